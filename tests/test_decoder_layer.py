"""bitnet::decoder_layer: a whole BitNet decoder layer over an int8 KV cache in one op.

Contract (docstring of torch_bitnet.ops.decoder_layer): the op computes exactly what the fused
layer forward computes with the separate ops (bitlinear_shared, the rotary embedding in the
activation dtype, kv_cache_write, int8_attention, bitlinear, bitlinear_relu2_glu and the
residual adds): outputs and caches bit for bit, on every kernel path, both weight formats,
every activation dtype, any batch and Q, with and without a mask.

Against torch_bitnet.reference.decoder_layer (plain PyTorch): the caches are identical (the
keys and values before quantization come from exact integer products and the same roundings);
the output differs only through the attention, whose kernel and reference differ by float32
rounding (tests/test_attention.py bounds it). In float32 that moves the o_proj input's RMSNorm
and quantization scale by an ulp or so, and every output with them (measured: within 3.2e-7 of
max|output|, 77% identical); in bf16 / fp16 the attention output's rounding to the dtype
absorbs it (measured: all identical). The difference can also move an activation to its
neighbouring int8 step, when it lies within that rounding of a half step, and one such step
moves an output by at most scale * max|activation| / 127. So: at least 99% of the outputs
within 2^-20 of max|output| (a few float32 ulps), and all within 2% of it (int8 steps).

At the model level, tests/test_fuse.py compares the layers using this op (int8 caches:
generate, eager and compiled, and transformers' generate) with transformers' own
BitNetDecoderLayer forward, token for token.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torch_bitnet
from torch_bitnet import fuse, reference
from torch_bitnet.packing import pack_ternary, padded_in_features

from _error_cases import error_tests

LAYER = torch.ops.bitnet.decoder_layer.default
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_layer(
    *, batch=1, q=1, hidden=96, heads=4, kv_heads=2, head_dim=16, inter=160, length=24, filled=5,
    dtype=torch.float32, fmt="2bit", seed=0, masked=False,
):
    """Random decode/prefill inputs: (args for the op without the caches, the caches)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(hidden, heads * head_dim), (hidden, kv_heads * head_dim), (hidden, kv_heads * head_dim),
             (heads * head_dim, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    packed = [pack_ternary(torch.randint(-1, 2, (n, k), generator=g), fmt) for k, n in sizes]
    scales = [torch.rand((), generator=g) + 0.05 for _ in sizes]
    norms = [(torch.rand(k, generator=g) + 0.5).to(dtype) for k in (hidden, heads * head_dim, hidden, inter)]
    eps = [1e-5, 1e-6, 1e-5, 0.0]
    x = (torch.randn(batch, q, hidden, generator=g) * 2).to(dtype)
    angle = torch.rand(batch, q, head_dim, generator=g) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    k_cache = torch.zeros(batch, kv_heads, length, head_dim, dtype=torch.int8)
    v_cache = torch.zeros_like(k_cache)
    for cache in (k_cache, v_cache):
        cache[:, :, :filled] = torch.randint(-127, 128, cache[:, :, :filled].shape, generator=g, dtype=torch.int8)
    k_scale = torch.zeros(batch, kv_heads, length)
    v_scale = torch.zeros_like(k_scale)
    k_scale[:, :, :filled] = torch.rand(batch, kv_heads, filled, generator=g) * 0.05
    v_scale[:, :, :filled] = torch.rand(batch, kv_heads, filled, generator=g) * 0.05
    positions = torch.arange(filled, filled + q)
    mask = None
    if masked:
        mask = torch.rand(batch, 1, q, filled + q, generator=g) < 0.8
        mask[..., filled:] = True  # each query sees itself
    args = (x, packed, scales, norms, eps, cos, sin)
    tail = (positions, head_dim**-0.5, heads, inter, mask)
    return args, (k_cache, k_scale, v_cache, v_scale), tail


def separate_ops(args, caches, tail):
    """The fused layer forward's sequence of separate ops (torch_bitnet.fuse)."""
    x, packed, scales, norms, eps, cos, sin = args
    positions, scaling, heads, inter, mask = tail
    b, q_len, hidden = x.shape
    kv_heads, head_dim = caches[0].shape[1], caches[0].shape[3]
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, v = torch_bitnet.ops.bitlinear_shared(x, packed[:3], scales[:3], hidden, sizes, norms[0], eps[0])
    q, k, v = (t.view(b, q_len, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    q, k = reference.rope(q, cos, sin), reference.rope(k, cos, sin)
    torch_bitnet.ops.kv_cache_write(*caches, k, v, positions)
    out = torch_bitnet.ops.int8_attention(q, *caches, positions, scaling, mask)
    out = out.transpose(1, 2).reshape(b, q_len, sizes[0])
    h = x + torch_bitnet.ops.bitlinear(out, packed[3], scales[3], None, sizes[0], hidden, norms[1], eps[1])
    gated = torch_bitnet.ops.bitlinear_relu2_glu(
        h, packed[4], scales[4], packed[5], scales[5], hidden, inter, norms[2], eps[2]
    )
    return h + torch_bitnet.ops.bitlinear(gated, packed[6], scales[6], None, inter, hidden, norms[3], eps[3])


def clones(caches):
    return tuple(c.clone() for c in caches)


SHAPES = st.sampled_from([
    dict(hidden=96, heads=4, kv_heads=2, head_dim=16, inter=160),
    dict(hidden=64, heads=2, kv_heads=2, head_dim=32, inter=96),  # no grouping
    dict(hidden=130, heads=6, kv_heads=1, head_dim=8, inter=300),  # odd widths, one kv head
    # 2B-4T's head_dim: the vectorised rotary embedding over several vectors per half
    dict(hidden=256, heads=4, kv_heads=1, head_dim=128, inter=128),
])


@given(
    shape=SHAPES,
    batch=st.integers(1, 2),
    q=st.sampled_from([1, 1, 2, 5]),
    dtype=st.sampled_from(FLOAT_DTYPES),
    fmt=st.sampled_from(["2bit", "5trit", "3trit"]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_the_separate_ops(isa5, shape, batch, q, dtype, fmt, masked, seed):
    args, caches, tail = make_layer(batch=batch, q=q, dtype=dtype, fmt=fmt, seed=seed, masked=masked, **shape)
    ours, theirs = clones(caches), clones(caches)
    out = LAYER(*args, *ours, *tail)
    expected = separate_ops(args, theirs, tail)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert torch.equal(out, expected)
    for a, e in zip(ours, theirs):
        assert torch.equal(a, e)


@pytest.mark.parametrize("fmt", ["2bit", "5trit", "3trit"])
@pytest.mark.parametrize("q", [1, 4])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference(isa, dtype, q, fmt):
    close = total = 0
    for seed in range(6):
        args, caches, tail = make_layer(batch=2, q=q, dtype=dtype, fmt=fmt, seed=seed, masked=seed % 2 == 1)
        ours, refs = clones(caches), clones(caches)
        out = LAYER(*args, *ours, *tail).float()
        expected = reference.decoder_layer(*args, *refs, *tail).float()
        for a, e in zip(ours, refs):
            assert torch.equal(a, e)
        torch.testing.assert_close(out, expected, atol=0.02 * expected.abs().max().item(), rtol=0)
        close += int(((out - expected).abs() <= 2**-20 * expected.abs().max()).sum())
        total += out.numel()
    assert close >= 0.99 * total


def test_calls_of_other_sizes_after_each_other(isa):
    """The op keeps its intermediates' buffer from call to call (growing it, or replacing it
    when a call needs under a quarter of it): calls of growing, shrinking and equal sizes one
    after the other, some after a call that left NaNs in the buffer, each equal the separate ops."""
    for q, seed, poison in ((1, 0, False), (40, 1, False), (6, 2, True), (5, 3, False), (1, 4, True), (1, 5, False),
                            (33, 6, False)):
        args, caches, tail = make_layer(q=q, seed=seed, filled=4, length=48)
        if poison:  # a NaN input: its quantized rows and the attention's buffers fill with NaN
            x = args[0].clone()
            x[..., 0] = float("nan")
            LAYER(x, *args[1:], *clones(caches), *tail)
        ours, theirs = clones(caches), clones(caches)
        assert torch.equal(LAYER(*args, *ours, *tail), separate_ops(args, theirs, tail))
        for a, e in zip(ours, theirs):
            assert torch.equal(a, e)


def test_one_op_layer_gives_the_tokens_of_the_separate_ops(tmp_path, monkeypatch):
    """A model's fused layers take the one-op path on int8 caches (torch_bitnet.generate's
    static cache, transformers' generate with its dynamic one) and give the tokens of the
    separate ops; float caches keep the separate ops."""
    from transformers import AutoTokenizer

    from torch_bitnet import checkpoints

    path = checkpoints.write_checkpoint(tmp_path / "m", checkpoints.small_config("gqa"), seed=3)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calls = []
    one_op = torch_bitnet.ops.decoder_layer
    monkeypatch.setattr(fuse.ops, "decoder_layer", lambda *a: calls.append(1) or one_op(*a))

    def run(kv):
        model = torch_bitnet.from_pretrained(path, kv_cache_dtype=kv)
        run = torch_bitnet.generate(model, tokenizer, "One op per layer.", 10, compile=False, max_seq_len=48)
        ids = torch.tensor([tokenizer("One op per layer.")["input_ids"]])
        with torch.inference_mode():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        return run.token_ids, hf.tolist()

    with_op = run("int8")
    assert len(calls) > 0
    calls.clear()
    run("fp32")
    assert not calls
    monkeypatch.setattr(fuse, "_int8_layer", lambda *a: None)
    assert run("int8") == with_op
    assert not calls


def test_opcheck_and_compile():
    for dtype in FLOAT_DTYPES:
        for q, masked in ((1, False), (3, True)):
            args, caches, tail = make_layer(batch=2, q=q, dtype=dtype, masked=masked, seed=1)
            torch.library.opcheck(LAYER, (*args, *clones(caches), *tail))
    args, caches, tail = make_layer(batch=1, q=1, dtype=torch.bfloat16, fmt="5trit", seed=2)
    eager, compiled = clones(caches), clones(caches)
    expected = torch_bitnet.ops.decoder_layer(*args, *eager, *tail)
    torch._dynamo.reset()
    got = torch.compile(torch_bitnet.ops.decoder_layer, fullgraph=True)(*args, *compiled, *tail)
    assert torch.equal(got, expected)
    for a, e in zip(compiled, eager):  # the cache write happened inside the graph
        assert torch.equal(a, e)


_NAMES = ["x", "packed", "scales", "norms", "eps", "cos", "sin", "k_cache", "k_scale", "v_cache", "v_scale",
          "positions", "scaling", "num_heads", "intermediate_size", "mask"]


def _call(change):
    """The op on a valid decode layer (zeros and ones made inside the call, so under
    FakeTensorMode they are fake) with the arguments ``change(valid arguments)`` returns replaced."""

    def call():
        hidden, heads, kv_heads, head_dim, inter = 96, 4, 2, 16, 160  # make_layer's default shape
        sizes = [(hidden, heads * head_dim), (hidden, kv_heads * head_dim), (hidden, kv_heads * head_dim),
                 (heads * head_dim, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
        cache = torch.zeros(1, kv_heads, 24, head_dim, dtype=torch.int8)
        values = dict(
            x=torch.ones(1, 1, hidden),
            packed=[torch.zeros(n, padded_in_features(k) // 4, dtype=torch.uint8) for k, n in sizes],
            scales=[torch.ones(()) for _ in sizes],
            norms=[torch.ones(k) for k in (hidden, heads * head_dim, hidden, inter)],
            eps=[1e-5] * 4, cos=torch.ones(1, 1, head_dim), sin=torch.zeros(1, 1, head_dim), k_cache=cache,
            k_scale=torch.zeros(1, kv_heads, 24), v_cache=cache.clone(), v_scale=torch.zeros(1, kv_heads, 24),
            positions=torch.arange(1), scaling=0.25, num_heads=heads, intermediate_size=inter, mask=None,
        )
        values.update(change(values))
        return LAYER(*(values[n] for n in _NAMES))

    return call


ERROR_CASES = [
    ("six_weights", _call(lambda v: dict(packed=v["packed"][:6])), ValueError, "7 packed weights and 7 scales"),
    ("three_norms", _call(lambda v: dict(norms=v["norms"][:3])), ValueError, "4 norm weights and 4 eps"),
    ("x_2d", _call(lambda v: dict(x=v["x"][0])), ValueError, r"must be \(batch, Q, hidden\)"),
    ("x_int", _call(lambda v: dict(x=v["x"].to(torch.int32))), TypeError, "float32, bfloat16 or float16"),
    ("heads", _call(lambda v: dict(num_heads=3)), ValueError, "not a positive multiple of 2 kv heads"),
    ("cos_dtype", _call(lambda v: dict(cos=v["cos"].double())), TypeError, "cos / sin must have the input's dtype"),
    ("sin_shape", _call(lambda v: dict(sin=v["sin"][..., :8])), ValueError, "cos / sin have shape"),
    ("cache_dtype", _call(lambda v: dict(k_cache=v["k_cache"].float())), TypeError, "key cache must be int8"),
    ("q_weight", _call(lambda v: dict(packed=[v["packed"][1], *v["packed"][1:]])), ValueError, "packed"),
    ("norm_size", _call(lambda v: dict(norms=[v["norms"][1], *v["norms"][1:]])), ValueError, "norm_weight has shape"),
    ("positions", _call(lambda v: dict(positions=torch.arange(2))), ValueError, "positions"),
]

test_errors_eager, test_errors_fake_kernels = error_tests(ERROR_CASES)
