"""Quantization-aware training: the STE layer, QAT through replace_linear, packing, export.

What is exact and what is not:

* ``bitlinear_ste``'s forward is the ops' arithmetic: equal bit for bit to
  ``reference.bitlinear`` and to the C++ op on every SIMD path (the integer products are
  exact float32 sums; the rescale is the same float32 expression).
* Its gradients are the STE definition written with ``detach`` (``F.linear`` of
  ``x + (x_dq - x).detach()`` and ``W + (W_dq - W).detach()``), and transformers' online
  ``AutoBitLinear`` (its own ActQuant / WeightQuant STE). Those compute the dequantized
  operands with other roundings (``w + (w_dq - w)`` is ``w_dq`` only up to one float32
  rounding; transformers divides by ``1 / mean`` instead of multiplying by ``mean``), so
  gradients agree to float32 rounding: relative error <= 1e-5 of the gradient's norm.
* A trained model packed (``to_packed``) or exported in float32 and loaded back gives the same
  logits bit for bit as its training forward (eval mode).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_bitnet
from torch_bitnet import reference
from torch_bitnet.checkpoints import small_config, write_tokenizer
from torch_bitnet.packing import pack_ternary, ternarize
from torch_bitnet.training import QATLinear, bitlinear_ste, export_checkpoint, perplexity, to_packed

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _operands(m: int, k: int, n: int, dtype: torch.dtype, seed: int, edge: str = "normal"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    if edge == "zero_row":
        x[0] = 0
    elif edge == "spike":
        x[:, 0] = 1e4  # one huge channel: every other value quantizes to 0 or +-1
    w = torch.randn(n, k, generator=g) * 0.02
    if edge == "zero_weight":
        w.zero_()  # mean|W| clamps to 1e-5
    bias = torch.randn(n, generator=g)
    return x.to(dtype), w, bias


def _ste_definition(x, w, bias=None):
    """BitNet's STE written the usual way, with detach (the definition the layer must follow)."""
    xq, a = reference.quantize_act(x.float())
    wq, s = ternarize(w)
    x_ste = x + (xq.float() / a - x).detach()
    w_ste = w + (wq.float() * s - w).detach()
    return F.linear(x_ste, w_ste, bias)


@settings(max_examples=40)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 600),
    n=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    edge=st.sampled_from(["normal", "zero_row", "spike", "zero_weight"]),
    seed=st.integers(0, 2**16),
)
def test_forward_is_the_ops_arithmetic_bit_for_bit(isa, m, k, n, dtype, bias, edge, seed):
    x, w, b = _operands(m, k, n, dtype, seed, edge)
    b = b if bias else None
    y = bitlinear_ste(x, w, b)
    wq, scale = ternarize(w)
    packed = pack_ternary(wq)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.equal(y, reference.bitlinear(x, packed, scale, b, k, n))
    assert torch.equal(y, torch_bitnet.bitlinear(x, packed, scale, b, k, n))


def test_forward_keeps_leading_dimensions():
    x, w, _ = _operands(6, 40, 12, torch.float32, 0)
    y = bitlinear_ste(x.view(2, 3, 40), w)
    assert y.shape == (2, 3, 12) and torch.equal(y.view(6, 12), bitlinear_ste(x, w))


def test_wide_inputs_stay_exact():
    """K beyond float32's exact range for the integer sum (128 K >= 2^24) goes through float64."""
    k = 140_000
    g = torch.Generator().manual_seed(1)
    x = torch.full((1, k), 127.0)  # every product +-127: the float32 sum would round
    w = torch.randint(-1, 2, (3, k), generator=g).float()
    w[0] = 1.0  # row 0 sums 140000 products of 127: beyond 2^24
    wq, scale = ternarize(w)
    _, a = reference.quantize_act(x)
    acc = x.to(torch.int64) @ wq.to(torch.int64).t()  # exact, then rounded once as the ops do
    assert acc.abs().max() >= 2**24
    assert torch.equal(bitlinear_ste(x, w), acc.float() * (scale.reshape(()) / a))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 16, 8), (7, 300, 33), (4, 1, 3)])
def test_gradients_are_the_ste_definition(shape, bias):
    m, k, n = shape
    x, w, b = _operands(m, k, n, torch.float32, 3)
    b = b if bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w, *([b] if bias else []))]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, *([b] if bias else []))]
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(5))
    bitlinear_ste(*leaves).backward(g)
    _ste_definition(*ref_leaves).backward(g)
    for ours, theirs in zip(leaves, ref_leaves):
        err = (ours.grad - theirs.grad).norm() / theirs.grad.norm().clamp(min=1e-30)
        assert err <= 1e-5, float(err)


