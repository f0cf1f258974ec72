"""The int8 per-row lm_head / embedding: format, ops, modules, and the quality of the logits.

Against the plain-PyTorch reference (torch_bitnet.reference.int8_linear / int8_embedding) there
is no tolerance: on every kernel path (the ``isa`` fixture) the int32 accumulation is exact and
the float32 epilogue ``acc * (scale[n] / a) + bias`` is the same sequence of float32
operations, rounded once to the output dtype, so outputs are bit-identical (NaN positions
compared, not NaN payloads).

The exact integer accumulation is also checked without the reference: with ``scale = 1`` and
activations whose max |x| is 127, the activation scale is a = 1 exactly, so a float32 output
is the integer ``acc`` itself (exact below 2**24, and for the K = 65536 extremes, which are
multiples of 2**16).

Quality (test_quality_vs_float_lm_head): the int8 table and int8 activations against the exact
logits of the bf16 lm_head, see that test for the error model and the measured figures.
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given
from hypothesis import strategies as st

import torch_bitnet
from torch_bitnet import int8, reference
from torch_bitnet.int8 import MAX_FEATURES, dequantize_int8_rows, int8_shape, padded_features, quantize_int8_rows

# The activation generators and the bitwise comparison of the bitlinear tests (tests/ is on
# sys.path under pytest's default import mode).
from test_ops import FLOAT_DTYPES, ROW_KINDS, assert_bitwise_equal, make_x

from _error_cases import error_tests

IL = torch.ops.bitnet.int8_linear.default
IE = torch.ops.bitnet.int8_embedding.default
# K on and around the 64-byte steps, a few odd sizes, and the 2B-4T hidden size.
SPECIAL_K = [1, 63, 64, 65, 127, 128, 300, 1000, 2560]
# Upper bound on M * N * Kp per example: keeps the scalar kernel and the reference fast.
MAC_BUDGET = 6_000_000


def random_table(n: int, k: int, g: torch.Generator, kind: str = "codes") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 (n, Kp), scale float32 (n,)) of one kind.

    codes: every valid code 1..255 uniformly (w = -127..127), random scales; zero_rows: some
    rows all-zero with scale 0; extreme: every code 1 or 255 (|w| = 127, the largest |acc|);
    quantized: quantize_int8_rows of Gaussian rows (what models hold).
    """
    if kind == "quantized":
        return quantize_int8_rows(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
    codes = torch.full(int8_shape(n, k), 128, dtype=torch.uint8)
    if kind == "extreme":
        codes[:, :k] = torch.where(torch.rand(n, k, generator=g) < 0.5, 1, 255).to(torch.uint8)
    else:
        codes[:, :k] = torch.randint(1, 256, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, generator=g) * 0.1
    if kind == "zero_rows":
        zero = torch.rand(n, generator=g) < 0.5
        codes[zero] = 128
        scale[zero] = 0.0
    return codes, scale


TABLE_KINDS = st.sampled_from(["codes", "codes", "zero_rows", "extreme", "quantized"])


def clip_n(n: int, m: int, k: int) -> int:
    """Shrink N so an example stays within MAC_BUDGET."""
    return max(1, min(n, MAC_BUDGET // max(1, m * padded_features(k))))


def exact_acc(x: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """int64 xq @ w^T, computed without the reference (x must already be integers with max |x| 127)."""
    return x.to(torch.int64) @ (codes[:, :k].to(torch.int64) - 128).t()


# --------------------------------------------------------------------------------------
# The format
# --------------------------------------------------------------------------------------


def test_golden_bytes():
    """Pin the format documented in int8.py with values worked out by hand.

    K = 70 -> Kp = 128. Row 0: max |w| = 127 -> scale 1, so w = round_half_even(W): 63.5 -> 64,
    0.5 -> 0, 1.5 -> 2, -2.5 -> -2. Row 1 is all zero: scale 0, every code 128. Row 2: max 254
    -> scale 2: 3 -> 1.5 -> 2, -5 -> -2.5 -> -2, 1 -> 0.5 -> 0, 100 -> 50. The padding
    k = 70..127 is code 128 everywhere.
    """
    w = torch.zeros(3, 70)
    w[0, :6] = torch.tensor([127.0, -127.0, 63.5, 0.5, 1.5, -2.5])
    w[2, :5] = torch.tensor([254.0, 3.0, -5.0, 1.0, 100.0])
    codes, scale = quantize_int8_rows(w.to(torch.bfloat16))  # all these values are exact in bf16
    assert codes.dtype == torch.uint8 and codes.shape == (3, 128)
    assert scale.dtype == torch.float32 and scale.tolist() == [1.0, 0.0, 2.0]
    expected = torch.full((3, 128), 128, dtype=torch.uint8)
    expected[0, :6] = torch.tensor([255, 1, 192, 128, 130, 126])
    expected[2, :5] = torch.tensor([255, 130, 126, 128, 178])
    assert torch.equal(codes, expected)
    back = dequantize_int8_rows(codes, scale, 70)
    assert back[0, :6].tolist() == [127.0, -127.0, 64.0, 0.0, 2.0, -2.0]
    assert back[2, :5].tolist() == [254.0, 4.0, -4.0, 0.0, 100.0]
    assert not back[1].any()


@given(
    n=st.integers(1, 40),
    k=st.one_of(st.sampled_from(SPECIAL_K), st.integers(1, 700)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_round_trip(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 10.0 ** (torch.rand(n, 1, generator=g) * 6 - 3)
    w[torch.rand(n, generator=g) < 0.2] = 0.0  # some all-zero rows
    w = w.to(dtype)
    before = w.clone()
    codes, scale = quantize_int8_rows(w)
    assert torch.equal(w, before), "the weight was modified"
    assert codes.shape == (n, padded_features(k)) and scale.shape == (n,)
    assert bool((codes[:, k:] == 128).all())
    assert bool((codes >= 1).all()), "code 0 (w = -128) is outside the format"
    wf = w.float()
    assert torch.equal(scale, wf.abs().amax(1) / 127)
    nonzero = scale > 0
    # each row's largest |w| is +-127 exactly; zero rows are code 128
    assert bool(((codes[nonzero, :k].int() - 128).abs().amax(1) == 127).all())
    assert bool((codes[~nonzero] == 128).all())
    # round to nearest: error at most half a step (plus float32 slack)
    err = (dequantize_int8_rows(codes, scale, k) - wf).abs()
    assert bool((err <= scale.unsqueeze(1) * (0.5 + 1e-5)).all())


def test_quantize_in_chunks_equals_at_once(monkeypatch):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(50, 130, generator=g).to(torch.bfloat16)
    whole = quantize_int8_rows(w)
    monkeypatch.setattr(int8, "_QUANTIZE_CHUNK_ROWS", 7)
    chunked = quantize_int8_rows(w)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (torch.zeros(3, 4, dtype=torch.int32), TypeError, "expects a floating-point tensor"),
        (torch.zeros(12), ValueError, r"expects a 2-D \(N, K\) weight"),
        (torch.zeros(2, MAX_FEATURES + 1), ValueError, "supported maximum is 65536"),
        (torch.tensor([[1.0, math.nan]]), ValueError, "NaN or Inf"),
        (torch.tensor([[1.0], [-math.inf]]), ValueError, "NaN or Inf"),
    ],
)
def test_quantize_errors(weight, error, match):
    with pytest.raises(error, match=match):
        quantize_int8_rows(weight)


# --------------------------------------------------------------------------------------
# int8_linear: exact accumulation
# --------------------------------------------------------------------------------------


def test_int8_linear_known_values(isa):
    # x = [127, 1, -2]: a = 1, xq = x. Row 0: w = [1, -1, 0], scale 0.5 -> acc 126 -> 63.
    # Row 1: w = [-127, 127, 127], scale 1 -> acc = -16129 + 127 - 254 = -16256. Bias [1, 0].
    codes = torch.full((2, 64), 128, dtype=torch.uint8)
    codes[0, :3] = torch.tensor([129, 127, 128])
    codes[1, :3] = torch.tensor([1, 255, 255])
    x = torch.tensor([[127.0, 1.0, -2.0]])
    y = torch_bitnet.int8_linear(x, codes, torch.tensor([0.5, 1.0]), 3, 2, torch.tensor([1.0, 0.0]))
    assert y.tolist() == [[64.0, -16256.0]]
    yb = torch_bitnet.int8_linear(x.to(torch.bfloat16), codes, torch.tensor([0.5, 1.0]), 3, 2)
    assert yb.dtype == torch.bfloat16 and yb.tolist() == [[63.0, -16256.0]]


# 1..4: the streaming (decode) tiles; 5, 9: prefill tiles; 17, 33: amx's token tiles
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 17, 33])
@pytest.mark.parametrize("k", [1, 64, 65, 1000])
def test_int8_linear_exact_accumulation(isa, m, k):
    """acc against an independent int64 product: scale 1 and a = 1 make the float32 output acc itself."""
    g = torch.Generator().manual_seed(m * 10000 + k)
    n = 37  # 9 x 4 + 1 rows: full tiles and a single row
    codes, _ = random_table(n, k, g, "codes")
    codes[0, :k], codes[1, :k] = 255, 1  # w = +127 and -127 everywhere
    x = torch.randint(-127, 128, (m, k), generator=g).float()
    x[:, 0] = 127.0  # max |x| = 127 -> a = 1, xq = x
    x[0, :] = 127.0  # the largest |acc| row: 127 * 127 * K with row 0
    y = torch_bitnet.int8_linear(x, codes, torch.ones(n), k, n)
    acc = exact_acc(x, codes, k)
    assert bool((acc.abs() < 2**24).all())  # so float32(acc) is exact
    assert torch.equal(y, acc.float())
    assert y[0, 0].item() == 127 * 127 * k and y[0, 1].item() == -127 * 127 * k


@pytest.mark.parametrize("m", [1, 5, 17])
def test_int8_linear_largest_k(isa, m):
    """K = 65536 (the maximum): |acc| = 127 * 127 * 2**16 ~ 1.06e9 and the kernels' unsigned
    sums reach 255 * 127 * 2**16 ~ 2.12e9, just below 2**31; these results are multiples of
    2**16 below 2**40, exact in float32."""
    k = MAX_FEATURES
    codes = torch.full((6, k), 128, dtype=torch.uint8)
    codes[0], codes[1] = 255, 1
    codes[2, ::2], codes[2, 1::2] = 255, 1  # alternating +-127: acc = 0 for a constant x
    codes[3, : k // 2] = 255  # half the row: 127 * 127 * K / 2
    x = torch.full((m, k), 127.0)
    x[1:] = -127.0
    y = torch_bitnet.int8_linear(x, codes, torch.ones(6), k, 6)
    top = 127 * 127 * k
    assert y[0].tolist() == [top, -top, 0.0, top // 2, 0.0, 0.0]
    if m > 1:
        assert y[1].tolist() == [-top, top, 0.0, -top // 2, 0.0, 0.0]
    assert_bitwise_equal(y, reference.int8_linear(x, codes, torch.ones(6), k, 6))


# --------------------------------------------------------------------------------------
# int8_linear against the reference
# --------------------------------------------------------------------------------------

K_ANY = st.one_of(st.sampled_from(SPECIAL_K), st.integers(1, 1100))
LEAD = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 300)),
    st.tuples(st.integers(0, 17), st.integers(0, 17)),
    st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 12)),
)
SCALE_KINDS = st.sampled_from(["random", "random", "zero", "huge", "tiny"])


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
def test_int8_linear_matches_reference(isa, lead, k, n, dtype, kinds, table, scale_kind, bias_kind, seed):
    m = math.prod(lead)
    n = clip_n(n, m, k)
    g = torch.Generator().manual_seed(seed)
    codes, scale = random_table(n, k, g, table)
    if scale_kind == "zero":
        scale = torch.zeros(n)
    elif scale_kind == "huge":  # products overflow float32 to +-Inf; Inf * 0 gives NaN
        scale = scale * 1e36
    elif scale_kind == "tiny":  # float32 subnormal results
        scale = scale * 1e-40
    x = make_x(lead, k, dtype, kinds, seed + 1)
    bias = None
    if bias_kind is not None:
        bias = (torch.randn(n, generator=g) * 3).to(torch.float32 if bias_kind == "float32" else dtype)
    y = torch_bitnet.int8_linear(x, codes, scale, k, n, bias)
    assert y.dtype == dtype and tuple(y.shape) == (*lead, n)
    assert_bitwise_equal(y, reference.int8_linear(x, codes, scale, k, n, bias))


# Tile edges: AVX-512 streams 4 rows at a time for M <= 4 (then single rows) and computes
# 4 x 4 tiles beyond; AVX2 streams 4 rows for M <= 2 and computes 2 x 4 tiles beyond.
TILE_M = [1, 2, 3, 4, 5, 6, 7, 8, 9]
TILE_N = [1, 3, 4, 5, 8, 15, 16, 17, 33, 65]


def test_int8_linear_tile_edges(isa):
    g = torch.Generator().manual_seed(7)
    for k in (1, 64, 129):
        codes, scale = random_table(max(TILE_N), k, g)
        for n in TILE_N:
            for m in TILE_M:
                x = torch.randn(m, k, generator=g)
                y = torch_bitnet.int8_linear(x, codes[:n], scale[:n], k, n)
                assert_bitwise_equal(y, reference.int8_linear(x, codes[:n], scale[:n], k, n))


# amx from M = 16 (the int8 table; 12 for ternary weights): 16-token x 16-row tiles in pairs over
# 64-row panels; every tile shape (one
# partial token tile, one full and one partial, two full), partial and whole row vectors and
# panels, each output dtype with and without bias.
AMX_M = [15, 16, 17, 31, 32, 33, 47]
AMX_N = [1, 15, 16, 17, 33, 63, 64, 65, 130]


def test_int8_linear_amx_tiles(isa):
    g = torch.Generator().manual_seed(8)
    for k in (1, 64, 129):
        codes, scale = random_table(max(AMX_N), k, g)
        bias = torch.randn(max(AMX_N), generator=g)
        for i, (n, m) in enumerate(itertools.product(AMX_N, AMX_M)):
            x = torch.randn(m, k, generator=g).to(FLOAT_DTYPES[i % len(FLOAT_DTYPES)])
            b = bias[:n] if i % 2 else None
            y = torch_bitnet.int8_linear(x, codes[:n], scale[:n], k, n, b)
            assert_bitwise_equal(y, reference.int8_linear(x, codes[:n], scale[:n], k, n, b))


@pytest.mark.parametrize("m,n,k", [(205, 9, 2560), (103, 6, 2560), (301, 5, 640)])
def test_int8_linear_token_chunks(isa, m, n, k):
    """Prefill chunks of <= 512 KiB of activations: 204 tokens at Kp = 2560, 816 at Kp = 640."""
    g = torch.Generator().manual_seed(m + n)
    codes, scale = random_table(n, k, g)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    assert_bitwise_equal(torch_bitnet.int8_linear(x, codes, scale, k, n), reference.int8_linear(x, codes, scale, k, n))


@pytest.fixture(scope="module")
def head_shape_data():
    """A 2B-4T-wide slice of the lm_head (K = 2560, 1029 rows), decode and short prefill."""
    g = torch.Generator().manual_seed(2025)
    codes, scale = random_table(1029, 2560, g, "quantized")
    data = {}
    for m in (1, 3, 6):
        x = torch.randn(m, 2560, generator=g).to(torch.bfloat16)
        data[m] = (x, reference.int8_linear(x, codes, scale, 2560, 1029))
    return codes, scale, data


@pytest.mark.parametrize("m", [1, 3, 6])
def test_int8_linear_model_width(isa, head_shape_data, m):
    codes, scale, data = head_shape_data
    x, expected = data[m]
    assert_bitwise_equal(torch_bitnet.int8_linear(x, codes, scale, 2560, 1029), expected)


def test_int8_linear_threads_agree(isa):
    """Every output is computed by one thread in a fixed order: the split over threads, and
    which thread takes which chunk of rows, must not matter (large enough that both the
    quantizer and the row loop split)."""
    g = torch.Generator().manual_seed(5)
    k, n = 2560, 700
    codes, scale = random_table(n, k, g, "quantized")
    bias = torch.randn(n, generator=g)
    before = torch.get_num_threads()
    try:
        for m in (1, 64):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            expected = reference.int8_linear(x, codes, scale, k, n, bias)
            for threads in (1, 2, 3, 8):
                torch.set_num_threads(threads)
                assert_bitwise_equal(torch_bitnet.int8_linear(x, codes, scale, k, n, bias), expected)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_linear_empty_batch(isa, dtype):
    codes, scale = random_table(6, 300, torch.Generator().manual_seed(0))
    for lead in [(0,), (0, 3), (2, 0, 4)]:
        y = torch_bitnet.int8_linear(torch.randn(*lead, 300).to(dtype), codes, scale, 300, 6, torch.ones(6))
        assert y.dtype == dtype and tuple(y.shape) == (*lead, 6)


def test_int8_linear_non_contiguous(isa):
    g = torch.Generator().manual_seed(9)
    k, n = 300, 13
    codes, scale = random_table(n, k, g)
    wide = torch.zeros(n, codes.shape[1] + 64, dtype=torch.uint8)
    wide[:, 32 : 32 + codes.shape[1]] = codes
    codes_view = wide[:, 32 : 32 + codes.shape[1]]
    scale_view = torch.stack([scale, scale], 1)[:, 0]
    assert not codes_view.is_contiguous() and not scale_view.is_contiguous()
    for x in (torch.randn(k, 7, generator=g).t(), torch.randn(7, 2 * k, generator=g)[:, ::2], torch.randn(1, k).expand(4, k)):
        expected = reference.int8_linear(x.contiguous(), codes, scale, k, n)
        assert_bitwise_equal(torch_bitnet.int8_linear(x, codes_view, scale_view, k, n), expected)


# --------------------------------------------------------------------------------------
# int8_embedding
# --------------------------------------------------------------------------------------


@given(
    shape=st.lists(st.integers(0, 6), max_size=3).map(tuple),
    rows=st.integers(1, 50),
    d=st.one_of(st.sampled_from(SPECIAL_K), st.integers(1, 700)),
    dtype=st.sampled_from(FLOAT_DTYPES),
    table=TABLE_KINDS,
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_embedding_matches_reference(shape, rows, d, dtype, table, seed):
    g = torch.Generator().manual_seed(seed)
    codes, scale = random_table(rows, d, g, table)
    ids = torch.randint(0, rows, shape, generator=g)
    out = torch_bitnet.int8_embedding(ids, codes, scale, d, dtype)
    assert out.dtype == dtype and tuple(out.shape) == (*shape, d)
    expected = reference.int8_embedding(ids, codes, scale, d, dtype)
    assert_bitwise_equal(out, expected)
    # the float32 lookup is the dequantized table's row
    if ids.numel():
        table_f = dequantize_int8_rows(codes, scale, d)
        assert torch.equal(torch_bitnet.int8_embedding(ids, codes, scale, d, torch.float32), table_f[ids])


def test_int8_embedding_large_batch_non_contiguous():
    # Enough ids to split over threads; ids and the table as views.
    g = torch.Generator().manual_seed(3)
    codes, scale = random_table(300, 2560, g, "quantized")
    ids = torch.randint(0, 300, (64, 40), generator=g).t()
    assert not ids.is_contiguous()
    out = torch_bitnet.int8_embedding(ids, codes[:, :], scale, 2560, torch.bfloat16)
    assert_bitwise_equal(out, reference.int8_embedding(ids, codes, scale, 2560, torch.bfloat16))


@pytest.mark.parametrize("bad", [-1, 5, 2**40])
def test_int8_embedding_out_of_range(bad):
    codes, scale = random_table(5, 8, torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 4], [bad, 1]])
    with pytest.raises(IndexError, match=f"id {bad} is out of range: the table has 5 rows"):
        torch_bitnet.int8_embedding(ids, codes, scale, 8, torch.float32)
    with pytest.raises(IndexError, match=f"id {bad} is out of range: the table has 5 rows"):
        reference.int8_embedding(ids, codes, scale, 8, torch.float32)


