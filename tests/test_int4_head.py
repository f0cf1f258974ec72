"""The int4 group lm_head / embedding: format, ops, modules, loading, and the quality of the logits.

Against the plain-PyTorch reference (torch_bitnet.reference.int4_linear / int4_embedding) there
is no tolerance: on every kernel path (the ``isa`` fixture) each group's int32 dot product is
exact, and the float32 part, ``s = s + float(d_g) * scale[n, g]`` in increasing g from 0, then
``s / a + bias``, is the same sequence of float32 operations as the reference's (the kernels
keep one output row per SIMD lane, so the sum over groups never needs reordering), rounded
once to the output dtype: outputs are bit-identical (NaN positions compared, not payloads).

The exact integer accumulation is also checked without the reference: with every scale 1 and
activations whose max |x| is 127, a = 1 exactly and a float32 output is the integer sum itself
(exact while the partial sums stay below 2**24, or are multiples of a large power of two).

Quality (test_quality_vs_float_lm_head): the int4 table and int8 activations against the exact
logits of the bf16 lm_head, next to the int8 table's figures; see that test.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given
from hypothesis import strategies as st

import torch_bitnet
from torch_bitnet import int4, reference
from torch_bitnet.int4 import (
    GROUP_SIZE,
    MAX_FEATURES,
    ROW_TILE,
    dequantize_int4_rows,
    int4_shapes,
    padded_features,
    quantize_int4_rows,
    unpack_int4_codes,
)

# The activation generators and the bitwise comparison of the bitlinear tests (tests/ is on
# sys.path under pytest's default import mode).
from test_ops import FLOAT_DTYPES, ROW_KINDS, assert_bitwise_equal, make_x

from _error_cases import error_tests

IL = torch.ops.bitnet.int4_linear.default
IE = torch.ops.bitnet.int4_embedding.default
# K on and around the 32-weight groups and the 64-weight padding unit, odd sizes, and 2B-4T's.
SPECIAL_K = [1, 31, 32, 33, 63, 64, 65, 127, 128, 300, 1000, 2560]
# Upper bound on M * N * Kp per example: keeps the scalar kernel and the reference fast.
MAC_BUDGET = 6_000_000


def pack_codes(u: torch.Tensor) -> torch.Tensor:
    """The documented byte formula, written independently of torch_bitnet.int4: nibbles u
    (16 T, Kp) -> codes (T, Kp / 8, 64), byte 4r + j of line c of tile t =
    u[16t + r, 8c + j] | u[16t + r, 8c + 4 + j] << 4."""
    rows, kp = u.shape
    t, c, r, j = torch.meshgrid(
        torch.arange(rows // 16), torch.arange(kp // 8), torch.arange(16), torch.arange(4), indexing="ij"
    )
    lo, hi = u[16 * t + r, 8 * c + j], u[16 * t + r, 8 * c + 4 + j]
    return (lo | (hi << 4)).reshape(rows // 16, kp // 8, 64).to(torch.uint8)


def random_table(n: int, k: int, g: torch.Generator, kind: str = "codes") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, scale bfloat16) of an (n, k) table of one kind.

    codes: every nibble 0..15 uniformly (w = -8..7: the kernels take any nibble; quantization
    makes 1..15), random scales, random nibbles in the padding too (the kernels must ignore
    them); zero_rows: some rows all-zero (nibble 8) with scale 0; extreme: every nibble 0 or
    15 (the largest |d|); quantized: quantize_int4_rows of Gaussian rows (what models hold).
    """
    if kind == "quantized":
        return quantize_int4_rows(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
    rows = -(-n // ROW_TILE) * ROW_TILE
    kp = padded_features(k)
    if kind == "extreme":
        u = torch.where(torch.rand(rows, kp, generator=g) < 0.5, 0, 15).to(torch.uint8)
    else:
        u = torch.randint(0, 16, (rows, kp), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, kp // GROUP_SIZE, generator=g) * 0.1).to(torch.bfloat16)
    if kind == "zero_rows":
        zero = torch.rand(n, generator=g) < 0.5
        u[:n][zero] = 8
        scale[zero] = 0.0
    return pack_codes(u), scale


TABLE_KINDS = st.sampled_from(["codes", "codes", "zero_rows", "extreme", "quantized"])


def clip_n(n: int, m: int, k: int) -> int:
    """Shrink N so an example stays within MAC_BUDGET."""
    return max(1, min(n, MAC_BUDGET // max(1, m * padded_features(k))))


def weights(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """w = u - 8 as int64 (n, k), through the test's own reading of the layout."""
    kp = padded_features(k)
    t, c, r, j = torch.meshgrid(
        torch.arange(codes.shape[0]), torch.arange(kp // 8), torch.arange(16), torch.arange(8), indexing="ij"
    )
    byte = codes[t, c, 4 * r + j % 4].to(torch.int64)
    u = torch.where(j < 4, byte & 15, byte >> 4)  # (T, lines, 16, 8)
    return u.permute(0, 2, 1, 3).reshape(-1, kp)[:n, :k] - 8


# --------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------


def test_golden_bytes():
    """Pin the format documented in int4.py with values worked out by hand.

    K = 70 -> Kp = 128: groups k 0-31, 32-63, 64-95 (64-69 real), 96-127 (padding); N = 3 rows
    in one tile of 16. Row 0, group 0: max |W| = 7 -> scale 1, w = round_half_even(W):
    [7, -7, 3.5, 0.5, 1.5, -2.5, 0, 1] -> [7, -7, 4, 0, 2, -2, 0, 1], u = w + 8 =
    [15, 1, 12, 8, 10, 6, 8, 9]; line 0, bytes 0-3 = u[0, j] | u[0, 4 + j] << 4 = AF 61 8C 98.
    Row 0, group 2: max 14 -> scale 2: W[0, 64] = -14 -> u 1, W[0, 69] = 3 -> 1.5 -> 2 -> u 10;
    line 8 (k 64-71): byte 0 = 1 | 8 << 4 = 81, byte 1 = 8 | 10 << 4 = A8. Row 1 is all zero.
    Row 2, group 0: max 1 -> 1/7 = 0.142857.. rounds UP to the bf16 0.1435546875 (the nearest,
    0.142578125, is smaller); 1 / 0.14355 = 6.97 -> 7 (u 15), -0.5 -> -3.48 -> -3 (u 5),
    W[2, 31] = 0.25 -> 1.74 -> 2 (u 10): line 0 bytes 8, 9 = 8F 85; line 3 (k 24-31) byte
    4 * 2 + 3 = 8 | 10 << 4 = A8. Everything else (other groups, rows 3-15, k >= 70) is 0x88.
    """
    w = torch.zeros(3, 70)
    w[0, :8] = torch.tensor([7.0, -7.0, 3.5, 0.5, 1.5, -2.5, 0.0, 1.0])
    w[0, 64], w[0, 69] = -14.0, 3.0
    w[2, 0], w[2, 1], w[2, 31] = 1.0, -0.5, 0.25
    codes, scale = quantize_int4_rows(w.to(torch.bfloat16))  # all these values are exact in bf16
    assert codes.dtype == torch.uint8 and codes.shape == (1, 16, 64)
    assert scale.dtype == torch.bfloat16 and scale.shape == (3, 4)
    assert scale.float().tolist() == [[1.0, 0.0, 2.0, 0.0], [0.0] * 4, [0.1435546875, 0.0, 0.0, 0.0]]
    expected = torch.full((1, 16, 64), 0x88, dtype=torch.uint8)
    expected[0, 0, :4] = torch.tensor([0xAF, 0x61, 0x8C, 0x98])
    expected[0, 8, :2] = torch.tensor([0x81, 0xA8])
    expected[0, 0, 8:10] = torch.tensor([0x8F, 0x85])
    expected[0, 3, 11] = 0xA8
    assert torch.equal(codes, expected)
    back = dequantize_int4_rows(codes, scale, 70)
    assert back[0, :8].tolist() == [7.0, -7.0, 4.0, 0.0, 2.0, -2.0, 0.0, 1.0]
    assert back[0, 64].item() == -14.0 and back[0, 69].item() == 4.0
    s = 0.1435546875
    assert back[2, [0, 1, 31]].tolist() == [7 * s, -3 * s, 2 * s]
    assert not back[1].any()


@given(
    n=st.integers(1, 40),
    k=st.one_of(st.sampled_from(SPECIAL_K), st.integers(1, 700)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_round_trip(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # |w| < 30 * 100 * 6 (outlier factor, row scale, Gaussian tail): finite in float16 too
    w = torch.randn(n, k, generator=g) * 10.0 ** (torch.rand(n, 1, generator=g) * 5 - 3)
    w[torch.rand(n, generator=g) < 0.2] = 0.0  # some all-zero rows
    w[:, torch.rand(k, generator=g) < 0.1] *= 30.0  # outlier columns: their groups get large scales
    w = w.to(dtype)
    before = w.clone()
    codes, scale = quantize_int4_rows(w)
    assert torch.equal(w, before), "the weight was modified"
    kp = padded_features(k)
    assert (codes.shape, tuple(scale.shape)) == int4_shapes(n, k)
    u = unpack_int4_codes(codes, -(-n // 16) * 16)
    assert torch.equal(pack_codes(u), codes)  # the library's layout is the documented formula
    assert bool((u[n:] == 8).all()) and bool((u[:, k:] == 8).all()), "padding must be w = 0"
    assert bool((u >= 1).all()) and bool((u <= 15).all()), "quantization makes w in [-7, 7]"
    # the scale: the smallest bf16 >= max |W| / 7 over the group
    wf = torch.nn.functional.pad(w.float(), (0, kp - k)).view(n, -1, GROUP_SIZE)
    target = wf.abs().amax(2) / 7
    sf = scale.float()
    below = (scale.view(torch.int16) - 1).view(torch.bfloat16).float()  # the next bf16 down
    assert bool((sf >= target).all()) and bool(((below < target) | (sf == 0)).all())
    assert bool(((sf == 0) == (target == 0)).all())
    # round to nearest: error at most half a step (plus float32 slack)
    err = (dequantize_int4_rows(codes, scale, k) - w.float()).abs()
    step = sf.repeat_interleave(GROUP_SIZE, 1)[:, :k]
    assert bool((err <= step * (0.5 + 1e-5)).all())


def test_quantize_in_chunks_equals_at_once(monkeypatch):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 130, generator=g).to(torch.bfloat16)
    whole = quantize_int4_rows(w)
    monkeypatch.setattr(int4, "_QUANTIZE_CHUNK_ROWS", 32)  # a multiple of the 16-row tiles: 32 + 18 rows
    chunked = quantize_int4_rows(w)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (torch.zeros(3, 4, dtype=torch.int32), TypeError, "expects a floating-point tensor"),
        (torch.zeros(12), ValueError, r"expects a 2-D \(N, K\) weight"),
        (torch.zeros(2, MAX_FEATURES + 1), ValueError, "supported maximum is 65536"),
        (torch.tensor([[1.0, math.nan]]), ValueError, "NaN or Inf"),
        (torch.tensor([[1.0], [-math.inf]]), ValueError, "NaN or Inf"),
        (torch.tensor([[1e300]], dtype=torch.float64), ValueError, "NaN or Inf"),  # Inf in float32
    ],
)
def test_quantize_errors(weight, error, match):
    with pytest.raises(error, match=match):
        quantize_int4_rows(weight)


# --------------------------------------------------------------------------------------
# int4_linear: exact accumulation
# --------------------------------------------------------------------------------------


def test_int4_linear_known_values(isa):
    # x = [127, 1, -2]: a = 1, xq = x. Row 0: w = [1, -1, 0], scale 0.5 -> d = 126 -> 63.
    # Row 1: w = [-8, 7, 7], scale 1 -> d = -1016 + 7 - 14 = -1023. Bias [1, 0].
    u = torch.full((16, 64), 8, dtype=torch.uint8)
    u[0, :3] = torch.tensor([9, 7, 8])
    u[1, :3] = torch.tensor([0, 15, 15])
    codes = pack_codes(u)
    scale = torch.zeros(2, 2, dtype=torch.bfloat16)
    scale[:, 0] = torch.tensor([0.5, 1.0])
    x = torch.tensor([[127.0, 1.0, -2.0]])
    y = torch_bitnet.int4_linear(x, codes, scale, 3, 2, torch.tensor([1.0, 0.0]))
    assert y.tolist() == [[64.0, -1023.0]]
    yb = torch_bitnet.int4_linear(x.to(torch.bfloat16), codes, scale, 3, 2)
    assert yb.dtype == torch.bfloat16 and yb.tolist() == [[63.0, -1024.0]]  # -1023 rounds to bf16's -1024


# 1: the decode tile; 2, 3: the 2-chain tiles; 8: a full prefill tile; 9, 13: a full tile and a rest
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 13])
@pytest.mark.parametrize("k", [1, 32, 65, 1000])
def test_int4_linear_exact_accumulation(isa, m, k):
    """Every scale 1 and a = 1 make the float32 output the exact integer sum over groups
    (|sum| <= 8 * 127 * 1000 < 2**24: no float32 rounding anywhere)."""
    g = torch.Generator().manual_seed(m * 10000 + k)
    n = 37  # 2 tiles and 5 rows
    codes, _ = random_table(n, k, g, "codes")
    u = unpack_int4_codes(codes, 48)
    u[0], u[1] = 15, 0  # w = +7 and -8 everywhere
    codes = pack_codes(u)
    scale = torch.ones(int4_shapes(n, k)[1], dtype=torch.bfloat16)
    x = torch.randint(-127, 128, (m, k), generator=g).float()
    x[:, 0] = 127.0  # max |x| = 127 -> a = 1, xq = x
    x[0, :] = 127.0  # the largest |acc| row
    y = torch_bitnet.int4_linear(x, codes, scale, k, n)
    acc = x.to(torch.int64) @ weights(codes, n, k).t()
    assert torch.equal(y, acc.float())
    assert y[0, 0].item() == 7 * 127 * k and y[0, 1].item() == -8 * 127 * k


@pytest.mark.parametrize("m", [1, 9])
def test_int4_linear_largest_k(isa, m):
    """K = 65536 (the maximum), 2048 groups: with x = +-127 and w = 7 a group's d is
    +-32 * 7 * 127 = +-2**5 * 889 and the running sums 2**5 * 889 * g stay exact in float32
    (889 g < 2**24), so the results are exact: +-7 * 127 * 2**16 and so on."""
    k = MAX_FEATURES
    u = torch.full((16, k), 8, dtype=torch.uint8)
    u[0], u[1] = 15, 1  # w = +7, -7
    u[2, ::2], u[2, 1::2] = 15, 1  # alternating: d = 0 per group for a constant x
    u[3, : k // 2] = 15  # half the row
    codes = pack_codes(u)
    scale = torch.ones(6, k // GROUP_SIZE, dtype=torch.bfloat16)
    x = torch.full((m, k), 127.0)
    x[1:] = -127.0
    y = torch_bitnet.int4_linear(x, codes, scale, k, 6)
    top = 7 * 127 * k
    assert y[0].tolist() == [top, -top, 0.0, top // 2, 0.0, 0.0]
    if m > 1:
        assert y[1].tolist() == [-top, top, 0.0, -top // 2, 0.0, 0.0]
    assert_bitwise_equal(y, reference.int4_linear(x, codes, scale, k, 6))


# --------------------------------------------------------------------------------------
# int4_linear against the reference
# --------------------------------------------------------------------------------------

K_ANY = st.one_of(st.sampled_from(SPECIAL_K), st.integers(1, 1100))
LEAD = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 300)),
    st.tuples(st.integers(0, 17), st.integers(0, 17)),
    st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 12)),
)
SCALE_KINDS = st.sampled_from(["random", "random", "zero", "huge", "tiny", "signed"])


@given(
    lead=LEAD,
    k=K_ANY,
    n=st.integers(1, 150).map(lambda v: 2 * v - 1),  # odd N: never a whole number of tiles
    dtype=st.sampled_from(FLOAT_DTYPES),
    kinds=st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=4),
    table=TABLE_KINDS,
    scale_kind=SCALE_KINDS,
    bias_kind=st.sampled_from([None, "float32", "same"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_int4_linear_matches_reference(isa, lead, k, n, dtype, kinds, table, scale_kind, bias_kind, seed):
    m = math.prod(lead)
    n = clip_n(n, m, k)
    g = torch.Generator().manual_seed(seed)
    codes, scale = random_table(n, k, g, table)
    if scale_kind == "zero":
        scale = torch.zeros_like(scale)
    elif scale_kind == "huge":  # products overflow float32 to +-Inf; Inf - Inf and Inf * 0 give NaN
        scale = (torch.rand(scale.shape, generator=g) * 1e36).to(torch.bfloat16)
    elif scale_kind == "tiny":  # float32 subnormal products
        scale = (torch.rand(scale.shape, generator=g) * 1e-38).to(torch.bfloat16)
    elif scale_kind == "signed":  # the format never makes them, the kernels take any value
        scale = (torch.randn(scale.shape, generator=g)).to(torch.bfloat16)
    x = make_x(lead, k, dtype, kinds, seed)
    bias_dtype = torch.float32 if bias_kind == "float32" else dtype
    bias = None if bias_kind is None else torch.randn(n, generator=g).to(bias_dtype)
    y = torch_bitnet.int4_linear(x, codes, scale, k, n, bias)
    assert y.dtype == dtype and tuple(y.shape) == (*lead, n)
    assert_bitwise_equal(y, reference.int4_linear(x, codes, scale, k, n, bias))


def test_int4_linear_nan_rows(isa):
    """The NaN contract of int8_linear: a row with NaN / Inf gives a NaN row, other rows are unaffected."""
    codes, scale = random_table(20, 100, torch.Generator().manual_seed(0), "quantized")
    x = torch.randn(4, 100)
    x[1, 7], x[2, 0] = math.nan, math.inf
    y = torch_bitnet.int4_linear(x, codes, scale, 100, 20)
    assert bool(y[1].isnan().all()) and bool(y[2].isnan().all())
    assert bool(y[[0, 3]].isfinite().all())


def test_int4_linear_threads_agree(isa):
    """The work split over threads (row ranges, chunks taken by threads that finish early)
    does not change a bit."""
    before = torch.get_num_threads()
    try:
        g = torch.Generator().manual_seed(5)
        k, n = 300, 1000  # several 64-row tasks per thread
        codes, scale = random_table(n, k, g, "quantized")
        bias = torch.randn(n, generator=g)
        for m in (1, 20):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            expected = reference.int4_linear(x, codes, scale, k, n, bias)
            for threads in (1, 2, 3, 8):
                torch.set_num_threads(threads)
                assert_bitwise_equal(torch_bitnet.int4_linear(x, codes, scale, k, n, bias), expected)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int4_linear_empty_batch(isa, dtype):
    codes, scale = random_table(6, 300, torch.Generator().manual_seed(0))
    for lead in [(0,), (0, 3), (2, 0, 4)]:
        y = torch_bitnet.int4_linear(torch.randn(*lead, 300).to(dtype), codes, scale, 300, 6, torch.ones(6))
        assert y.dtype == dtype and tuple(y.shape) == (*lead, 6)


def test_int4_linear_non_contiguous(isa):
    g = torch.Generator().manual_seed(9)
    k, n = 300, 13
    codes, scale = random_table(n, k, g)
    wide = torch.zeros(codes.shape[0], codes.shape[1], 128, dtype=torch.uint8)
    wide[:, :, 32:96] = codes
    codes_view = wide[:, :, 32:96]
    scale_view = torch.stack([scale, scale], 2)[:, :, 0]
    # contiguous, but 2 bytes off a 4-byte boundary (the kernels read scale pairs as dwords)
    flat = torch.empty(scale.numel() + 1, dtype=torch.bfloat16)
    flat[1:] = scale.reshape(-1)
    scale_odd = flat[1:].view(scale.shape)
    assert not codes_view.is_contiguous() and not scale_view.is_contiguous()
    assert scale_odd.is_contiguous() and scale_odd.data_ptr() % 4 == 2
    for x in (torch.randn(k, 7, generator=g).t(), torch.randn(7, 2 * k, generator=g)[:, ::2],
              torch.randn(1, k).expand(4, k)):
        expected = reference.int4_linear(x.contiguous(), codes, scale, k, n)
        assert_bitwise_equal(torch_bitnet.int4_linear(x, codes_view, scale_view, k, n), expected)
        assert_bitwise_equal(torch_bitnet.int4_linear(x, codes, scale_odd, k, n), expected)


# --------------------------------------------------------------------------------------
# int4_embedding
# --------------------------------------------------------------------------------------


@given(
    shape=st.lists(st.integers(0, 6), max_size=3).map(tuple),
    rows=st.integers(1, 50),
    d=st.one_of(st.sampled_from(SPECIAL_K), st.integers(1, 700)),
    dtype=st.sampled_from(FLOAT_DTYPES),
    table=TABLE_KINDS,
    seed=st.integers(0, 2**31 - 1),
)
def test_int4_embedding_matches_reference(shape, rows, d, dtype, table, seed):
    g = torch.Generator().manual_seed(seed)
    codes, scale = random_table(rows, d, g, table)
    ids = torch.randint(0, rows, shape, generator=g)
    out = torch_bitnet.int4_embedding(ids, codes, scale, d, dtype)
    assert out.dtype == dtype and tuple(out.shape) == (*shape, d)
    assert_bitwise_equal(out, reference.int4_embedding(ids, codes, scale, d, dtype))
    if ids.numel():
        # the float32 lookup is the dequantized table's row, and that is (w - 8) * scale by the test's own reading
        table_f = dequantize_int4_rows(codes, scale, d)
        assert torch.equal(torch_bitnet.int4_embedding(ids, codes, scale, d, torch.float32), table_f[ids])
        by_hand = weights(codes, rows, d).float() * scale.float().repeat_interleave(GROUP_SIZE, 1)[:, :d]
        assert torch.equal(table_f, by_hand)


def test_int4_embedding_large_batch_non_contiguous():
    # Enough ids to split over threads; ids and the table as views.
    g = torch.Generator().manual_seed(3)
    codes, scale = random_table(300, 2560, g, "quantized")
    ids = torch.randint(0, 300, (64, 40), generator=g).t()
    assert not ids.is_contiguous()
    out = torch_bitnet.int4_embedding(ids, codes[:, :], scale, 2560, torch.bfloat16)
    assert_bitwise_equal(out, reference.int4_embedding(ids, codes, scale, 2560, torch.bfloat16))


@pytest.mark.parametrize("bad", [-1, 5, 15, 2**40])  # 15: a padding row of the 16-row tile, still out of range
def test_int4_embedding_out_of_range(bad):
    codes, scale = random_table(5, 8, torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 4], [bad, 1]])
    with pytest.raises(IndexError, match=f"id {bad} is out of range: the table has 5 rows"):
        torch_bitnet.int4_embedding(ids, codes, scale, 8, torch.float32)
    with pytest.raises(IndexError, match=f"id {bad} is out of range: the table has 5 rows"):
        reference.int4_embedding(ids, codes, scale, 8, torch.float32)


# --------------------------------------------------------------------------------------
# Errors, in eager mode and in the fake kernels (what torch.compile traces)
# --------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _codes(n, k, dtype=torch.uint8):
    return torch.full(int4_shapes(n, k)[0], 0x88 if dtype == torch.uint8 else 0, dtype=dtype)


def _scale(n, k, dtype=torch.bfloat16):
    return torch.zeros(int4_shapes(n, k)[1], dtype=dtype)


ERROR_CASES = [
    ("x_int32", lambda: IL(_x(2, 8, dtype=torch.int32), _codes(4, 8), _scale(4, 8), 8, 4),
     TypeError, "int4_linear input must be float32, bfloat16 or float16"),
    ("x_float64", lambda: IL(_x(2, 8, dtype=torch.float64), _codes(4, 8), _scale(4, 8), 8, 4),
     TypeError, "int4_linear input must be float32, bfloat16 or float16"),
    ("x_0d", lambda: IL(_x(), _codes(4, 8), _scale(4, 8), 8, 4),
     ValueError, "int4_linear input must have at least 1 dimension"),
    ("x_wrong_k", lambda: IL(_x(2, 7), _codes(4, 8), _scale(4, 8), 8, 4),
     ValueError, "int4_linear input has 7 features in its last dimension, expected in_features=8"),
    ("weight_int8", lambda: IL(_x(2, 8), _codes(4, 8, torch.int8), _scale(4, 8), 8, 4),
     TypeError, "int4_linear weight must be uint8 codes"),
    ("weight_2d", lambda: IL(_x(2, 8), torch.zeros(16, 32, dtype=torch.uint8), _scale(4, 8), 8, 4),
     ValueError, "int4_linear weight has shape"),
    ("weight_wrong_tiles", lambda: IL(_x(2, 8), _codes(17, 8), _scale(4, 8), 8, 4),
     ValueError, "int4_linear weight has shape"),
    ("weight_wrong_k", lambda: IL(_x(2, 8), _codes(4, 100), _scale(4, 8), 8, 4),
     ValueError, "int4_linear weight has shape"),
    ("scale_float32", lambda: IL(_x(2, 8), _codes(4, 8), _scale(4, 8, torch.float32), 8, 4),
     ValueError, r"int4_linear scale must be bfloat16 of shape \(4, 2\)"),
    ("scale_wrong_rows", lambda: IL(_x(2, 8), _codes(4, 8), _scale(5, 8), 8, 4),
     ValueError, r"int4_linear scale must be bfloat16 of shape \(4, 2\)"),
    ("scale_1d", lambda: IL(_x(2, 8), _codes(4, 8), torch.zeros(8, dtype=torch.bfloat16), 8, 4),
     ValueError, r"int4_linear scale must be bfloat16 of shape \(4, 2\)"),
    ("bias_wrong_length", lambda: IL(_x(2, 8), _codes(4, 8), _scale(4, 8), 8, 4, _x(5)),
     ValueError, "bias has shape"),
    ("bias_int", lambda: IL(_x(2, 8), _codes(4, 8), _scale(4, 8), 8, 4, _x(4, dtype=torch.int32)),
     TypeError, "bias must be float32, bfloat16 or float16"),
    ("in_features_0", lambda: IL(_x(2, 0), _codes(4, 1), _scale(4, 1), 0, 4),
     ValueError, "int4_linear sizes must be >= 1"),
    ("out_features_0", lambda: IL(_x(2, 8), _codes(1, 8)[:0], _scale(1, 8)[:0], 8, 0),
     ValueError, "int4_linear sizes must be >= 1"),
    ("in_features_too_big", lambda: IL(_x(1, 2**16 + 1), _codes(1, 2**16 + 1), _scale(1, 2**16 + 1), 2**16 + 1, 1),
     ValueError, "int4_linear has 65537 features; the supported maximum is 65536"),
    ("ids_int32", lambda: IE(_x(3, dtype=torch.int32), _codes(4, 8), _scale(4, 8), 8, torch.float32),
     TypeError, "int4_embedding ids must be int64"),
    ("ids_float", lambda: IE(_x(3), _codes(4, 8), _scale(4, 8), 8, torch.float32),
     TypeError, "int4_embedding ids must be int64"),
    ("emb_scale_1d", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8), torch.zeros(8, dtype=torch.bfloat16), 8,
                                torch.float32),
     ValueError, r"int4_embedding scale must be 2-D \(rows, Kp/32\)"),
    ("emb_weight_width", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 100), _scale(4, 8), 8, torch.float32),
     ValueError, "int4_embedding weight has shape"),
    ("emb_weight_tiles", lambda: IE(_x(3, dtype=torch.int64), _codes(40, 8), _scale(4, 8), 8, torch.float32),
     ValueError, "int4_embedding weight has shape"),
    ("emb_weight_int8", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8, torch.int8), _scale(4, 8), 8,
                                   torch.float32),
     TypeError, "int4_embedding weight must be uint8 codes"),
    ("emb_scale_dtype", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8), _scale(4, 8, torch.float16), 8,
                                   torch.float32),
     ValueError, r"int4_embedding scale must be bfloat16 of shape \(4, 2\)"),
    ("emb_dim_0", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8), _scale(4, 8), 0, torch.float32),
     ValueError, "int4_embedding sizes must be >= 1"),
    ("emb_dtype", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8), _scale(4, 8), 8, torch.float64),
     TypeError, "int4_embedding dtype must be float32, bfloat16 or float16"),
]