def test_gradients_match_transformers_online_autobitlinear():
    """transformers' own trainable BitNet layer (ActQuant / WeightQuant with STE backward)."""
    from transformers.integrations.bitnet import AutoBitLinear

    x, w, b = _operands(5, 96, 24, torch.float32, 11)
    hf = AutoBitLinear(96, 24, bias=True, online_quant=True)
    with torch.no_grad():
        hf.weight.copy_(w)
        hf.bias.copy_(b)
    ours = QATLinear(96, 24, bias=True)
    with torch.no_grad():
        ours.weight.copy_(w)
        ours.bias.copy_(b)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    ya, yb = ours(xa), hf(xb)
    # Forwards differ by float32 rounding only (transformers dequantizes before its matmul).
    assert torch.allclose(ya, yb, rtol=1e-5, atol=1e-5 * float(yb.detach().abs().max()))
    ya.backward(g)
    yb.backward(g)
    for p, q in ((xa.grad, xb.grad), (ours.weight.grad, hf.weight.grad), (ours.bias.grad, hf.bias.grad)):
        assert (p - q).norm() <= 1e-5 * q.norm()


def test_jacobians_are_the_dequantized_operands():
    """With STE the layer is linear in each operand: d y / d x = W_dq, d y[m, n] / d W[n] = x_dq[m]."""
    x, w, _ = _operands(3, 20, 5, torch.float32, 4)
    xq, a = reference.quantize_act(x)
    wq, s = ternarize(w)
    jx = torch.autograd.functional.jacobian(lambda t: bitlinear_ste(t, w), x)  # (3, 5, 3, 20)
    for m in range(3):
        assert torch.equal(jx[m, :, m], wq.float() * s)
    jw = torch.autograd.functional.jacobian(lambda t: bitlinear_ste(x, t), w)  # (3, 5, 5, 20)
    for n in range(5):
        assert torch.equal(jw[:, n, n], xq.float() / a)


def test_gradcheck_of_the_bias():
    """The only operand the layer is differentiable in without an estimator.

    The layer computes in float32 whatever the input dtype, so finite differences in float64
    see float32 rounding: eps 1e-2 and a 1e-3 tolerance (the derivative is exactly 1).
    """
    x, w, b = _operands(4, 64, 6, torch.float64, 8)
    bias = b.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bitlinear_ste(x, w, t), (bias,), eps=1e-2, atol=1e-3, rtol=1e-3)


def test_compiled_fullgraph_training_step_matches_eager():
    layer = QATLinear(128, 64, bias=True)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))

    def loss_fn(inp):
        return layer(inp).square().mean()

    eager = loss_fn(x)
    eager.backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(loss_fn, fullgraph=True)(x)  # forward and backward graphs
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    for p, ref in zip(layer.parameters(), grads):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_packed_gives_the_training_output_bit_for_bit(dtype):
    layer = QATLinear(300, 20, bias=True)
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(1)).to(dtype)
    packed = layer.to_packed()
    assert isinstance(packed, torch_bitnet.BitLinear)
    with torch.no_grad():
        assert torch.equal(packed(x), layer(x))