# --------------------------------------------------------------------------------------
# Errors, in eager mode and in the fake kernels (what torch.compile traces)
# --------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _codes(n, k, dtype=torch.uint8):
    return torch.full(int8_shape(n, k), 128 if dtype == torch.uint8 else 0, dtype=dtype)


ERROR_CASES = [
    ("x_int32", lambda: IL(_x(2, 8, dtype=torch.int32), _codes(4, 8), _x(4), 8, 4),
     TypeError, "int8_linear input must be float32, bfloat16 or float16"),
    ("x_float64", lambda: IL(_x(2, 8, dtype=torch.float64), _codes(4, 8), _x(4), 8, 4),
     TypeError, "int8_linear input must be float32, bfloat16 or float16"),
    ("x_0d", lambda: IL(_x(), _codes(4, 8), _x(4), 8, 4),
     ValueError, "int8_linear input must have at least 1 dimension"),
    ("x_wrong_k", lambda: IL(_x(2, 7), _codes(4, 8), _x(4), 8, 4),
     ValueError, "int8_linear input has 7 features in its last dimension, expected in_features=8"),
    ("weight_int8", lambda: IL(_x(2, 8), _codes(4, 8, torch.int8), _x(4), 8, 4),
     TypeError, "int8_linear weight must be uint8 codes"),
    ("weight_unpadded", lambda: IL(_x(2, 8), torch.zeros(4, 8, dtype=torch.uint8), _x(4), 8, 4),
     ValueError, "int8_linear weight has shape"),
    ("weight_wrong_rows", lambda: IL(_x(2, 8), _codes(5, 8), _x(4), 8, 4),
     ValueError, "int8_linear weight has shape"),
    ("weight_1d", lambda: IL(_x(2, 8), torch.zeros(256, dtype=torch.uint8), _x(4), 8, 4),
     ValueError, "int8_linear weight has shape"),
    ("scale_bf16", lambda: IL(_x(2, 8), _codes(4, 8), _x(4, dtype=torch.bfloat16), 8, 4),
     ValueError, r"int8_linear scale must be float32 of shape \(4,\)"),
    ("scale_wrong_length", lambda: IL(_x(2, 8), _codes(4, 8), _x(5), 8, 4),
     ValueError, r"int8_linear scale must be float32 of shape \(4,\)"),
    ("scale_2d", lambda: IL(_x(2, 8), _codes(4, 8), _x(4, 1), 8, 4),
     ValueError, r"int8_linear scale must be float32 of shape \(4,\)"),
    ("bias_wrong_length", lambda: IL(_x(2, 8), _codes(4, 8), _x(4), 8, 4, _x(5)),
     ValueError, "bias has shape"),
    ("bias_int", lambda: IL(_x(2, 8), _codes(4, 8), _x(4), 8, 4, _x(4, dtype=torch.int32)),
     TypeError, "bias must be float32, bfloat16 or float16"),
    ("in_features_0", lambda: IL(_x(2, 0), _codes(4, 1), _x(4), 0, 4),
     ValueError, "int8_linear sizes must be >= 1"),
    ("out_features_0", lambda: IL(_x(2, 8), _codes(0, 8), _x(0), 8, 0),
     ValueError, "int8_linear sizes must be >= 1"),
    ("in_features_too_big", lambda: IL(_x(1, 2**16 + 1), _codes(1, 2**16 + 1), _x(1), 2**16 + 1, 1),
     ValueError, "int8_linear has 65537 features; the supported maximum is 65536"),
    ("ids_int32", lambda: IE(_x(3, dtype=torch.int32), _codes(4, 8), _x(4), 8, torch.float32),
     TypeError, "int8_embedding ids must be int64"),
    ("ids_float", lambda: IE(_x(3), _codes(4, 8), _x(4), 8, torch.float32),
     TypeError, "int8_embedding ids must be int64"),
    ("emb_weight_1d", lambda: IE(_x(3, dtype=torch.int64), torch.zeros(64, dtype=torch.uint8), _x(4), 8,
                                 torch.float32),
     ValueError, r"int8_embedding weight must be 2-D \(rows, Kp\)"),
    ("emb_weight_width", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 100), _x(4), 8, torch.float32),
     ValueError, "int8_embedding weight has shape"),
    ("emb_weight_int8", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8, torch.int8), _x(4), 8, torch.float32),
     TypeError, "int8_embedding weight must be uint8 codes"),
    ("emb_scale", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8), _x(3), 8, torch.float32),
     ValueError, r"int8_embedding scale must be float32 of shape \(4,\)"),
    ("emb_dim_0", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8), _x(4), 0, torch.float32),
     ValueError, "int8_embedding sizes must be >= 1"),
    ("emb_dtype", lambda: IE(_x(3, dtype=torch.int64), _codes(4, 8), _x(4), 8, torch.float64),
     TypeError, "int8_embedding dtype must be float32, bfloat16 or float16"),
]


