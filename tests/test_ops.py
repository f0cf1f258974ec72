"""The bitnet:: operators against their plain-PyTorch definitions (torch_bitnet.reference).

Tolerance: none. Every kernel path (scalar, avx2, avx512; see the ``isa`` fixture) must
reproduce the reference bit for bit:

* ``quantize_act``: same int8 codes and the same float32 scale ``a`` (the kernels evaluate
  ``127 * (1 / max|x|)`` with the same two float32 roundings as PyTorch);
* ``ternary_mm``: the exact integer product;
* ``bitlinear``: the same float32 expression ``acc * (scale / a) + bias`` rounded once to the
  output dtype, so the outputs have identical bits. Rows with NaN/Inf inputs give NaN rows in
  both; NaN payloads are not compared, only NaN positions.

Hypothesis draws shapes, dtypes and "kinds" of rows (zero, tiny, huge, exact .5 ties after
scaling, NaN/Inf, ...); the values themselves come from a seeded torch generator, which keeps
example generation cheap for K up to a few thousand.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import torch_bitnet
from torch_bitnet import reference
from torch_bitnet.packing import MAX_IN_FEATURES, pack_ternary, padded_in_features

from _error_cases import error_tests

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# K values that sit on and around the 256-weight block edges, the 2B-4T sizes, and K = 1.
SPECIAL_K = [1, 255, 256, 257, 688, 1000, 2560]
# Upper bound on M * N * Kp per example: keeps the scalar kernel and the int64 reference fast.
MAC_BUDGET = 6_000_000


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bits; NaNs must be in the same places (payloads not compared)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not actual.dtype.is_floating_point:
        assert torch.equal(actual, expected)
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"NaN positions differ: {(nan_a != nan_e).nonzero()[:8].tolist()}"
    int_dtype = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    bits_a = torch.where(nan_a, torch.zeros_like(actual), actual).contiguous().view(int_dtype)
    bits_e = torch.where(nan_e, torch.zeros_like(expected), expected).contiguous().view(int_dtype)
    if not torch.equal(bits_a, bits_e):
        bad = (bits_a != bits_e).nonzero()
        idx = tuple(bad[0].tolist())
        raise AssertionError(
            f"{bad.shape[0]} of {actual.numel()} elements differ; first at {idx}: "
            f"{actual[idx].item()!r} != {expected[idx].item()!r}"
        )


def random_ternary(n: int, k: int, g: torch.Generator, mode: str = "random") -> torch.Tensor:
    if mode == "random":
        return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    if mode == "sparse":
        w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        return w * (torch.rand((n, k), generator=g) < 0.05).to(torch.int8)
    return torch.full((n, k), {"neg": -1, "zero": 0, "pos": 1}[mode], dtype=torch.int8)


W_MODES = st.sampled_from(["random", "random", "sparse", "neg", "pos", "zero"])

# Kinds of activation rows. Each exercises one branch of the quantizer:
ROW_KINDS = [
    "normal",  # randn at a random scale
    "zero",  # amax = 0: a = 127 / 1e-5 (the clamp), xq = 0
    "tiny",  # |x| ~ 1e-8: amax below the 1e-5 clamp
    "subnormal",  # below the dtype's smallest normal number
    "huge",  # |x| ~ 1e30 (fp32/bf16) or the f16 maximum: 1/amax is tiny
    "maxed",  # up to the dtype's largest finite value
    "mixed",  # magnitudes spread over many decades in one row
    "ties",  # x * a lands exactly on n + 0.5: round half to even
    "ints",  # x * a lands exactly on integers
    "const",  # every element equal: all map to +-127
    "nan",  # one NaN: xq = 0, a = NaN
    "posinf",  # one +Inf: xq = 0, a = NaN
    "neginf",  # one -Inf: xq = 0, a = NaN
]
ROW_KIND = st.sampled_from(ROW_KINDS)


def make_row(kind: str, k: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """One float32 row of the given kind; values are chosen to survive the cast to ``dtype``."""
    finfo = torch.finfo(dtype)
    rand_int = lambda lo, hi: int(torch.randint(lo, hi, (), generator=g))  # noqa: E731
    if kind == "normal":
        return torch.randn(k, generator=g) * 10.0 ** (torch.rand((), generator=g).item() * 6 - 3)
    if kind == "zero":
        return torch.zeros(k)
    if kind == "tiny":
        return torch.randn(k, generator=g) * 1e-8
    if kind == "subnormal":
        return (torch.rand(k, generator=g) * 2 - 1) * finfo.smallest_normal
    if kind == "huge":
        return torch.randn(k, generator=g) * (1e30 if dtype != torch.float16 else 1e4)
    if kind == "maxed":
        return (torch.rand(k, generator=g) * 2 - 1) * finfo.max
    if kind == "mixed":
        decades = 30 if dtype != torch.float16 else 4
        exps = torch.rand(k, generator=g) * 2 * decades - decades
        return torch.randn(k, generator=g) * torch.pow(10.0, exps)
    if kind in ("ties", "ints"):
        # amax = 127 * 2^e gives a = fl(fl(1 / amax) * 127) = 2^-e exactly (fl(fl(1/127) * 127)
        # is 1 in float32), so x = (n + 0.5) * 2^e scales to the exact tie n + 0.5. These values
        # have at most 8 significant bits: exact in bf16 and f16 too.
        e = rand_int(-10, 9)
        n = torch.randint(-127, 127, (k,), generator=g).float()
        row = (n + (0.5 if kind == "ties" else 0.0)) * 2.0**e
        row[rand_int(0, k)] = (1 if rand_int(0, 2) else -1) * 127 * 2.0**e
        return row
    if kind == "const":
        return torch.full((k,), (torch.randn((), generator=g) * 10.0 ** rand_int(-3, 4)).item())
    row = torch.randn(k, generator=g)
    row[rand_int(0, k)] = {"nan": math.nan, "posinf": math.inf, "neginf": -math.inf}[kind]
    return row


def make_x(lead: tuple, k: int, dtype: torch.dtype, kinds: list, seed: int) -> torch.Tensor:
    """Activations of shape (*lead, k); row r (of the flattened leading dims) is of kinds[r % len]."""
    g = torch.Generator().manual_seed(seed)
    m = math.prod(lead)
    rows = [make_row(kinds[r % len(kinds)], k, dtype, g) for r in range(m)]
    x = torch.stack(rows) if rows else torch.empty((0, k))
    return x.to(dtype).reshape(*lead, k)


XQ_KINDS = st.sampled_from(["uniform", "uniform", "min", "max", "alternate", "small", "zero"])


def make_xq(lead: tuple, k: int, kinds: list, seed: int) -> torch.Tensor:
    """int8 activations (*lead, k), including the extremes -128 and 127."""
    g = torch.Generator().manual_seed(seed)
    m = math.prod(lead)
    xq = torch.empty((m, k), dtype=torch.int8)
    for r in range(m):
        kind = kinds[r % len(kinds)]
        if kind == "uniform":
            xq[r] = torch.randint(-128, 128, (k,), generator=g, dtype=torch.int8)
        elif kind == "min":  # the largest |acc|: -128 * K with an all +1 weight
            xq[r] = -128
        elif kind == "max":
            xq[r] = 127
        elif kind == "alternate":
            xq[r] = torch.where(torch.arange(k) % 2 == 0, -128, 127).to(torch.int8)
        elif kind == "small":
            xq[r] = torch.randint(-2, 3, (k,), generator=g, dtype=torch.int8)
        else:
            xq[r] = 0
    return xq.reshape(*lead, k)


def clip_n(n: int, m: int, k: int) -> int:
    """Shrink N so the example stays within MAC_BUDGET."""
    return max(1, min(n, MAC_BUDGET // max(1, m * padded_in_features(k))))


K_ANY = st.one_of(st.sampled_from(SPECIAL_K), st.integers(1, 1100))
SEEDS = st.integers(0, 2**31 - 1)
# Leading shapes with 0 to 3 dims, zero-sized ones included.
SMALL_LEAD = st.lists(st.integers(0, 5), max_size=3).map(tuple)
MM_LEAD = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 300)),
    st.tuples(st.integers(0, 17), st.integers(0, 17)),
    st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 12)),
)


# --------------------------------------------------------------------------------------
# The isa fixture and path selection
# --------------------------------------------------------------------------------------


def test_isa_fixture_selects_the_path(isa):
    assert torch_bitnet.get_isa() == isa


def test_scalar_path_always_available():
    assert torch_bitnet.available_isas()[0] == "scalar"
    assert set(torch_bitnet.available_isas()) <= set(torch_bitnet.isa.ISAS)
    assert torch_bitnet.get_isa() in torch_bitnet.available_isas()


def test_use_isa_restores_on_exception():
    before = torch_bitnet.get_isa()
    with pytest.raises(KeyError):
        with torch_bitnet.use_isa("scalar"):
            assert torch_bitnet.get_isa() == "scalar"
            raise KeyError("boom")
    assert torch_bitnet.get_isa() == before


def test_set_isa_unknown_name():
    before = torch_bitnet.get_isa()
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        torch_bitnet.set_isa("sse9")
    # The raw op checks too (it is reachable without the Python wrapper).
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        torch.ops.bitnet.set_isa("sse9")
    assert torch_bitnet.get_isa() == before


def _import_with_env(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_BITNET_ISA=value)
    code = "import torch_bitnet; print(torch_bitnet.get_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_var_forces_path_at_import():
    done = _import_with_env("scalar")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "scalar"
    # The best path is the default; each of the others can be forced (avx512 without VBMI too).
    best = torch_bitnet.available_isas()[-1]
    assert _import_with_env("").stdout.strip() == best
    for name in torch_bitnet.available_isas()[1:]:
        assert _import_with_env(name).stdout.strip() == name
    done = _import_with_env("sse9")
    assert done.returncode != 0
    assert "TORCH_BITNET_ISA='sse9' is not one of scalar, avx2, avx512, avx512vbmi, amx" in done.stderr


# --------------------------------------------------------------------------------------
# quantize_act
# --------------------------------------------------------------------------------------


def test_quantize_act_known_values(isa):
    # amax = 127 -> a = 1 exactly, so xq = round_half_even(x): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 3.25])
    xq, a = torch_bitnet.quantize_act(x)
    assert xq.tolist() == [127, 0, 2, 2, 0, -2, -126, 3]
    assert a.tolist() == [1.0]
    # A NaN or Inf row gives xq = 0 and a = NaN (documented); finite rows are unaffected.
    x2 = torch.tensor([[1.0, math.nan, 2.0], [1.0, -math.inf, 2.0], [0.0, 0.0, 0.0], [-2.0, 1.0, 0.5]])
    xq2, a2 = torch_bitnet.quantize_act(x2)
    assert xq2[:3].tolist() == [[0, 0, 0]] * 3
    assert xq2[3].tolist() == [-127, 64, 32]  # a = 63.5: 63.5 -> 64, 31.75 -> 32
    assert math.isnan(a2[0, 0].item()) and math.isnan(a2[1, 0].item())
    assert a2[2, 0].item() == pytest.approx(127 / 1e-5, rel=1e-6)  # the 1e-5 clamp


def test_tie_rows_are_exact_ties():
    # Guard for the "ties" generator: the test below would silently lose its point if the
    # scaled values stopped being exact .5 ties.
    g = torch.Generator().manual_seed(0)
    for dtype in FLOAT_DTYPES:
        x = make_row("ties", 300, dtype, g).to(dtype).float()
        a = reference.quantize_act(x)[1]
        scaled = x * a
        frac = (scaled - scaled.floor())[scaled.abs() < 127]
        assert frac.numel() > 250 and bool((frac == 0.5).all())


@given(lead=SMALL_LEAD, k=K_ANY, dtype=st.sampled_from(FLOAT_DTYPES), kinds=st.lists(ROW_KIND, min_size=1, max_size=6), seed=SEEDS)
def test_quantize_act_matches_reference(isa, lead, k, dtype, kinds, seed):
    x = make_x(lead, k, dtype, kinds, seed)
    xq, a = torch_bitnet.quantize_act(x)
    ref_xq, ref_a = reference.quantize_act(x)
    assert xq.dtype == torch.int8 and tuple(xq.shape) == tuple(x.shape)
    assert a.dtype == torch.float32 and tuple(a.shape) == (*lead, 1)
    assert torch.equal(xq, ref_xq)
    assert_bitwise_equal(a, ref_a)


def test_quantize_act_every_row_kind(isa):
    """Deterministic sweep: every row kind at every special K and dtype (Hypothesis samples these)."""
    for dtype in FLOAT_DTYPES:
        for k in SPECIAL_K + [15, 16, 17, 31, 32, 33, 63, 64, 65]:  # around the 8/16/32-wide vector loops
            x = make_x((len(ROW_KINDS),), k, dtype, ROW_KINDS, seed=k)
            xq, a = torch_bitnet.quantize_act(x)
            ref_xq, ref_a = reference.quantize_act(x)
            assert torch.equal(xq, ref_xq), (dtype, k)
            assert_bitwise_equal(a, ref_a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_act_every_16bit_value(isa, dtype):
    """Every one of the 65536 bit patterns, one per row (K = 1) and repeated along K = 37.

    With K = 1 the scale a = 127 * (1 / |x|) exposes the kernel's 16-bit -> float32
    conversion bit for bit (subnormals, Inf and NaN included); K = 37 runs the vector loops.
    """
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)
    for xx in (x, x.expand(-1, 37).contiguous()):
        xq, a = torch_bitnet.quantize_act(xx)
        ref_xq, ref_a = reference.quantize_act(xx)
        assert torch.equal(xq, ref_xq)
        assert_bitwise_equal(a, ref_a)


# --------------------------------------------------------------------------------------
# ternary_mm
# --------------------------------------------------------------------------------------


def test_ternary_mm_known_values(isa):
    # W = [[1, -1, 0], [-1, -1, -1]], xq = [127, 1, -2]: 127 - 1 = 126 and -127 - 1 + 2 = -126.
    w = torch.tensor([[1, -1, 0], [-1, -1, -1]], dtype=torch.int8)
    xq = torch.tensor([[127, 1, -2], [-128, -128, -128]], dtype=torch.int8)
    out = torch_bitnet.ternary_mm(xq, pack_ternary(w), 3, 2)
    assert out.dtype == torch.int32
    assert out.tolist() == [[126, -126], [0, 384]]


@given(
    lead=MM_LEAD,
    k=K_ANY,
    n=st.integers(1, 300),
    xkinds=st.lists(XQ_KINDS, min_size=1, max_size=4),
    wmode=W_MODES,
    seed=SEEDS,
)
def test_ternary_mm_matches_reference(isa, lead, k, n, xkinds, wmode, seed):
    m = math.prod(lead)
    n = clip_n(n, m, k)
    g = torch.Generator().manual_seed(seed)
    packed = pack_ternary(random_ternary(n, k, g, wmode))
    xq = make_xq(lead, k, xkinds, seed + 1)
    out = torch_bitnet.ternary_mm(xq, packed, k, n)
    assert out.dtype == torch.int32 and tuple(out.shape) == (*lead, n)
    assert torch.equal(out, reference.ternary_mm(xq, packed, k, n))


# Tile edges of the kernels (avx512: 4 x 4 tiles below M = 128, a separate M = 1 kernel; avx2: an
# M = 1 kernel of 2-row tiles, 2 x 4 tiles below M = 4, then 6-token x 16-row tiles of unpacked
# weights) and token chunks of the small tiles (256 KiB of activations: 100 rows at Kp = 2560, 36
# at Kp = 6912 on avx512), and avx2's token groups above 256 tokens (257: 132 + 125; 520: 174 +
# 174 + 172).
TILE_CASES = [(m, n, k) for m in (1, 2, 3, 4, 5) for n in (1, 2, 3, 4, 5, 7, 8, 9, 17) for k in (1, 256, 257)]
CHUNK_CASES = [(257, 19, 2560), (103, 6, 2560), (40, 9, 6912), (73, 5, 6912), (9, 33, 300), (520, 21, 520)]
# avx512 from M = 128 (127 still takes the 4 x 4 tiles): 64-row panels of 16-row vectors, 6-token
# tiles; every token-tile remainder, partial vectors and panels, one to three blocks (and avx2's
# 16-row panels of 8-row vectors, 6-token tiles: M mod 6 takes every value here too).
PANEL_CASES = [
    (m, n, k)
    for m in (127, 128, 129, 130, 131, 133)
    for n in (1, 16, 17, 48, 63, 64, 65, 130)
    for k in (1, 256, 257, 769)
]

# amx from M = 12 (11 still takes avx512's tiles): 16-token x 16-row tiles in pairs, so every
# remainder of M mod 32 that changes the tile shapes (one partial tile, one full and one partial,
# two full), partial and whole 16-row vectors and 64-row panels, K of one to three 256-weight
# blocks; and token groups above 256 (257: 160 + 97; 520: 192 + 192 + 136).
AMX_CASES = [
    (m, n, k)
    for m in (11, 12, 16, 17, 31, 32, 33, 47, 63, 257)
    for n in (1, 15, 16, 17, 33, 63, 64, 65, 130)
    for k in (1, 64, 256, 257, 769)
] + [(520, 21, 520), (520, 200, 2560)]


@pytest.mark.parametrize("m,n,k", CHUNK_CASES)
def test_ternary_mm_token_chunks(isa, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n)
    packed = pack_ternary(random_ternary(n, k, g))
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    assert torch.equal(torch_bitnet.ternary_mm(xq, packed, k, n), reference.ternary_mm(xq, packed, k, n))


@pytest.mark.parametrize(
    "cases,seed", [(TILE_CASES, 7), (PANEL_CASES, 8), (AMX_CASES, 9)], ids=["tiles", "panels", "amx_tiles"]
)
def test_ternary_mm_kernel_edges(isa, cases, seed):
    g = torch.Generator().manual_seed(seed)
    for m, n, k in cases:
        packed = pack_ternary(random_ternary(n, k, g))
        xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        out = torch_bitnet.ternary_mm(xq, packed, k, n)
        assert torch.equal(out, reference.ternary_mm(xq, packed, k, n)), (m, n, k)


def test_ternary_mm_largest_accumulator(isa):
    """K = MAX_IN_FEATURES with -128 / 127 activations: |acc| reaches 2**24, the documented bound."""
    k = MAX_IN_FEATURES
    w = torch.ones((5, k), dtype=torch.int8)
    w[1] = -1
    w[2] = 0
    w[3, ::2] = -1
    packed = pack_ternary(w)
    xq = torch.full((128, k), -128, dtype=torch.int8)
    xq[1] = 127
    for m in (1, 3, 128):  # the GEMV kernels (avx2: int16 sums over 4 blocks), the small tiles, the panels / amx
        out = torch_bitnet.ternary_mm(xq[:m], packed, k, 5)
        assert out[0, 0].item() == -(2**24)  # -128 * 2^17
        assert out[0, 1].item() == 2**24
        assert torch.equal(out, reference.ternary_mm(xq[:m], packed, k, 5))


# --------------------------------------------------------------------------------------
# bitlinear
# --------------------------------------------------------------------------------------


def test_bitlinear_known_values(isa):
    # x = [127, 1, -2] -> a = 1, xq = x; W = [[1, -1, 0]] -> acc = 126; y = 126 * 0.5 + 1.
    w = pack_ternary(torch.tensor([[1, -1, 0]], dtype=torch.int8))
    x = torch.tensor([[127.0, 1.0, -2.0]])
    y = torch_bitnet.bitlinear(x, w, torch.tensor([0.5]), torch.tensor([1.0]), 3, 1)
    assert y.tolist() == [[64.0]]
    y16 = torch_bitnet.bitlinear(x.to(torch.bfloat16), w, torch.tensor(0.5), None, 3, 1)
    assert y16.dtype == torch.bfloat16 and y16.tolist() == [[63.0]]


def test_bitlinear_sweep(isa):
    """Deterministic sweep over the block-edge K values, tile-edge N and M, all dtypes."""
    g = torch.Generator().manual_seed(12)
    for k in SPECIAL_K:
        for n in (1, 3, 4, 17, 64):
            packed = pack_ternary(random_ternary(n, k, g))
            bias = torch.randn(n, generator=g)
            scale = torch.tensor([0.037])
            for m in (1, 2, 5, 64, 128):
                for dtype in FLOAT_DTYPES:
                    x = make_x((m,), k, dtype, ["normal", "ties", "mixed", "zero", "nan"], seed=m + k)
                    for b in (None, bias.to(dtype)):
                        expected = reference.bitlinear(x, packed, scale, b, k, n)
                        assert_bitwise_equal(torch_bitnet.bitlinear(x, packed, scale, b, k, n), expected)


BIAS_KINDS = st.sampled_from([None, "float32", "same"])
SCALES = st.one_of(
    st.floats(2.0**-13, 128.0, width=32),
    st.sampled_from([1.0, 2.0**-20, 0.0, -0.75, 3e38]),
)


@given(
    lead=SMALL_LEAD,
    k=K_ANY,
    n=st.integers(1, 300),
    dtype=st.sampled_from(FLOAT_DTYPES),
    bias_kind=BIAS_KINDS,
    scale=SCALES,
    scale_0d=st.booleans(),
    kinds=st.lists(ROW_KIND, min_size=1, max_size=4),
    wmode=W_MODES,
    seed=SEEDS,
)
def test_bitlinear_matches_reference(isa, lead, k, n, dtype, bias_kind, scale, scale_0d, kinds, wmode, seed):
    m = math.prod(lead)
    n = clip_n(n, m, k)
    g = torch.Generator().manual_seed(seed)
    packed = pack_ternary(random_ternary(n, k, g, wmode))
    x = make_x(lead, k, dtype, kinds, seed + 1)
    s = torch.tensor(scale if scale_0d else [scale], dtype=torch.float32)
    bias = None
    if bias_kind is not None:
        bias = (torch.randn(n, generator=g) * 3).to(torch.float32 if bias_kind == "float32" else dtype)
    y = torch_bitnet.bitlinear(x, packed, s, bias, k, n)
    assert y.dtype == dtype and tuple(y.shape) == (*lead, n)
    assert_bitwise_equal(y, reference.bitlinear(x, packed, s, bias, k, n))


def _rounding_probe_values() -> torch.Tensor:
    """float32 values that exercise float32 -> f16 / bf16 rounding."""
    g = torch.Generator().manual_seed(11)
    h16 = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16)
    pool = []
    for fmt in (torch.float16, torch.bfloat16):
        table = h16.view(fmt).float()  # every value of the format, Inf and NaN included
        v = torch.unique(table[torch.isfinite(table)])  # sorted
        mid = (v[:-1] + v[1:]) / 2  # exact in float32 (<= 12 significant bits): exact ties
        up = torch.nextafter(mid, torch.full_like(mid, math.inf))
        down = torch.nextafter(mid, torch.full_like(mid, -math.inf))
        pool += [table, mid, up, down]
    pool.append(torch.tensor([65504.0, 65519.0, 65519.996, 65520.0, 65536.0, 3e38, 2.0**-24, 2.0**-25, 3 * 2.0**-26]))
    pool.append(torch.randint(-(2**31), 2**31, (65536,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32))
    return torch.cat(pool)


# M = 1: avx512's GEMV epilogue; M = 5: the vector epilogues of avx512's 4 x 4 tiles and avx2's
# panels; M = 128: avx512's panel epilogue (on every 7th probe value, to keep the output small).
@pytest.mark.parametrize("m,every", [(1, 1), (5, 1), (128, 7)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bitlinear_output_rounding(isa, dtype, m, every):
    """The kernels' float32 -> f16/bf16 rounding, on chosen float32 values.

    With an all-zero weight acc = 0, so y = 0 * (scale / a) + bias = bias: the output is the
    float32 bias rounded to x.dtype by the kernel's own conversion. The biases are every f16
    and bf16 value, the exact midpoints between neighbours (ties: round half to even) and the
    floats just above / below them, values around the f16 overflow threshold (65520 rounds to
    Inf) and the f16 subnormal range, and 65536 random bit patterns (NaN, Inf included).
    The expected output is computed by plain torch (the reference's last step, without its
    unpacked (N, 1) int64 weight, which would be large here).
    """
    bias = _rounding_probe_values()[::every].contiguous()
    n = bias.numel()
    packed = pack_ternary(torch.zeros((n, 1), dtype=torch.int8))
    x = torch.ones((m, 1), dtype=dtype)
    y = torch_bitnet.bitlinear(x, packed, torch.tensor([1.0]), bias, 1, n)
    # 0 * factor is +0, and +0 + bias turns a -0.0 bias into +0.0: write that out.
    expected = (torch.zeros(n) + bias).to(dtype).expand(m, n)
    assert_bitwise_equal(y, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bitlinear_empty_batch(isa, dtype):
    packed = pack_ternary(torch.ones((6, 300), dtype=torch.int8))
    for lead in [(0,), (0, 3), (2, 0, 4)]:
        x = torch.randn(*lead, 300).to(dtype)
        y = torch_bitnet.bitlinear(x, packed, torch.tensor([1.0]), torch.ones(6), 300, 6)
        assert y.dtype == dtype and tuple(y.shape) == (*lead, 6)


def test_bitlinear_input_requiring_grad(isa):
    """A model run outside no_grad hands the op activations that require grad: the forward
    values must be unaffected (the ops are inference-only; there is no backward formula)."""
    g = torch.Generator().manual_seed(4)
    packed = pack_ternary(random_ternary(5, 300, g))
    x = torch.randn(3, 300, generator=g)
    y = torch_bitnet.bitlinear(x.clone().requires_grad_(True), packed, torch.tensor([0.5]), None, 300, 5)
    assert_bitwise_equal(y.detach(), torch_bitnet.bitlinear(x, packed, torch.tensor([0.5]), None, 300, 5))


# The BitLinear shapes of microsoft/bitnet-b1.58-2B-4T (hidden 2560, intermediate 6912):
# k/v_proj 2560 -> 640 and down_proj 6912 -> 2560; decode (M = 1) and a short prefill (M = 3).
MODEL_CASES = [(2560, 640, 1), (2560, 640, 3), (6912, 2560, 1), (6912, 2560, 3)]


@pytest.fixture(scope="module")
def model_shape_data():
    """Inputs and reference outputs of MODEL_CASES, computed once for all paths."""
    data = {}
    g = torch.Generator().manual_seed(2025)
    for k, n, m in MODEL_CASES:
        packed = pack_ternary(random_ternary(n, k, g))
        scale = torch.tensor([0.0123])
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        data[(k, n, m)] = (x, packed, scale, reference.bitlinear(x, packed, scale, None, k, n))
        xf = torch.randn(m, k, generator=g)
        bias = torch.randn(n, generator=g)
        data[(k, n, m, "f32")] = (xf, packed, scale, bias, reference.bitlinear(xf, packed, scale, bias, k, n))
    return data


@pytest.mark.parametrize("k,n,m", MODEL_CASES)
def test_bitlinear_model_shapes(isa, model_shape_data, k, n, m):
    x, packed, scale, expected = model_shape_data[(k, n, m)]
    assert_bitwise_equal(torch_bitnet.bitlinear(x, packed, scale, None, k, n), expected)
    xf, packed, scale, bias, expected_f = model_shape_data[(k, n, m, "f32")]
    assert_bitwise_equal(torch_bitnet.bitlinear(xf, packed, scale, bias, k, n), expected_f)


def test_bitlinear_one_thread_equals_two(isa):
    """Each output element is computed by one thread in a fixed order: the split must not matter.

    The sizes are large enough that both the quantizer (grain 2^16 / K rows) and the GEMM
    (grain ~2^20 multiply-adds) actually split the work over the two threads.
    """
    g = torch.Generator().manual_seed(5)
    k, n, m = 2560, 640, 64
    packed = pack_ternary(random_ternary(n, k, g))
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g)
    scale = torch.tensor([0.7])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = torch_bitnet.bitlinear(x, packed, scale, bias, k, n)
        acc1 = torch_bitnet.ternary_mm(torch_bitnet.quantize_act(x)[0], packed, k, n)
        torch.set_num_threads(2)
        y2 = torch_bitnet.bitlinear(x, packed, scale, bias, k, n)
        acc2 = torch_bitnet.ternary_mm(torch_bitnet.quantize_act(x)[0], packed, k, n)
    finally:
        torch.set_num_threads(before)
    assert_bitwise_equal(y1, y2)
    assert torch.equal(acc1, acc2)
    assert_bitwise_equal(y2, reference.bitlinear(x, packed, scale, bias, k, n))


# --------------------------------------------------------------------------------------
# Non-contiguous inputs
# --------------------------------------------------------------------------------------


def strided_views(k: int, dtype: torch.dtype, g: torch.Generator) -> dict:
    """Non-contiguous tensors with last dimension k (values of dtype)."""

    def base(*shape):
        if dtype.is_floating_point:
            return torch.randn(*shape, generator=g).to(dtype)
        return torch.randint(-128, 128, shape, generator=g, dtype=dtype)

    return {
        "transposed": base(k, 7).t(),
        "sliced_last_dim": base(7, 2 * k)[:, ::2],
        "sliced_rows": base(14, k)[::2],
        "permuted_3d": base(k, 3, 5).permute(1, 2, 0),
        "expanded": base(1, k).expand(4, k),  # stride 0
        "offset_1d": base(k + 3)[3:][None, :].expand(2, k)[1],  # 1-D view with a storage offset
    }


def test_non_contiguous_inputs(isa):
    """Views give the same bits as their .contiguous() copies (the ops copy them internally)."""
    g = torch.Generator().manual_seed(9)
    k, n = 300, 13
    packed = pack_ternary(random_ternary(n, k, g))
    # A packed weight that is a column slice of a wider buffer (row stride != row length).
    wide = torch.zeros((n, packed.shape[1] + 64), dtype=torch.uint8)
    wide[:, 32 : 32 + packed.shape[1]] = packed
    packed_view = wide[:, 32 : 32 + packed.shape[1]]
    assert not packed_view.is_contiguous()
    bias_view = torch.randn(2 * n, generator=g)[::2]
    scale = torch.tensor([0.25])

    for dtype in FLOAT_DTYPES:
        for name, x in strided_views(k, dtype, g).items():
            assert x.dtype == dtype and (not x.is_contiguous() or x.storage_offset()), name
            xc = x.contiguous()
            xq_v, a_v = torch_bitnet.quantize_act(x)
            xq_c, a_c = torch_bitnet.quantize_act(xc)
            assert torch.equal(xq_v, xq_c), (name, dtype)
            assert_bitwise_equal(a_v, a_c)
            y_v = torch_bitnet.bitlinear(x, packed_view, scale, bias_view, k, n)
            y_c = torch_bitnet.bitlinear(xc, packed, scale, bias_view.contiguous(), k, n)
            assert_bitwise_equal(y_v, y_c)
            assert_bitwise_equal(y_c, reference.bitlinear(xc, packed, scale, bias_view, k, n))
    for name, xq in strided_views(k, torch.int8, g).items():
        expected = torch_bitnet.ternary_mm(xq.contiguous(), packed, k, n)
        assert torch.equal(torch_bitnet.ternary_mm(xq, packed_view, k, n), expected), name
        assert torch.equal(expected, reference.ternary_mm(xq.contiguous(), packed, k, n)), name


# --------------------------------------------------------------------------------------
# stream_max
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 10**6 + 17, 2**21 + 3])
def test_stream_max(isa, size):
    g = torch.Generator().manual_seed(size)
    buf = torch.randint(0, 200, (size,), generator=g, dtype=torch.uint8)
    positions = {0, size - 1, int(torch.randint(0, size, (), generator=g))} if size else set()
    for pos in sorted(positions):
        b = buf.clone()
        peak = int(torch.randint(200, 256, (), generator=g))
        b[pos] = peak  # the unique maximum
        out = torch_bitnet.stream_max(b)
        assert out.dtype == torch.uint8 and out.dim() == 0
        assert out.item() == peak, (pos, out.item(), peak)
        assert torch.equal(out, reference.stream_max(b))
    if size == 0:
        assert torch.equal(torch_bitnet.stream_max(buf), reference.stream_max(buf))
        assert torch_bitnet.stream_max(buf).item() == 0
    else:
        assert torch.equal(torch_bitnet.stream_max(torch.zeros(size, dtype=torch.uint8)), torch.tensor(0, dtype=torch.uint8))


def test_stream_max_views(isa):
    g = torch.Generator().manual_seed(1)
    buf = torch.randint(0, 100, (3, 1000), generator=g, dtype=torch.uint8)
    buf[1, 501] = 250  # hidden from the strided view below (odd column)
    buf[2, 998] = 180
    assert torch_bitnet.stream_max(buf).item() == 250
    assert torch_bitnet.stream_max(buf[:, ::2]).item() == 180
    assert torch_bitnet.stream_max(buf[0]).item() == int(buf[0].max())


# --------------------------------------------------------------------------------------
# Argument errors, in eager mode and in the fake kernels (what torch.compile traces)
# --------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _packed(n, k, dtype=torch.uint8):
    return torch.zeros((n, padded_in_features(k) // 4), dtype=dtype)


BL = torch.ops.bitnet.bitlinear.default
TMM = torch.ops.bitnet.ternary_mm.default
QA = torch.ops.bitnet.quantize_act.default
SMAX = torch.ops.bitnet.stream_max.default

# (id, call, exception, message regex). The calls build their tensors when run, so under
# FakeTensorMode they get fake tensors and exercise the fake kernels of ops.py.
ERROR_CASES = [
    ("x_int32", lambda: BL(_x(2, 8, dtype=torch.int32), _packed(4, 8), _x(1), None, 8, 4),
     TypeError, "bitlinear input must be float32, bfloat16 or float16, got"),
    ("x_float64", lambda: BL(_x(2, 8, dtype=torch.float64), _packed(4, 8), _x(1), None, 8, 4),
     TypeError, "bitlinear input must be float32, bfloat16 or float16, got"),
    ("x_0d", lambda: BL(_x(), _packed(4, 8), _x(1), None, 8, 4),
     ValueError, "bitlinear input must have at least 1 dimension"),
    ("x_wrong_k", lambda: BL(_x(2, 7), _packed(4, 8), _x(1), None, 8, 4),
     ValueError, "bitlinear input has 7 features in its last dimension, expected in_features=8"),
    ("packed_int8", lambda: BL(_x(2, 8), _packed(4, 8, torch.int8), _x(1), None, 8, 4),
     TypeError, "packed weight must be uint8"),
    ("packed_wrong_rows", lambda: BL(_x(2, 8), _packed(5, 8), _x(1), None, 8, 4),
     ValueError, "packed weight has shape"),
    ("packed_unpadded", lambda: BL(_x(2, 8), torch.zeros((4, 2), dtype=torch.uint8), _x(1), None, 8, 4),
     ValueError, "packed weight has shape"),
    ("packed_1d", lambda: BL(_x(2, 8), torch.zeros(256, dtype=torch.uint8), _x(1), None, 8, 4),
     ValueError, "packed weight has shape"),
    ("scale_float64", lambda: BL(_x(2, 8), _packed(4, 8), _x(1, dtype=torch.float64), None, 8, 4),
     ValueError, "weight scale must be a float32 tensor with one element"),
    ("scale_bf16", lambda: BL(_x(2, 8), _packed(4, 8), _x(1, dtype=torch.bfloat16), None, 8, 4),
     ValueError, "weight scale must be a float32 tensor with one element"),
    ("scale_numel_2", lambda: BL(_x(2, 8), _packed(4, 8), _x(2), None, 8, 4),
     ValueError, "weight scale must be a float32 tensor with one element"),
    ("scale_empty", lambda: BL(_x(2, 8), _packed(4, 8), _x(0), None, 8, 4),
     ValueError, "weight scale must be a float32 tensor with one element"),
    ("bias_wrong_length", lambda: BL(_x(2, 8), _packed(4, 8), _x(1), _x(5), 8, 4),
     ValueError, "bias has shape"),
    ("bias_2d", lambda: BL(_x(2, 8), _packed(4, 8), _x(1), _x(1, 4), 8, 4),
     ValueError, "bias has shape"),
    ("bias_int", lambda: BL(_x(2, 8), _packed(4, 8), _x(1), _x(4, dtype=torch.int32), 8, 4),
     TypeError, "bias must be float32, bfloat16 or float16"),
    ("in_features_0", lambda: BL(_x(2, 0), _packed(4, 1), _x(1), None, 0, 4),
     ValueError, "in_features and out_features must be >= 1"),
    ("out_features_0", lambda: BL(_x(2, 8), _packed(0, 8), _x(1), None, 8, 0),
     ValueError, "in_features and out_features must be >= 1"),
    ("in_features_too_big", lambda: BL(_x(1, MAX_IN_FEATURES + 1), _packed(1, MAX_IN_FEATURES + 1), _x(1), None,
                                       MAX_IN_FEATURES + 1, 1),
     ValueError, f"in_features={MAX_IN_FEATURES + 1} exceeds the supported maximum {MAX_IN_FEATURES}"),
    ("mm_float_xq", lambda: TMM(_x(2, 8), _packed(4, 8), 8, 4),
     TypeError, "ternary_mm input must be int8"),
    ("mm_uint8_xq", lambda: TMM(_x(2, 8, dtype=torch.uint8), _packed(4, 8), 8, 4),
     TypeError, "ternary_mm input must be int8"),
    ("mm_0d", lambda: TMM(_x(dtype=torch.int8), _packed(4, 8), 8, 4),
     ValueError, "ternary_mm input must have at least 1 dimension"),
    ("mm_wrong_k", lambda: TMM(_x(3, 9, dtype=torch.int8), _packed(4, 8), 8, 4),
     ValueError, "ternary_mm input has 9 features"),
    ("mm_packed_shape", lambda: TMM(_x(3, 8, dtype=torch.int8), _packed(4, 300), 8, 4),
     ValueError, "packed weight has shape"),
    ("mm_in_features_too_big", lambda: TMM(_x(1, 8, dtype=torch.int8), _packed(1, 8), MAX_IN_FEATURES + 1, 1),
     ValueError, "exceeds the supported maximum"),
    ("quantize_int8", lambda: QA(_x(2, 8, dtype=torch.int8)),
     TypeError, "quantize_act input must be float32, bfloat16 or float16"),
    ("quantize_float64", lambda: QA(_x(2, 8, dtype=torch.float64)),
     TypeError, "quantize_act input must be float32, bfloat16 or float16"),
    ("quantize_0d", lambda: QA(_x()),
     ValueError, "quantize_act input needs a non-empty last dimension"),
    ("quantize_k0", lambda: QA(_x(3, 0)),
     ValueError, "quantize_act input needs a non-empty last dimension"),
    ("stream_max_float", lambda: SMAX(_x(16)),
     TypeError, "stream_max expects a uint8 tensor"),
    ("stream_max_int8", lambda: SMAX(_x(16, dtype=torch.int8)),
     TypeError, "stream_max expects a uint8 tensor"),
]


test_errors_eager, test_errors_fake_kernels = error_tests(ERROR_CASES)


def test_typed_wrappers_raise_too():
    # The Python entry points are thin: the same errors come through them.
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
        torch_bitnet.bitlinear(_x(2, 8, dtype=torch.float64), _packed(4, 8), _x(1), None, 8, 4)
    with pytest.raises(TypeError, match="ternary_mm input must be int8"):
        torch_bitnet.ternary_mm(_x(2, 8), _packed(4, 8), 8, 4)
    with pytest.raises(TypeError, match="stream_max expects a uint8 tensor"):
        torch_bitnet.stream_max(_x(3))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "fn,args,exc,match",
    [
        (lambda x, p, s: torch_bitnet.bitlinear(x, p, s, None, 8, 4), (_x(2, 7), _packed(4, 8), _x(1)),
         ValueError, "has 7 features in its last dimension, expected in_features=8"),
        (lambda x, p, s: torch_bitnet.ternary_mm(x, p, 8, 4), (_x(2, 8), _packed(4, 8), _x(1)),
         TypeError, "ternary_mm input must be int8"),
    ],
    ids=["bitlinear_wrong_k", "ternary_mm_float"],
)
def test_errors_at_trace_time(fresh_dynamo, fn, args, exc, match):
    """Under torch.compile the error comes from tracing (the backend is never reached)."""
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    with pytest.raises(Exception, match=match) as info:
        compiled(*args)
    assert counter.frame_count == 0, "the graph compiled: the error was raised at run time, not by the fake kernel"
    # Dynamo wraps the fake kernel's exception in a TorchRuntimeError whose message names the
    # original: "... got ValueError('bitnet: ...')".
    assert isinstance(info.value, exc) or f"got {exc.__name__}(" in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------
# opcheck: schema, fake kernels and AOT dispatch agree with the real kernels
# --------------------------------------------------------------------------------------


def _opcheck_cases():
    g = torch.Generator().manual_seed(3)
    cases = []
    for dtype in FLOAT_DTYPES:
        for lead, k, n in [((3,), 300, 5), ((2, 4), 256, 8), ((1,), 1, 1), ((0, 2), 40, 3)]:
            x = torch.randn(*lead, k, generator=g).to(dtype)
            packed = pack_ternary(random_ternary(n, k, g))
            scale = torch.tensor([0.3])
            bias = torch.randn(n, generator=g).to(dtype)
            cases.append((f"quantize_act-{dtype}-{lead}-{k}", QA, (x,)))
            cases.append((f"bitlinear-{dtype}-{lead}-{k}-{n}", BL, (x, packed, scale, None, k, n)))
            cases.append((f"bitlinear_bias-{dtype}-{lead}-{k}-{n}", BL, (x, packed, scale, bias, k, n)))
            if dtype == torch.float32:
                xq = torch.randint(-128, 128, (*lead, k), generator=g, dtype=torch.int8)
                cases.append((f"ternary_mm-{lead}-{k}-{n}", TMM, (xq, packed, k, n)))
    for size in (0, 1, 300, 5000):
        cases.append((f"stream_max-{size}", SMAX, (torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8),)))
    return cases


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("op,args", [c[1:] for c in OPCHECK_CASES], ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(fresh_dynamo, op, args):
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


class TwoBitLinear(torch.nn.Module):
    """Two BitNet layers with a ReLU between, weights held as buffers (as a patched model would)."""

    def __init__(self, k: int, h: int, n: int, dtype: torch.dtype, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.k, self.h, self.n = k, h, n
        self.register_buffer("packed1", pack_ternary(random_ternary(h, k, g)))
        self.register_buffer("scale1", torch.tensor([0.05]))
        self.register_buffer("bias1", torch.randn(h, generator=g).to(dtype))
        self.register_buffer("packed2", pack_ternary(random_ternary(n, h, g)))
        self.register_buffer("scale2", torch.tensor([0.02]))

    def forward(self, x):
        y = torch_bitnet.bitlinear(x, self.packed1, self.scale1, self.bias1, self.k, self.h)
        y = torch.relu(y)
        return torch_bitnet.bitlinear(y, self.packed2, self.scale2, None, self.h, self.n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_module_static(fresh_dynamo, dtype):
    model = TwoBitLinear(300, 96, 40, dtype, seed=1)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # same shape, new values: one compilation
        x = torch.randn(2, 5, 300, generator=g).to(dtype)
        assert_bitwise_equal(compiled(x), model(x))
    assert counter.frame_count == 1
    # The traced graph holds both custom-op calls (no graph break, nothing decomposed away).
    targets = [node.target for node in counter.graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.bitnet.bitlinear.default) == 2


def test_compile_module_dynamic_batch(fresh_dynamo):
    model = TwoBitLinear(257, 64, 24, torch.bfloat16, seed=3)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(4)
    for m in (2, 3, 5, 8, 3, 13):
        x = torch.randn(m, 257, generator=g).to(torch.bfloat16)
        assert_bitwise_equal(compiled(x), model(x))
    assert counter.frame_count == 1, "varying the batch size recompiled a dynamic=True graph"


def test_compile_quantize_then_ternary_mm(fresh_dynamo):
    k, n = 700, 33
    packed = pack_ternary(random_ternary(n, k, torch.Generator().manual_seed(6)))

    def fn(x):
        xq, a = torch_bitnet.quantize_act(x)
        acc = torch_bitnet.ternary_mm(xq, packed, k, n)
        return acc, a

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(8)
    for _ in range(2):
        x = torch.randn(4, k, generator=g)
        x[1] = 0.0
        x[2, 17] = math.nan
        acc_c, a_c = compiled(x)
        acc_e, a_e = fn(x)
        assert torch.equal(acc_c, acc_e)
        assert_bitwise_equal(a_c, a_e)
    assert counter.frame_count == 1


def test_backward_raises_a_clear_error():
    # The ops are inference-only: a backward through them must fail loudly, naming the op,
    # instead of torch's default "silently incorrect" warning with no gradient.
    x = torch.randn(2, 300, requires_grad=True)
    packed = pack_ternary(torch.randint(-1, 2, (8, 300), dtype=torch.int8))
    y = torch_bitnet.bitlinear(x, packed, torch.tensor([0.5]), None, 300, 8)
    with pytest.raises(RuntimeError, match="bitnet::bitlinear is an inference op"):
        y.sum().backward()
    _, a = torch_bitnet.quantize_act(x)
    with pytest.raises(RuntimeError, match="bitnet::quantize_act is an inference op"):
        a.sum().backward()
