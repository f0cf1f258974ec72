"""The int8 KV cache ops (kv_cache_write, int8_attention) against the plain-PyTorch reference and
torch.nn.functional.scaled_dot_product_attention.

Tolerances: against the reference and against SDPA over the *dequantized* cache the math is
the same up to float32 summation order (dot products of head_dim terms, softmax sums over up
to L terms): atol 1e-5 on outputs of magnitude ~1. Against SDPA over the *original* float keys
and values, each key/value element carries an int8 rounding error of at most half a step,
max|x| / 254 of its vector: the output error stays below a few percent of max|v| (checked: 0.05).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import torch_bitnet
from torch_bitnet import reference


def _cache(b, kvh, length, d):
    return (
        torch.zeros(b, kvh, length, d, dtype=torch.int8),
        torch.zeros(b, kvh, length),
        torch.zeros(b, kvh, length, d, dtype=torch.int8),
        torch.zeros(b, kvh, length),
    )


def _sdpa(q, k, v, positions):
    """SDPA with GQA expansion and the causal-over-cache mask (query at p sees 0..p)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = torch.arange(k.shape[2]).view(1, -1) <= positions.view(-1, 1)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


@given(
    b=st.integers(1, 2),
    kvh=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([8, 24, 64, 128]),  # 8 and 24: head_dims the AVX-512 kernel hands to the portable one
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
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, reference.int8_attention(q, *ours, qpos, d**-0.5), **tol)
    kc, ks, vc, vs = ours
    kd = (kc.float() * ks.unsqueeze(-1))[:, :, :filled]
    vd = (vc.float() * vs.unsqueeze(-1))[:, :, :filled]
    torch.testing.assert_close(out.float(), _sdpa(q, kd, vd, qpos), **tol)
    err = (out.float() - _sdpa(q, k, v, qpos)).abs().max().item()
    assert err <= 0.05 * v.float().abs().max().item()


def test_decode_over_a_4096_cache_with_2b4t_geometry(isa):
    # 20 query heads over 5 kv heads, head_dim 128, as bitnet-b1.58-2B-4T; one query at 4095.
    torch.manual_seed(0)
    cache = _cache(1, 5, 4096, 128)
    k, v = torch.randn(1, 5, 4096, 128), torch.randn(1, 5, 4096, 128)
    torch_bitnet.ops.kv_cache_write(*cache, k, v, torch.arange(4096))
    q = torch.randn(1, 20, 1, 128)
    pos = torch.tensor([4095])
    out = torch_bitnet.ops.int8_attention(q, *cache, pos, 128**-0.5)
    kc, ks, vc, vs = cache
    expected = _sdpa(q, kc.float() * ks.unsqueeze(-1), vc.float() * vs.unsqueeze(-1), pos)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_softmax_is_stable_for_huge_scores(isa):
    cache = _cache(1, 1, 8, 16)
    k = torch.full((1, 1, 8, 16), 1e4)
    torch_bitnet.ops.kv_cache_write(*cache, k, torch.randn(1, 1, 8, 16), torch.arange(8))
    out = torch_bitnet.ops.int8_attention(torch.full((1, 1, 1, 16), 1e4), *cache, torch.tensor([7]), 1.0)
    assert bool(torch.isfinite(out).all())


def test_opcheck_and_compile():
    cache = _cache(2, 2, 32, 64)
    k, v = torch.randn(2, 2, 5, 64), torch.randn(2, 2, 5, 64)
    torch.library.opcheck(torch.ops.bitnet.kv_cache_write.default, (*cache, k, v, torch.arange(3, 8)))
    q = torch.randn(2, 4, 5, 64)
    torch.library.opcheck(torch.ops.bitnet.int8_attention.default, (q, *cache, torch.arange(3, 8), 0.125))

    def step(q, k, v, pos, kc, ks, vc, vs):
        torch_bitnet.ops.kv_cache_write(kc, ks, vc, vs, k, v, pos)
        return torch_bitnet.ops.int8_attention(q, kc, ks, vc, vs, pos, 0.125)

    eager_cache, compiled_cache = _cache(2, 2, 32, 64), _cache(2, 2, 32, 64)
    expected = step(q, k, v, torch.arange(5), *eager_cache)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(q, k, v, torch.arange(5), *compiled_cache)
    assert torch.equal(got, expected)
    for a, e in zip(compiled_cache, eager_cache):  # the mutation happened inside the graph
        assert torch.equal(a, e)


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
    ],
)
def test_attention_errors(change, error, match):
    k_cache, k_scale, v_cache, v_scale = _cache(1, 2, 8, 16)
    args = dict(q=torch.randn(1, 4, 1, 16), k_cache=k_cache, k_scale=k_scale, v_cache=v_cache,
                v_scale=v_scale, positions=torch.tensor([3]))
    args.update(change)
    with pytest.raises(error, match=match):
        torch_bitnet.ops.int8_attention(**args, scale=0.25)


def test_cache_write_errors():
    cache = _cache(1, 2, 8, 16)
    with pytest.raises(ValueError, match="position 9 is outside the cache"):
        torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.tensor([9]))
    with pytest.raises(ValueError, match="do not fit|new keys/values have shape"):
        torch_bitnet.ops.kv_cache_write(*cache, torch.randn(1, 3, 1, 16), torch.randn(1, 3, 1, 16), torch.tensor([0]))
