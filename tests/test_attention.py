"""The int8 KV cache ops (kv_cache_write, int8_attention) against the plain-PyTorch reference and
torch.nn.functional.scaled_dot_product_attention, on every kernel path (the ``isa`` fixture).

Tolerances. Against the reference and against SDPA over the *dequantized* cache the math is
the same up to float32 rounding: the kernels sum dot products in a different order (SIMD
lanes, 2 keys at a time), use their own e^x (Cephes' polynomial, within 2 ulp) and combine
the softmax over blocks of 64 positions and over position ranges done by different threads
(flash-decoding), each rescaled by e^(m_part - m). Each score s then carries an error of a
few eps * |s| in both computations, and an error in the scores moves the output by at most
about that much times max|v|: ``_atol`` allows 4 eps (1 + max|s|) max|v|. Over 150 random
shapes (head_dim 16..128, up to 4096 positions, masks) the largest difference measured on
every path was 0.8 eps (1 + max|s|) max|v| (3.5e-6 to 1.8e-5 absolute), so the bound holds
with a margin of 5 while a missing or extra position (a weight of at least ~1 / L) is far
outside it. Against SDPA over the *original* float keys and values, each key/value element
carries an int8 rounding error of at most half a step, max|x| / 254 of its vector: the
output error stays below a few percent of max|v| (checked: 0.05).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import torch_bitnet
from torch_bitnet import reference


def _cache(b, kvh, length, d):
    return (
        torch.zeros(b, kvh, length, d, dtype=torch.int8),
        torch.zeros(b, kvh, length),
        torch.zeros(b, kvh, length, d, dtype=torch.int8),
        torch.zeros(b, kvh, length),
    )


def _dequantized(cache):
    """Float keys and values (B, KVH, L, D) of an int8 cache."""
    kc, ks, vc, vs = cache
    return kc.float() * ks.unsqueeze(-1), vc.float() * vs.unsqueeze(-1)


def _atol(q, cache, scale):
    """4 eps (1 + max|score|) max|v| (see the module docstring)."""
    k, v = _dequantized(cache)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    smax = ((q.float() @ k.transpose(-1, -2)).abs().max() * scale).item()
    return 4 * torch.finfo(torch.float32).eps * (1 + smax) * v.abs().max().item()


def _int16_isas():
    """The kernel paths with int16 attention products that this CPU runs (skips the test if none)."""
    names = [name for name in ("avx2", "avx512", "amx") if name in torch_bitnet.available_isas()]
    if not names:
        pytest.skip("no AVX2 or AVX-512 on this CPU")
    return names


def _attend(isa, *args):
    """int8_attention(*args) on the given kernel path."""
    with torch_bitnet.use_isa(isa):
        return torch_bitnet.ops.int8_attention(*args)


def _sdpa(q, k, v, positions, mask=None):
    """SDPA with GQA expansion and the causal-over-cache mask (query at p sees 0..p), and'ed
    with the optional bool mask (B, Q, Lm), Lm <= L (positions past Lm hidden)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    visible = torch.arange(k.shape[2]).view(1, -1) <= positions.view(-1, 1)  # (Q, L)
    if mask is not None:
        visible = visible & F.pad(mask, (0, k.shape[2] - mask.shape[-1])).unsqueeze(1)  # (B, 1, Q, L)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible)