test_errors_eager, test_errors_fake_kernels = error_tests(ERROR_CASES)


def test_errors_reference():
    # The reference checks the table like the op (it shares int8.check_int8_weight).
    with pytest.raises(ValueError, match="int8_linear weight has shape"):
        reference.int8_linear(_x(2, 8), _codes(5, 8), _x(4), 8, 4)
    with pytest.raises(TypeError, match="int8_embedding weight must be uint8 codes"):
        reference.int8_embedding(torch.zeros(2, dtype=torch.int64), _codes(4, 8, torch.int8), _x(4), 8, torch.float32)


def test_error_at_trace_time():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda x, w, s: torch_bitnet.int8_linear(x, w, s, 8, 4), backend=counter, fullgraph=True)
    with pytest.raises(Exception, match="has 7 features in its last dimension") as info:
        compiled(_x(2, 7), _codes(4, 8), _x(4))
    assert counter.frame_count == 0, "the graph compiled: the error came at run time, not from the fake kernel"
    assert isinstance(info.value, ValueError) or "got ValueError(" in str(info.value)


def test_backward_raises_a_clear_error():
    x = torch.randn(2, 64, requires_grad=True)
    codes, scale = random_table(4, 64, torch.Generator().manual_seed(0))
    y = torch_bitnet.int8_linear(x, codes, scale, 64, 4)
    with pytest.raises(RuntimeError, match="bitnet::int8_linear is an inference op"):
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
            cases.append((f"int8_linear-{dtype}-{lead}-{k}-{n}", IL, (x, codes, scale, k, n)))
            cases.append((f"int8_linear_bias-{dtype}-{lead}-{k}-{n}", IL, (x, codes, scale, k, n, bias)))
            ids = torch.randint(0, n, lead, generator=g)
            cases.append((f"int8_embedding-{dtype}-{lead}-{k}-{n}", IE, (ids, codes, scale, k, dtype)))
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
        self.embed = torch_bitnet.Int8Embedding.from_float(table)
        self.head = torch_bitnet.Int8Linear.tied_to(self.embed)

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
    assert targets.count(torch.ops.bitnet.int8_embedding.default) == 1
    assert targets.count(torch.ops.bitnet.int8_linear.default) == 1


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


