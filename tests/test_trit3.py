"""The 3-trit packed ternary format (nine weights per 16-bit word, tiles of 32 rows) and the ops
and models on 3-trit weights.

* Layout: pinned by hand-computed golden bytes, and round trips / ``repack`` against an
  independent decoder written from the documented word layout (not ``packing._codes``).
* Validation: words no weights produce (an index 27-31, bit 15), non-zero padding along K and in
  the rows past out_features, shapes, the out_features a 3-trit weight needs.
* Kernels, on every path (``isa5``): bit for bit equal to the reference and to the same op on
  the 2-bit packing of the same weight. M = 1 takes the table-lookup GEMV on avx512,
  avx512vbmi and amx (each thread builds the table of the call's input); M > 1 decodes the words
  into the AVX-512 panels on avx512vbmi (and into the AMX tiles' from 12 tokens on amx); the
  other cases unpack 64 rows at a time to the 2-bit layout. Row ranges of 1-3 threads start and
  end inside 32-row tiles.
* Words no weights produce: every path ignores bit 15 and reads indices 27-31 as three zero
  weights.
* opcheck, torch.compile(fullgraph=True), models (from_pretrained, save / load, generation on
  every path).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops import SEEDS, XQ_KINDS, assert_bitwise_equal, make_x, make_xq
from test_trit5 import F_LEAD, FLOAT_DTYPES, MM_LEAD, N_ANY, W_MODES, mm_oracle, random_ternary
from transformers import AutoTokenizer

import torch_bitnet
from torch_bitnet import BitLinear, bench, cli, reference
from torch_bitnet.checkpoints import small_config, write_checkpoint
from torch_bitnet.generate import generate
from torch_bitnet.packing import (
    FORMATS,
    GROUP_K3,
    MAX_IN_FEATURES,
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
BL = torch.ops.bitnet.bitlinear.default
GLU = torch.ops.bitnet.bitlinear_relu2_glu.default

# K on both sides of the 9-weight word and the 256-weight 2-bit block (Kp3 = ceil(K/9)*9):
# 2560 -> 2565 is the 2B-4T hidden size, 6912 = 768 words its intermediate size.
SPECIAL_K3 = [1, 8, 9, 10, 18, 255, 256, 257, 300, 2304, 2560, 6912]
K_ANY = st.one_of(st.integers(1, 80), st.sampled_from(SPECIAL_K3), st.integers(81, 1100))
# Upper bound on M * N * K per example (the scalar paths and the int64 oracle stay fast).
MAC_BUDGET = 3_000_000


def clip_n(n: int, m: int, k: int) -> int:
    return max(1, min(n, MAC_BUDGET // max(1, m * padded_in_features(k, "3trit"))))


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
# ternary_mm on 3-trit weights, every path
# --------------------------------------------------------------------------------------


@settings(max_examples=80)
@given(lead=MM_LEAD, k=K_ANY, n=N_ANY, xkinds=st.lists(XQ_KINDS, min_size=1, max_size=4), wmode=W_MODES, seed=SEEDS)
def test_ternary_mm_3trit_matches_reference(isa5, lead, k, n, xkinds, wmode, seed):
    m = math.prod(lead)
    n = clip_n(n, m, k)
    w = random_ternary(n, k, torch.Generator().manual_seed(seed), wmode)
    p3, p2 = pack_ternary(w, "3trit"), pack_ternary(w)
    xq = make_xq(lead, k, xkinds, seed + 1)
    out = torch_bitnet.ternary_mm(xq, p3, k, n)
    assert out.dtype == torch.int32 and tuple(out.shape) == (*lead, n)
    assert torch.equal(out, mm_oracle(xq.reshape(-1, k), w).reshape(*lead, n))
    assert torch.equal(out, reference.ternary_mm(xq, p3, k, n))
    assert torch.equal(out, torch_bitnet.ternary_mm(xq, p2, k, n))


def test_ternary_mm_3trit_edges(isa5):
    """Every special K, M on each kernel (1: table lookup; 2, 5: AVX-512 panels; 12, 13, 33: AMX
    from 12 tokens; 131: more than one AVX-512 panel tile run), N with partial 16- and 32-row
    tiles; extreme activations (-128, 127) and weight rows (all +1, all -1)."""
    g = torch.Generator().manual_seed(12)
    for k in SPECIAL_K3:
        for m in (1, 2, 5, 12, 13, 33, 131):
            for n in (5, 48, 97):
                n = clip_n(n, m, k)
                w = random_ternary(n, k, g)
                w[0] = 1
                if n > 1:
                    w[1] = -1
                xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
                xq[0] = -128
                if m > 1:
                    xq[1] = 127
                p3 = pack_ternary(w, "3trit")
                out = torch_bitnet.ternary_mm(xq, p3, k, n)
                assert torch.equal(out, mm_oracle(xq, w)), (m, n, k)
                assert out[0, 0].item() == -128 * k


def test_ternary_mm_3trit_largest_accumulator(isa5):
    """K = MAX_IN_FEATURES: |acc| reaches 2**24, and the table lookup's int16 partial sums hold
    28 words of -128 * +1 (or 127 * -1) per row before they widen."""
    k = MAX_IN_FEATURES
    w = torch.ones((5, k), dtype=torch.int8)
    w[1] = -1
    w[2] = 0
    w[3, ::2] = -1
    p3 = pack_ternary(w, "3trit")
    xq = torch.full((128, k), -128, dtype=torch.int8)
    xq[1] = 127
    two = mm_oracle(xq[:2], w)
    for m in (1, 3, 128):
        out = torch_bitnet.ternary_mm(xq[:m], p3, k, 5)
        assert out[0, 0].item() == -(2**24) and out[0, 1].item() == 2**24
        expected = torch.cat([two[:1], two[1:2], two[:1].expand(max(0, m - 2), 5)])[:m]
        assert torch.equal(out, expected), m


def test_ternary_mm_3trit_threads(isa5):
    """Row ranges of 1, 2 and 3 threads: a token's ranges are whole 32-row tiles but the last;
    several tokens' start and end inside tiles (a 64-row panel then spans three of them)."""
    g = torch.Generator().manual_seed(22)
    cases = [(1, 2560, 700), (1, 300, 1000), (3, 1000, 300), (20, 700, 150), (130, 700, 150)]
    before = torch.get_num_threads()
    try:
        for m, k, n in cases:
            w = random_ternary(n, k, g)
            p3 = pack_ternary(w, "3trit")
            xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            expected = mm_oracle(xq, w)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                assert torch.equal(torch_bitnet.ternary_mm(xq, p3, k, n), expected), (m, k, n, threads)
    finally:
        torch.set_num_threads(before)


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
# bitlinear, bitlinear_relu2_glu (bitlinear_shared: test_trit5's mixed-format test takes
# every format), opcheck, torch.compile
# --------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(lead=F_LEAD, k=K_ANY, n=N_ANY, dtype=st.sampled_from(FLOAT_DTYPES), bias=st.booleans(), seed=SEEDS)
def test_bitlinear_3trit_equals_2bit(isa5, lead, k, n, dtype, bias, seed):
    m = math.prod(lead)
    n = clip_n(n, m, k)
    g = torch.Generator().manual_seed(seed)
    w = random_ternary(n, k, g)
    p3, p2 = pack_ternary(w, "3trit"), pack_ternary(w)
    scale = torch.rand(1, generator=g) + 0.01
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    nw = (torch.rand(k, generator=g) + 0.5).to(dtype)
    x = make_x(lead, k, dtype, ["normal", "ties", "zero", "nan"], seed)
    out = torch_bitnet.bitlinear(x, p3, scale, b, k, n, nw, 1e-5)
    assert_bitwise_equal(out, torch_bitnet.bitlinear(x, p2, scale, b, k, n, nw, 1e-5))
    assert_bitwise_equal(out, reference.bitlinear(x, p3, scale, b, k, n, nw, 1e-5))