@given(
    b=st.integers(1, 2),
    kvh=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([8, 24, 64, 128]),  # 8, 24: not multiples of 16 (AVX-512 hands them to the portable kernel)
    length=st.integers(1, 300),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_write_then_attend_matches_reference_and_sdpa(isa, b, kvh, groups, d, length, data, dtype):
    g = torch.Generator().manual_seed(length * 7 + d)
    filled = data.draw(st.integers(1, length), label="filled")  # positions 0..filled-1 hold tokens
    qlen = data.draw(st.integers(1, filled), label="qlen")  # the last qlen of them are queries
    k = (torch.randn(b, kvh, filled, d, generator=g) * 3).to(dtype)
    v = torch.randn(b, kvh, filled, d, generator=g).to(dtype)
    q = torch.randn(b, kvh * groups, qlen, d, generator=g).to(dtype)
    positions = torch.arange(filled)
    ours, theirs = _cache(b, kvh, length, d), _cache(b, kvh, length, d)
    torch_bitnet.ops.kv_cache_write(*ours, k, v, positions)
    reference.kv_cache_write(*theirs, k, v, positions)
    for a, e in zip(ours, theirs):  # quantization is exact: same float32 operations
        assert torch.equal(a, e)
    qpos = positions[filled - qlen :]
    out = torch_bitnet.ops.int8_attention(q, *ours, qpos, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    # bfloat16 outputs: the same float32 result, rounded once to 8 significant bits.
    tol = dict(atol=_atol(q, ours, d**-0.5), rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, reference.int8_attention(q, *ours, qpos, d**-0.5), **tol)
    kd, vd = (x[:, :, :filled] for x in _dequantized(ours))
    torch.testing.assert_close(out.float(), _sdpa(q, kd, vd, qpos), **tol)
    err = (out.float() - _sdpa(q, k, v, qpos)).abs().max().item()
    assert err <= 0.05 * v.float().abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [40, 128])  # 40: a partial last vector of 16 on the AVX-512 path
def test_cache_write_edge_values_agree_across_paths(isa, dtype, d):
    """Keys / values at the edges of the quantizer, written on this path and on the portable one:
    the same bits. Rows: all zero (scale 0), exact halves of a step (round half to even), a
    subnormal-sized row, one Inf (scale Inf, the row's finite values -> 0, the Inf itself NaN ->
    0), one NaN (left out of the maximum), values at the dtype's largest finite size. The rows
    without NaN also equal the reference."""
    rows = torch.zeros(7, d)
    rows[1] = torch.arange(d) % 5 - 2.0
    rows[1, 0] = 4.0  # max 4: s = 4 / 127, x / s = 127 x / 4 hits .25/.5/.75 fractions
    rows[2] = torch.linspace(-1, 1, d) * 1e-38
    rows[3] = torch.randn(d, generator=torch.Generator().manual_seed(0))
    rows[3, 3] = float("inf")
    rows[4] = torch.randn(d, generator=torch.Generator().manual_seed(1))
    rows[4, 7] = float("nan")
    rows[5] = torch.linspace(-1, 1, d) * torch.finfo(dtype).max
    rows[6] = torch.randn(d, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.5
    k = rows.to(dtype).view(1, 1, 7, d)
    v = -k
    positions = torch.arange(7)
    ours = _cache(1, 1, 7, d)
    torch_bitnet.ops.kv_cache_write(*ours, k, v, positions)
    portable = _cache(1, 1, 7, d)
    with torch_bitnet.use_isa("scalar"):
        torch_bitnet.ops.kv_cache_write(*portable, k, v, positions)
    for a, e in zip(ours, portable):
        assert torch.equal(a.view(torch.int8) if a.dtype == torch.int8 else a.view(torch.int32),
                           e.view(torch.int8) if e.dtype == torch.int8 else e.view(torch.int32))
    theirs = _cache(1, 1, 7, d)
    reference.kv_cache_write(*theirs, k, v, positions)
    finite = [0, 1, 2, 3, 5, 6]  # row 4's NaN: the reference's maximum is NaN, the kernels skip it
    for a, e in zip(ours, theirs):
        assert torch.equal(a[:, :, finite], e[:, :, finite])
    assert ours[1][0, 0, 0] == 0 and (ours[0][0, 0, 0] == 0).all()
    assert torch.isinf(ours[1][0, 0, 3]) and (ours[0][0, 0, 3] == 0).all()
    assert torch.isfinite(ours[1][0, 0, 4]) and ours[0][0, 0, 4, 7] == 0


@given(
    b=st.integers(1, 2),
    kvh=st.integers(1, 3),
    groups=st.sampled_from([1, 3, 4, 5, 8]),  # 3, 5: a last group of fewer than 4 rows
    # 40, 72: not multiples of 16, the AVX-512 path's portable fallback; 36: AVX2's too.
    d=st.sampled_from([16, 36, 40, 64, 72, 128]),
    length=st.one_of(st.integers(1, 200), st.integers(200, 4096)),
    data=st.data(),
    masked=st.sampled_from([None, "3d", "4d"]),
)
def test_attention_matches_reference_and_sdpa(isa, b, kvh, groups, d, length, data, masked):
    """Decode and short prefill chunks at any positions, up to 4096 cached positions (long
    ranges are split over threads and merged), with and without masks."""
    g = torch.Generator().manual_seed(length * 11 + d + b)
    qlen = data.draw(st.integers(1, min(length, 8)), label="qlen")
    positions = torch.tensor(data.draw(st.lists(st.integers(0, length - 1), min_size=qlen, max_size=qlen)))
    cache = _cache(b, kvh, length, d)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(b, kvh, length, d, generator=g) * 2,
                                    torch.randn(b, kvh, length, d, generator=g), torch.arange(length))
    q = torch.randn(b, kvh * groups, qlen, d, generator=g)
    mask = given_mask = None
    if masked:
        lm = data.draw(st.integers(int(positions.max()) + 1, length), label="Lm")
        density = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), label="density")  # 0: every row sees nothing
        mask = torch.rand(b, qlen, lm, generator=g) < density
        # (B, 1, Q, Lm), transformers' layout, given as a non-contiguous view.
        given_mask = mask.unsqueeze(1).transpose(2, 3).contiguous().transpose(2, 3) if masked == "4d" else mask
    out = torch_bitnet.ops.int8_attention(q, *cache, positions, d**-0.5, given_mask)
    atol = _atol(q, cache, d**-0.5)
    expected = reference.int8_attention(q, *cache, positions, d**-0.5, given_mask)
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    torch.testing.assert_close(out, _sdpa(q, *_dequantized(cache), positions, mask), atol=atol, rtol=0)
    if mask is not None:
        causal = torch.arange(mask.shape[-1]).view(1, -1) <= positions.view(-1, 1)
        blind = ~(mask & causal).any(-1)  # (B, Q): rows that see no position
        assert bool((out.permute(0, 2, 1, 3)[blind] == 0).all())


