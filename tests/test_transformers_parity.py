"""bitnet::bitlinear against transformers' own BitNet layers (transformers.integrations.bitnet).

Both transformers classes are filled with the same ternary weight W and scale ws:

* ``BitLinear`` (packed uint8 buffer, *divides*): y = F.linear(xq, W) / (ws * a) + b
  -> our op with scale = 1 / ws;
* ``AutoBitLinear`` offline (float weight, *multiplies*): y = F.linear(xq / a, W, b) * ws
  -> our op with scale = ws. Note that transformers multiplies the bias by ws too, so the
  equivalent bias for our op is b * ws.

transformers decorates its helpers with @torch.compile (about 20 s of inductor compilation
per function and shape on this machine). The parity tests run them with
``torch.compiler.set_stance("force_eager")``, i.e. the same Python code without compilation;
one slow test checks that the compiled activation quantizer gives the same bits.
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations import bitnet as hf

import torch_bitnet
from torch_bitnet import pack_ternary, to_hf_packed

U = 2.0**-24  # unit roundoff of float32

SHAPES = [(2560, 640), (256, 688), (1000, 256)]  # (in_features, out_features), out % 4 == 0
BATCHES = [1, 7, 64]


@pytest.fixture
def eager_transformers():
    """Run transformers' @torch.compile'd helpers as plain Python (see module docstring)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def make_case(k: int, n: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    # Rows at very different magnitudes (per-token scales a differ by 10^6), one all-zero row.
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m).unsqueeze(1)
    if m > 2:
        x[1] = 0.0
    ws = torch.rand((1,), generator=g) * 0.05 + 0.005  # about mean|W| of a real checkpoint
    b = torch.randn(n, generator=g)
    return x, w, ws, b


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """|actual - expected| <= bound element-wise (bound computed in float64)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert bool(torch.isfinite(actual).all()) and bool(torch.isfinite(expected).all())
    err = (actual.double() - expected.double()).abs()
    ratio = err / bound
    worst = int(ratio.argmax())
    assert bool((err <= bound).all()), (
        f"{int((err > bound).sum())} elements exceed the bound; worst: |{actual.flatten()[worst].item()!r} - "
        f"{expected.flatten()[worst].item()!r}| = {err.flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g}"
    )


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_bitlinear_class_parity(eager_transformers, k, n, m, with_bias):
    """transformers' BitLinear (divides by weight_scale) vs our op with scale = 1 / ws.

    Tolerance: the integer product is exact on both sides (F.linear of integer-valued float32
    with |partial sums| <= 127 K < 2^24 is exact in any order). transformers then computes
    acc / fl(ws * a) (2 roundings), we compute acc * fl(fl(1 / ws) / a) (3 roundings), and each
    side rounds once more when adding the bias: |ours - theirs| <= 8u (|acc| / (a ws) + |b|),
    u = 2^-24, per element.
    """
    x, w, ws, b = make_case(k, n, m, seed=k + n + m)
    layer = hf.BitLinear(k, n, bias=with_bias, dtype=torch.float32)
    layer.weight.copy_(to_hf_packed(w))
    layer.weight_scale.copy_(ws)
    if with_bias:
        layer.bias.copy_(b)
    with torch.no_grad():
        theirs = layer(x)

    bias = b if with_bias else None
    inv_ws = (1.0 / ws).to(torch.float32)
    ours = torch_bitnet.bitlinear(x, pack_ternary(w), inv_ws, bias, k, n)

    xq, a = torch_bitnet.quantize_act(x)
    acc = xq.double() @ w.double().t()
    bound = 8 * U * (acc.abs() / (a.double() * ws.double()) + (b.double().abs() if with_bias else 0.0))
    assert_within(ours, theirs, bound)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_autobitlinear_class_parity(eager_transformers, k, n, m, with_bias):
    """transformers' AutoBitLinear, offline mode (multiplies by weight_scale), vs scale = ws.

    Tolerance: transformers dequantizes first (xd = fl(xq / a), 1 rounding each) and sums K
    float32 products in an order chosen by the BLAS: the classic bound for a float sum of K
    terms is (K - 1) u * sum |terms|; the bias adds one term and the final * ws one rounding.
    We round 3 times (ws / a, acc * factor, + b*ws) plus once for b * ws. So per element
    |ours - theirs| <= (K + 8) u ws (sum_i |xq_i| |w_i| / a + |b|), u = 2^-24.
    """
    x, w, ws, b = make_case(k, n, m, seed=10 * k + n + m)
    layer = hf.AutoBitLinear(k, n, bias=with_bias, dtype=torch.float32, online_quant=False)
    with torch.no_grad():
        layer.weight.copy_(w.float())
        layer.weight_scale.copy_(ws)
        if with_bias:
            layer.bias.copy_(b)
        theirs = layer(x)

    # transformers scales the bias by weight_scale as well: (x W^T + b) * ws.
    bias = (b * ws).to(torch.float32) if with_bias else None
    ours = torch_bitnet.bitlinear(x, pack_ternary(w), ws, bias, k, n)

    xq, a = torch_bitnet.quantize_act(x)
    s = xq.double().abs() @ w.double().abs().t() / a.double()
    bound = (k + 8) * U * ws.double() * (s + (b.double().abs() if with_bias else 0.0))
    assert_within(ours, theirs, bound)


def _activation_rows(m: int, k: int, seed: int) -> torch.Tensor:
    """Finite fp32 rows of many kinds: ordinary, all zero, below the 1e-5 clamp, huge, ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-12, 30, m).unsqueeze(1)
    x[0] = 0.0
    # amax = 127 -> a = 1 exactly; the other values sit on exact .5 ties.
    x[1] = torch.randint(-127, 127, (k,), generator=g).float() + 0.5
    x[1, 0] = 127.0
    x[2] = torch.full((k,), -3.0)
    return x