@settings(max_examples=25)
@given(lead=F_LEAD, k=K_ANY, n=N_ANY, fmts=st.sampled_from([("3trit", "3trit"), ("3trit", "5trit"), ("2bit", "3trit")]),
       dtype=st.sampled_from(FLOAT_DTYPES), seed=SEEDS)
def test_relu2_glu_3trit_equals_2bit(isa5, lead, k, n, fmts, dtype, seed):
    m = math.prod(lead)
    n = clip_n(n, 2 * m, k)
    g = torch.Generator().manual_seed(seed)
    wg, wu = random_ternary(n, k, g), random_ternary(n, k, g)
    gs, us = torch.rand(1, generator=g) + 0.01, torch.rand(1, generator=g) + 0.01
    x = make_x(lead, k, dtype, ["normal", "zero"], seed)
    out = torch_bitnet.bitlinear_relu2_glu(x, pack_ternary(wg, fmts[0]), gs, pack_ternary(wu, fmts[1]), us, k, n)
    expected = torch_bitnet.bitlinear_relu2_glu(x, pack_ternary(wg), gs, pack_ternary(wu), us, k, n)
    assert_bitwise_equal(out, expected)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _opcheck_cases():
    g = torch.Generator().manual_seed(4)

    def p3(n, k):
        return pack_ternary(random_ternary(n, k, g), "3trit")

    cases = []
    for lead, k, n in [((1,), 700, 5), ((3,), 300, 40), ((0, 2), 40, 3), ((2, 7), 321, 70)]:
        xq = torch.randint(-128, 128, (*lead, k), generator=g, dtype=torch.int8)
        cases.append((f"ternary_mm-{lead}-{k}-{n}", TMM, (xq, p3(n, k), k, n)))
    for lead in ((1,), (2, 3)):
        x = make_x(lead, 700, torch.bfloat16, ["normal"], 1)
        s = torch.tensor([0.3])
        cases.append((f"bitlinear-{lead}", BL, (x, p3(9, 700), s, None, 700, 9)))
        cases.append((f"glu-{lead}", GLU, (x, p3(6, 700), s, p3(6, 700), s, 700, 6)))
    return cases


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("op,args", [c[1:] for c in OPCHECK_CASES], ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_3trit(fresh_dynamo, op, args):
    torch.library.opcheck(op, args)


def test_compile_fullgraph_3trit(fresh_dynamo):
    k, h, n = 700, 96, 40
    g = torch.Generator().manual_seed(10)
    w1, w2 = random_ternary(h, k, g), random_ternary(n, h, g)
    p1, p2 = pack_ternary(w1, "3trit"), pack_ternary(w2, "3trit")
    s1, s2 = torch.tensor([0.05]), torch.tensor([0.02])

    def fn(x, a, b):
        y = torch_bitnet.bitlinear(x, a, s1, None, k, h)
        return torch_bitnet.bitlinear(torch.relu(y), b, s2, None, h, n)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)
    for m in (1, 1, 3):  # decode-shaped twice (one compilation), then a prefill shape
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        got = compiled(x, p1, p2)
        assert_bitwise_equal(got, fn(x, pack_ternary(w1), pack_ternary(w2)))
    assert counter.frame_count == 2


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


def test_greedy_tokens_equal_on_every_path_3trit(checkpoint):
    """Eager decoding: the table lookup on the AVX-512 paths, unpacking elsewhere; all give the
    2-bit model's tokens."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = generate(torch_bitnet.from_pretrained(checkpoint), tokenizer, "Once upon", 10, compile=False, eos=False)
    three = torch_bitnet.from_pretrained(checkpoint, ternary_format="3trit")
    for isa in torch_bitnet.available_isas():
        with torch_bitnet.use_isa(isa):
            got = generate(three, tokenizer, "Once upon", 10, compile=False, eos=False)
        assert got.token_ids == expected.token_ids, isa


@pytest.mark.slow
def test_compiled_generation_equals_2bit_3trit(checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = generate(torch_bitnet.from_pretrained(checkpoint), tokenizer, "Once upon", 12, eos=False)
    got = generate(torch_bitnet.from_pretrained(checkpoint, ternary_format="3trit"), tokenizer, "Once upon", 12,
                   eos=False)
    assert got.token_ids == expected.token_ids