@given(
    d=st.sampled_from([32, 64, 128]),
    length=st.integers(1, 300),
    qlen=st.integers(1, 3),
    groups=st.sampled_from([1, 3, 4, 5]),  # query heads per kv head: groups of 1-4 rows
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int16_products_of_16bit_queries(d, length, qlen, groups, dtype, masked, seed):
    """On the AVX2 and AVX-512 paths 16-bit queries use int16 products (queries and each block's
    softmax weights scaled to int16 per row, attention_avx512.cpp); the portable path keeps float. The
    query rounding (half a step of max|q| / 32767) moves a score by at most 2^-16 max|q| sum|k|
    k_scale scale, 1/256 of what the int8 rounding of the keys already moves it by; the weight
    rounding moves the output by at most 2^-16 of the block's largest weighted value. Allowed:
    one unit in the last place of the 16-bit output (2^-7 of the value for bf16, 2^-10 for
    fp16, where the float results fall on either side of a rounding boundary) plus 2^-9 max|v|.
    Measured over 400 random shapes and scales (queries x1-10, keys x0.5-8, up to 600
    positions): at most 2^-10.1 max|v| beyond the ulp on AVX-512, 2^-9.7 over 300 on AVX2. Up
    to 15 rows per kv head here: from 5 the amx path takes the products on AMX tiles
    (test_amx_attention_over_many_rows)."""
    int16_isas = _int16_isas()
    g = torch.Generator().manual_seed(seed)
    qlen = min(qlen, length)
    cache = _cache(1, 2, length, d)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 2, length, d, generator=g) * 2,
                                    torch.randn(1, 2, length, d, generator=g), torch.arange(length))
    q = (torch.randn(1, 2 * groups, qlen, d, generator=g) * 3).to(dtype)
    positions = torch.arange(length - qlen, length)
    mask = (torch.rand(1, qlen, length, generator=g) > 0.3) if masked else None
    with torch_bitnet.use_isa("scalar"):
        float_path = torch_bitnet.ops.int8_attention(q, *cache, positions, d**-0.5, mask)
    vmax = _dequantized(cache)[1].abs().max().item()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for name in int16_isas:
        with torch_bitnet.use_isa(name):
            ours = torch_bitnet.ops.int8_attention(q, *cache, positions, d**-0.5, mask)
        torch.testing.assert_close(ours.float(), float_path.float(), rtol=ulp, atol=2.0**-9 * vmax, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_non_finite_16bit_queries_take_the_float_path(dtype):
    """A query row holding a NaN or an infinity cannot be scaled to int16: the rows of its task
    (one kv head here, 4 heads x 8 queries: also an AMX task on the amx path) take the float
    products, bit for bit what float32 queries of the same values give rounded to the dtype,
    and handle the non-finite values as the portable path does; the other kv head's rows keep
    int16 products."""
    int16_isas = _int16_isas()
    g = torch.Generator().manual_seed(3)
    cache = _cache(1, 2, 40, 64)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 2, 40, 64, generator=g), torch.randn(1, 2, 40, 64, generator=g),
                                    torch.arange(40))
    q = torch.randn(1, 8, 8, 64, generator=g).to(dtype)
    # both in kv head 0's task (heads 0-3), rows 27 and 23: on amx its first 16 rows have run on
    # the tiles when they are found
    q[0, 3, 3, 5] = float("nan")
    q[0, 2, 7, 0] = float("inf")
    positions = torch.arange(32, 40)
    with torch_bitnet.use_isa("scalar"):
        portable = torch_bitnet.ops.int8_attention(q, *cache, positions, 0.125)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    vmax = _dequantized(cache)[1].abs().max().item()
    for name in int16_isas:
        with torch_bitnet.use_isa(name):
            ours = torch_bitnet.ops.int8_attention(q, *cache, positions, 0.125)
            float_products = torch_bitnet.ops.int8_attention(q.float(), *cache, positions, 0.125).to(dtype)
        torch.testing.assert_close(ours[:, :4], float_products[:, :4], rtol=0, atol=0, equal_nan=True, msg=name)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(portable)), name
        torch.testing.assert_close(ours[:, 4:].float(), portable[:, 4:].float(), rtol=ulp, atol=2.0**-9 * vmax,
                                   msg=name)