@pytest.mark.parametrize("k", [1, 255, 256, 300, 2560])
def test_activation_quant_matches_bitlinear(eager_transformers, k):
    """BitLinear.activation_quant returns (xq int8, a): ours must be identical for fp32 input.

    (Rows with NaN/Inf are left out: transformers has no special case there, its int8 cast of
    NaN is unspecified; ours returns xq = 0, a = NaN by design.)
    """
    x = _activation_rows(24, k, seed=k)
    layer = hf.BitLinear(k, 4, bias=False, dtype=torch.float32)
    result, scale = layer.activation_quant(x)
    xq, a = torch_bitnet.quantize_act(x)
    assert torch.equal(xq, result)
    assert torch.equal(a, scale)
    # 3-D input as the models pass it (batch, seq, hidden).
    result3, scale3 = layer.activation_quant(x.view(2, 12, k))
    xq3, a3 = torch_bitnet.quantize_act(x.view(2, 12, k))
    assert torch.equal(xq3, result3) and torch.equal(a3, scale3)


@pytest.mark.parametrize("k", [1, 300, 2560])
def test_activation_quant_matches_actquant(eager_transformers, k):
    """AutoBitLinear's ActQuant returns the dequantized x = xq / a (fp32): same bits from ours."""
    x = _activation_rows(24, k, seed=k + 1)
    theirs = hf.ActQuant.apply(x)
    xq, a = torch_bitnet.quantize_act(x)
    assert torch.equal(xq.float() / a, theirs)


@pytest.mark.slow
def test_activation_quant_matches_compiled_transformers():
    """Without force_eager: transformers' activation_quant as users run it, compiled by inductor.

    Inductor generates its own C++ for 127 / amax, rounding and clamping; it must still agree
    bit for bit with ours (slow: about 20 s of compilation on this machine).
    """
    torch._dynamo.reset()
    try:
        x = _activation_rows(24, 300, seed=3)
        layer = hf.BitLinear(300, 4, bias=False, dtype=torch.float32)
        result, scale = layer.activation_quant(x)
        xq, a = torch_bitnet.quantize_act(x)
        assert torch.equal(xq, result)
        assert torch.equal(a, scale)
    finally:
        torch._dynamo.reset()