def test_int8_linear_module_from_linear_and_weight():
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(100, 37, bias=True)
    layer = torch_bitnet.Int8Linear.from_float(linear)
    assert (layer.in_features, layer.out_features) == (100, 37)
    assert layer.weight.shape == (37, 128) and layer.weight.dtype == torch.uint8
    assert layer.weight_scale.shape == (37,) and layer.bias.dtype == torch.float32
    codes, scale = quantize_int8_rows(linear.weight.detach())
    assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scale)
    x = torch.randn(4, 100, generator=g).to(torch.bfloat16)
    bias = linear.bias.detach().float()
    assert_bitwise_equal(layer(x), reference.int8_linear(x, codes, scale, 100, 37, bias))
    # a plain weight with a separate bias gives the same layer
    same = torch_bitnet.Int8Linear.from_float(linear.weight.detach(), bias=linear.bias.detach().to(torch.bfloat16))
    assert_bitwise_equal(same(x), reference.int8_linear(x, codes, scale, 100, 37, bias.to(torch.bfloat16).float()))
    assert torch_bitnet.Int8Linear.from_float(torch.nn.Linear(10, 3, bias=False)).bias is None
    assert "in_features=100, out_features=37, bias=True" in repr(layer)


def test_module_errors():
    with pytest.raises(ValueError, match="got both a bias and an nn.Linear with one"):
        torch_bitnet.Int8Linear.from_float(torch.nn.Linear(4, 3), bias=torch.zeros(3))
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(3,\)"):
        torch_bitnet.Int8Linear.from_float(torch.zeros(3, 4), bias=torch.zeros(4))
    with pytest.raises(TypeError, match="expects an nn.Linear or a tensor"):
        torch_bitnet.Int8Linear.from_float("weight")
    with pytest.raises(TypeError, match="expects an Int8Embedding"):
        torch_bitnet.Int8Linear.tied_to(torch.nn.Embedding(3, 4))
    with pytest.raises(ValueError, match="does not support nn.Embedding\\(max_norm"):
        torch_bitnet.Int8Embedding.from_float(torch.nn.Embedding(3, 4, max_norm=1.0))
    with pytest.raises(ValueError, match="output_dtype must be float32, bfloat16 or float16"):
        torch_bitnet.Int8Embedding.from_float(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Int8Linear sizes must be >= 1"):
        torch_bitnet.Int8Linear(0, 3)


def test_embedding_module():
    emb = torch.nn.Embedding(50, 70, padding_idx=0).to(torch.bfloat16)
    module = torch_bitnet.Int8Embedding.from_float(emb)
    assert module.output_dtype == torch.bfloat16 and module.weight.shape == (50, 128)
    ids = torch.tensor([[0, 49, 3], [3, 3, 7]])
    out = module(ids)
    assert_bitwise_equal(out, reference.int8_embedding(ids, module.weight, module.weight_scale, 70, torch.bfloat16))
    # close to the float table: at most half a step per element, plus bf16 output rounding
    step = module.weight_scale[ids].unsqueeze(-1)
    assert bool(((out.float() - emb.weight.detach()[ids].float()).abs() <= step / 2 + out.float().abs() / 128).all())
    assert module.dequantize().shape == (50, 70)
    assert "50, 70, output_dtype=torch.bfloat16" in repr(module)


def test_tied_modules_share_the_table():
    embed = torch_bitnet.Int8Embedding.from_float(torch.randn(300, 96), output_dtype=torch.bfloat16)
    head = torch_bitnet.Int8Linear.tied_to(embed)
    assert (head.in_features, head.out_features, head.bias) == (96, 300, None)
    assert head.weight is embed.weight and head.weight_scale is embed.weight_scale
    assert head.weight.untyped_storage().data_ptr() == embed.weight.untyped_storage().data_ptr()
    # the lm_head multiplies by exactly the rows the embedding returns
    h = torch.randn(3, 96)
    assert_bitwise_equal(head(h), reference.int8_linear(h, embed.weight, embed.weight_scale, 96, 300))
    # one table in memory, in a model too
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    distinct = {t.untyped_storage().data_ptr() for t in model.buffers()}
    assert len(distinct) == 2  # weight and weight_scale, each once


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(1)
    model = TinyTiedLM(200, 80, torch.bfloat16, seed=5)
    head = torch_bitnet.Int8Linear.from_float(torch.randn(33, 80, generator=g), bias=torch.randn(33, generator=g))
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

    fresh_head = torch_bitnet.Int8Linear(80, 33, bias=True)
    fresh_head.load_state_dict({k.removeprefix("extra."): v for k, v in loaded.items() if k.startswith("extra.")})
    x = torch.randn(4, 80, generator=g)
    assert_bitwise_equal(fresh_head(x), head(x))


# --------------------------------------------------------------------------------------
# Quality against the float lm_head
# --------------------------------------------------------------------------------------

# (outlier channel factor, max rel. error, mean rel. error, top-1 agreement): the bounds the
# test asserts, with about 1.5x headroom over the errors measured on this seeded data (and
# 1.5x on the top-1 disagreement rate).
QUALITY_CASES = [(1.0, 0.025, 0.016, 0.97), (10.0, 0.07, 0.04, 0.93)]


@pytest.mark.parametrize("outlier,max_tol,mean_tol,top1_tol", QUALITY_CASES, ids=["no_outliers", "outliers_x10"])
def test_quality_vs_float_lm_head(outlier, max_tol, mean_tol, top1_tol):
    """int8 lm_head logits against the exact logits of the bf16 lm_head (float64 of the bf16 values).

    Data: a (vocab 4096, hidden 512) bf16 table of Gaussian rows whose norms vary by 3x (as
    trained embeddings do), 256 bf16 hidden states, 4 of whose 512 channels are scaled by
    ``outlier`` (1 = none; BitNet's hidden states carry a few large channels). Error of a row:
    max_n |logit - exact| / max_n |exact|; top-1: argmax equal.

    Measured (float32 output; bf16 output within 0.001 of it):

    =================  ============  =============  =====  ========================
    case               max rel. err  mean rel. err  top-1  bf16 F.linear (context)
    =================  ============  =============  =====  ========================
    no outliers        0.017         0.011          0.98   0.004 / 0.003 / 0.99
    outliers x10       0.045         0.025          0.95   0.004 / 0.003 / 0.99
    =================  ============  =============  =====  ========================

    Where the error comes from: rounding the weight to its row's step max|W_n| / 127 alone gives
    about 0.8% (mean) of the row's largest logit, rounding the activations to the token's step
    max|h| / 127 alone about the same without outliers, and 2.4% with them (the outliers set
    the step for all 512 channels); top-1 flips happen on rows whose two best logits are
    closer than that (random logits often are). Asserted:

    * every logit lies within the worst-case bound of the two roundings,
      sum_k |h - h_q| |W| + sum_k |h_q| |W - W_q| (triangle inequality; a violation is a kernel bug);
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
    head = torch_bitnet.Int8Linear.from_float(table)

    exact = h.double() @ table.double().t()
    ours = torch_bitnet.int8_linear(h.float(), head.weight, head.weight_scale, hidden, vocab).double()
    ours_bf16 = head(h).double()

    xq, a = reference.quantize_act(h)
    hq = xq.double() / a.double()
    wq = head.dequantize().double()
    bound = (h.double() - hq).abs() @ table.double().abs().t() + hq.abs() @ (table.double() - wq).abs().t()
    slack = 1e-6 * exact.abs() + 1e-9  # float32 evaluation of the epilogue
    assert bool(((ours - exact).abs() <= bound + slack).all())

    def summary(y):
        rel = (y - exact).abs().amax(1) / exact.abs().amax(1)
        return rel.max().item(), rel.mean().item(), (y.argmax(1) == exact.argmax(1)).double().mean().item()

    top2 = exact.topk(2, dim=1).values
    safe = (top2[:, 0] - top2[:, 1]) > 2 * bound.amax(1)
    assert bool((ours.argmax(1) == exact.argmax(1))[safe].all())

    worst, mean, top1 = summary(ours)
    worst16, mean16, top1_16 = summary(ours_bf16)
    ref_bf16 = summary(torch.nn.functional.linear(h, table).double())
    print(
        f"\nint8 lm_head, outliers x{outlier:g}: max rel. err {worst:.4f}, mean {mean:.4f}, top-1 {top1:.3f} "
        f"(bf16 output: {worst16:.4f} / {mean16:.4f} / {top1_16:.3f}); bf16 F.linear: "
        f"{ref_bf16[0]:.4f} / {ref_bf16[1]:.4f} / {ref_bf16[2]:.3f}"
    )
    assert worst <= max_tol and mean <= mean_tol and top1 >= top1_tol
    assert worst16 <= max_tol and mean16 <= mean_tol and top1_16 >= top1_tol