@given(
    b=st.integers(1, 2),
    d=st.sampled_from([64, 128, 192, 256]),
    groups=st.sampled_from([1, 2, 4, 5]),
    qlen=st.integers(2, 70),
    before=st.integers(0, 200),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_amx_attention_over_many_rows(b, d, groups, qlen, before, dtype, masked, seed):
    """Prefill chunks on the amx path: tasks of 5 rows or more take the int16 products on AMX tiles
    (attention_amx.cpp), 16 rows per tile (here also partial tiles, tiles spanning two query
    heads, several tasks per kv head, a batch of 2 with its own masks), 64 positions per block
    (partly visible blocks, a last block past the cache's end, rows that see nothing).

    Against the AVX-512 kernel: the same int32 products; the float steps differ in order (scores
    converted once instead of as 8 partial sums, e^x of the rescaling by the polynomial instead
    of libm), which can move a weight's int16 rounding by one step, 2^-16 of the block's largest
    weight. Allowed: one unit in the last place of the 16-bit output plus 2^-13 max|v| (8 such
    steps in one direction); measured over 300 random shapes and scales (queries x1-10, keys
    x0.5-8): 2^-17.2 max|v| beyond the ulp. Against the float path: the bound of
    test_int16_products_of_16bit_queries (measured at this test's scales: 2^-12.2 max|v| beyond
    the ulp)."""
    if "amx" not in torch_bitnet.available_isas():
        pytest.skip("this CPU cannot run the amx path")
    g = torch.Generator().manual_seed(seed)
    length = before + qlen
    cache = _cache(b, 2, length, d)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(b, 2, length, d, generator=g) * 2,
                                    torch.randn(b, 2, length, d, generator=g), torch.arange(length))
    q = (torch.randn(b, 2 * groups, qlen, d, generator=g) * 3).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(b, qlen, length, generator=g) > 0.3
        mask[:, 0] = False  # the first query sees nothing
    args = (q, *cache, torch.arange(before, length), d**-0.5, mask)
    amx, avx512, float_path = (_attend(name, *args).float() for name in ("amx", "avx512", "scalar"))
    vmax = _dequantized(cache)[1].abs().max().item()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(amx, avx512, rtol=ulp, atol=2.0**-13 * vmax)
    torch.testing.assert_close(amx, float_path, rtol=ulp, atol=2.0**-9 * vmax)
    if masked:
        assert bool((amx[:, :, 0] == 0).all())


