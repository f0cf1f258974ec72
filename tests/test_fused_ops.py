"""The fused BitNet ops: bitlinear with its input's RMSNorm, bitlinear_shared (q/k/v) and
bitlinear_relu2_glu (gate/up + squared-ReLU gating).

Tolerance: none against torch_bitnet.reference (every ISA path): the norm sums its squares in
float64 and rounds the variance once to float32, which makes the result independent of the
summation order; every later step is the same float32 operation in kernels and reference.
Against transformers' own modules (float32 sum of squares) the normalised values may differ by
one float32 ulp of the variance: see test_rms_norm_matches_transformers for the bound.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_ops import ROW_KIND, SEEDS, W_MODES, assert_bitwise_equal, make_x, random_ternary

import torch_bitnet
from torch_bitnet import reference
from torch_bitnet.packing import pack_ternary, padded_in_features

from _error_cases import error_tests

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BL = torch.ops.bitnet.bitlinear.default
SHARED = torch.ops.bitnet.bitlinear_shared.default
GLU = torch.ops.bitnet.bitlinear_relu2_glu.default
MAC_BUDGET = 4_000_000


def _weights(ns, k, seed, mode="random"):
    g = torch.Generator().manual_seed(seed)
    packed = [pack_ternary(random_ternary(n, k, g, mode)) for n in ns]
    scales = [torch.rand(1, generator=g) + 0.01 for _ in ns]
    return packed, scales


def _norm_weight(k, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(k, generator=g) * 2 - 0.5).to(dtype)  # some negative, some near zero


def _clip(n, m, k):
    return max(1, min(n, MAC_BUDGET // max(1, m * padded_in_features(k))))


LEADS = st.one_of(st.just(()), st.tuples(st.integers(0, 40)), st.tuples(st.integers(1, 3), st.integers(0, 9)))
K_ANY = st.one_of(st.sampled_from([1, 255, 256, 257, 1000, 2560]), st.integers(1, 1100))
EPS = st.sampled_from([0.0, 1e-6, 1e-5, 0.5])


# --------------------------------------------------------------------------------------
# RMSNorm semantics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rms_norm_matches_transformers(dtype):
    """reference.rms_norm == transformers' BitNetRMSNorm up to the variance's summation.

    The float64 mean of squares differs from transformers' float32 one by a few float32 ulps;
    h = x * rsqrt(var + eps) then moves by ~1e-7 relative, so after rounding to a 16-bit dtype
    the two agree except where h lies within 1e-7 of a rounding boundary: then h differs by one
    ulp of the dtype, and weight * h (weight in [0.5, 1.5]) by up to two after its own rounding.
    In float32 the variance's few ulps and the two roundings after it add up to a few ulps.
    Bounds: float32 within 4 ulps (relative 2^-21); bf16 / fp16 within 2 ulps (same-sign values:
    their bit patterns differ by at most 2), and at least 99% identical.
    """
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    g = torch.Generator().manual_seed(0)
    k = 2560
    norm = BitNetRMSNorm(k, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=g) + 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(64, k, generator=g) * 3).to(dtype)
    with torch.no_grad():
        expected = norm(x).float()
    actual = reference.rms_norm(x, norm.weight, 1e-5).float()
    if dtype == torch.float32:
        rel = ((actual - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
        assert rel <= 2.0**-21
    else:
        bits = lambda t: t.to(dtype).view(torch.int16).int()  # noqa: E731
        assert (bits(actual) - bits(expected)).abs().max().item() <= 2
        assert (actual == expected).float().mean().item() >= 0.99


# --------------------------------------------------------------------------------------
# Against the reference, bit for bit
# --------------------------------------------------------------------------------------


@given(lead=LEADS, k=K_ANY, n=st.integers(1, 300), dtype=st.sampled_from(FLOAT_DTYPES), eps=EPS,
       kinds=st.lists(ROW_KIND, min_size=1, max_size=4), wmode=W_MODES, seed=SEEDS)
def test_bitlinear_norm_matches_reference(isa, lead, k, n, dtype, eps, kinds, wmode, seed):
    m = math.prod(lead)
    n = _clip(n, m, k)
    x = make_x(lead, k, dtype, kinds, seed)
    (packed,), (scale,) = _weights([n], k, seed, wmode)
    weight = _norm_weight(k, dtype, seed)
    actual = torch_bitnet.bitlinear(x, packed, scale, None, k, n, weight, eps)
    assert_bitwise_equal(actual, reference.bitlinear(x, packed, scale, None, k, n, weight, eps))


@given(lead=LEADS, k=K_ANY, ns=st.lists(st.integers(1, 200), min_size=1, max_size=3),
       dtype=st.sampled_from(FLOAT_DTYPES), norm=st.booleans(), kinds=st.lists(ROW_KIND, min_size=1, max_size=4),
       seed=SEEDS)
def test_bitlinear_shared_matches_separate_calls(isa, lead, k, ns, dtype, norm, kinds, seed):
    m = math.prod(lead)
    ns = [_clip(n, m * len(ns), k) for n in ns]
    x = make_x(lead, k, dtype, kinds, seed)
    packed, scales = _weights(ns, k, seed)
    weight = _norm_weight(k, dtype, seed) if norm else None
    outs = torch_bitnet.bitlinear_shared(x, packed, scales, k, ns, weight, 1e-5)
    assert len(outs) == len(ns)
    for out, p, s, n in zip(outs, packed, scales, ns):
        assert_bitwise_equal(out, torch_bitnet.bitlinear(x, p, s, None, k, n, weight, 1e-5))
        assert_bitwise_equal(out, reference.bitlinear(x, p, s, None, k, n, weight, 1e-5))


@given(lead=LEADS, k=K_ANY, n=st.integers(1, 300), dtype=st.sampled_from(FLOAT_DTYPES), norm=st.booleans(),
       kinds=st.lists(ROW_KIND, min_size=1, max_size=4), seed=SEEDS)
def test_relu2_glu_matches_reference(isa, lead, k, n, dtype, norm, kinds, seed):
    m = math.prod(lead)
    n = _clip(n, 2 * m, k)
    x = make_x(lead, k, dtype, kinds, seed)
    (gate, up), (gs, us) = _weights([n, n], k, seed)
    weight = _norm_weight(k, dtype, seed) if norm else None
    actual = torch_bitnet.bitlinear_relu2_glu(x, gate, gs, up, us, k, n, weight, 1e-6)
    assert_bitwise_equal(actual, reference.bitlinear_relu2_glu(x, gate, gs, up, us, k, n, weight, 1e-6))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_relu2_glu_is_transformers_gating(isa, dtype):
    """The gating equals transformers' ACT2FN["relu2"](gate) * up on the same projections."""
    from transformers.activations import ACT2FN

    k, n = 700, 1500
    x = make_x((5,), k, dtype, ["normal"], 11)
    (gate, up), (gs, us) = _weights([n, n], k, 11)
    g = torch_bitnet.bitlinear(x, gate, gs, None, k, n)
    u = torch_bitnet.bitlinear(x, up, us, None, k, n)
    expected = ACT2FN["relu2"](g) * u
    assert_bitwise_equal(torch_bitnet.bitlinear_relu2_glu(x, gate, gs, up, us, k, n), expected)
    assert (expected == 0).float().mean() > 0.3  # the ReLU was exercised (about half the gates are negative)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_relu2_glu_overflow_and_nan(isa, dtype):
    """Gates whose square overflows to inf (times an up value of 0: NaN), NaN rows, and
    M * N not a multiple of the SIMD width (the kernels' scalar tails): as the reference."""
    k, n = 300, 37
    x = make_x((7,), k, dtype, ["normal", "nan", "normal", "zero", "maxed"], 3)
    (gate, up), _ = _weights([n, n], k, 3, "random")
    big = torch.tensor([torch.finfo(dtype).max / 4])  # g^2 overflows, g itself stays finite
    for gs, us in [(big, torch.tensor([0.5])), (torch.tensor([0.3]), torch.tensor([0.0])), (big, big)]:
        actual = torch_bitnet.bitlinear_relu2_glu(x, gate, gs, up, us, k, n)
        assert_bitwise_equal(actual, reference.bitlinear_relu2_glu(x, gate, gs, up, us, k, n))
        if gs is big:  # the overflow really happened (beyond the NaN row)
            assert (~torch.isfinite(actual[[0, 2, 4, 5, 6]])).any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_norm_of_non_finite_rows(isa, dtype):
    """A row with NaN or Inf normalises to NaN and gives a NaN output row, as the unfused ops do."""
    k, n = 300, 7
    x = torch.randn(4, k).to(dtype)
    x[1, 5], x[2, 0], x[3, 9] = math.nan, math.inf, -math.inf
    (packed,), (scale,) = _weights([n], k, 0)
    out = torch_bitnet.bitlinear(x, packed, scale, None, k, n, _norm_weight(k, dtype, 0), 1e-6)
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1:]).all()


