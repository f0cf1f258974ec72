"""Plain-PyTorch semantics of every torch_bitnet op.

These functions define what the C++ kernels compute; tests compare the kernels against
them (the integer parts bit for bit), and they are the place to read the math.
They are slow and allocate freely: use them for checking and debugging, not for speed.
"""

from __future__ import annotations

import torch

from .int4 import GROUP_SIZE, check_int4_weight, padded_features, unpack_int4_codes
from .int8 import check_int8_weight
from .packing import check_packed, unpack_ternary

__all__ = [
    "quantize_act",
    "ternary_mm",
    "rms_norm",
    "bitlinear",
    "bitlinear_shared",
    "bitlinear_relu2_glu",
    "stream_max",
    "int8_linear",
    "int8_embedding",
    "int4_linear",
    "int4_embedding",
    "kv_quantize",
    "kv_cache_write",
    "int8_attention",
    "rope",
    "decoder_layer",
]


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization of the last dimension (BitNet b1.58 activations).

    In float32 (the input is upcast first, as transformers' ``ActQuant`` does)::

        a  = 127 / max(|x|, dim=-1).clamp(min=1e-5)        # float32 (..., 1)
        xq = round_half_even(x * a).clamp(-128, 127)       # int8 (..., K)

    ``127 / t`` is evaluated the way PyTorch evaluates it for a tensor ``t`` (and so the way
    transformers' BitNet modules do): ``t.reciprocal() * 127``, two float32 roundings.

    Non-finite rows: a row whose max |x| is NaN or +Inf gets ``xq = 0`` and ``a = NaN``, so
    a ``bitlinear`` output row computed from it is NaN (the float matmul would also give
    NaN/Inf there) instead of arbitrary integers.

    Returns ``(xq, a)``; ``xq / a`` dequantizes.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    a = amax.clamp(min=1e-5).reciprocal() * 127.0
    xq = (xf * a).round().clamp(-128, 127)
    bad = ~torch.isfinite(amax)
    xq = torch.where(bad, torch.zeros_like(xq), xq).to(torch.int8)
    a = torch.where(bad, torch.full_like(a, float("nan")), a)
    return xq, a


def ternary_mm(xq: torch.Tensor, packed: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Exact integer product ``xq @ W^T``: int8 (..., K) x packed ternary (N, Kp/4) -> int32 (..., N)."""
    check_packed(packed, in_features, out_features)
    w = unpack_ternary(packed, in_features, out_features)
    # int64 matmul is exact; the kernels' int32 cannot overflow for K <= MAX_IN_FEATURES.
    acc = xq.to(torch.int64) @ w.to(torch.int64).t()
    return acc.to(torch.int32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the fused-norm ops compute it (transformers' ``BitNetRMSNorm`` operations)::

        var = mean(x^2)                          # summed in float64, rounded once to float32
        r   = 1 / sqrt(var + eps)                # var + eps in float32; sqrt and division in
                                                 # float64, rounded once to float32
        h   = (x * r).to(x.dtype)                # float32 product, one rounding
        y   = weight * h                         # in x.dtype (weight has x's dtype)

    Why float64 for the sum and for ``r``: transformers sums the squares in float32 in an
    order that depends on the vector width, and torch's vectorised float32 ``rsqrt`` / ``sqrt``
    kernels are not correctly rounded (one ulp off for some inputs). A float64 result rounded
    once to float32 is the same whatever the order or the library (in practice: the float64
    results differ only in their last bits, far below float32's half-ulp), so every ISA path
    and this function agree bit for bit. Against transformers, ``r`` differs by a few float32
    ulps.
    """
    xf = x.float()
    var = (xf.double().square().sum(-1, keepdim=True) / x.shape[-1]).float()
    r = (var + eps).double().sqrt().reciprocal().float()
    h = (xf * r).to(x.dtype)
    return weight * h


def bitlinear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: int,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """W1.58A8 linear layer: float (..., K) -> float (..., N) in the input's dtype.

    In float32::

        x     = rms_norm(x, norm_weight, norm_eps)         # only with norm_weight
        xq, a = quantize_act(x)
        acc   = ternary_mm(xq, packed)                     # exact int32
        y     = acc * (scale / a)  (+ bias)                # one factor per token
        y     = y.to(x.dtype)                              # one rounding at the end

    This equals ``(xq @ W^T) / a * scale`` up to float32 rounding; the kernels compute
    exactly this expression, so they match this function bit for bit.
    """
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, norm_eps)
    xq, a = quantize_act(x)
    acc = ternary_mm(xq, packed, in_features, out_features)
    y = acc.float() * (scale.float().reshape(()) / a)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def bitlinear_shared(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    scales: list[torch.Tensor],
    in_features: int,
    out_features: list[int],
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> list[torch.Tensor]:
    """One input times several ternary weights (q/k/v): ``[bitlinear(x, w_i, s_i) ...]``, the
    input normalised (optionally) and quantized once (the result is the same as separately)."""
    return [
        bitlinear(x, w, s, None, in_features, n, norm_weight, norm_eps)
        for w, s, n in zip(packed, scales, out_features, strict=True)
    ]


def bitlinear_relu2_glu(
    x: torch.Tensor,
    gate: torch.Tensor,
    gate_scale: torch.Tensor,
    up: torch.Tensor,
    up_scale: torch.Tensor,
    in_features: int,
    out_features: int,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """BitNet's gated MLP input: ``relu(g)^2 * u`` in x's dtype (each step rounded to it, as
    transformers' ``ReLUSquaredActivation`` and the product do), with ``g`` and ``u`` the
    bitlinear outputs of the (optionally normalised) input for the gate and up weights."""
    g, u = bitlinear_shared(x, [gate, up], [gate_scale, up_scale], in_features, [out_features] * 2, norm_weight, norm_eps)
    return torch.square(torch.relu(g)) * u


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer over int8 per-row weights (the lm_head): float (..., K) -> float (..., N) in x's dtype.

    ``weight`` uint8 codes (N, Kp) and ``scale`` float32 (N,) as :mod:`torch_bitnet.int8`
    defines them. The activations are quantized per token exactly as in :func:`bitlinear`.
    In float32::

        xq, a = quantize_act(x)                            # int8 (..., K), float32 (..., 1)
        acc   = xq @ (codes[:, :K] - 128)^T                # exact int32 (..., N)
        y     = acc * (scale / a)  (+ bias)                # scale (N,) / a (..., 1): one factor per element
        y     = y.to(x.dtype)                              # one rounding at the end

    Rows of x with NaN / Inf give NaN rows (a = NaN), as in :func:`bitlinear`.
    """
    check_int8_weight(weight, scale, in_features, out_features, "int8_linear")
    xq, a = quantize_act(x)
    w = weight[:, :in_features].to(torch.float64) - 128.0
    # float64 is exact here: every product is an integer below 2**14 in magnitude and every
    # partial sum below 2**31, far inside float64's 2**53 (and much faster than int64 matmul).
    acc = (xq.to(torch.float64) @ w.t()).to(torch.int32)
    y = acc.float() * (scale / a)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_embedding(
    ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, embedding_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Embedding lookup in an int8 per-row table: int64 ids (...) -> (..., embedding_dim) in ``dtype``.

    ``(codes[id, :D] - 128) * scale[id]`` in float32, rounded once to ``dtype``; an id outside
    [0, rows) raises IndexError.
    """
    rows = weight.shape[0]
    check_int8_weight(weight, scale, embedding_dim, rows, "int8_embedding")
    flat = ids.reshape(-1)
    bad = flat[(flat < 0) | (flat >= rows)]
    if bad.numel():
        raise IndexError(f"bitnet: int8_embedding id {int(bad[0])} is out of range: the table has {rows} rows")
    # the products of dequantize_int8_rows, for the looked-up rows only
    vectors = (weight[flat, :embedding_dim].float() - 128.0) * scale[flat].unsqueeze(1)
    return vectors.to(dtype).reshape(*ids.shape, embedding_dim)


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer over int4 group weights (the compact lm_head): float (..., K) -> float (..., N) in x's dtype.

    ``weight`` uint8 codes and ``scale`` bfloat16 (N, Kp/32) as :mod:`torch_bitnet.int4` defines
    them. The activations are quantized per token exactly as in :func:`bitlinear`. Then::

        xq, a = quantize_act(x)                            # int8 (M, K) (zero-padded to Kp), float32 (M, 1)
        d_g   = xq[:, group g] @ (u[:, group g] - 8)^T     # exact int32 (M, N), group g = k in [32 g, 32 g + 32)
        s     = 0;  for g = 0, 1, ...:  s = s + float(d_g) * scale[:, g]   # float32, one rounding per op
        y     = s / a  (+ bias)                            # float32
        y     = y.to(x.dtype)                              # one rounding at the end

    The kernels evaluate the same float32 operations in the same order (lane by lane, a lane
    per output row), so they match this function bit for bit. Rows of x with NaN / Inf give
    NaN rows (a = NaN), as in :func:`bitlinear`.
    """
    check_int4_weight(weight, scale, in_features, out_features, "int4_linear")
    lead = x.shape[:-1]
    xq, a = quantize_act(x)
    kp = padded_features(in_features)
    xg = torch.nn.functional.pad(xq.reshape(-1, in_features).to(torch.float64), (0, kp - in_features))
    w = unpack_int4_codes(weight, out_features).to(torch.float64) - 8.0  # (N, Kp), 0 in the padding
    sf = scale.float()
    s = torch.zeros(xg.shape[0], out_features)
    for g in range(kp // GROUP_SIZE):
        k = slice(g * GROUP_SIZE, (g + 1) * GROUP_SIZE)
        # float64 is exact: products below 2**10, sums below 2**15
        d = (xg[:, k] @ w[:, k].t()).to(torch.int32)
        s = s + d.float() * sf[:, g]
    y = s / a.reshape(-1, 1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, out_features)


def int4_embedding(
    ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, embedding_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Embedding lookup in an int4 group table: int64 ids (...) -> (..., embedding_dim) in ``dtype``.

    ``(u[id, k] - 8) * scale[id, k // 32]`` in float32, rounded once to ``dtype``; the table
    has ``scale.shape[0]`` rows and an id outside [0, rows) raises IndexError.
    """
    rows = scale.shape[0] if scale.dim() == 2 else 0
    check_int4_weight(weight, scale, embedding_dim, rows, "int4_embedding")
    flat = ids.reshape(-1)
    bad = flat[(flat < 0) | (flat >= rows)]
    if bad.numel():
        raise IndexError(f"bitnet: int4_embedding id {int(bad[0])} is out of range: the table has {rows} rows")
    # the products of dequantize_int4_rows, for the looked-up rows only
    u = unpack_int4_codes(weight, rows)[flat, :embedding_dim].float() - 8.0
    vectors = u * scale[flat].float().repeat_interleave(GROUP_SIZE, dim=1)[:, :embedding_dim]
    return vectors.to(dtype).reshape(*ids.shape, embedding_dim)


def stream_max(buf: torch.Tensor) -> torch.Tensor:
    """Maximum byte of a uint8 tensor, as a uint8 scalar tensor (0 for an empty tensor).

    The kernel reads the buffer once, sequentially, with the widest loads the CPU has; the
    benchmarks use it as the yardstick for the machine's read bandwidth.
    """
    if buf.numel() == 0:
        return torch.zeros((), dtype=torch.uint8)
    return buf.max()


def kv_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector symmetric int8 of keys or values: x (..., D) float -> (q int8 (..., D), s float32 (...)).

    In float32: ``s = max|x| / 127`` (``0`` for an all-zero vector), ``q = round(x / s)`` (half
    to even; 0 where s is 0), so that ``q * s`` dequantizes. One scale per token and head keeps
    an outlier in one token from coarsening every other token's grid.
    """
    xf = x.float()
    s = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = (xf / safe.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return q, s


def kv_cache_write(
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Quantize new keys/values (B, KVH, Q, D) and store them at ``positions`` (Q,) of the int8
    caches (B, KVH, L, D) and their scales (B, KVH, L), in place."""
    kq, ks = kv_quantize(k)
    vq, vs = kv_quantize(v)
    k_cache[:, :, positions] = kq
    v_cache[:, :, positions] = vq
    k_scale[:, :, positions] = ks
    v_scale[:, :, positions] = vs


def int8_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention of float queries over an int8 KV cache.

    q (B, H, Q, D) at cache ``positions`` (Q,); caches (B, KVH, L, D) int8 with scales
    (B, KVH, L); H a multiple of KVH (query head h reads kv head h // (H / KVH)). The query at
    position p attends to the cache positions j <= p that the optional bool ``mask``
    (B, Q, Lm) or (B, 1, Q, Lm), max(positions) < Lm <= L, allows (True = may attend; it is
    shared by all heads). In float32: softmax((q . k_j) * ks_j * scale) weighted sum of
    v_j * vs_j. A query that sees no position at all gets zeros (a plain softmax would give
    NaN; torch's scaled_dot_product_attention also returns zeros). Returns (B, H, Q, D) in
    q's dtype.
    """
    b, h, qlen, d = q.shape
    kvh, length = k_cache.shape[1], k_cache.shape[2]
    groups = h // kvh
    k = (k_cache.float() * k_scale.unsqueeze(-1)).repeat_interleave(groups, dim=1)  # (B, H, L, D)
    v = (v_cache.float() * v_scale.unsqueeze(-1)).repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # (B, H, Q, L)
    visible = torch.arange(length).view(1, length) <= positions.view(qlen, 1)  # (Q, L)
    visible = visible.expand(b, 1, qlen, length)  # (B, 1, Q, L), broadcast over heads
    if mask is not None:
        mask = mask.reshape(b, 1, qlen, mask.shape[-1])
        visible = visible & torch.nn.functional.pad(mask, (0, length - mask.shape[-1]), value=False)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    probs = torch.where(visible.any(-1, keepdim=True), probs, 0.0)  # rows seeing nothing: 0, not NaN
    return (probs @ v).to(q.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, rotate-half form, in x's dtype: x (B, H, Q, D), cos / sin
    (B, Q, D) -> ``x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin`` (each product and the sum
    rounded to the dtype, as PyTorch computes it in bf16 / fp16)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def decoder_layer(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    scales: list[torch.Tensor],
    norms: list[torch.Tensor],
    eps: list[float],
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_cache: torch.Tensor,
    v_scale: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    num_heads: int,
    intermediate_size: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One BitNet b1.58 decoder layer over an int8 KV cache: x (B, Q, hidden) -> (B, Q, hidden)
    in x's dtype; the Q new keys / values are written to the caches at ``positions`` (Q,).

    ``packed`` / ``scales``: the q, k, v, o, gate, up and down projections; ``norms`` / ``eps``:
    input_layernorm, attn_sub_norm, post_attention_layernorm, ffn_sub_norm. The KV cache gives
    the head_dim and the kv heads; ``cos`` / ``sin`` (B, Q, head_dim) are the rotary tables of
    the queries' positions in x's dtype (transformers' ``position_embeddings``)::

        q, k, v = bitlinear_shared(x, [q, k, v], norm=input_layernorm)   # (B, Q, heads * D)
        q, k    = rope(q, cos, sin), rope(k, cos, sin)                   # (B, heads, Q, D)
        kv_cache_write(caches, k, v, positions)
        h       = x + bitlinear(int8_attention(q, caches, positions, scaling, mask), o,
                                norm=attn_sub_norm)
        out     = h + bitlinear(bitlinear_relu2_glu(h, gate, up, norm=post_attention_layernorm),
                                down, norm=ffn_sub_norm)

    (transformers' ``BitNetDecoderLayer`` with torch_bitnet's ops; every intermediate in x's dtype.)
    """
    b, q_len, hidden = x.shape
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    sizes = [num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    q, k, v = bitlinear_shared(x, packed[:3], scales[:3], hidden, sizes, norms[0], eps[0])
    q, k, v = (t.view(b, q_len, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    kv_cache_write(k_cache, k_scale, v_cache, v_scale, k, v, positions)
    out = int8_attention(q, k_cache, k_scale, v_cache, v_scale, positions, scaling, mask)
    out = out.transpose(1, 2).reshape(b, q_len, sizes[0])
    h = x + bitlinear(out, packed[3], scales[3], None, sizes[0], hidden, norms[1], eps[1])
    gated = bitlinear_relu2_glu(
        h, packed[4], scales[4], packed[5], scales[5], hidden, intermediate_size, norms[2], eps[2]
    )
    return h + bitlinear(gated, packed[6], scales[6], None, intermediate_size, hidden, norms[3], eps[3])