def test_amx_attention_per_call_and_thread_count():
    """A thread keeps a kv head's transposed values from one task of a call to the next: the
    result is the same, bit for bit, however the tasks fall on 1, 2 or 3 threads, and a later
    call over the same cache tensors, rewritten in between, sees the new values."""
    if "amx" not in torch_bitnet.available_isas():
        pytest.skip("this CPU cannot run the amx path")
    g = torch.Generator().manual_seed(5)
    cache = _cache(1, 2, 300, 128)
    q = torch.randn(1, 8, 100, 128, generator=g).to(torch.bfloat16)
    args = (q, *cache, torch.arange(200, 300), 128**-0.5)
    before = torch.get_num_threads()
    outs = []
    try:
        for _ in range(2):
            torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 2, 300, 128, generator=g),
                                            torch.randn(1, 2, 300, 128, generator=g), torch.arange(300))
            by_threads = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                by_threads.append(_attend("amx", *args))
            assert all(torch.equal(by_threads[0], out) for out in by_threads[1:])
            vmax = _dequantized(cache)[1].abs().max().item()
            torch.testing.assert_close(by_threads[0].float(), _attend("avx512", *args).float(), rtol=2.0**-7,
                                       atol=2.0**-13 * vmax)
            outs.append(by_threads[0])
    finally:
        torch.set_num_threads(before)
    assert not torch.allclose(outs[0].float(), outs[1].float(), atol=0.1)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_attention_over_position_ranges(threads):
    """A short chunk over a long cache: few tasks, so with 2 or more threads each kv head's
    positions are split into ranges (flash-decoding) that start past position 0, each an AMX
    task of 12 rows (4 heads x 3 queries) whose last block ends inside the cache, then merged."""
    if "amx" not in torch_bitnet.available_isas():
        pytest.skip("this CPU cannot run the amx path")
    g = torch.Generator().manual_seed(11)
    cache = _cache(1, 2, 2000, 128)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 2, 2000, 128, generator=g) * 2,
                                    torch.randn(1, 2, 2000, 128, generator=g), torch.arange(2000))
    q = (torch.randn(1, 8, 3, 128, generator=g) * 3).to(torch.bfloat16)
    args = (q, *cache, torch.tensor([1900, 1950, 1999]), 128**-0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        amx, avx512 = _attend("amx", *args).float(), _attend("avx512", *args).float()
    finally:
        torch.set_num_threads(before)
    vmax = _dequantized(cache)[1].abs().max().item()
    torch.testing.assert_close(amx, avx512, rtol=2.0**-7, atol=2.0**-13 * vmax)


def test_decode_over_a_4096_cache_with_2b4t_geometry(isa):
    # 20 query heads over 5 kv heads, head_dim 128, as bitnet-b1.58-2B-4T; one query at 4095.
    torch.manual_seed(0)
    cache = _cache(1, 5, 4096, 128)
    k, v = torch.randn(1, 5, 4096, 128), torch.randn(1, 5, 4096, 128)
    torch_bitnet.ops.kv_cache_write(*cache, k, v, torch.arange(4096))
    q = torch.randn(1, 20, 1, 128)
    pos = torch.tensor([4095])
    out = torch_bitnet.ops.int8_attention(q, *cache, pos, 128**-0.5)
    torch.testing.assert_close(out, _sdpa(q, *_dequantized(cache), pos), atol=_atol(q, cache, 128**-0.5), rtol=0)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_position_split_over_threads_merges_exactly(isa, threads):
    """Decode of one kv head: the positions are split into as many ranges as the threads need
    (none with 1 thread); the ranges left of 3000 see nothing (masked), so their partial states
    are empty and the merge must ignore them."""
    cache = _cache(1, 1, 4096, 128)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 1, 4096, 128) * 2, torch.randn(1, 1, 4096, 128),
                                    torch.arange(4096))
    q, pos = torch.randn(1, 4, 1, 128), torch.tensor([4000])
    mask = torch.zeros(1, 1, 4096, dtype=torch.bool)
    mask[..., 3000:] = True
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch_bitnet.ops.int8_attention(q, *cache, pos, 128**-0.5, mask)
    finally:
        torch.set_num_threads(before)
    expected = reference.int8_attention(q, *cache, pos, 128**-0.5, mask)
    torch.testing.assert_close(out, expected, atol=_atol(q, cache, 128**-0.5), rtol=0)


