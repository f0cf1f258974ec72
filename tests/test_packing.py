"""The packed ternary format (torch_bitnet.packing): layout, lossless conversions, errors.

The layout is pinned by a hand-computed golden test, so a change of the format (which every
kernel and every saved checkpoint depends on) cannot go unnoticed. The conversions to and
from transformers' own packed layout are checked against transformers itself.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.integrations import bitnet as hf_bitnet

from torch_bitnet import packing
from torch_bitnet.packing import (
    MAX_IN_FEATURES,
    check_packed,
    from_hf_packed,
    pack_ternary,
    packed_shape,
    ternarize,
    to_hf_packed,
    unpack_ternary,
)

# transformers wraps these in @torch.compile; the undecorated Python functions keep the
# tests free of inductor compilation (tens of seconds each) and compute the same thing.
hf_unpack_weights = getattr(hf_bitnet.unpack_weights, "__wrapped__", hf_bitnet.unpack_weights)
hf_weight_quant = getattr(hf_bitnet.WeightQuant.forward, "__wrapped__", hf_bitnet.WeightQuant.forward)


def random_ternary(n: int, k: int, seed: int, mode: str = "random", dtype=torch.int8) -> torch.Tensor:
    """A ternary (n, k) matrix: uniform random, constant, or mostly zero."""
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        w = torch.randint(-1, 2, (n, k), generator=g)
    elif mode == "sparse":
        w = torch.randint(-1, 2, (n, k), generator=g) * (torch.rand((n, k), generator=g) < 0.05)
    else:  # constant -1, 0 or +1 everywhere: every byte of a row is the same code 4 times
        w = torch.full((n, k), {"neg": -1, "zero": 0, "pos": 1}[mode])
    return w.to(dtype)


# --------------------------------------------------------------------------------------
# Golden bytes
# --------------------------------------------------------------------------------------


def test_golden_bytes():
    """Pin the byte layout documented in packing.py with values computed by hand.

    N = 2, K = 300 -> Kp = 512 (two 256-weight blocks), 128 bytes per row. A weight k sits in
    block b = k // 256, plane i = (k % 256) // 64, byte j = k % 64 of the block, at bits
    2i+1:2i, as the code u = w + 1 (0 for -1, 1 for 0, 2 for +1). Every weight not listed
    below is 0 (code 1 = 0b01), and the padding k = 300..511 is code 1 too, so a byte whose
    four weights are all 0 / padding is 0b01_01_01_01 = 0x55.
    """
    w = torch.zeros((2, 300), dtype=torch.int8)
    w[0, 0] = 1  # b0 i0 j0 -> byte 0, bits 1:0 = 0b10
    w[0, 64] = -1  # b0 i1 j0 -> byte 0, bits 3:2 = 0b00
    w[0, 255] = 1  # b0 i3 j63 -> byte 63, bits 7:6 = 0b10
    w[0, 256] = -1  # b1 i0 j0 -> byte 64 + 0, bits 1:0 = 0b00
    w[0, 299] = 1  # b1 i0 j43 -> byte 64 + 43 = 107, bits 1:0 = 0b10 (bits 7:2 are padding)
    w[1, 1] = w[1, 65] = w[1, 129] = 1  # b0 j1, planes 0, 1, 2 -> byte 1 codes 2, 2, 2
    w[1, 193] = -1  # b0 j1 plane 3 -> byte 1 code 0
    w[1, 130] = -1  # b0 i2 j2 -> byte 2, bits 5:4 = 0b00
    w[1, 5] = w[1, 69] = w[1, 133] = w[1, 197] = 1  # byte 5: all four planes code 2
    w[1, 6] = w[1, 70] = w[1, 134] = w[1, 198] = -1  # byte 6: all four planes code 0
    w[1, 298] = -1  # b1 i0 j42 -> byte 64 + 42 = 106, bits 1:0 = 0b00

    expected_bytes = {
        # (row, byte): value, written as the bit fields u3 | u2 | u1 | u0
        (0, 0): 0b01_01_00_10,  # 0x52: u0 = 2 (w[0,0] = +1), u1 = 0 (w[0,64] = -1)
        (0, 63): 0b10_01_01_01,  # 0x95: u3 = 2 (w[0,255] = +1)
        (0, 64): 0b01_01_01_00,  # 0x54: u0 = 0 (w[0,256] = -1)
        (0, 107): 0b01_01_01_10,  # 0x56: u0 = 2 (w[0,299] = +1), u1..u3 padding
        (1, 1): 0b00_10_10_10,  # 0x2A: u0 = u1 = u2 = 2, u3 = 0
        (1, 2): 0b01_00_01_01,  # 0x45: u2 = 0 (w[1,130] = -1)
        (1, 5): 0b10_10_10_10,  # 0xAA: four +1
        (1, 6): 0b00_00_00_00,  # 0x00: four -1
        (1, 106): 0b01_01_01_00,  # 0x54: u0 = 0 (w[1,298] = -1), u1..u3 padding
    }
    assert (expected_bytes[(0, 0)], expected_bytes[(1, 1)], expected_bytes[(0, 63)]) == (0x52, 0x2A, 0x95)

    packed = pack_ternary(w)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (2, 128)  # Kp / 4 = 512 / 4 bytes per row
    assert packed.is_contiguous()

    expected = torch.full((2, 128), 0x55, dtype=torch.uint8)
    for (row, col), value in expected_bytes.items():
        expected[row, col] = value
        assert packed[row, col].item() == value, f"byte ({row}, {col}): {packed[row, col].item():#04x} != {value:#04x}"
    # Pure padding: bytes 108..127 of block 1 hold only k >= 300 (j >= 44 for plane 0).
    assert bool((packed[:, 108:] == 0x55).all())
    # And every byte not listed above holds four zero weights.
    assert torch.equal(packed, expected)
    assert torch.equal(unpack_ternary(packed, 300), w)


def test_golden_hf_layout_from_transformers_docstring():
    """transformers' unpack_weights docstring example, decoded by hand from its bit diagram.

    Packed row 0 byte 0b10100001 -> bits 1:0 = 01 (0, row 0), 3:2 = 00 (-1, row 2),
    5:4 = 10 (+1, row 4), 7:6 = 10 (+1, row 6): R = 2 rows apart, i.e. blocks of N/4 rows.
    """
    hf = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    expected = torch.tensor(
        [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=torch.int8
    )
    assert torch.equal(from_hf_packed(hf), expected)
    assert torch.equal(to_hf_packed(expected), hf)


def test_packed_shape_and_padding_helpers():
    # Kp is K rounded up to 256; the packed row holds Kp / 4 bytes.
    assert packing.padded_in_features(1) == 256
    assert packing.padded_in_features(256) == 256
    assert packing.padded_in_features(257) == 512
    assert packed_shape(640, 2560) == (640, 640)
    assert packed_shape(2560, 6912) == (2560, 1728)  # 6912 = 27 * 256: no padding
    assert packed_shape(3, 300) == (3, 128)


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------

MODES = st.sampled_from(["random", "sparse", "neg", "zero", "pos"])
INT_DTYPES = st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64])


@given(n=st.integers(1, 40), k=st.integers(1, 1100), seed=st.integers(0, 2**31 - 1), mode=MODES, dtype=INT_DTYPES)
def test_pack_unpack_round_trip(n, k, seed, mode, dtype):
    w = random_ternary(n, k, seed, mode, dtype)
    packed = pack_ternary(w)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == packed_shape(n, k)
    check_packed(packed, k, n)  # must accept what pack_ternary produces
    out = unpack_ternary(packed, k)
    assert out.dtype == torch.int8
    assert torch.equal(out, w.to(torch.int8))

    # Independent oracle: read every weight back with the formula of the format docstring
    # (byte 64*b + j, bits 2i+1:2i, b = k // 256, i = k % 256 // 64, j = k % 64).
    kk = torch.arange(packing.padded_in_features(k))
    byte = packed[:, 64 * (kk // 256) + kk % 64].to(torch.int64)
    codes = (byte >> (2 * ((kk % 256) // 64))) & 3
    assert torch.equal(codes[:, :k] - 1, w.to(torch.int64))
    assert bool((codes[:, k:] == 1).all())  # padding = code 1 (weight 0)


def test_pack_non_contiguous_input():
    w = random_ternary(300, 37, seed=3)
    wt = w.t()  # (37, 300), non-contiguous view
    assert not wt.is_contiguous()
    assert torch.equal(pack_ternary(wt), pack_ternary(wt.contiguous()))


@given(r=st.integers(1, 40), k=st.integers(1, 700), seed=st.integers(0, 2**31 - 1), mode=MODES)
def test_hf_layout_matches_transformers(r, k, seed, mode):
    n = 4 * r  # transformers' BitLinear stores out_features divisible by 4
    w = random_ternary(n, k, seed, mode)
    hf = to_hf_packed(w)
    assert hf.dtype == torch.uint8 and tuple(hf.shape) == (r, k)
    # transformers' pack_weights adds 1 to its argument in place: give it a copy.
    w_copy = w.clone()
    assert torch.equal(hf, hf_bitnet.pack_weights(w_copy))
    assert torch.equal(from_hf_packed(hf), w)
    assert torch.equal(from_hf_packed(hf, out_features=n), w)
    assert torch.equal(hf_unpack_weights(hf, torch.int8), w)
    # Our packed format from either side is the same bytes.
    assert torch.equal(pack_ternary(from_hf_packed(hf)), pack_ternary(w))


# --------------------------------------------------------------------------------------
# ternarize == transformers' WeightQuant
# --------------------------------------------------------------------------------------


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Distance from |x| to the next larger float32."""
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


