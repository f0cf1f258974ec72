"""The 5-trit packed ternary format (five weights per byte), and every op on the denser formats
(5-trit, and 3-trit: its layout is in tests/test_trit3.py).

* Layout: pinned by hand-computed golden bytes, and round trips / ``repack`` against an
  independent decoder (a 256-entry table built from the documented byte code, not from
  ``packing._codes``).
* Validation: all 256 byte values (243 encode five weights, the other 13 are rejected),
  non-zero padding, wrong shapes, unknown format names.
* Kernels, on every path (``isa5``: scalar, avx2, avx512, avx512vbmi, amx) and for both dense
  formats (``fmt``): bit for bit equal to ``torch_bitnet.reference`` and to the same op on the
  2-bit packing of the same weight. 5-trit: M = 1 takes the VBMI decode GEMV on avx512vbmi and
  amx; M >= 12 on amx decodes 64 rows at a time straight into the AMX kernel's panel; other
  M > 1 (and every M on the other paths) unpack 64 rows at a time to the 2-bit layout and run
  the 2-bit kernels. 3-trit: M = 1 takes the table lookup on avx512, avx512vbmi and amx (threads
  take whole 32-row tiles); M > 1 decodes into the AVX-512 panels on avx512vbmi and into the AMX
  tiles' from 12 tokens on amx (row ranges then start inside 32-row tiles); the other paths
  unpack to the 2-bit layout.
* Bytes no weights produce: every path reads them through one fixed table
  (u0..u3 = 1, u4 = min(2, (c & 63) // 21)); checked against a Python decoding of that rule.
* opcheck, torch.compile(fullgraph=True), and errors eager vs fake kernels.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops import ROW_KIND, SEEDS, XQ_KINDS, assert_bitwise_equal, make_x, make_xq

import torch_bitnet
from torch_bitnet import packing, reference
from torch_bitnet.packing import (
    BLOCK_K5,
    FORMATS,
    MAX_IN_FEATURES,
    TRIT5_ZERO,
    check_packed,
    pack_ternary,
    packed_format,
    packed_shape,
    padded_in_features,
    repack,
    unpack_ternary,
)

from _error_cases import error_tests

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TMM = torch.ops.bitnet.ternary_mm.default
BL = torch.ops.bitnet.bitlinear.default
SHARED = torch.ops.bitnet.bitlinear_shared.default
GLU = torch.ops.bitnet.bitlinear_relu2_glu.default

# K on both sides of the 256 / 320 block edges: Kp2 = ceil(K/256)*256 vs Kp5 = ceil(K/320)*320
#   K     1   255  256  300  320  321  640  700  1000  1280  2560  6912
#   Kp2 256   256  256  512  512  512  768  768  1024  1280  2560  6912
#   Kp5 320   320  320  320  320  640  640  960  1280  1280  2560  7040
SPECIAL_K5 = [1, 255, 256, 300, 320, 321, 640, 700, 1000, 1280, 2560, 6912]
# and the 3-trit format's 9-weight words (Kp3 = ceil(K/9)*9; 2304 = 256 words exactly)
SPECIAL_K3 = [8, 9, 10, 18, 2304]
# the formats denser than 2 bits, whose ops are tested here against the 2-bit ones
DENSE = ["5trit", "3trit"]
# Upper bound on M * N * max(Kp2, Kp5) per example (scalar kernel + int64 reference stay fast).
MAC_BUDGET = 3_000_000

# The 13 byte values no five weights encode to, by hand from c = 64*(t//21) + 21*u4 + t%21,
# t in 0..80, u4 in 0..2: (c & 63) = 21*u4 + t%21 <= 62, so c & 63 == 63 never occurs (c = 63,
# 127, 191, 255); and t//21 == 3 only for t = 63..80, i.e. t%21 <= 17, so c = 192 + 21*u4 + r
# with r in {18, 19, 20} never occurs (c = 210-212, 231-233, 252-254).
INVALID_BYTES = [63, 127, 191, 255, 210, 211, 212, 231, 232, 233, 252, 253, 254]


# --------------------------------------------------------------------------------------
# An independent decoder: a 256 x 5 table of codes u_i = w + 1
# --------------------------------------------------------------------------------------


def _encode5(u) -> int:
    """The documented byte code of five codes u0..u4 in {0, 1, 2}."""
    t = u[0] + 3 * u[1] + 9 * u[2] + 27 * u[3]
    return 64 * (t // 21) + 21 * u[4] + t % 21


VALID = {_encode5(u): u for u in itertools.product(range(3), repeat=5)}


def _decode_table() -> torch.Tensor:
    """int64 (256, 5): the codes of each byte; bytes no weights produce get the kernels' fixed
    reading u0..u3 = 1, u4 = min(2, (c & 63) // 21)."""
    table = torch.empty((256, 5), dtype=torch.int64)
    for c in range(256):
        table[c] = torch.tensor(VALID[c] if c in VALID else (1, 1, 1, 1, min(2, (c & 63) // 21)))
    return table


DECODE = _decode_table()


def decode5(packed: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """5-trit packed (N, B, 64) -> int64 weights (N, k) (all Kp5 if k is None), by the table:
    weight 320*b + 64*i + j is code i of byte j of block b."""
    n, blocks, _ = packed.shape
    codes = DECODE[packed.long()]  # (N, B, 64 bytes j, 5 chunks i)
    w = codes.permute(0, 1, 3, 2).reshape(n, blocks * BLOCK_K5) - 1
    return w if k is None else w[:, :k]


def random_ternary(n: int, k: int, g: torch.Generator, mode: str = "random", dtype=torch.int8) -> torch.Tensor:
    if mode == "random":
        w = torch.randint(-1, 2, (n, k), generator=g)
    elif mode == "sparse":
        w = torch.randint(-1, 2, (n, k), generator=g) * (torch.rand((n, k), generator=g) < 0.05)
    else:
        w = torch.full((n, k), {"neg": -1, "zero": 0, "pos": 1}[mode])
    return w.to(dtype)


def both_formats(w: torch.Tensor, fmt: str = "5trit") -> tuple[torch.Tensor, torch.Tensor]:
    return pack_ternary(w, fmt), pack_ternary(w, "2bit")


def kp_max(k: int) -> int:
    return max(padded_in_features(k, f) for f in FORMATS)


def clip_n(n: int, m: int, k: int, budget: int = MAC_BUDGET) -> int:
    return max(1, min(n, budget // max(1, m * kp_max(k))))


def mm_oracle(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 xq @ w^T in int64 (w: int (N, K))."""
    return (xq.to(torch.int64) @ w.to(torch.int64).t()).to(torch.int32)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# Golden bytes
# --------------------------------------------------------------------------------------


def test_decode_table_guard():
    # The oracle's encoding is a bijection from the 243 five-tuples onto 243 byte values, and the
    # other 13 are exactly the hand-listed ones (so the oracle itself is pinned by hand).
    assert len(VALID) == 243
    assert sorted(set(range(256)) - set(VALID)) == sorted(INVALID_BYTES)
    assert VALID[TRIT5_ZERO] == (1, 1, 1, 1, 1) and TRIT5_ZERO == 104
    # The fixed reading of the invalid bytes, by hand: c & 63 = 63 -> u4 = min(2, 3) = 2;
    # c & 63 = 18..20 -> 0, 39..41 -> 1, 60..62 -> 2.
    expected_u4 = {63: 2, 127: 2, 191: 2, 255: 2, 210: 0, 211: 0, 212: 0, 231: 1, 232: 1, 233: 1, 252: 2, 253: 2, 254: 2}
    for c, u4 in expected_u4.items():
        assert DECODE[c].tolist() == [1, 1, 1, 1, u4], c


def test_golden_bytes_5trit():
    """Pin the 5-trit byte code with values computed by hand.

    N = 2, K = 700 -> Kp5 = 960: three 320-weight blocks of 64 bytes per row, shape (2, 3, 64).
    Weight k sits in block b = k // 320, chunk i = (k % 320) // 64, byte j = k % 64, with code
    u_i = w + 1; the byte is c = 64*(t//21) + 21*u4 + t%21, t = u0 + 3 u1 + 9 u2 + 27 u3.
    Five zeros (u = 1,1,1,1,1): t = 40 = 1*21 + 19 -> c = 64 + 21 + 19 = 104. Every byte not
    listed below holds five zeros or padding (k = 700..959, also code 1) and is 104.
    """
    w = torch.zeros((2, 700), dtype=torch.int8)
    # row 0
    w[0, 0], w[0, 64], w[0, 256] = 1, -1, 1  # b0 j0: u = (2,0,1,1,2): t = 2+0+9+27 = 38 = 21+17
    #                                          -> c = 64*1 + 21*2 + 17 = 123
    w[0, [1, 65, 129, 193, 257]] = 1  # b0 j1: u = (2,2,2,2,2): t = 2+6+18+54 = 80 = 3*21+17 -> 192+42+17 = 251
    w[0, [2, 66, 130, 194, 258]] = -1  # b0 j2: u = 0: t = 0 -> c = 0
    w[0, 255] = -1  # 255 = 3*64 + 63: b0 i3 j63: u = (1,1,1,0,1): t = 13 -> c = 0 + 21 + 13 = 34
    w[0, 320] = -1  # b1 i0 j0: u = (0,1,1,1,1): t = 39 = 21+18 -> c = 64 + 21 + 18 = 103
    w[0, 639] = 1  # 639-320 = 319 = 4*64+63: b1 i4 j63: u4 = 2, t = 40 -> c = 64 + 42 + 19 = 125
    # row 1
    w[1, [10, 74, 138]] = -1  # b0 j10 chunks 0..2
    w[1, 202] = 1  # b0 j10 chunk 3; chunk 4 (k = 266) stays 0: u = (0,0,0,2,1): t = 54 = 2*21+12
    #                -> c = 128 + 21 + 12 = 161
    w[1, 389] = -1  # 389-320 = 69 = 64+5: b1 i1 j5: u = (1,0,1,1,1): t = 37 = 21+16 -> 64+21+16 = 101
    w[1, 583] = -1  # 583-320 = 263 = 4*64+7: b1 i4 j7: u4 = 0, t = 40 -> c = 64 + 0 + 19 = 83
    w[1, 699] = 1  # 699-640 = 59: b2 i0 j59 (chunks 1..4: k >= 763, padding): t = 41 = 21+20 -> 64+21+20 = 105
    w[1, 660] = -1  # b2 i0 j20 (chunks 1..4 padding): t = 39 -> 103

    expected_bytes = {  # (row, block, byte): value
        (0, 0, 0): 123,
        (0, 0, 1): 251,
        (0, 0, 2): 0,
        (0, 0, 63): 34,
        (0, 1, 0): 103,
        (0, 1, 63): 125,
        (1, 0, 10): 161,
        (1, 1, 5): 101,
        (1, 1, 7): 83,
        (1, 2, 59): 105,
        (1, 2, 20): 103,
    }
    packed = pack_ternary(w, "5trit")
    assert packed.dtype == torch.uint8 and packed.is_contiguous()
    assert tuple(packed.shape) == (2, 3, 64) == packed_shape(2, 700, "5trit")
    assert packed_format(packed) == "5trit"
    expected = torch.full((2, 3, 64), 104, dtype=torch.uint8)
    for (r, b, j), value in expected_bytes.items():
        expected[r, b, j] = value
        assert packed[r, b, j].item() == value, f"byte ({r}, {b}, {j}): {packed[r, b, j].item()} != {value}"
    assert bool((packed[:, 2, 60:] == 104).all())  # k = 700..703 and beyond: pure padding
    assert torch.equal(packed, expected)
    assert torch.equal(unpack_ternary(packed, 700), w)
    assert torch.equal(decode5(packed, 700), w.long())
    # Both formats hold the same weight.
    assert torch.equal(repack(packed, 700, "2bit"), pack_ternary(w, "2bit"))
    assert torch.equal(repack(pack_ternary(w, "2bit"), 700, "5trit"), expected)


def test_golden_small_k_padding():
    # K = 3 -> one block; weights k = 0, 1, 2 are chunk 0 of bytes 0, 1, 2 (chunks 1..4 padding).
    w = torch.tensor([[-1, 0, 1]], dtype=torch.int8)
    packed = pack_ternary(w, "5trit")
    assert tuple(packed.shape) == (1, 1, 64)
    # byte 0: u0 = 0: t = 39 -> 103; byte 1: zero -> 104; byte 2: u0 = 2: t = 41 -> 105; rest 104.
    assert packed[0, 0, :4].tolist() == [103, 104, 105, 104]
    assert bool((packed[0, 0, 3:] == 104).all())
    assert torch.equal(unpack_ternary(packed, 3), w)


def test_packed_shape_and_padding_helpers():
    assert FORMATS == ("2bit", "5trit", "3trit") and BLOCK_K5 == 320
    assert packing.padded_in_features(1, "5trit") == 320
    assert packing.padded_in_features(320, "5trit") == 320
    assert packing.padded_in_features(321, "5trit") == 640
    assert packing.padded_in_features(6912, "5trit") == 7040  # 22 blocks
    assert packing.padded_in_features(300) == 512  # the default is still the 2-bit format
    assert packed_shape(3, 300, "5trit") == (3, 1, 64)
    assert packed_shape(640, 2560, "5trit") == (640, 8, 64)
    assert packed_shape(2560, 6912, "5trit") == (2560, 22, 64)
    assert packed_shape(3, 300, "2bit") == packed_shape(3, 300) == (3, 128)
    assert packed_format(torch.zeros((2, 64), dtype=torch.uint8)) == "2bit"
    assert packed_format(torch.zeros((2, 1, 64), dtype=torch.uint8)) == "5trit"


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------

MODES = st.sampled_from(["random", "sparse", "neg", "zero", "pos"])
INT_DTYPES = st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64])
K_PACK = st.one_of(st.sampled_from(SPECIAL_K5 + SPECIAL_K3), st.integers(1, 1500))


@settings(max_examples=100)
@given(n=st.integers(1, 40), k=K_PACK, seed=SEEDS, mode=MODES, dtype=INT_DTYPES)
def test_round_trip_and_repack(n, k, seed, mode, dtype):
    w = random_ternary(n, k, torch.Generator().manual_seed(seed), mode, dtype)
    p5 = pack_ternary(w, "5trit")
    p2 = pack_ternary(w, "2bit")
    assert p5.dtype == torch.uint8 and p5.is_contiguous()
    assert tuple(p5.shape) == packed_shape(n, k, "5trit") == (n, -(-k // 320), 64)
    assert tuple(p2.shape) == packed_shape(n, k, "2bit")
    check_packed(p5, k, n)
    check_packed(p2, k, n)
    out = unpack_ternary(p5, k)
    assert out.dtype == torch.int8 and torch.equal(out, w.to(torch.int8))
    # Independent decoding (table): same weights, zero padding, and no byte outside the code.
    full = decode5(p5)
    assert torch.equal(full[:, :k], w.long())
    assert bool((full[:, k:] == 0).all())
    assert not any(c in INVALID_BYTES for c in p5.unique().tolist())
    # repack, both ways, lossless; identity (the same object) in the same format.
    assert torch.equal(repack(p2, k, "5trit"), p5)
    assert torch.equal(repack(p5, k, "2bit"), p2)
    assert repack(p5, k, "5trit") is p5
    assert repack(p2, k, "2bit") is p2


def test_pack_non_contiguous_input_5trit():
    w = random_ternary(700, 37, torch.Generator().manual_seed(3)).t()
    assert not w.is_contiguous()
    assert torch.equal(pack_ternary(w, "5trit"), pack_ternary(w.contiguous(), "5trit"))
    assert torch.equal(unpack_ternary(pack_ternary(w, "5trit"), 700), w)


# --------------------------------------------------------------------------------------
# Decoder validation
# --------------------------------------------------------------------------------------


def test_every_byte_value():
    """Each of the 256 bytes at byte 0 of a block of zeros: the 243 valid ones decode to their
    five weights (k = 0, 64, 128, 192, 256), the 13 others are rejected."""
    rejected = []
    for c in range(256):
        packed = torch.full((2, 1, 64), TRIT5_ZERO, dtype=torch.uint8)
        packed[1, 0, 0] = c
        if c in VALID:
            w = unpack_ternary(packed, 320)
            expected = torch.zeros((2, 320), dtype=torch.int8)
            expected[1, [0, 64, 128, 192, 256]] = torch.tensor(VALID[c], dtype=torch.int8) - 1
            assert torch.equal(w, expected), c
            assert pack_ternary(expected, "5trit")[1, 0, 0].item() == c
        else:
            with pytest.raises(ValueError, match="encodes no five ternary weights"):
                unpack_ternary(packed, 320)
            rejected.append(c)
    assert sorted(rejected) == sorted(INVALID_BYTES)
    assert 256 - len(rejected) == 243


def assert_unpack_and_repack_reject(packed: torch.Tensor, k: int, match: str) -> None:
    """Both readers of 5-trit bytes refuse ``packed`` with a ValueError matching ``match``."""
    with pytest.raises(ValueError, match=match):
        unpack_ternary(packed, k)
    with pytest.raises(ValueError, match=match):
        repack(packed, k, "2bit")


def test_invalid_byte_in_padding_rejected():
    # K = 330: block 1 byte 20 holds k = 340, 404, ... (all padding); an invalid byte there is
    # still rejected, as is repacking it.
    packed = pack_ternary(torch.zeros((2, 330), dtype=torch.int8), "5trit")
    packed[0, 1, 20] = 232
    assert_unpack_and_repack_reject(packed, 330, "encodes no five ternary weights")


def test_non_zero_padding_rejected():
    # K = 300: byte 50 of block 0 holds k = 50, 114, 178, 242 and 306 (padding): u4 = 2 there
    # (t = 40, c = 64 + 42 + 19 = 125) is a +1 in the padding.
    packed = pack_ternary(torch.zeros((2, 300), dtype=torch.int8), "5trit")
    packed[1, 0, 50] = 125
    with pytest.raises(ValueError, match="non-zero values in the K padding"):
        unpack_ternary(packed, 300)
    # The same byte at K = 320 is a real weight (+1 at k = 306).
    w = unpack_ternary(packed, 320)
    assert w[1, 306].item() == 1 and int(w.abs().sum()) == 1
    # K = 330: a whole byte of padding (block 1 byte 20, k = 340...), u0 = 2: c = 105.
    packed = pack_ternary(torch.zeros((1, 330), dtype=torch.int8), "5trit")
    packed[0, 1, 20] = 105
    assert_unpack_and_repack_reject(packed, 330, "non-zero values in the K padding")


BOTH_300 = r"expected \(2, 128\) \(2-bit\), \(2, 1, 64\) \(5-trit\) or \(1, 34, 32, 2\) \(3-trit\)"


@pytest.mark.parametrize(
    "shape",
    [(2, 2, 64), (2, 1, 32), (2, 1, 65), (3, 1, 64), (2, 0, 64)],
    ids=["blocks", "last_32", "last_65", "rows", "no_blocks"],
)
def test_wrong_shape_rejected(shape):
    packed = torch.full(shape, TRIT5_ZERO, dtype=torch.uint8)
    with pytest.raises(ValueError, match=BOTH_300):
        check_packed(packed, 300, 2)
    if shape[0] != 2:  # unpack_ternary / repack take N from the tensor: 3 rows are a valid weight
        assert torch.equal(unpack_ternary(packed, 300), torch.zeros((3, 300), dtype=torch.int8))
        return
    with pytest.raises(ValueError, match=r"packed weight has shape"):
        unpack_ternary(packed, 300)
    with pytest.raises(ValueError, match=r"packed weight has shape"):
        repack(packed, 300, "2bit")
    with pytest.raises(ValueError, match=r"packed weight has shape"):
        repack(packed, 300, "5trit")  # the identity case checks the shape too


def test_wrong_rank_and_dtype_rejected():
    with pytest.raises(ValueError, match=r"must be 2-D \(2-bit\), 3-D \(5-trit\) or 4-D \(3-trit\)"):
        unpack_ternary(torch.full((2, 1, 1, 1, 64), 104, dtype=torch.uint8), 300)
    with pytest.raises(ValueError, match=BOTH_300):
        check_packed(torch.zeros((2, 64), dtype=torch.uint8), 300, 2)  # 5-trit bytes flattened to 2-D
    with pytest.raises(TypeError, match="packed weight must be uint8"):
        check_packed(torch.zeros((2, 1, 64), dtype=torch.int8), 300, 2)


@pytest.mark.parametrize("name", ["3bit", "5-trit", "2BIT", ""])
def test_unknown_format_rejected(name):
    w = torch.zeros((2, 10), dtype=torch.int8)
    with pytest.raises(ValueError, match=f"unknown packed format {name!r}"):
        pack_ternary(w, name)
    with pytest.raises(ValueError, match="unknown packed format"):
        repack(pack_ternary(w), 10, name)
    with pytest.raises(ValueError, match="unknown packed format"):
        padded_in_features(10, name)
    with pytest.raises(ValueError, match="unknown packed format"):
        packed_shape(2, 10, name)


# --------------------------------------------------------------------------------------
# ternary_mm on the dense formats, every path
# --------------------------------------------------------------------------------------

M_ANY = st.one_of(st.just(1), st.integers(2, 5), st.integers(6, 127), st.integers(128, 200))
MM_LEAD = st.one_of(
    st.just(()),
    M_ANY.map(lambda m: (m,)),
    st.tuples(st.integers(1, 3), st.integers(1, 5)),
    st.just((0,)),
)
N_ANY = st.one_of(st.integers(1, 300), st.sampled_from([1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 127, 129, 200, 257]))
W_MODES = st.sampled_from(["random", "random", "sparse", "neg", "pos", "zero"])


@pytest.mark.parametrize("fmt", DENSE)
@settings(max_examples=80)
@given(lead=MM_LEAD, k=K_PACK, n=N_ANY, xkinds=st.lists(XQ_KINDS, min_size=1, max_size=4), wmode=W_MODES, seed=SEEDS)
def test_ternary_mm_dense_matches_reference(isa5, fmt, lead, k, n, xkinds, wmode, seed):
    m = math.prod(lead)
    n = clip_n(n, m, k)
    w = random_ternary(n, k, torch.Generator().manual_seed(seed), wmode)
    p5, p2 = both_formats(w, fmt)
    xq = make_xq(lead, k, xkinds, seed + 1)
    out = torch_bitnet.ternary_mm(xq, p5, k, n)
    assert out.dtype == torch.int32 and tuple(out.shape) == (*lead, n)
    expected = mm_oracle(xq.reshape(-1, k), w).reshape(*lead, n)
    assert torch.equal(out, expected)
    assert torch.equal(out, reference.ternary_mm(xq, p5, k, n))
    assert torch.equal(out, torch_bitnet.ternary_mm(xq, p2, k, n))


@pytest.mark.parametrize("fmt", DENSE)
def test_ternary_mm_dense_edges(isa5, fmt):
    """Deterministic sweep: every special K, M on each kernel (1: GEMV or table lookup, 2/5:
    small tiles or AVX-512 panels, 12 / 13: amx's threshold, 17 / 33: amx's token tiles, one and a
    half pairs; 131: panels), N with partial 4/16/32/64-row tiles and several 64-row unpack
    tiles; extreme activation rows (-128, 127) and weight rows (all -1, all +1)."""
    g = torch.Generator().manual_seed(11)
    for k in SPECIAL_K5 + SPECIAL_K3:
        for m in (1, 2, 5, 12, 13, 33, 131):
            for n in (5, 65, 130):
                n = clip_n(n, m, k)
                w = random_ternary(n, k, g)
                w[0] = 1
                if n > 1:
                    w[1] = -1
                xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
                xq[0] = -128
                if m > 1:
                    xq[1] = 127
                p5, p2 = both_formats(w, fmt)
                out = torch_bitnet.ternary_mm(xq, p5, k, n)
                assert torch.equal(out, mm_oracle(xq, w)), (m, n, k)
                assert torch.equal(out, torch_bitnet.ternary_mm(xq, p2, k, n)), (m, n, k)
                # -128 * sum(+1 row) is the most negative accumulator of the row
                assert out[0, 0].item() == -128 * k


@pytest.mark.parametrize("fmt", DENSE)
def test_ternary_mm_dense_largest_accumulator(isa5, fmt):
    """K = MAX_IN_FEATURES (Kp5 = 131200 > Kp2 = 131072): |acc| reaches 2**24; the 3-trit table
    lookup's int16 partial sums hold 28 words of -128 * +1 (or 127 * -1) before they widen."""
    k = MAX_IN_FEATURES
    w = torch.ones((5, k), dtype=torch.int8)
    w[1] = -1
    w[2] = 0
    w[3, ::2] = -1
    p5 = pack_ternary(w, fmt)
    xq = torch.full((128, k), -128, dtype=torch.int8)
    xq[1] = 127
    # rows 0 and 2.. are equal: the oracle of two rows covers all
    two = mm_oracle(xq[:2], w)
    for m in (1, 3, 128):
        out = torch_bitnet.ternary_mm(xq[:m], p5, k, 5)
        assert out[0, 0].item() == -(2**24) and out[0, 1].item() == 2**24
        expected = torch.cat([two[:1], two[1:2], two[:1].expand(max(0, m - 2), 5)])[:m]
        assert torch.equal(out, expected), m


@pytest.mark.parametrize("fmt", DENSE)
def test_ternary_mm_dense_threads(isa5, fmt):
    """Row ranges of 1, 2 and 3 threads (they start mid unpack tile, and for several tokens mid
    3-trit tile: a 64-row panel then spans three of them)."""
    g = torch.Generator().manual_seed(21)
    cases = [(1, 2560, 700), (1, 300, 1000), (3, 1000, 300), (20, 700, 150), (130, 700, 150)]
    before = torch.get_num_threads()
    try:
        for m, k, n in cases:
            w = random_ternary(n, k, g)
            p5, _ = both_formats(w, fmt)
            xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            expected = mm_oracle(xq, w)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                assert torch.equal(torch_bitnet.ternary_mm(xq, p5, k, n), expected), (m, k, n, threads)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# Bytes no weights produce: the same fixed reading on every path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 300, 700, 1000, 2560])
def test_invalid_bytes_read_the_same_on_every_path(isa5, k):
    g = torch.Generator().manual_seed(k)
    n = 70
    p5 = pack_ternary(random_ternary(n, k, g), "5trit")
    blocks = p5.shape[1]
    # Sprinkle the 13 invalid bytes over random places (inside K and in the padding), and fill
    # two whole rows with them so every invalid value meets every chunk position.
    count = max(40, p5.numel() // 20)
    flat = p5.view(-1)
    idx = torch.randint(0, flat.numel(), (count,), generator=g)
    inv = torch.tensor(INVALID_BYTES, dtype=torch.uint8)
    flat[idx] = inv[torch.randint(0, len(INVALID_BYTES), (count,), generator=g)]
    p5[3] = inv[torch.arange(blocks * 64) % len(INVALID_BYTES)].view(blocks, 64)
    p5[64] = inv[(torch.arange(blocks * 64) * 5) % len(INVALID_BYTES)].view(blocks, 64)  # in the 2nd unpack tile
    with pytest.raises(ValueError, match="encodes no five ternary weights"):
        unpack_ternary(p5, k)
    w = decode5(p5, k)  # the kernels' reading of the invalid bytes
    # Row 3 is all invalid bytes: read as zeros it would give 0, but u4 != 1 for 10 of the 13
    # values, so where K reaches chunk 4 (k >= 256) the fixed reading gives non-zero weights.
    if k > 256:
        assert int((w[3] != 0).sum()) > 0
    for m in (1, 2, 5, 130):
        xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        out = torch_bitnet.ternary_mm(xq, p5, k, n)
        assert torch.equal(out, mm_oracle(xq, w)), (torch_bitnet.get_isa(), m, k)


# --------------------------------------------------------------------------------------
# bitlinear / bitlinear_shared / bitlinear_relu2_glu
# --------------------------------------------------------------------------------------

F_LEAD = st.one_of(
    st.just(()),
    st.tuples(st.sampled_from([1, 1, 2, 3, 4, 5, 17, 0])),
    st.tuples(st.integers(128, 140)),
    st.tuples(st.integers(1, 3), st.integers(1, 6)),
)


def _norm_weight(k, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(k, generator=g) * 2 - 0.5).to(dtype)


@pytest.mark.parametrize("fmt", DENSE)
@settings(max_examples=50)
@given(lead=F_LEAD, k=K_PACK, n=N_ANY, dtype=st.sampled_from(FLOAT_DTYPES), bias=st.booleans(), norm=st.booleans(),
       kinds=st.lists(ROW_KIND, min_size=1, max_size=4), wmode=W_MODES, seed=SEEDS)
def test_bitlinear_dense_equals_2bit(isa5, fmt, lead, k, n, dtype, bias, norm, kinds, wmode, seed):
    m = math.prod(lead)
    n = clip_n(n, m, k)
    g = torch.Generator().manual_seed(seed)
    w = random_ternary(n, k, g, wmode)
    p5, p2 = both_formats(w, fmt)
    scale = torch.rand(1, generator=g) + 0.01
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    nw = _norm_weight(k, dtype, seed) if norm else None
    x = make_x(lead, k, dtype, kinds, seed)
    out = torch_bitnet.bitlinear(x, p5, scale, b, k, n, nw, 1e-5)
    assert out.dtype == dtype and tuple(out.shape) == (*lead, n)
    assert_bitwise_equal(out, torch_bitnet.bitlinear(x, p2, scale, b, k, n, nw, 1e-5))
    assert_bitwise_equal(out, reference.bitlinear(x, p2, scale, b, k, n, nw, 1e-5))


@settings(max_examples=30)
@given(lead=F_LEAD, k=K_PACK, ns=st.lists(st.integers(1, 200), min_size=1, max_size=3),
       fmts=st.lists(st.sampled_from(FORMATS), min_size=3, max_size=3), dtype=st.sampled_from(FLOAT_DTYPES),
       norm=st.booleans(), seed=SEEDS)
def test_bitlinear_shared_mixed_formats(isa5, lead, k, ns, fmts, dtype, norm, seed):
    m = math.prod(lead)
    ns = [clip_n(n, m * len(ns), k) for n in ns]
    g = torch.Generator().manual_seed(seed)
    ws = [random_ternary(n, k, g) for n in ns]
    packed = [pack_ternary(w, f) for w, f in zip(ws, fmts)]
    scales = [torch.rand(1, generator=g) + 0.01 for _ in ns]
    nw = _norm_weight(k, dtype, seed) if norm else None
    x = make_x(lead, k, dtype, ["normal", "ties", "zero", "mixed"], seed)
    outs = torch_bitnet.bitlinear_shared(x, packed, scales, k, ns, nw, 1e-5)
    assert len(outs) == len(ns)
    for out, w, s, n in zip(outs, ws, scales, ns):
        p2 = pack_ternary(w, "2bit")
        assert_bitwise_equal(out, torch_bitnet.bitlinear(x, p2, s, None, k, n, nw, 1e-5))
        assert_bitwise_equal(out, reference.bitlinear(x, p2, s, None, k, n, nw, 1e-5))


@settings(max_examples=30)
@given(lead=F_LEAD, k=K_PACK, n=N_ANY,
       fmts=st.sampled_from([("5trit", "5trit"), ("5trit", "2bit"), ("2bit", "5trit"), ("3trit", "3trit"),
                             ("3trit", "5trit"), ("2bit", "3trit")]),
       dtype=st.sampled_from(FLOAT_DTYPES), norm=st.booleans(), seed=SEEDS)
def test_relu2_glu_dense_equals_2bit(isa5, lead, k, n, fmts, dtype, norm, seed):
    m = math.prod(lead)
    n = clip_n(n, 2 * m, k)
    g = torch.Generator().manual_seed(seed)
    wg, wu = random_ternary(n, k, g), random_ternary(n, k, g)
    gs, us = torch.rand(1, generator=g) + 0.01, torch.rand(1, generator=g) + 0.01
    nw = _norm_weight(k, dtype, seed) if norm else None
    x = make_x(lead, k, dtype, ["normal", "normal", "nan", "zero"], seed)
    gate, up = pack_ternary(wg, fmts[0]), pack_ternary(wu, fmts[1])
    out = torch_bitnet.bitlinear_relu2_glu(x, gate, gs, up, us, k, n, nw, 1e-6)
    g2, u2 = pack_ternary(wg), pack_ternary(wu)
    assert_bitwise_equal(out, torch_bitnet.bitlinear_relu2_glu(x, g2, gs, u2, us, k, n, nw, 1e-6))
    assert_bitwise_equal(out, reference.bitlinear_relu2_glu(x, g2, gs, u2, us, k, n, nw, 1e-6))


@pytest.mark.parametrize("m", [1, 37])
def test_shared_threads_split_across_5trit_weights(isa5, m):
    """The row tiles of all weights share one parallel range (a thread's part may span a 5-trit
    and a 2-bit weight); results must not depend on the thread count."""
    k = 2560
    ns, fmts = ([600, 77, 130], ["5trit", "2bit", "5trit"]) if m == 1 else ([100, 77, 30], ["5trit", "5trit", "2bit"])
    g = torch.Generator().manual_seed(5 + m)
    ws = [random_ternary(n, k, g) for n in ns]
    packed = [pack_ternary(w, f) for w, f in zip(ws, fmts)]
    scales = [torch.rand(1, generator=g) + 0.01 for _ in ns]
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    nw = _norm_weight(k, torch.bfloat16, 5)
    expected = reference.bitlinear_shared(x, [pack_ternary(w) for w in ws], scales, k, ns, nw)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs = torch_bitnet.bitlinear_shared(x, packed, scales, k, ns, nw)
            for a, b in zip(outs, expected):
                assert_bitwise_equal(a, b)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# opcheck and torch.compile
# --------------------------------------------------------------------------------------


def _opcheck_cases(fmt):
    g = torch.Generator().manual_seed(3)
    cases = []

    def p5(n, k):
        return pack_ternary(random_ternary(n, k, g), fmt)

    def p2(n, k):
        return pack_ternary(random_ternary(n, k, g), "2bit")

    for lead, k, n in [((3,), 700, 5), ((1,), 300, 3), ((0, 2), 40, 3), ((2, 3), 321, 70)]:
        xq = torch.randint(-128, 128, (*lead, k), generator=g, dtype=torch.int8)
        cases.append((f"{fmt}-ternary_mm-{lead}-{k}-{n}", TMM, (xq, p5(n, k), k, n)))
    for dtype in (torch.float32, torch.bfloat16):
        x = make_x((2, 3), 700, dtype, ["normal"], 1)
        nw = _norm_weight(700, dtype, 1)
        bias = torch.randn(9, generator=g).to(dtype)
        s = torch.tensor([0.3])
        cases.append((f"{fmt}-bitlinear-{dtype}", BL, (x, p5(9, 700), s, bias, 700, 9, nw, 1e-5)))
        cases.append((f"{fmt}-shared-{dtype}", SHARED,
                      (x, [p5(9, 700), p2(4, 700), p5(3, 700)], [s, s, s], 700, [9, 4, 3], nw, 1e-5)))
        cases.append((f"{fmt}-glu-{dtype}", GLU, (x, p5(6, 700), s, p2(6, 700), s, 700, 6, nw, 1e-5)))
    x = make_x((1,), 300, torch.float16, ["normal"], 2)
    cases.append((f"{fmt}-glu-both-m1", GLU,
                  (x, p5(8, 300), torch.tensor([0.2]), p5(8, 300), torch.tensor([0.7]), 300, 8)))
    cases.append((f"{fmt}-bitlinear-m1", BL, (x, p5(8, 300), torch.tensor([0.2]), None, 300, 8)))
    return cases


OPCHECK_CASES = [case for fmt in DENSE for case in _opcheck_cases(fmt)]


@pytest.mark.parametrize("op,args", [c[1:] for c in OPCHECK_CASES], ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_dense(fresh_dynamo, op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("fmt", DENSE)
def test_compile_fullgraph_dense(fresh_dynamo, fmt):
    k, h, n = 700, 96, 40
    g = torch.Generator().manual_seed(9)
    p1 = pack_ternary(random_ternary(h, k, g), fmt)
    p2 = pack_ternary(random_ternary(n, h, g), fmt)
    s1, s2 = torch.tensor([0.05]), torch.tensor([0.02])
    bias = torch.randn(h, generator=g).to(torch.bfloat16)
    nw = _norm_weight(k, torch.bfloat16, 9)

    def fn(x):
        y = torch_bitnet.bitlinear(x, p1, s1, bias, k, h, nw, 1e-5)
        return torch_bitnet.bitlinear(torch.relu(y), p2, s2, None, h, n)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)
    for _ in range(2):  # same shape, new values: one compilation
        x = torch.randn(3, k, generator=g).to(torch.bfloat16)
        got = compiled(x)
        assert_bitwise_equal(got, fn(x))
        # and the eager result itself is the 2-bit one
        y = torch_bitnet.bitlinear(x, repack(p1, k, "2bit", h), s1, bias, k, h, nw, 1e-5)
        assert_bitwise_equal(got, torch_bitnet.bitlinear(torch.relu(y), repack(p2, h, "2bit", n), s2, None, h, n))
    assert counter.frame_count == 1
    targets = [node.target for node in counter.graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.bitnet.bitlinear.default) == 2


# --------------------------------------------------------------------------------------
# Errors, eager and in the fake kernels
# --------------------------------------------------------------------------------------


def _x(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _w(*shape, dtype=torch.uint8):
    return torch.full(shape, TRIT5_ZERO, dtype=dtype)


def _both(n, k):
    """Regex for the shape error naming every format's shape, in the C++ ([..]) and the Python
    ((..)) spelling."""
    two, five, three = (packed_shape(n, k, f) for f in ("2bit", "5trit", "3trit"))
    fmt = lambda s: r"[\[(]" + ", ".join(map(str, s)) + r"[\])]"  # noqa: E731
    return f"expected {fmt(two)} \\(2-bit\\), {fmt(five)} \\(5-trit\\) or {fmt(three)} \\(3-trit\\)"


_S = lambda: _x(1)  # noqa: E731

ERROR_CASES = [
    ("mm_blocks", lambda: TMM(_x(2, 300, dtype=torch.int8), _w(4, 2, 64), 300, 4), ValueError, _both(4, 300)),
    ("mm_last_dim", lambda: TMM(_x(2, 300, dtype=torch.int8), _w(4, 1, 32), 300, 4), ValueError, _both(4, 300)),
    ("mm_rows", lambda: TMM(_x(2, 300, dtype=torch.int8), _w(5, 1, 64), 300, 4), ValueError, _both(4, 300)),
    ("mm_flattened", lambda: TMM(_x(2, 300, dtype=torch.int8), _w(4, 64), 300, 4), ValueError, _both(4, 300)),
    ("mm_4d", lambda: TMM(_x(2, 300, dtype=torch.int8), _w(4, 1, 1, 64), 300, 4), ValueError, _both(4, 300)),
    ("mm_int8_5trit", lambda: TMM(_x(2, 300, dtype=torch.int8), _w(4, 1, 64, dtype=torch.int8), 300, 4),
     TypeError, "packed weight must be uint8"),
    ("bl_blocks", lambda: BL(_x(2, 321), _w(4, 1, 64), _S(), None, 321, 4), ValueError, _both(4, 321)),
    ("bl_blocks_6912", lambda: BL(_x(1, 6912), _w(3, 21, 64), _S(), None, 6912, 3), ValueError, _both(3, 6912)),
    ("shared_second_bad", lambda: SHARED(_x(2, 300), [_w(4, 1, 64), _w(3, 2, 64)], [_S(), _S()], 300, [4, 3], None,
                                         1e-6), ValueError, _both(3, 300)),
    ("glu_up_bad", lambda: GLU(_x(2, 300), _w(4, 1, 64), _S(), _w(4, 1, 63), _S(), 300, 4, None, 1e-6),
     ValueError, _both(4, 300)),
    ("glu_gate_bad", lambda: GLU(_x(2, 300), _w(4, 3, 64), _S(), _w(4, 128), _S(), 300, 4, None, 1e-6),
     ValueError, _both(4, 300)),
]


test_errors_eager, test_errors_fake_kernels = error_tests(ERROR_CASES)