def test_softmax_is_stable_for_huge_scores(isa):
    cache = _cache(1, 1, 8, 16)
    k = torch.full((1, 1, 8, 16), 1e4)
    torch_bitnet.ops.kv_cache_write(*cache, k, torch.randn(1, 1, 8, 16), torch.arange(8))
    out = torch_bitnet.ops.int8_attention(torch.full((1, 1, 1, 16), 1e4), *cache, torch.tensor([7]), 1.0)
    assert bool(torch.isfinite(out).all())


def test_fully_masked_rows_give_zeros(isa):
    # Batch 0 query 1 and all of batch 1 see nothing; the other rows must be unaffected.
    cache = _cache(2, 1, 16, 64)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(2, 1, 16, 64), torch.randn(2, 1, 16, 64), torch.arange(16))
    q = torch.randn(2, 2, 3, 64)
    positions = torch.tensor([5, 9, 15])
    mask = torch.ones(2, 3, 16, dtype=torch.bool)
    mask[0, 1, :10] = False  # only positions > 9 allowed, the causal limit is 9
    mask[1] = False
    out = torch_bitnet.ops.int8_attention(q, *cache, positions, 0.125, mask)
    assert bool((out[0, :, 1] == 0).all()) and bool((out[1] == 0).all())
    unmasked = torch_bitnet.ops.int8_attention(q, *cache, positions, 0.125)
    torch.testing.assert_close(out[0, :, [0, 2]], unmasked[0, :, [0, 2]], atol=0, rtol=0)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_keys_do_not_leak_their_scale(isa, dtype):
    """A key the mask hides from some rows may still be multiplied (the AVX2 int16 path scores keys
    in pairs) and then discarded: a NaN or infinite key scale there changes nothing, bit for bit."""
    g = torch.Generator().manual_seed(3)
    cache = _cache(1, 2, 67, 128)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 2, 67, 128, generator=g),
                                    torch.randn(1, 2, 67, 128, generator=g), torch.arange(67))
    q = torch.randn(1, 8, 3, 128, generator=g).to(dtype)
    positions = torch.tensor([40, 60, 66])
    mask = torch.rand(1, 3, 67, generator=g) > 0.4
    mask[0, :, [5, 17, 66]] = False  # hidden from every row; 6, 18 (their pair partners) from some
    mask[0, 0, [6, 18]] = False
    mask[0, 1:, [6, 18]] = True
    clean = torch_bitnet.ops.int8_attention(q, *cache, positions, 0.1, mask)
    for bad in (float("nan"), float("inf")):
        k_scale = cache[1].clone()
        k_scale[:, :, [5, 17, 66]] = bad
        k_scale[:, :, [6, 18]] = torch.where(torch.tensor(bad != bad), bad, -bad)
        cache_bad = (cache[0], k_scale, cache[2], cache[3])
        rows_seeing = torch_bitnet.ops.int8_attention(q, *cache_bad, positions, 0.1, mask)
        # queries 1, 2 see keys 6 and 18, whose scale is now bad: only query 0 must be unchanged
        assert torch.equal(rows_seeing[:, :, 0], clean[:, :, 0])
        k_scale[:, :, [6, 18]] = cache[1][:, :, [6, 18]]
        out = torch_bitnet.ops.int8_attention(q, *cache_bad, positions, 0.1, mask)
        assert torch.equal(out, clean)


def test_all_true_mask_equals_no_mask(isa):
    cache = _cache(1, 2, 64, 128)
    torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 2, 64, 128), torch.randn(1, 2, 64, 128), torch.arange(64))
    q, positions = torch.randn(1, 8, 4, 128), torch.tensor([10, 20, 40, 63])
    out = torch_bitnet.ops.int8_attention(q, *cache, positions, 0.1, torch.ones(1, 4, 64, dtype=torch.bool))
    assert torch.equal(out, torch_bitnet.ops.int8_attention(q, *cache, positions, 0.1))


