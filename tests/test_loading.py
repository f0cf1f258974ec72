"""from_pretrained / save_pretrained / convert_checkpoint, and whole-model fidelity to transformers.

Checkpoints are written by torch_bitnet.checkpoints in the exact on-disk formats transformers
reads (2B-4T offline, -bf16 online, BitLinear), at three small shapes.

Tolerance against transformers' own model (fp32): every layer's integer product is exact on
both sides, but transformers dequantizes before its float matmul, so hidden states differ in
the last float32 bits; occasionally such a difference moves an activation across an int8
rounding boundary in a later layer ("a bin flip"), which changes that value by one
quantization step. The float summation order of transformers' matmuls depends on the CPU, and
so do the flips. Measured on these models, per position: relative L2 error of the logits 1e-7
to 2e-6 without a flip (AMD Zen 3 and Zen 4, an Intel Xeon with AMX); a flip hits single
positions (a flip in a position's MLP stays in that position), up to 0.2 there (one of 40
positions of a prompt on the Xeon; over the whole prompt 2.7e-2); top-1 tokens always equal. The
tests require every position below 0.3, at most one position in eight (and at least one is
allowed) above 1e-5, equal top-1 tokens, and identical greedy continuations.
"""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import torch_bitnet
from torch_bitnet import BitLinear
from torch_bitnet.checkpoints import SMALL_CONFIGS, small_config, write_checkpoint
from torch_bitnet.loading import ALIGNMENT, PACKED_FILE, packed_file_aligned

MODES = ("offline", "online", "bitlinear")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(config name, mode) -> checkpoint directory, written once for the module."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in SMALL_CONFIGS:
        for mode in MODES:
            out[name, mode] = write_checkpoint(root / f"{name}-{mode}", small_config(name), mode=mode, seed=7)
    return out


def _transformers_fp32(path):
    """transformers' own model for the checkpoint, with every float tensor in float32."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.float()
    return model.eval()


def _prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab - 256, (1, n), generator=g) for n in (1, 9, 40)]


def _greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation recomputing the whole sequence each step (no cache: model-independent)."""
    for _ in range(steps):
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
@pytest.mark.parametrize("mode", MODES)
def test_logits_match_transformers(checkpoints, name, mode):
    path = checkpoints[name, mode]
    # the float lm_head: transformers' own (the int8 one is measured in test_int8_head.py), and
    # transformers' layer forward (the fused one rounds its norms once more: test_fuse.py)
    ours = torch_bitnet.from_pretrained(path, dtype=torch.float32, lm_head="bf16", fuse=False)
    theirs = _transformers_fp32(path)
    for ids in _prompts(ours.config.vocab_size):
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            got, expected = ours(ids).logits, theirs(ids).logits
        per_position = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).flatten()
        flipped = int((per_position > 1e-5).sum())
        assert flipped <= max(1, per_position.numel() // 8), f"{flipped} positions off: {per_position.tolist()}"
        assert per_position.max().item() < 0.3, f"relative logit error {per_position.max().item():.2e}"
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_greedy_continuation_matches_transformers(checkpoints, name):
    path = checkpoints[name, "offline"]
    ours = torch_bitnet.from_pretrained(path, dtype=torch.float32, lm_head="bf16", fuse=False)
    theirs = _transformers_fp32(path)
    ids = _prompts(ours.config.vocab_size)[1]
    assert torch.equal(_greedy(ours, ids, 32), _greedy(theirs, ids, 32))


@pytest.mark.parametrize("mode", MODES)
def test_from_pretrained_equals_patch_of_transformers(checkpoints, mode):
    path = checkpoints["gqa", mode]
    ours = torch_bitnet.from_pretrained(path, dtype=torch.float32)
    patched = torch_bitnet.patch(_transformers_fp32(path))  # both quantize the embedding / lm_head alike
    assert sum(isinstance(m, BitLinear) for m in ours.modules()) == 2 * 7
    ids = _prompts(ours.config.vocab_size)[2]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, patched(ids).logits)


@pytest.mark.parametrize("lm_head", ["int8", "bf16"])
def test_bf16_model_loads_and_runs(checkpoints, lm_head):
    path = checkpoints["tiny", "offline"]
    model = torch_bitnet.from_pretrained(path, lm_head=lm_head)
    # generation_config.json is read (its eos list includes <|eot_id|>)
    assert model.generation_config.eos_token_id == json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    embedding = model.get_input_embeddings()
    if lm_head == "int8":  # one int8 table for the tied embedding and lm_head, bf16 vectors out
        assert isinstance(embedding, torch_bitnet.Int8Embedding) and embedding.output_dtype == torch.bfloat16
        assert model.lm_head.weight.data_ptr() == embedding.weight.data_ptr()
    else:
        assert embedding.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(_prompts(model.config.vocab_size)[1]).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_compiled_forward_matches_eager(checkpoints):
    # float lm_head: with the int8 one a last-bit change of the final hidden state can move an
    # activation across an int8 rounding boundary, beyond this tolerance (test_int8_head.py
    # tests the int8 op under torch.compile)
    model = torch_bitnet.from_pretrained(checkpoints["odd", "offline"], dtype=torch.float32, lm_head="bf16")
    ids = _prompts(model.config.vocab_size)[2]
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    # Inductor fuses the float ops around the BitLinear ops differently (norms, RoPE,
    # softmax): last-bit differences, hence the same tolerance as against transformers.
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))