@pytest.mark.parametrize("m", [1, 37])
def test_threads_split_across_weights(isa, m):
    """The weights' row tiles share one parallel range: a thread's part may end inside one
    weight and start inside the next (sizes not multiples of the 16-row tile), threads that
    finish early take chunks from the back of the others' parts (with 8 threads on a 2-core
    machine some always do), and the results must not depend on the thread count."""
    k, ns = 2560, [600, 77, 130]
    x = torch.randn(m, k).to(torch.bfloat16)
    packed, scales = _weights(ns, k, 5)
    weight = _norm_weight(k, torch.bfloat16, 5)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3, 8, 8, 8):
            torch.set_num_threads(threads)
            runs.append(torch_bitnet.bitlinear_shared(x, packed, scales, k, ns, weight))
    finally:
        torch.set_num_threads(before)
    expected = reference.bitlinear_shared(x, packed, scales, k, ns, weight)
    for outs in runs:
        for a, b in zip(outs, expected):
            assert_bitwise_equal(a, b)


# --------------------------------------------------------------------------------------
# Errors, eager and in the fake kernels
# --------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _p(n, k):
    return torch.zeros((n, padded_in_features(k) // 4), dtype=torch.uint8)


ERROR_CASES = [
    ("norm_dtype", lambda: BL(_x(2, 8), _p(4, 8), _x(1), None, 8, 4, _x(8, dtype=torch.bfloat16), 1e-6),
     TypeError, "norm_weight must have the input's dtype"),
    ("norm_shape", lambda: BL(_x(2, 8), _p(4, 8), _x(1), None, 8, 4, _x(7), 1e-6),
     ValueError, "norm_weight has shape"),
    ("norm_eps", lambda: BL(_x(2, 8), _p(4, 8), _x(1), None, 8, 4, _x(8), -1.0),
     ValueError, "norm_eps must be >= 0"),
    ("shared_lengths", lambda: SHARED(_x(2, 8), [_p(4, 8), _p(3, 8)], [_x(1)], 8, [4, 3], None, 1e-6),
     ValueError, "as many weights, scales and out_features"),
    ("shared_empty", lambda: SHARED(_x(2, 8), [], [], 8, [], None, 1e-6),
     ValueError, "as many weights, scales and out_features"),
    ("shared_packed_shape", lambda: SHARED(_x(2, 8), [_p(4, 8), _p(3, 8)], [_x(1), _x(1)], 8, [4, 4], None, 1e-6),
     ValueError, "packed weight has shape"),
    ("shared_scale", lambda: SHARED(_x(2, 8), [_p(4, 8)], [_x(2)], 8, [4], None, 1e-6),
     ValueError, "weight scale must be a float32 tensor with one element"),
    ("shared_x_int", lambda: SHARED(_x(2, 8, dtype=torch.int8), [_p(4, 8)], [_x(1)], 8, [4], None, 1e-6),
     TypeError, "bitlinear_shared input must be float32, bfloat16 or float16"),
    ("shared_norm_shape", lambda: SHARED(_x(2, 8), [_p(4, 8)], [_x(1)], 8, [4], _x(9), 1e-6),
     ValueError, "norm_weight has shape"),
    ("glu_wrong_k", lambda: GLU(_x(2, 9), _p(4, 8), _x(1), _p(4, 8), _x(1), 8, 4, None, 1e-6),
     ValueError, "bitlinear_relu2_glu input has 9 features"),
    ("glu_up_shape", lambda: GLU(_x(2, 8), _p(4, 8), _x(1), _p(5, 8), _x(1), 8, 4, None, 1e-6),
     ValueError, "packed weight has shape"),
    ("glu_up_scale", lambda: GLU(_x(2, 8), _p(4, 8), _x(1), _p(4, 8), _x(1, dtype=torch.float64), 8, 4, None, 1e-6),
     ValueError, "up weight scale must be a float32 tensor with one element"),
    ("glu_norm_dtype", lambda: GLU(_x(2, 8), _p(4, 8), _x(1), _p(4, 8), _x(1), 8, 4, _x(8, dtype=torch.half), 1e-6),
     TypeError, "norm_weight must have the input's dtype"),
]


test_errors_eager, test_errors_fake_kernels = error_tests(ERROR_CASES)


# --------------------------------------------------------------------------------------
# opcheck and torch.compile
# --------------------------------------------------------------------------------------


def _opcheck_cases():
    cases = []
    for dtype in FLOAT_DTYPES:
        for lead, k, ns in [((3,), 300, [5, 7, 2]), ((2, 4), 256, [8]), ((0, 2), 40, [3, 3])]:
            x = make_x(lead, k, dtype, ["normal"], 1)
            packed, scales = _weights(ns, k, 2)
            w = _norm_weight(k, dtype, 2)
            cases.append((f"bitlinear_norm-{dtype}-{lead}", BL, (x, packed[0], scales[0], None, k, ns[0], w, 1e-5)))
            cases.append((f"shared-{dtype}-{lead}", SHARED, (x, packed, scales, k, ns, w, 1e-5)))
            cases.append((f"shared_nonorm-{dtype}-{lead}", SHARED, (x, packed, scales, k, ns, None, 1e-6)))
            gate, up = _weights([ns[0], ns[0]], k, 3)[0]
            cases.append((f"glu-{dtype}-{lead}", GLU, (x, gate, scales[0], up, scales[-1], k, ns[0], w, 1e-5)))
    return cases


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("op,args", [c[1:] for c in OPCHECK_CASES], ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(op, args):
    torch._dynamo.reset()
    torch.library.opcheck(op, args)


class FusedMLP(torch.nn.Module):
    """A BitNet MLP over the fused ops, weights as buffers (as a fused decoder layer holds them)."""

    def __init__(self, k, f, dtype, seed):
        super().__init__()
        (self.gate, self.up), (self.gs, self.us) = _weights([f, f], k, seed)
        (self.down,), (self.ds,) = _weights([k], f, seed)
        self.norm, self.sub_norm = _norm_weight(k, dtype, seed), _norm_weight(f, dtype, seed + 1)
        self.k, self.f = k, f

    def forward(self, x):
        h = torch_bitnet.bitlinear_relu2_glu(x, self.gate, self.gs, self.up, self.us, self.k, self.f, self.norm, 1e-5)
        out = torch_bitnet.bitlinear(h, self.down, self.ds, None, self.f, self.k, self.sub_norm, 1e-5)
        q, kk = torch_bitnet.bitlinear_shared(out, [self.gate, self.up], [self.gs, self.us], self.k, [self.f] * 2)
        return x + out, q * kk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph(dtype):
    torch._dynamo.reset()
    model = FusedMLP(300, 520, dtype, 4)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for m in (1, 5):
            x = make_x((m,), 300, dtype, ["normal"], m)
            for got, want in zip(compiled(x), model(x)):
                assert_bitwise_equal(got, want)
    assert counter.frame_count >= 1
    torch._dynamo.reset()