test_errors_eager, test_errors_fake_kernels = error_tests(ERROR_CASES)


def test_errors_reference():
    # The reference checks the table like the op (it shares int4.check_int4_weight).
    with pytest.raises(ValueError, match="int4_linear weight has shape"):
        reference.int4_linear(_x(2, 8), _codes(40, 8), _scale(4, 8), 8, 4)
    with pytest.raises(TypeError, match="int4_embedding weight must be uint8 codes"):
        reference.int4_embedding(torch.zeros(2, dtype=torch.int64), _codes(4, 8, torch.int8), _scale(4, 8), 8,
                                 torch.float32)


def test_error_at_trace_time():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda x, w, s: torch_bitnet.int4_linear(x, w, s, 8, 4), backend=counter, fullgraph=True)
    with pytest.raises(Exception, match="has 7 features in its last dimension") as info:
        compiled(_x(2, 7), _codes(4, 8), _scale(4, 8))
    assert counter.frame_count == 0, "the graph compiled: the error came at run time, not from the fake kernel"
    assert isinstance(info.value, ValueError) or "got ValueError(" in str(info.value)


def test_backward_raises_a_clear_error():
    x = torch.randn(2, 64, requires_grad=True)
    codes, scale = random_table(4, 64, torch.Generator().manual_seed(0))
    y = torch_bitnet.int4_linear(x, codes, scale, 64, 4)
    with pytest.raises(RuntimeError, match="bitnet::int4_linear is an inference op"):
        y.sum().backward()