@pytest.mark.parametrize("mode", MODES)
def test_save_then_load_round_trips_exactly(checkpoints, tmp_path, mode):
    model = torch_bitnet.from_pretrained(checkpoints["odd", mode], dtype=torch.float32)
    saved = torch_bitnet.save_pretrained(model, tmp_path / "saved")
    assert (saved / PACKED_FILE).is_file()
    again = torch_bitnet.from_pretrained(saved, dtype=torch.float32)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1
    ids = _prompts(model.config.vocab_size)[1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def _kernel_inputs(model) -> list[torch.Tensor]:
    """The uint8 buffers the kernels stream: packed ternary weights, int8 / int4 tables."""
    return [b for b in model.buffers() if b.dtype == torch.uint8]


@pytest.mark.parametrize("lm_head,ternary_format", [("int8", "2bit"), ("int4", "5trit")])
def test_saved_weights_are_64_byte_aligned(checkpoints, tmp_path, lm_head, ternary_format):
    """save_pretrained's file puts the data and every uint8 tensor at a multiple of 64 bytes, so
    the memory-mapped weights the kernels stream start on cache lines; safetensors' own reader
    reads the file back exactly, and loading it warns about nothing."""
    from safetensors.torch import load_file

    model = torch_bitnet.from_pretrained(checkpoints["odd", "offline"], dtype=torch.float32, lm_head=lm_head,
                                         ternary_format=ternary_format)
    saved = torch_bitnet.save_pretrained(model, tmp_path / "saved")
    raw = (saved / PACKED_FILE).read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    start = 8 + length
    assert start % ALIGNMENT == 0
    packed = {k: v for k, v in header.items() if k != "__metadata__" and v["dtype"] == "U8"}
    assert len(packed) == len(_kernel_inputs(model))
    assert all((start + v["data_offsets"][0]) % ALIGNMENT == 0 for v in packed.values()), packed
    assert packed_file_aligned(saved)
    state = model.state_dict()
    read = load_file(saved / PACKED_FILE)
    assert read.keys() <= state.keys() and all(torch.equal(t, state[k]) for k, t in read.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = torch_bitnet.from_pretrained(saved, dtype=torch.float32, lm_head=lm_head)
    assert all(b.data_ptr() % ALIGNMENT == 0 for b in _kernel_inputs(again))


def test_save_over_the_checkpoint_the_model_was_loaded_from(checkpoints, tmp_path, monkeypatch):
    """The model's weights are memory-mapped from the file save_pretrained replaces (here they
    stay in the map: no place_weights): the new file is written beside it and renamed, so the
    weights read while writing stay intact (the way to align an old file, as the warning says)."""
    from safetensors.torch import save_file

    monkeypatch.setenv("TORCH_BITNET_HUGE_PAGES", "0")
    model = torch_bitnet.from_pretrained(checkpoints["odd", "offline"], dtype=torch.float32, lm_head="int8")
    first = torch_bitnet.save_pretrained(model, tmp_path / "saved")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
               and k != "lm_head.weight_scale"}, first / PACKED_FILE, metadata={"format": "pt", "torch_bitnet": "1"})
    with pytest.warns(UserWarning, match="not multiples of 64 bytes"):
        mapped = torch_bitnet.from_pretrained(first, dtype=torch.float32, lm_head="int8")
    torch_bitnet.save_pretrained(mapped, first)
    assert packed_file_aligned(first)
    again = torch_bitnet.from_pretrained(first, dtype=torch.float32, lm_head="int8")
    ids = _prompts(model.config.vocab_size)[1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
        assert torch.equal(model(ids).logits, mapped(ids).logits)
    assert not list(first.glob(".*.tmp"))


def test_aligned_writer_rejects_dtypes_safetensors_cannot_name(tmp_path):
    from torch_bitnet.loading import _save_aligned

    with pytest.raises(TypeError, match="cannot store tensor 'z' of dtype torch.complex64"):
        _save_aligned({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors", {})


def test_unaligned_checkpoint_loads_with_a_warning(checkpoints, tmp_path, monkeypatch):
    """A file written the old way (safetensors' save_file: tensors ordered by dtype, header padded
    to 8 bytes) still loads, to the same model, with a warning that says how to align it (where
    the weights stay in the file's memory map: place_weights would copy them to aligned places)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("TORCH_BITNET_HUGE_PAGES", "0")
    model = torch_bitnet.from_pretrained(checkpoints["odd", "offline"], dtype=torch.float32, lm_head="int8")
    saved = torch_bitnet.save_pretrained(model, tmp_path / "saved")
    with safe_open(str(saved / PACKED_FILE), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(saved / PACKED_FILE), saved / PACKED_FILE, metadata=metadata)
    assert not packed_file_aligned(saved)
    with pytest.warns(UserWarning, match="not multiples of 64 bytes.*save_pretrained"):
        again = torch_bitnet.from_pretrained(saved, dtype=torch.float32, lm_head="int8")
    assert any(b.data_ptr() % ALIGNMENT for b in _kernel_inputs(again))  # the case this test is about
    ids = _prompts(model.config.vocab_size)[1]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_lm_head_forms_save_load_and_convert(checkpoints, tmp_path):
    """int8 and bf16 embedding / lm_head tables survive save -> load; a bf16 table can be loaded
    as int8 (quantized at load, equal to quantizing the original); an int8 one cannot be loaded
    as bf16 (clear error); patch() quantizes exactly as from_pretrained."""
    src = checkpoints["odd", "offline"]
    ids = _prompts(1000)[1]
    models = {head: torch_bitnet.from_pretrained(src, dtype=torch.float32, lm_head=head) for head in ("int8", "bf16")}
    with torch.no_grad():
        for head, model in models.items():
            saved = torch_bitnet.save_pretrained(model, tmp_path / head)
            assert json.loads((saved / "config.json").read_text())["torch_bitnet"]["lm_head"] == head
            again = torch_bitnet.from_pretrained(saved, dtype=torch.float32, lm_head=head)
            assert torch.equal(model(ids).logits, again(ids).logits)
        requantized = torch_bitnet.from_pretrained(tmp_path / "bf16", dtype=torch.float32, lm_head="int8")
        assert torch.equal(requantized(ids).logits, models["int8"](ids).logits)
        patched = torch_bitnet.patch(_transformers_fp32(src))
        assert isinstance(patched.lm_head, torch_bitnet.Int8Linear)
        assert torch.equal(patched(ids).logits, models["int8"](ids).logits)
    with pytest.raises(ValueError, match="stores an int8 embedding"):
        torch_bitnet.from_pretrained(tmp_path / "int8", lm_head="bf16")
    with pytest.raises(ValueError, match="lm_head must be one of"):
        torch_bitnet.from_pretrained(src, lm_head="int2")
    converted = torch_bitnet.convert_checkpoint(src, tmp_path / "conv", dtype=torch.float32, lm_head="int8",
                                                progress=False)
    assert (converted / PACKED_FILE).stat().st_size < (tmp_path / "bf16" / PACKED_FILE).stat().st_size


def test_convert_online_checkpoint_to_packed(checkpoints, tmp_path):
    src = checkpoints["gqa", "online"]
    dst = torch_bitnet.convert_checkpoint(src, tmp_path / "packed", dtype=torch.float32, progress=False)
    assert (dst / "tokenizer.json").is_file() and (dst / PACKED_FILE).is_file()
    a = torch_bitnet.from_pretrained(src, dtype=torch.float32)
    b = torch_bitnet.from_pretrained(dst, dtype=torch.float32)
    ids = _prompts(a.config.vocab_size)[1]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # the packed form is much smaller than the float masters
    packed_bytes = (dst / PACKED_FILE).stat().st_size
    master_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert packed_bytes < master_bytes


# ---- errors: each names the file or tensor at fault ----


def test_missing_directory_or_uncached_hub_id():
    with pytest.raises(FileNotFoundError, match="neither a directory nor a model in the local Hugging Face cache"):
        torch_bitnet.from_pretrained("someone/no-such-bitnet-model")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        torch_bitnet.from_pretrained(tmp_path)


def _copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_wrong_model_type(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["tiny", "offline"], tmp_path / "c")
    raw = json.loads((path / "config.json").read_text())
    raw["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        torch_bitnet.from_pretrained(path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        torch_bitnet.from_pretrained(tmp_path)


def test_missing_weights_file(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["tiny", "offline"], tmp_path / "c")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        torch_bitnet.from_pretrained(path)


def test_tensor_of_wrong_shape_or_missing(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy_checkpoint(checkpoints["tiny", "offline"], tmp_path / "c")
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{key}' in model.safetensors has shape"):
        torch_bitnet.from_pretrained(path)
    del tensors[key]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"no tensor '{key}'"):
        torch_bitnet.from_pretrained(path)


def test_corrupt_safetensors(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["tiny", "offline"], tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        torch_bitnet.from_pretrained(path)


def test_save_requires_a_patched_bitnet_model(checkpoints, tmp_path):
    model = _transformers_fp32(checkpoints["tiny", "offline"])
    with pytest.raises(ValueError, match="patch the model first"):
        torch_bitnet.save_pretrained(model, tmp_path / "x")