def assert_matches_weight_quant(weight: torch.Tensor):
    wq, s = ternarize(weight)
    assert wq.dtype == torch.int8 and tuple(wq.shape) == tuple(weight.shape)
    assert s.dtype == torch.float32 and tuple(s.shape) == (1,)
    assert bool((wq.abs() <= 1).all())
    theirs = hf_weight_quant(None, weight.float())  # round(W / s).clamp(-1, 1) * s, as float32
    # Same ternary codes: transformers' output is code * (1 / (1 / mean)), a positive factor.
    assert torch.equal(torch.sign(theirs).to(torch.int8), wq)
    # Same scale, up to the extra rounding of transformers' 1 / (1 / mean): at most one ulp.
    nonzero = theirs[theirs != 0].abs()
    if nonzero.numel():
        assert bool((nonzero == nonzero[0]).all())
        assert abs(nonzero[0].item() - s.item()) <= ulp(s).item()
    # And ours is the mean itself (the clamp keeps an all-zero weight from dividing by 0).
    assert s.item() == weight.float().abs().mean().clamp(min=1e-5).item()


@given(
    n=st.integers(1, 48),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-8, 4),
    kind=st.sampled_from(["normal", "uniform", "sparse", "zero", "one_value"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_ternarize_matches_weight_quant(n, k, seed, log_scale, kind, dtype):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn((n, k), generator=g)
    elif kind == "uniform":
        w = torch.rand((n, k), generator=g) * 2 - 1
    elif kind == "sparse":
        w = torch.randn((n, k), generator=g) * (torch.rand((n, k), generator=g) < 0.1)
    elif kind == "zero":
        w = torch.zeros((n, k))
    else:  # every weight +-v: W / mean is exactly +-1
        w = torch.where(torch.rand((n, k), generator=g) < 0.5, -1.0, 1.0)
    w = (w * 10.0**log_scale).to(dtype)
    assert_matches_weight_quant(w)


def test_ternarize_rounds_half_to_even():
    # mean |W| = (0.5 + 0.5 + 1.5 + 2.5 + 1 + 1 + 0.5 + 0.5) / 8 = 1 exactly, so W / s = W and
    # the 0.5 entries are exact ties: half-to-even gives 0 (half-away-from-zero would give 1).
    w = torch.tensor([[0.5, -0.5, 1.5, -2.5], [1.0, 1.0, 0.5, 0.5]])
    wq, s = ternarize(w)
    assert torch.equal(wq, torch.tensor([[0, 0, 1, -1], [1, 1, 0, 0]], dtype=torch.int8))
    assert s.item() == 1.0
    assert_matches_weight_quant(w)
    assert_matches_weight_quant(w * 2.0**-20)  # same ties at another binade


def test_ternarize_zero_weight_uses_clamped_scale():
    wq, s = ternarize(torch.zeros(4, 8))
    assert bool((wq == 0).all())
    assert s.item() == torch.tensor(1e-5, dtype=torch.float32).item()


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2, -2, 127, -128])
def test_pack_rejects_non_ternary_values(bad):
    w = torch.zeros((3, 10), dtype=torch.int8)
    w[1, 7] = bad
    with pytest.raises(ValueError, match=r"values outside \{-1, 0, 1\}"):
        pack_ternary(w)
    # to_hf_packed validates the same way (4 rows: the hf layout needs N divisible by 4).
    w4 = torch.zeros((4, 10), dtype=torch.int8)
    w4[2, 3] = bad
    with pytest.raises(ValueError, match=r"values outside \{-1, 0, 1\}"):
        to_hf_packed(w4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_pack_rejects_non_integer_dtype(dtype):
    with pytest.raises(TypeError, match="must be an integer tensor"):
        pack_ternary(torch.zeros((2, 4), dtype=dtype))


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must be 2-D"):
        pack_ternary(torch.zeros(8, dtype=torch.int8))
    with pytest.raises(ValueError, match="must be >= 1"):
        pack_ternary(torch.zeros((0, 8), dtype=torch.int8))
    with pytest.raises(ValueError, match="must be >= 1"):
        pack_ternary(torch.zeros((3, 0), dtype=torch.int8))
    with pytest.raises(ValueError, match=f"exceeds the supported maximum {MAX_IN_FEATURES}"):
        pack_ternary(torch.zeros((1, MAX_IN_FEATURES + 1), dtype=torch.int8))
    # The largest supported K is accepted.
    assert tuple(pack_ternary(torch.zeros((1, MAX_IN_FEATURES), dtype=torch.int8)).shape) == (1, MAX_IN_FEATURES // 4)


def test_unpack_rejects_code_3():
    packed = pack_ternary(torch.zeros((2, 300), dtype=torch.int8))
    packed[1, 10] |= 0b11 << 4  # plane 2 of byte 10: code 3, which no weight encodes to
    with pytest.raises(ValueError, match="invalid code 3"):
        unpack_ternary(packed, 300)


def test_unpack_rejects_non_zero_padding():
    packed = pack_ternary(torch.zeros((2, 300), dtype=torch.int8))
    packed[0, 127] = 0b01_01_01_10  # byte 127 holds only padding (k >= 300): make one +1
    with pytest.raises(ValueError, match="non-zero values in the K padding"):
        unpack_ternary(packed, 300)


def test_unpack_rejects_wrong_shape():
    packed = pack_ternary(torch.zeros((2, 300), dtype=torch.int8))
    with pytest.raises(ValueError, match="must be 2-D"):
        unpack_ternary(packed.flatten(), 300)
    with pytest.raises(ValueError, match=r"expected \(2, 64\)"):
        unpack_ternary(packed, 200)  # K = 200 needs one block, 64 bytes per row


def test_from_hf_packed_errors():
    with pytest.raises(ValueError, match="invalid code 3"):
        from_hf_packed(torch.tensor([[0b01_11_01_01]], dtype=torch.uint8))  # row 2R: code 3
    with pytest.raises(TypeError, match="must be a uint8 tensor, got torch.int8"):
        from_hf_packed(torch.zeros((1, 4), dtype=torch.int8))
    with pytest.raises(TypeError, match="must be a uint8 tensor, got list"):
        from_hf_packed([[0x55]])
    with pytest.raises(ValueError, match="must be 2-D"):
        from_hf_packed(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="holds 8 output rows, but out_features=7"):
        from_hf_packed(torch.full((2, 4), 0x55, dtype=torch.uint8), out_features=7)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 10])