def test_bad_inputs_are_clear_errors():
    w = torch.randn(4, 8)
    with pytest.raises(TypeError, match="floating-point input"):
        bitlinear_ste(torch.ones(2, 8, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="in_features = 8"):
        bitlinear_ste(torch.randn(2, 7), w)
    with pytest.raises(ValueError, match="bias has shape"):
        bitlinear_ste(torch.randn(2, 8), w, torch.zeros(3))
    with pytest.raises(ValueError, match="no QATLinear"):
        to_packed(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="BitNetForCausalLM"):
        export_checkpoint(torch.nn.Linear(2, 2), "unused")
    with pytest.raises(ValueError, match="1-D integer"):
        perplexity(torch.nn.Identity(), torch.zeros(3, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(torch.nn.Identity(), torch.zeros(3, dtype=torch.long), 8)


# ------------------------------------------------------------------------------------------
# whole models
# ------------------------------------------------------------------------------------------


def _train(model, vocab: int, steps: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, min(vocab, 64), (4, 33), generator=g)  # a small fixed batch to memorise
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def test_replace_linear_qat_fine_tunes_another_architecture():
    """QAT fine-tuning of a Llama: parameters are kept (same objects), the loss falls, and the
    packed model's logits are the training forward's, bit for bit."""
    model = _llama()
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    torch_bitnet.replace_linear(model, qat=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QATLinear) and layer.weight is q_proj
    assert not isinstance(model.lm_head, QATLinear)  # skipped by default
    losses = _train(model, 256, 30)
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        to_packed(model)
        assert not any(isinstance(m, QATLinear) for m in model.modules())
        assert isinstance(model.model.layers[1].mlp.down_proj, torch_bitnet.BitLinear)
        assert torch.equal(model(input_ids=ids).logits, trained)


def _bitnet_qat():
    from transformers import BitNetForCausalLM

    torch.manual_seed(0)
    config = small_config("gqa", vocab_size=768)
    config.quantization_config = None
    model = BitNetForCausalLM(config).float()
    return torch_bitnet.replace_linear(model, qat=True)


@pytest.fixture(scope="module")
def trained_bitnet():
    model = _bitnet_qat()
    losses = _train(model, 768, 25)
    return model.eval(), losses


def test_bitnet_from_config_trains(trained_bitnet):
    model, losses = trained_bitnet
    assert sum(isinstance(m, QATLinear) for m in model.modules()) == 2 * 7
    assert losses[-1] < 0.7 * losses[0], losses


def test_export_in_float32_loads_back_bit_for_bit(trained_bitnet, tmp_path):
    """Exported with float32 tables and scales, the checkpoint is the trained model exactly."""
    model, _ = trained_bitnet
    path = export_checkpoint(model, tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(4))
    loaded = torch_bitnet.from_pretrained(path, dtype=torch.float32, lm_head="bf16", fuse=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_export_is_the_2b4t_format_transformers_loads(trained_bitnet, tmp_path):
    """bf16 export: uint8 (out/4, in) weights, (1,) bf16 scales, no lm_head; transformers' own
    model and torch_bitnet's give the training forward's greedy tokens."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, _ = trained_bitnet
    write_tokenizer(tmp_path / "tok", vocab_size=768)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    path = export_checkpoint(model, tmp_path / "ckpt", tokenizer)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"
    }
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        w = f.get_tensor("model.layers.1.mlp.gate_proj.weight")
        assert w.dtype == torch.uint8 and tuple(w.shape) == (688 // 4, 256)
        scale = f.get_tensor("model.layers.1.mlp.gate_proj.weight_scale")
        assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (1,)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()

    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for tensor in [*hf.parameters(), *hf.buffers()]:  # transformers keeps the offline layers in bf16
            if tensor.is_floating_point():
                tensor.data = tensor.data.float()
        theirs = hf(input_ids=ids).logits
        ours = torch_bitnet.from_pretrained(path, dtype=torch.float32, lm_head="bf16")(input_ids=ids).logits
    # bf16 rounding of the tables, norms and scales: a few per cent of the logits' spread.
    for got in (theirs, ours):
        assert (got - want).norm() <= 0.05 * want.norm()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_perplexity_is_exp_of_the_mean_cross_entropy(trained_bitnet):
    model, _ = trained_bitnet
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(7))
    got = perplexity(model, ids, 16, batch_size=3)  # 4 windows of 16; the last 6 tokens dropped
    windows = ids[:64].view(4, 16)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    want = math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))))
    # Batches of 3 and 1 windows vs one of 4: the float32 matmuls block differently, which
    # moves logits in their last bits (and may move an activation across an int8 rounding
    # boundary): 1e-4 relative.
    assert got == pytest.approx(want, rel=1e-4)
    assert perplexity(model, ids, 16, batch_size=4) == pytest.approx(want, rel=1e-6)


def test_tokenizer_trained_on_given_texts(tmp_path):
    from transformers import AutoTokenizer

    texts = ["And the LORD spake unto Moses, saying,\n"] * 50
    write_tokenizer(tmp_path, vocab_size=1024, texts=texts)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("And the LORD spake unto Moses", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 6  # whole words are single tokens after training on them
    assert tok.decode(ids) == "And the LORD spake unto Moses"


def test_qat_fine_tunes_a_bf16_master_checkpoint(tmp_path):
    """A -bf16 master checkpoint loaded by transformers (online AutoBitLinear) fine-tunes in
    place: its layers become QATLinear with the same parameters and the same forward, and the
    packed model gives the trained forward bit for bit."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear

    from torch_bitnet.checkpoints import write_checkpoint

    path = write_checkpoint(tmp_path / "online", small_config("tiny"), mode="online", seed=3, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    master = model.model.layers[0].mlp.up_proj.weight
    torch_bitnet.replace_linear(model, qat=True)
    assert not any(isinstance(m, AutoBitLinear) for m in model.modules())
    assert model.model.layers[0].mlp.up_proj.weight is master
    with torch.no_grad():
        # transformers dequantizes before its matmul: float32 rounding apart
        assert (model(input_ids=ids).logits - before).norm() <= 1e-4 * before.norm()
    losses = _train(model, 768, 15)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        to_packed(model)
        assert torch.equal(model(input_ids=ids).logits, trained)
