"""Fused BitNet decoder layers (torch_bitnet.fuse) against transformers' own layer forward.

The fused forward must compute exactly what transformers' BitNetDecoderLayer computes over
the same modules, except the RMSNorm's variance, which the fused ops sum in float64
(torch_bitnet.reference.rms_norm). So the unfused model here runs with its norm modules
switched to reference.rms_norm, and the two must agree bit for bit: logits of whole forward
passes, greedy tokens of eager and compiled generation, on the int8 and float KV caches.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from test_ops import assert_bitwise_equal
from transformers import AutoModelForCausalLM

import torch_bitnet
from torch_bitnet import checkpoints, reference
from torch_bitnet.fuse import fuse_layers, is_fused, unfusable_reason
from torch_bitnet.loading import from_pretrained, save_pretrained

CONFIGS = list(checkpoints.SMALL_CONFIGS)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    return {name: checkpoints.write_checkpoint(root / name, checkpoints.small_config(name), seed=5) for name in CONFIGS}


def _reference_norms(model):
    """Run the RMSNorms of ``model``'s decoder layers with the fused ops' norm (the final norm
    before the lm_head is not part of a layer: it stays transformers' in both models)."""
    for module in model.model.layers.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(lambda self, x: reference.rms_norm(x, self.weight, self.variance_epsilon), module)
    return model


def _ids(vocab, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 256, (batch, length), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_forward_equals_layer_forward(paths, name, dtype):
    unfused = _reference_norms(from_pretrained(paths[name], dtype=dtype, fuse=False))
    fused = from_pretrained(paths[name], dtype=dtype)
    assert all(is_fused(layer) for layer in fused.model.layers)
    assert not any(is_fused(layer) for layer in unfused.model.layers)
    ids = _ids(fused.config.vocab_size, 2, 23)
    with torch.inference_mode():
        assert_bitwise_equal(fused(ids).logits, unfused(ids).logits)
        # a padded batch: left padding through the attention mask
        mask = torch.ones_like(ids)
        mask[1, :7] = 0
        assert_bitwise_equal(fused(ids, attention_mask=mask).logits, unfused(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("kv", ["int8", "fp32"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fused_generation_equals_layer_forward(paths, compile, kv):
    """Prefill + decode through the cache (torch_bitnet.generate, eager and compiled) and
    transformers' model.generate: the same tokens and prefill logits, fused or not."""
    from transformers import AutoTokenizer

    path = paths["gqa"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    unfused = _reference_norms(from_pretrained(path, dtype=torch.float32, fuse=False, kv_cache_dtype=kv))
    fused = from_pretrained(path, dtype=torch.float32, kv_cache_dtype=kv)
    prompt = "Fused layers must not change a single token."
    runs = [
        torch_bitnet.generate(m, tokenizer, prompt, 24, compile=compile, max_seq_len=64)
        for m in (fused, unfused)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert len(runs[0].token_ids) == 24
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        hf = [m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False) for m in (fused, unfused)]
    assert torch.equal(hf[0], hf[1])


def test_state_dict_and_round_trip_unchanged(paths, tmp_path):
    unfused = from_pretrained(paths["odd"], fuse=False)
    fused = from_pretrained(paths["odd"])
    assert list(fused.state_dict()) == list(unfused.state_dict())
    saved = save_pretrained(fused, tmp_path / "saved")
    again = from_pretrained(saved)
    assert all(is_fused(layer) for layer in again.model.layers)
    ids = _ids(fused.config.vocab_size, 1, 17)
    with torch.inference_mode():
        assert_bitwise_equal(again(ids).logits, fused(ids).logits)


def test_fuse_layers_is_idempotent_and_optional(paths):
    model = from_pretrained(paths["tiny"], fuse=False)
    n = len(model.model.layers)
    assert fuse_layers(model) == n
    assert fuse_layers(model) == n
    assert all(is_fused(layer) for layer in model.model.layers)


def test_patch_fuses_transformers_models(paths):
    for fuse in (True, False):
        model = AutoModelForCausalLM.from_pretrained(paths["gqa"], dtype=torch.bfloat16).eval()
        torch_bitnet.patch(model, fuse=fuse)
        assert all(is_fused(layer) == fuse for layer in model.model.layers)


def test_unfusable_layers_are_left_alone(paths, caplog):
    model = from_pretrained(paths["gqa"], fuse=False)
    layer = model.model.layers[1]
    layer.mlp.ffn_sub_norm.weight = torch.nn.Parameter(layer.mlp.ffn_sub_norm.weight.float(), requires_grad=False)
    assert "RMSNorm weights are not all torch.bfloat16" in unfusable_reason(layer, torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="torch_bitnet"):
        assert fuse_layers(model) == len(model.model.layers) - 1
    assert "not fusing model.layers.1" in caplog.text
    assert is_fused(model.model.layers[0]) and not is_fused(layer)

    silu = checkpoints.write_checkpoint(paths["gqa"].parent / "silu", checkpoints.small_config("gqa", hidden_act="silu"))
    model = from_pretrained(silu)
    assert not any(is_fused(layer) for layer in model.model.layers)
    assert "not relu2" in unfusable_reason(model.model.layers[0], torch.bfloat16)