# --------------------------------------------------------------------------------------
# opcheck and torch.compile
# --------------------------------------------------------------------------------------


def _opcheck_cases():
    g = torch.Generator().manual_seed(3)
    cases = []
    for dtype in FLOAT_DTYPES:
        for lead, k, n in [((3,), 300, 5), ((2, 4), 64, 17), ((1,), 1, 1), ((0, 2), 40, 3)]:
            codes, scale = random_table(n, k, g)
            x = torch.randn(*lead, k, generator=g).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype)
            cases.append((f"int4_linear-{dtype}-{lead}-{k}-{n}", IL, (x, codes, scale, k, n)))
            cases.append((f"int4_linear_bias-{dtype}-{lead}-{k}-{n}", IL, (x, codes, scale, k, n, bias)))
            ids = torch.randint(0, n, lead, generator=g)
            cases.append((f"int4_embedding-{dtype}-{lead}-{k}-{n}", IE, (ids, codes, scale, k, dtype)))
    return cases


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("op,args", [c[1:] for c in OPCHECK_CASES], ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck(op, args):
    torch._dynamo.reset()
    torch.library.opcheck(op, args)


class TinyTiedLM(torch.nn.Module):
    """Embedding -> ReLU -> tied lm_head: a BitNet model's two ends, with an exact op between them
    (so inductor's fusion of it cannot change any bit and compiled == eager bit for bit)."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype)
        self.embed = torch_bitnet.Int4Embedding.from_float(table)
        self.head = torch_bitnet.Int4Linear.tied_to(self.embed)

    def forward(self, ids):
        return self.head(torch.relu(self.embed(ids)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_fullgraph(dtype):
    torch._dynamo.reset()
    model = TinyTiedLM(300, 96, dtype, seed=1)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # same shape, new values: one compilation
        ids = torch.randint(0, 300, (2, 5), generator=g)
        assert_bitwise_equal(compiled(ids), model(ids))
    assert counter.frame_count == 1
    targets = [node.target for node in counter.graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.bitnet.int4_embedding.default) == 1
    assert targets.count(torch.ops.bitnet.int4_linear.default) == 1


def test_compile_dynamic_batch():
    torch._dynamo.reset()
    model = TinyTiedLM(257, 64, torch.bfloat16, seed=3)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(4)
    for m in (2, 3, 5, 8, 3, 13):
        ids = torch.randint(0, 257, (m,), generator=g)
        assert_bitwise_equal(compiled(ids), model(ids))
    assert counter.frame_count == 1, "varying the batch size recompiled a dynamic=True graph"


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


def test_int4_linear_module_from_linear_and_weight():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(100, 37, bias=True)
    layer = torch_bitnet.Int4Linear.from_float(linear)
    assert (layer.in_features, layer.out_features) == (100, 37)
    assert layer.weight.shape == (3, 16, 64) and layer.weight.dtype == torch.uint8
    assert layer.weight_scale.shape == (37, 4) and layer.weight_scale.dtype == torch.bfloat16
    assert layer.bias.dtype == torch.float32
    codes, scale = quantize_int4_rows(linear.weight.detach())
    assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scale)
    x = torch.randn(4, 100, generator=g).to(torch.bfloat16)
    bias = linear.bias.detach().float()
    assert_bitwise_equal(layer(x), reference.int4_linear(x, codes, scale, 100, 37, bias))
    # a plain weight with a separate bias gives the same layer
    same = torch_bitnet.Int4Linear.from_float(linear.weight.detach(), bias=linear.bias.detach().to(torch.bfloat16))
    assert_bitwise_equal(same(x), reference.int4_linear(x, codes, scale, 100, 37, bias.to(torch.bfloat16).float()))
    assert torch_bitnet.Int4Linear.from_float(torch.nn.Linear(10, 3, bias=False)).bias is None
    assert "in_features=100, out_features=37, bias=True" in repr(layer)
    assert torch.equal(layer.dequantize(), dequantize_int4_rows(codes, scale, 100))


def test_module_errors():
    with pytest.raises(ValueError, match="got both a bias and an nn.Linear with one"):
        torch_bitnet.Int4Linear.from_float(torch.nn.Linear(4, 3), bias=torch.zeros(3))
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(3,\)"):
        torch_bitnet.Int4Linear.from_float(torch.zeros(3, 4), bias=torch.zeros(4))
    with pytest.raises(TypeError, match="expects an nn.Linear or a tensor"):
        torch_bitnet.Int4Linear.from_float("weight")
    with pytest.raises(TypeError, match="expects an Int4Embedding"):
        torch_bitnet.Int4Linear.tied_to(torch.nn.Embedding(3, 4))
    with pytest.raises(TypeError, match="expects an Int4Embedding"):
        torch_bitnet.Int4Linear.tied_to(torch_bitnet.Int8Embedding(3, 4))
    with pytest.raises(ValueError, match="does not support nn.Embedding\\(max_norm"):
        torch_bitnet.Int4Embedding.from_float(torch.nn.Embedding(3, 4, max_norm=1.0))
    with pytest.raises(TypeError, match="expects an nn.Embedding or a tensor"):
        torch_bitnet.Int4Embedding.from_float([1.0])
    with pytest.raises(ValueError, match="output_dtype must be float32, bfloat16 or float16"):
        torch_bitnet.Int4Embedding.from_float(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Int4Linear sizes must be >= 1"):
        torch_bitnet.Int4Linear(0, 3)


def test_embedding_module():
    emb = torch.nn.Embedding(50, 70, padding_idx=0).to(torch.bfloat16)
    module = torch_bitnet.Int4Embedding.from_float(emb)
    assert module.output_dtype == torch.bfloat16 and module.weight.shape == (4, 16, 64)
    assert module.weight_scale.shape == (50, 4)
    ids = torch.tensor([[0, 49, 3], [3, 3, 7]])
    out = module(ids)
    assert_bitwise_equal(out, reference.int4_embedding(ids, module.weight, module.weight_scale, 70, torch.bfloat16))
    # close to the float table: at most half a step per element, plus bf16 output rounding
    step = module.weight_scale.float().repeat_interleave(GROUP_SIZE, 1)[:, :70][ids]
    assert bool(((out.float() - emb.weight.detach()[ids].float()).abs() <= step / 2 + out.float().abs() / 128).all())
    assert module.dequantize().shape == (50, 70)
    assert "50, 70, output_dtype=torch.bfloat16" in repr(module)
    # 4.5 bits per weight: 4-bit codes and one bf16 scale per 32 (vs int8's 8 bits + a scale per row)
    table = torch_bitnet.Int4Embedding.from_float(torch.randn(1024, 2560))
    bits = (table.weight.numel() + 2 * table.weight_scale.numel()) * 8 / (1024 * 2560)
    assert bits == 4.5


def test_tied_modules_share_the_table():
    embed = torch_bitnet.Int4Embedding.from_float(torch.randn(300, 96), output_dtype=torch.bfloat16)
    head = torch_bitnet.Int4Linear.tied_to(embed)
    assert (head.in_features, head.out_features, head.bias) == (96, 300, None)
    assert head.weight is embed.weight and head.weight_scale is embed.weight_scale
    assert head.weight.untyped_storage().data_ptr() == embed.weight.untyped_storage().data_ptr()
    # the lm_head multiplies by exactly the rows the embedding returns
    h = torch.randn(3, 96)
    assert_bitwise_equal(head(h), reference.int4_linear(h, embed.weight, embed.weight_scale, 96, 300))
    # ... which are the rows the embedding op reads from the same buffers (float32: not rounded)
    rows = torch_bitnet.int4_embedding(torch.arange(300), embed.weight, embed.weight_scale, 96, torch.float32)
    xq, a = reference.quantize_act(h)
    assert torch.allclose(head(h), (xq.float() @ rows.t()) / a, rtol=1e-5, atol=1e-5)
    # one table in memory, in a model too
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    distinct = {t.untyped_storage().data_ptr() for t in model.buffers()}
    assert len(distinct) == 2  # weight and weight_scale, each once


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(1)
    model = TinyTiedLM(200, 80, torch.bfloat16, seed=5)
    head = torch_bitnet.Int4Linear.from_float(torch.randn(33, 80, generator=g), bias=torch.randn(33, generator=g))
    state = {**model.state_dict(), **{f"extra.{k}": v for k, v in head.state_dict().items()}}
    assert set(model.state_dict()) == {"embed.weight", "embed.weight_scale", "head.weight", "head.weight_scale"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    # torch.save keeps the tie: the two keys are one storage after loading
    assert loaded["embed.weight"].untyped_storage().data_ptr() == loaded["head.weight"].untyped_storage().data_ptr()

    fresh = TinyTiedLM(200, 80, torch.bfloat16, seed=6)  # other values, same shapes
    fresh.load_state_dict({k: v for k, v in loaded.items() if not k.startswith("extra.")})
    assert fresh.head.weight is fresh.embed.weight  # loading copied into the shared buffers
    ids = torch.randint(0, 200, (2, 7), generator=g)
    assert_bitwise_equal(fresh(ids), model(ids))

    fresh_head = torch_bitnet.Int4Linear(80, 33, bias=True)
    fresh_head.load_state_dict({k.removeprefix("extra."): v for k, v in loaded.items() if k.startswith("extra.")})
    x = torch.randn(4, 80, generator=g)
    assert_bitwise_equal(fresh_head(x), head(x))


# --------------------------------------------------------------------------------------
# Loading, saving and patching whole models
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from torch_bitnet.checkpoints import small_config, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("int4"), small_config("odd"), mode="offline", seed=7)


def test_model_save_load_convert_and_patch(checkpoint, tmp_path):
    """lm_head="int4": one int4 table for the tied pair; it survives save_pretrained ->
    from_pretrained (recorded as "lm_head": "int4"); convert_checkpoint stores it; patch()
    quantizes exactly as from_pretrained; an int4 checkpoint cannot be loaded in another form."""
    from transformers import AutoModelForCausalLM

    from torch_bitnet.loading import PACKED_FILE

    model = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32, lm_head="int4")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, torch_bitnet.Int4Embedding) and isinstance(head, torch_bitnet.Int4Linear)
    assert head.weight is embedding.weight and head.weight_scale is embedding.weight_scale  # tied: one table
    ids = torch.randint(0, 900, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        saved = torch_bitnet.save_pretrained(model, tmp_path / "int4")
        assert json.loads((saved / "config.json").read_text())["torch_bitnet"]["lm_head"] == "int4"
        again = torch_bitnet.from_pretrained(saved, dtype=torch.float32, lm_head="int4")
        assert again.lm_head.weight is again.model.embed_tokens.weight
        assert torch.equal(again(ids).logits, logits)
        hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        patched = torch_bitnet.patch(hf, lm_head="int4")
        assert isinstance(patched.lm_head, torch_bitnet.Int4Linear)
        assert patched.lm_head.weight is patched.model.embed_tokens.weight
        assert torch.equal(patched.model.embed_tokens.weight, embedding.weight)
        assert torch.equal(patched.model.embed_tokens.weight_scale, embedding.weight_scale)
    for other in ("int8", "bf16"):
        with pytest.raises(ValueError, match="stores an int4 embedding"):
            torch_bitnet.from_pretrained(saved, lm_head=other)
    converted = torch_bitnet.convert_checkpoint(checkpoint, tmp_path / "conv", dtype=torch.float32, lm_head="int4",
                                                progress=False)
    int8 = torch_bitnet.convert_checkpoint(checkpoint, tmp_path / "conv8", dtype=torch.float32, lm_head="int8",
                                           progress=False)
    assert (converted / PACKED_FILE).stat().st_size < (int8 / PACKED_FILE).stat().st_size
    with torch.no_grad():
        assert torch.equal(torch_bitnet.from_pretrained(converted, dtype=torch.float32, lm_head="int4")(ids).logits,
                           logits)


def test_cli_lm_head_int4(capsys, checkpoint):
    """torch-bitnet generate --lm-head int4 generates what the int4-lm_head model generates."""
    from transformers import AutoTokenizer

    from torch_bitnet import cli
    from torch_bitnet.generate import generate

    model = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32, lm_head="int4")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = generate(model, tokenizer, "Once upon a time", 8, compile=False, eos=False)
    code = cli.main(["generate", "--model", str(checkpoint), "--prompt", "Once upon a time", "--max-new-tokens", "8",
                     "--ignore-eos", "--lm-head", "int4", "--dtype", "float32", "--no-compile"])
    assert code == 0 and capsys.readouterr().out == expected.text + "\n"


def test_bytes_by_kind_counts_the_int4_table(checkpoint):
    from torch_bitnet.bench import bytes_by_kind

    model = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32, lm_head="int4")
    sizes = bytes_by_kind(model)
    embedding = model.get_input_embeddings()
    assert sizes["embedding"] == embedding.weight.numel() + 2 * embedding.weight_scale.numel()
    assert sizes["lm_head"] == 0  # tied to the embedding: counted once


# --------------------------------------------------------------------------------------
# Quality against the float lm_head
# --------------------------------------------------------------------------------------

# (outlier channel factor, max rel. error, mean rel. error, top-1 agreement): the bounds the
# test asserts, with about 1.25x headroom over the errors measured on this seeded data (and
# 1.5x on the top-1 disagreement rate).
QUALITY_CASES = [(1.0, 0.18, 0.125, 0.75), (10.0, 0.18, 0.125, 0.72)]


@pytest.mark.parametrize("outlier,max_tol,mean_tol,top1_tol", QUALITY_CASES, ids=["no_outliers", "outliers_x10"])
def test_quality_vs_float_lm_head(outlier, max_tol, mean_tol, top1_tol):
    """int4 lm_head logits against the exact logits of the bf16 lm_head (float64 of the bf16 values).

    The data of tests/test_int8_head.py::test_quality_vs_float_lm_head: a (vocab 4096, hidden
    512) bf16 table of Gaussian rows whose norms vary by 3x, 256 bf16 hidden states, 4 of whose
    512 channels are scaled by ``outlier``. Error of a row: max_n |logit - exact| / max_n |exact|;
    top-1: argmax equal.

    Measured (float32 output; bf16 output within 0.002 of it), int8's figures for comparison:

    =================  ============  =============  =====  ==========================
    case               max rel. err  mean rel. err  top-1  int8: max / mean / top-1
    =================  ============  =============  =====  ==========================
    no outliers        0.14          0.099          0.83   0.017 / 0.011 / 0.98
    outliers x10       0.14          0.100          0.81   0.045 / 0.025 / 0.95
    =================  ============  =============  =====  ==========================

    Where the error comes from: rounding each weight to its group's step max|W_g| / 7 (the
    largest of 32 Gaussian values is about 2.1 sigma, so the step is ~0.3 sigma and the rounding
    noise ~0.09 sigma, about 10% of the weight's RMS) gives almost all of it, about 9x int8's
    per-row step of max|W_n| / 127; the int8 activations add little, even with outliers (they
    dominate the int8 table's error). Top-1 flips happen on rows whose two best logits are
    closer than that (random logits often are). Asserted:

    * every logit lies within the worst-case bound of the two roundings,
      sum_k |h - h_q| |W| + sum_k |h_q| |W - W_q| (triangle inequality; a violation is a kernel bug),
      plus the float32 evaluation: (groups + 2) roundings of 2**-24 relative to sum |h_q| |W_q|;
    * top-1 agrees on every row whose exact margin exceeds twice that row's bound;
    * the max / mean errors and the top-1 rate stay within the table's figures plus headroom.
    """
    g = torch.Generator().manual_seed(0)
    vocab, hidden, m = 4096, 512, 256
    table = (torch.randn(vocab, hidden, generator=g) * (0.5 + torch.rand(vocab, 1, generator=g)) / hidden**0.5)
    table = table.to(torch.bfloat16)
    h = torch.randn(m, hidden, generator=g)
    h[:, torch.randperm(hidden, generator=g)[:4]] *= outlier
    h = h.to(torch.bfloat16)
    head = torch_bitnet.Int4Linear.from_float(table)

    exact = h.double() @ table.double().t()
    ours = torch_bitnet.int4_linear(h.float(), head.weight, head.weight_scale, hidden, vocab).double()
    ours_bf16 = head(h).double()

    xq, a = reference.quantize_act(h)
    hq = xq.double() / a.double()
    wq = head.dequantize().double()
    bound = (h.double() - hq).abs() @ table.double().abs().t() + hq.abs() @ (table.double() - wq).abs().t()
    slack = (hidden // GROUP_SIZE + 2) * 2.0**-24 * (hq.abs() @ wq.abs().t()) + 1e-9
    assert bool(((ours - exact).abs() <= bound + slack).all())

    def summary(y):
        rel = (y - exact).abs().amax(1) / exact.abs().amax(1)
        return rel.max().item(), rel.mean().item(), (y.argmax(1) == exact.argmax(1)).double().mean().item()

    top2 = exact.topk(2, dim=1).values
    safe = (top2[:, 0] - top2[:, 1]) > 2 * bound.amax(1)
    assert bool((ours.argmax(1) == exact.argmax(1))[safe].all())

    worst, mean, top1 = summary(ours)
    worst16, mean16, top1_16 = summary(ours_bf16)
    int8 = summary(torch_bitnet.Int8Linear.from_float(table)(h.float()).double())
    print(
        f"\nint4 lm_head, outliers x{outlier:g}: max rel. err {worst:.4f}, mean {mean:.4f}, top-1 {top1:.3f} "
        f"(bf16 output: {worst16:.4f} / {mean16:.4f} / {top1_16:.3f}); int8 lm_head: "
        f"{int8[0]:.4f} / {int8[1]:.4f} / {int8[2]:.3f}"
    )
    assert worst <= max_tol and mean <= mean_tol and top1 >= top1_tol
    assert worst16 <= max_tol and mean16 <= mean_tol and top1_16 >= top1_tol