def test_to_hf_packed_needs_rows_divisible_by_4(n):
    with pytest.raises(ValueError, match=f"out_features divisible by 4, got {n}"):
        to_hf_packed(torch.zeros((n, 8), dtype=torch.int8))


def test_check_packed_errors():
    good = pack_ternary(torch.zeros((3, 300), dtype=torch.int8))
    check_packed(good, 300, 3)  # accepted
    check_packed(good, 257, 3)  # any K with the same Kp is the same shape
    with pytest.raises(ValueError, match=r"has shape \(3, 128\), expected \(3, 64\)"):
        check_packed(good, 256, 3)
    with pytest.raises(ValueError, match=r"expected \(4, 128\)"):
        check_packed(good, 300, 4)
    with pytest.raises(ValueError, match=r"expected \(3, 128\)"):
        check_packed(good.view(3, 64, 2), 300, 3)
    with pytest.raises(TypeError, match="must be uint8, got torch.int8"):
        check_packed(good.view(torch.int8), 300, 3)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        check_packed(good.numpy(), 300, 3)
    with pytest.raises(ValueError, match="must be >= 1"):
        check_packed(good, 300, 0)
    with pytest.raises(ValueError, match="exceeds the supported maximum"):
        check_packed(good, MAX_IN_FEATURES + 1, 3)


def test_ternarize_errors():
    with pytest.raises(TypeError, match="floating-point weight"):
        ternarize(torch.zeros((2, 2), dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D weight"):
        ternarize(torch.zeros(4))
