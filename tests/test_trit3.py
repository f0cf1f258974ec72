"""The 3-trit packed ternary format (nine weights per 16-bit word, tiles of 32 rows).

* Layout: pinned by hand-computed golden bytes, and round trips / ``repack`` against an
  independent decoder written from the documented word layout (not ``packing._codes``).
* Validation: words no weights produce (an index 27-31, bit 15), non-zero padding along K and in
  the rows past out_features, shapes (the Python check, the op and its fake kernel), the
  out_features a 3-trit weight needs.
* Words no weights produce: every path ignores bit 15 and reads indices 27-31 as three zero
  weights.
* The command line's and the bench's format options; a model packed 3-trit: the same logits,
  saved and loaded as 3-trit, and its bytes counted by the bench.

The ops on 3-trit weights, on every path, with opcheck and torch.compile, are
tests/test_trit5.py's dense-format tests; generation, tests/test_trit5_model.py's.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops import SEEDS
from test_trit5 import W_MODES, mm_oracle, random_ternary

import torch_bitnet
from torch_bitnet import BitLinear, bench, cli
from torch_bitnet.checkpoints import small_config, write_checkpoint
from torch_bitnet.packing import (
    FORMATS,
    GROUP_K3,
    TILE_N3,
    TRIT3_ZERO,
    check_packed,
    pack_ternary,
    packed_format,
    packed_shape,
    padded_in_features,
    repack,
    unpack_ternary,
)

TMM = torch.ops.bitnet.ternary_mm.default

# K on both sides of the 9-weight word and the 256-weight 2-bit block (Kp3 = ceil(K/9)*9):
# 2560 -> 2565 is the 2B-4T hidden size, 6912 = 768 words its intermediate size.
SPECIAL_K3 = [1, 8, 9, 10, 18, 255, 256, 257, 300, 2304, 2560, 6912]
K_ANY = st.one_of(st.integers(1, 80), st.sampled_from(SPECIAL_K3), st.integers(81, 1100))


# --------------------------------------------------------------------------------------
# An independent decoder, from the documented layout
# --------------------------------------------------------------------------------------


def decode3(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """int8 (n, k) weights of a 3-trit weight as the kernels read it: word (t, j, r) is bytes
    packed[t, j, r, 0] + 256 * packed[t, j, r, 1]; index m at bits 5m..5m+4 holds the codes
    (base-3 digits, u = w + 1) of k = 9j + 3m + (0, 1, 2) of row 32t + r; bit 15 is ignored and
    indices 27-31 read as three zero weights."""
    p = packed.to(torch.int64)
    words = p[..., 0] + 256 * p[..., 1]  # (tiles, groups, 32)
    tiles, groups = words.shape[:2]
    w = torch.empty((tiles * TILE_N3, groups * GROUP_K3), dtype=torch.int8)
    for m in range(3):
        idx = (words >> (5 * m)) & 31
        for d in range(3):
            digit = torch.where(idx >= 27, torch.ones_like(idx), idx // 3**d % 3)
            # (tiles, groups, rows) -> rows (32 t + r), k = 9 j + 3 m + d
            w[:, 3 * m + d :: GROUP_K3] = (digit - 1).permute(0, 2, 1).reshape(tiles * TILE_N3, groups).to(torch.int8)
    return w[:n, :k]


# --------------------------------------------------------------------------------------
# Layout and validation
# --------------------------------------------------------------------------------------


def test_golden_bytes_3trit():
    # row 0: w = 1 0 -1 | 0 0 0 | -1 -1 -1 (codes 2 1 0 | 1 1 1 | 0 0 0): indices 2 + 3 = 5, 1 + 3 + 9
    # = 13, 0: word 5 | 13 << 5 = 421 = 0x01A5. Row 1: all +1 (codes 2): index 26 three times,
    # 26 | 26 << 5 | 26 << 10 = 27482 = 0x6B5A. K = 10: a second word per row, k = 9 holds row 0's
    # 1 (code 2: index 2 + 3 + 9 = 14 then two zero triples 13) and row 1's +1; rows 2-31 pad.
    w = torch.zeros((2, 10), dtype=torch.int8)
    w[0, :9] = torch.tensor([1, 0, -1, 0, 0, 0, -1, -1, -1])
    w[0, 9] = 1
    w[1] = 1
    p = pack_ternary(w, "3trit")
    assert p.dtype == torch.uint8 and tuple(p.shape) == (1, 2, 32, 2) == packed_shape(2, 10, "3trit")
    assert packed_format(p) == "3trit" and padded_in_features(10, "3trit") == 18
    assert p[0, 0, 0].tolist() == [0xA5, 0x01]
    assert p[0, 0, 1].tolist() == [0x5A, 0x6B]
    word = 14 | 13 << 5 | 13 << 10
    assert p[0, 1, 0].tolist() == [word & 255, word >> 8]
    word = 2 + 3 + 9 | 13 << 5 | 13 << 10  # +1, then eight zero weights of padding
    assert p[0, 1, 1].tolist() == [word & 255, word >> 8]
    assert TRIT3_ZERO == 13741
    assert (p[0, :, 2:].to(torch.int64) @ torch.tensor([1, 256]) == TRIT3_ZERO).all()
    assert torch.equal(unpack_ternary(p, 10, 2), w)


@settings(max_examples=80)
@given(n=st.integers(1, 80), k=K_ANY, seed=SEEDS, mode=W_MODES)
def test_round_trip_and_repack(n, k, seed, mode):
    w = random_ternary(n, k, torch.Generator().manual_seed(seed), mode)
    p3 = pack_ternary(w, "3trit")
    assert tuple(p3.shape) == packed_shape(n, k, "3trit") == (-(-n // 32), -(-k // 9), 32, 2)
    check_packed(p3, k, n)
    assert torch.equal(decode3(p3, n, k), w)
    assert torch.equal(unpack_ternary(p3, k, n), w)
    for fmt in FORMATS:
        other = repack(p3, k, fmt, n)
        assert packed_format(other) == fmt and torch.equal(unpack_ternary(other, k, n), w)
        assert torch.equal(repack(other, k, "3trit", n), p3)
    assert repack(p3, k, "3trit", n) is p3


def test_pack_non_contiguous_input_3trit():
    w = random_ternary(40, 70, torch.Generator().manual_seed(3)).t()  # (70, 40) view
    assert torch.equal(unpack_ternary(pack_ternary(w, "3trit"), 40, 70), w)


def test_out_features_required():
    p3 = pack_ternary(torch.zeros((5, 20), dtype=torch.int8), "3trit")
    for fn in (lambda: unpack_ternary(p3, 20), lambda: repack(p3, 20, "2bit"), lambda: repack(p3, 20, "3trit")):
        with pytest.raises(ValueError, match="3-trit packed weight needs out_features"):
            fn()
    # any out_features with the same tile count is a valid shape; rows past it must be zero
    assert unpack_ternary(p3, 20, 32).abs().sum() == 0
    with pytest.raises(ValueError, match=r"expected .*\(2, 3, 32, 2\) \(3-trit\)"):
        unpack_ternary(p3, 20, 33)


def _set_word(p: torch.Tensor, t: int, j: int, r: int, word: int) -> None:
    p[t, j, r, 0], p[t, j, r, 1] = word & 255, word >> 8


@pytest.mark.parametrize("bad", ["index", "bit15", "k_padding", "row_padding"])
def test_invalid_words_rejected(bad):
    k, n = 20, 5  # Kp3 = 27: k = 20..26 is padding; rows 5..31 too
    w = random_ternary(n, k, torch.Generator().manual_seed(1))
    p3 = pack_ternary(w, "3trit")
    if bad == "index":
        _set_word(p3, 0, 1, 2, 27 << 5 | 13 | 13 << 10)
        match = "encodes no nine ternary weights"
    elif bad == "bit15":
        _set_word(p3, 0, 0, 0, TRIT3_ZERO | 1 << 15)
        match = "encodes no nine ternary weights"
    elif bad == "k_padding":
        _set_word(p3, 0, 2, 1, 13 | 13 << 5 | 14 << 10)  # k = 24: +1
        match = "non-zero values in the K padding"
    else:
        _set_word(p3, 0, 0, 7, TRIT3_ZERO - 1)  # row 7: k = 0 is -1
        match = "rows past out_features"
    with pytest.raises(ValueError, match=match):
        unpack_ternary(p3, k, n)
    with pytest.raises(ValueError, match=match):
        repack(p3, k, "2bit", n)


def test_wrong_shapes_rejected():
    """The same message from the Python check, the C++ op and its fake kernel."""
    match = r"packed weight has shape [\[(]1, 3, 32, 2[\])].*[\[(]1, 2, 32, 2[\])] \(3-trit\) for in_features=10"
    for shape in [(1, 3, 32, 2), (2, 2, 32, 2), (1, 2, 16, 2), (1, 2, 32, 1)]:
        with pytest.raises(ValueError, match=r"[\[(]1, 2, 32, 2[\])] \(3-trit\) for in_features=10, out_features=5"):
            check_packed(torch.zeros(shape, dtype=torch.uint8), 10, 5)
    xq, bad = torch.zeros((1, 10), dtype=torch.int8), torch.zeros((1, 3, 32, 2), dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        TMM(xq, bad, 10, 5)
    with torch._subclasses.FakeTensorMode() as mode, pytest.raises(ValueError, match=match):
        TMM(mode.from_tensor(xq), mode.from_tensor(bad), 10, 5)


# --------------------------------------------------------------------------------------
# Words no weights produce: the same reading on every path (the products themselves, on every
# path, are test_trit5.py's dense-format tests)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [10, 300, 2560])
def test_invalid_words_read_the_same_on_every_path(isa5, k):
    g = torch.Generator().manual_seed(k)
    n = 70
    p3 = pack_ternary(random_ternary(n, k, g), "3trit")
    words = p3.view(torch.int16).view(-1)
    count = max(40, words.numel() // 10)
    at = torch.randint(0, words.numel(), (count,), generator=g)
    # an index of 27-31 in a random position, bit 15 set on half of them
    bad_idx = torch.randint(27, 32, (count,), generator=g)
    shift = 5 * torch.randint(0, 3, (count,), generator=g)
    new = (words[at].to(torch.int32) & 0xFFFF & ~(31 << shift)) | bad_idx << shift
    new |= (torch.arange(count) % 2) << 15
    words[at] = new.to(torch.int32).to(torch.int16)  # wraps to the same 16 bits
    with pytest.raises(ValueError, match="encodes no nine ternary weights"):
        unpack_ternary(p3, k, n)
    w = decode3(p3, n, k)
    for m in (1, 2, 13, 130):
        xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        assert torch.equal(torch_bitnet.ternary_mm(xq, p3, k, n), mm_oracle(xq, w)), (torch_bitnet.get_isa(), m, k)


# --------------------------------------------------------------------------------------
# The command line, and models
# --------------------------------------------------------------------------------------


def test_cli_and_bench_offer_every_format():
    parser = cli.build_parser()
    for fmt in ("auto", *FORMATS):
        assert parser.parse_args(["bench", "--ternary-format", fmt]).ternary_format == fmt
        args = parser.parse_args(["generate", "--prompt", "p", "--ternary-format", fmt])
        assert args.ternary_format == fmt


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("trit3") / "ckpt", small_config("odd"), mode="offline", seed=12)


def _formats(model) -> set[str]:
    return {m.ternary_format for m in model.modules() if isinstance(m, BitLinear)}


def test_model_3trit_same_logits_saved_and_reloaded(checkpoint, tmp_path):
    two = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32)
    three = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32, ternary_format="3trit")
    assert _formats(three) == {"3trit"}
    layer = three.model.layers[0].mlp.down_proj
    assert layer.weight.dim() == 4 and "3trit" in repr(layer)
    assert torch.equal(layer.ternary_weight(), two.model.layers[0].mlp.down_proj.ternary_weight())
    ids = torch.randint(0, two.config.vocab_size - 256, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = two(ids).logits
        assert torch.equal(three(ids).logits, expected)
        saved = torch_bitnet.save_pretrained(three, tmp_path / "three")
        assert json.loads((saved / "config.json").read_text())["torch_bitnet"]["ternary_format"] == "3trit"
        again = torch_bitnet.from_pretrained(saved, dtype=torch.float32)
        assert _formats(again) == {"3trit"} and torch.equal(again(ids).logits, expected)
        back = torch_bitnet.set_ternary_format(again, "2bit")
        assert _formats(back) == {"2bit"} and torch.equal(back(ids).logits, expected)
    # the bench counts the packed bytes (this small model's odd shapes pad 3-trit rows to 32)
    # and the scales (and biases) as they are
    layers = [m for m in two.modules() if isinstance(m, BitLinear)]
    grown = sum(math.prod(packed_shape(m.out_features, m.in_features, f)) * sign
                for m in layers for f, sign in (("3trit", 1), ("2bit", -1)))
    assert bench.bytes_by_kind(three)["ternary"] == bench.bytes_by_kind(two)["ternary"] + grown