def test_opcheck_and_compile():
    cache = _cache(2, 2, 32, 64)
    k, v = torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64)
    torch.library.opcheck(torch.ops.bitnet.kv_cache_write.default, (*cache, k, v, torch.arange(3, 8)))
    q = torch.randn(2, 4, 5, 64)
    torch.library.opcheck(torch.ops.bitnet.int8_attention.default, (q, *cache, torch.arange(3, 8), 0.125))
    mask = torch.rand(2, 1, 5, 20) < 0.7  # (batch, 1, Q, Lm), transformers' layout
    torch.library.opcheck(torch.ops.bitnet.int8_attention.default, (q, *cache, torch.arange(3, 8), 0.125, mask))
    torch.library.opcheck(torch.ops.bitnet.int8_attention.default, (q, *cache, torch.arange(3, 8), 0.125, mask[:, 0]))

    def step(q, k, v, pos, mask, kc, ks, vc, vs):
        torch_bitnet.ops.kv_cache_write(kc, ks, vc, vs, k, v, pos)
        return torch_bitnet.ops.int8_attention(q, kc, ks, vc, vs, pos, 0.125, mask)

    eager_cache, compiled_cache = _cache(2, 2, 32, 64), _cache(2, 2, 32, 64)
    expected = step(q, k, v, torch.arange(5), mask, *eager_cache)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q, k, v, torch.arange(5), mask, *compiled_cache)
    assert torch.equal(got, expected)
    for a, e in zip(compiled_cache, eager_cache):  # the mutation happened inside the graph
        assert torch.equal(a, e)


_MASK_ERRORS = [
    (dict(mask=torch.ones(1, 1, 8)), TypeError, "mask must be bool"),
    (dict(mask=torch.ones(1, 8, dtype=torch.bool)), ValueError, r"mask must be \(batch, Q, Lm\)"),
    (dict(mask=torch.ones(1, 2, 1, 8, dtype=torch.bool)), ValueError, r"mask must be \(batch, Q, Lm\)"),
    (dict(mask=torch.ones(2, 1, 8, dtype=torch.bool)), ValueError, "expected batch 1 and Q 1"),
    (dict(mask=torch.ones(1, 3, 8, dtype=torch.bool)), ValueError, "expected batch 1 and Q 1"),
    (dict(mask=torch.ones(1, 1, 9, dtype=torch.bool)), ValueError, "at most the cache length 8"),
]


def _attention_args(change):
    k_cache, k_scale, v_cache, v_scale = _cache(1, 2, 8, 16)
    args = dict(q=torch.randn(1, 4, 1, 16), k_cache=k_cache, k_scale=k_scale, v_cache=v_cache,
                v_scale=v_scale, positions=torch.tensor([3]))
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=torch.randn(1, 3, 1, 16)), ValueError, "not a multiple of 2 kv heads"),
        (dict(q=torch.randn(1, 4, 1, 8)), ValueError, "head_dim 8"),
        (dict(q=torch.randn(1, 4, 1, 16, dtype=torch.float64)), TypeError, "float32, bfloat16 or float16"),
        (dict(positions=torch.tensor([8])), ValueError, r"position 8 is outside the cache \(0 .. 7\)"),
        (dict(positions=torch.tensor([-1])), ValueError, "position -1 is outside the cache"),
        (dict(positions=torch.tensor([1.0])), TypeError, "positions must be int64"),
        (dict(k_cache=torch.zeros(1, 2, 8, 16)), TypeError, "key cache must be int8"),
        (dict(k_scale=torch.zeros(1, 2, 7)), ValueError, "key cache scales have shape"),
        *_MASK_ERRORS,
        # Needs the positions' values: only the real op can check it, not the fake kernel.
        (dict(mask=torch.ones(1, 1, 3, dtype=torch.bool)), ValueError, r"at least max\(positions\) \+ 1 = 4"),
    ],
)
def test_attention_errors(change, error, match):
    with pytest.raises(error, match=match):
        torch_bitnet.ops.int8_attention(**_attention_args(change), scale=0.25)


@pytest.mark.parametrize("change, error, match", _MASK_ERRORS)
def test_mask_errors_at_trace_time(change, error, match):
    # The fake kernel (what torch.compile traces) raises the real op's error and message.
    mode = FakeTensorMode()
    args = {name: mode.from_tensor(t) for name, t in _attention_args(change).items()}
    with mode, pytest.raises(error, match=match):
        torch_bitnet.ops.int8_attention(**args, scale=0.25)


def test_cache_write_errors():
    cache = _cache(1, 2, 8, 16)
    with pytest.raises(ValueError, match="position 9 is outside the cache"):
        torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.tensor([9]))
    with pytest.raises(ValueError, match="do not fit|new keys/values have shape"):
        torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16), torch.tensor([0]))
