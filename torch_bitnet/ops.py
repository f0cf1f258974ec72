"""Typed wrappers and fake (meta) kernels for the ``bitnet::`` operators.

The schemas are declared once, in ``csrc/ops.cpp``; this file only adds Python entry
points with docstrings and the fake kernels ``torch.compile`` traces through. Fake kernels
never read tensor data (packed weights are opaque); they repeat the C++ argument checks so
that a compiled model fails at trace time with the same message as in eager mode.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the bitnet:: ops)
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "torch_bitnet: the C++ extension torch_bitnet._C could not be loaded "
        f"({err}). It must be built against the installed torch "
        f"({torch.__version__}); rebuild it from the source tree with "
        "`pip install --no-build-isolation -e .`"
    ) from err

from .int4 import check_int4_weight
from .int8 import check_int8_weight
from .packing import check_features, check_packed

__all__ = [
    "quantize_act",
    "ternary_mm",
    "bitlinear",
    "bitlinear_shared",
    "bitlinear_relu2_glu",
    "stream_max",
    "int8_linear",
    "int8_embedding",
    "int4_linear",
    "int4_embedding",
    "kv_cache_write",
    "int8_attention",
    "decoder_layer",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_input(x: torch.Tensor, in_features: int, what: str) -> None:
    if x.dim() < 1:
        raise ValueError(f"bitnet: {what} must have at least 1 dimension, got a 0-d tensor")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"bitnet: {what} has {x.shape[-1]} features in its last dimension, expected in_features={in_features}"
        )


def _check_float_input(x, in_features: int, what: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bitnet: {what} must be float32, bfloat16 or float16, got {x.dtype}")
    _check_input(x, in_features, what)


def _check_scale(scale, what: str = "weight scale") -> None:
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise ValueError(
            f"bitnet: {what} must be a float32 tensor with one element, got {scale.dtype} of shape "
            f"{tuple(scale.shape)}"
        )


def _check_norm(norm_weight, norm_eps: float, x, in_features: int) -> None:
    if norm_weight is None:
        return
    if norm_weight.dtype != x.dtype:
        raise TypeError(f"bitnet: norm_weight must have the input's dtype {x.dtype}, got {norm_weight.dtype}")
    if tuple(norm_weight.shape) != (in_features,):
        raise ValueError(f"bitnet: norm_weight has shape {tuple(norm_weight.shape)}, expected [{in_features}]")
    if norm_eps < 0:
        raise ValueError(f"bitnet: norm_eps must be >= 0, got {norm_eps}")


def _check_bitlinear(x, packed, scale, bias, in_features, out_features, norm_weight=None, norm_eps=1e-6) -> None:
    check_features(in_features, out_features)
    _check_float_input(x, in_features, "bitlinear input")
    check_packed(packed, in_features, out_features)
    _check_scale(scale)
    _check_bias(bias, out_features)
    _check_norm(norm_weight, norm_eps, x, in_features)


def _check_bias(bias, out_features: int) -> None:
    if bias is not None:
        if bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"bitnet: bias must be float32, bfloat16 or float16, got {bias.dtype}")
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bitnet: bias has shape {tuple(bias.shape)}, expected ({out_features},)")


@torch.library.register_fake("bitnet::quantize_act")
def _quantize_act_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bitnet: quantize_act input must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"bitnet: quantize_act input needs a non-empty last dimension, got shape {tuple(x.shape)}")
    return (
        torch.empty(x.shape, dtype=torch.int8, device=x.device),
        torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device),
    )


@torch.library.register_fake("bitnet::ternary_mm")
def _ternary_mm_fake(xq: torch.Tensor, packed: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    check_features(in_features, out_features)
    if xq.dtype != torch.int8:
        raise TypeError(f"bitnet: ternary_mm input must be int8, got {xq.dtype}")
    _check_input(xq, in_features, "ternary_mm input")
    check_packed(packed, in_features, out_features)
    return torch.empty((*xq.shape[:-1], out_features), dtype=torch.int32, device=xq.device)


@torch.library.register_fake("bitnet::bitlinear")
def _bitlinear_fake(
    x, packed, scale, bias, in_features: int, out_features: int, norm_weight=None, norm_eps: float = 1e-6
) -> torch.Tensor:
    _check_bitlinear(x, packed, scale, bias, in_features, out_features, norm_weight, norm_eps)
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)


@torch.library.register_fake("bitnet::bitlinear_shared")
def _bitlinear_shared_fake(
    x, packed, scales, in_features: int, out_features: list[int], norm_weight=None, norm_eps: float = 1e-6
) -> list[torch.Tensor]:
    if not (len(packed) == len(scales) == len(out_features) >= 1):
        raise ValueError(
            "bitnet: bitlinear_shared needs as many weights, scales and out_features (at least one), got "
            f"{len(packed)}, {len(scales)} and {len(out_features)}"
        )
    _check_float_input(x, in_features, "bitlinear_shared input")
    for w, s, n in zip(packed, scales, out_features):
        check_features(in_features, n)
        check_packed(w, in_features, n)
        _check_scale(s)
    _check_norm(norm_weight, norm_eps, x, in_features)
    return [torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device) for n in out_features]


@torch.library.register_fake("bitnet::bitlinear_relu2_glu")
def _bitlinear_relu2_glu_fake(
    x, gate, gate_scale, up, up_scale, in_features: int, out_features: int, norm_weight=None, norm_eps: float = 1e-6
) -> torch.Tensor:
    check_features(in_features, out_features)
    _check_float_input(x, in_features, "bitlinear_relu2_glu input")
    check_packed(gate, in_features, out_features)
    check_packed(up, in_features, out_features)
    _check_scale(gate_scale, "gate weight scale")
    _check_scale(up_scale, "up weight scale")
    _check_norm(norm_weight, norm_eps, x, in_features)
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)


@torch.library.register_fake("bitnet::stream_max")
def _stream_max_fake(buf: torch.Tensor) -> torch.Tensor:
    if buf.dtype != torch.uint8:
        raise TypeError(f"bitnet: stream_max expects a uint8 tensor, got {buf.dtype}")
    return torch.empty((), dtype=torch.uint8, device=buf.device)


@torch.library.register_fake("bitnet::int8_linear")
def _int8_linear_fake(x, weight, scale, in_features: int, out_features: int, bias=None) -> torch.Tensor:
    check_int8_weight(weight, scale, in_features, out_features, "int8_linear")
    _check_float_input(x, in_features, "int8_linear input")
    _check_bias(bias, out_features)
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)


def _embedding_fake(ids, embedding_dim: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """The checks and output both embedding fakes share, after their table checks."""
    if ids.dtype != torch.int64:
        raise TypeError(f"bitnet: {what} ids must be int64, got {ids.dtype}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bitnet: {what} dtype must be float32, bfloat16 or float16, got {dtype}")
    # (the ids' range is data: checked by the real kernel)
    return torch.empty((*ids.shape, embedding_dim), dtype=dtype, device=ids.device)


@torch.library.register_fake("bitnet::int8_embedding")
def _int8_embedding_fake(ids, weight, scale, embedding_dim: int, dtype: torch.dtype) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"bitnet: int8_embedding weight must be 2-D (rows, Kp), got shape {tuple(weight.shape)}")
    check_int8_weight(weight, scale, embedding_dim, weight.shape[0], "int8_embedding")
    return _embedding_fake(ids, embedding_dim, dtype, "int8_embedding")


@torch.library.register_fake("bitnet::int4_linear")
def _int4_linear_fake(x, weight, scale, in_features: int, out_features: int, bias=None) -> torch.Tensor:
    check_int4_weight(weight, scale, in_features, out_features, "int4_linear")
    _check_float_input(x, in_features, "int4_linear input")
    _check_bias(bias, out_features)
    return torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)


@torch.library.register_fake("bitnet::int4_embedding")
def _int4_embedding_fake(ids, weight, scale, embedding_dim: int, dtype: torch.dtype) -> torch.Tensor:
    if scale.dim() != 2:
        raise ValueError(f"bitnet: int4_embedding scale must be 2-D (rows, Kp/32), got shape {tuple(scale.shape)}")
    check_int4_weight(weight, scale, embedding_dim, scale.shape[0], "int4_embedding")
    return _embedding_fake(ids, embedding_dim, dtype, "int4_embedding")


def _check_attention_shapes(q, k_cache, k_scale, v_cache, v_scale, positions) -> None:
    """The shape and dtype checks of the int8 attention ops (values are checked in C++)."""
    for cache, scale, what in ((k_cache, k_scale, "key cache"), (v_cache, v_scale, "value cache")):
        if cache.dtype != torch.int8:
            raise TypeError(f"bitnet: {what} must be int8, got {cache.dtype}")
        if cache.dim() != 4:
            raise ValueError(f"bitnet: {what} must be (batch, kv_heads, max_len, head_dim), got {tuple(cache.shape)}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != tuple(cache.shape[:3]):
            raise ValueError(f"bitnet: {what} scales must be float32 of shape {tuple(cache.shape[:3])}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"bitnet: key cache {tuple(k_cache.shape)} and value cache {tuple(v_cache.shape)} differ")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bitnet: queries/keys/values must be float32, bfloat16 or float16, got {q.dtype}")
    if q.dim() != 4 or q.shape[0] != k_cache.shape[0] or q.shape[3] != k_cache.shape[3]:
        raise ValueError(f"bitnet: tensor of shape {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}")
    if positions.dtype != torch.int64 or tuple(positions.shape) != (q.shape[2],):
        raise ValueError(f"bitnet: positions must be int64 of shape ({q.shape[2]},)")


@torch.library.register_fake("bitnet::kv_cache_write")
def _kv_cache_write_fake(k_cache, k_scale, v_cache, v_scale, k, v, positions) -> None:
    _check_attention_shapes(k, k_cache, k_scale, v_cache, v_scale, positions)
    if k.shape[1] != k_cache.shape[1] or k.shape != v.shape:
        raise ValueError(f"bitnet: new keys {tuple(k.shape)} / values {tuple(v.shape)} do not fit the cache")


def _check_mask(mask, q, k_cache) -> None:
    """The dtype / shape checks of int8_attention's mask (Lm > max(positions) is checked in C++)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"bitnet: mask must be bool (True = may attend), got {mask.dtype}")
    if not (mask.dim() == 3 or (mask.dim() == 4 and mask.shape[1] == 1)):
        raise ValueError(f"bitnet: mask must be (batch, Q, Lm) or (batch, 1, Q, Lm), got shape {tuple(mask.shape)}")
    if mask.shape[0] != q.shape[0] or mask.shape[-2] != q.shape[2]:
        raise ValueError(
            f"bitnet: mask has shape {tuple(mask.shape)}, expected batch {q.shape[0]} and Q {q.shape[2]} (batch, Q, Lm)"
        )
    if mask.shape[-1] > k_cache.shape[2]:
        raise ValueError(
            f"bitnet: mask covers {mask.shape[-1]} cache positions; it must cover at most the cache length "
            f"{k_cache.shape[2]}"
        )


@torch.library.register_fake("bitnet::int8_attention")
def _int8_attention_fake(q, k_cache, k_scale, v_cache, v_scale, positions, scale: float, mask=None) -> torch.Tensor:
    _check_attention_shapes(q, k_cache, k_scale, v_cache, v_scale, positions)
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"bitnet: {q.shape[1]} query heads are not a multiple of {k_cache.shape[1]} kv heads")
    if mask is not None:
        _check_mask(mask, q, k_cache)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _layer_sizes(x, k_cache, num_heads: int, intermediate_size: int) -> list[tuple[int, int]]:
    """(in_features, out_features) of decoder_layer's q, k, v, o, gate, up and down weights."""
    hidden, kv_heads, head_dim = x.shape[-1], k_cache.shape[1], k_cache.shape[3]
    if num_heads <= 0 or num_heads % kv_heads:
        raise ValueError(f"bitnet: {num_heads} query heads are not a positive multiple of {kv_heads} kv heads")
    hd, kvd = num_heads * head_dim, kv_heads * head_dim
    return [(hidden, hd), (hidden, kvd), (hidden, kvd), (hd, hidden)] + [(hidden, intermediate_size)] * 2 + [
        (intermediate_size, hidden)
    ]


@torch.library.register_fake("bitnet::decoder_layer")
def _decoder_layer_fake(
    x, packed, scales, norms, eps, cos, sin, k_cache, k_scale, v_cache, v_scale, positions, scaling: float,
    num_heads: int, intermediate_size: int, mask=None,
) -> torch.Tensor:
    if len(packed) != 7 or len(scales) != 7:
        raise ValueError(
            "bitnet: decoder_layer needs 7 packed weights and 7 scales (q, k, v, o, gate, up, down), got "
            f"{len(packed)} and {len(scales)}"
        )
    if len(norms) != 4 or len(eps) != 4:
        raise ValueError(
            "bitnet: decoder_layer needs 4 norm weights and 4 eps (input, attention sub-norm, post-attention, "
            f"ffn sub-norm), got {len(norms)} and {len(eps)}"
        )
    if x.dim() != 3:
        raise ValueError(f"bitnet: decoder_layer input must be (batch, Q, hidden), got shape {tuple(x.shape)}")
    _check_float_input(x, x.shape[-1], "decoder_layer input")
    b, q_len, _ = x.shape
    head_dim = k_cache.shape[-1] if k_cache.dim() == 4 else 0
    new_keys = x.new_empty((b, k_cache.shape[1], q_len, head_dim))  # (B, KVH, Q, D), as the op makes them
    _check_attention_shapes(new_keys, k_cache, k_scale, v_cache, v_scale, positions)
    sizes = _layer_sizes(x, k_cache, num_heads, intermediate_size)
    if head_dim % 2:
        raise ValueError(f"bitnet: head_dim must be even for the rotary embedding, got {head_dim}")
    for t in (cos, sin):
        if t.dtype != x.dtype:
            raise TypeError(f"bitnet: cos / sin must have the input's dtype {x.dtype}, got {t.dtype}")
        if tuple(t.shape) != (b, q_len, head_dim):
            raise ValueError(f"bitnet: cos / sin have shape {tuple(t.shape)}, expected {(b, q_len, head_dim)}")
    for w, s, (k, n) in zip(packed, scales, sizes):
        check_features(k, n)
        check_packed(w, k, n)
        _check_scale(s)
    for norm, e, k in zip(norms, eps, (sizes[0][0], sizes[3][0], sizes[4][0], sizes[6][0])):
        _check_norm(norm, e, x, k)
    if mask is not None:
        _check_mask(mask, x.new_empty((b, num_heads, q_len, head_dim)), k_cache)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _no_backward(ctx, *grads):
    raise RuntimeError(
        f"bitnet: {ctx.op_name} is an inference op and has no gradient; run the model under "
        "torch.no_grad() / torch.inference_mode()"
    )


def _register_no_backward(op_name: str) -> None:
    """A backward through these ops would otherwise only warn and return nothing useful."""

    def setup_context(ctx, inputs, output):
        ctx.op_name = op_name

    torch.library.register_autograd(op_name, _no_backward, setup_context=setup_context)


for _name in (
    "bitnet::quantize_act",
    "bitnet::bitlinear",
    "bitnet::bitlinear_shared",
    "bitnet::bitlinear_relu2_glu",
    "bitnet::int8_linear",
    "bitnet::int4_linear",
    "bitnet::int8_attention",
):
    _register_no_backward(_name)


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization of the last dimension.

    Args:
        x: float32, bfloat16 or float16 tensor of shape (..., K).

    Returns:
        ``(xq, a)``: int8 (..., K) and float32 (..., 1) with ``xq = round(x * a)``,
        ``a = 127 / max|x|`` (see :func:`torch_bitnet.reference.quantize_act`; rows with
        NaN/Inf give ``xq = 0``, ``a = NaN``). Non-contiguous inputs are copied.
    """
    return torch.ops.bitnet.quantize_act.default(x)


def ternary_mm(xq: torch.Tensor, packed: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Exact integer matmul of int8 activations with a packed ternary weight.

    Args:
        xq: int8 tensor (..., in_features).
        packed: uint8 (out_features, ceil(in_features / 256) * 64) (2-bit), (out_features,
            ceil(in_features / 320), 64) (5-trit) or (ceil(out_features / 32), ceil(in_features / 9),
            32, 2) (3-trit), see :mod:`torch_bitnet.packing`.
        in_features, out_features: the logical weight size K, N.

    Returns:
        int32 tensor (..., out_features), equal bit for bit to ``xq @ W^T``.
    """
    return torch.ops.bitnet.ternary_mm.default(xq, packed, in_features, out_features)


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
    """BitNet b1.58 linear layer (ternary weight, int8 activations quantized inside).

    Args:
        x: float32, bfloat16 or float16 tensor (..., in_features); any leading shape, M = 0 allowed.
        packed: uint8 packed ternary weight, 2-bit (out_features, ceil(in_features / 256) * 64),
            5-trit (out_features, ceil(in_features / 320), 64) or 3-trit (ceil(out_features / 32),
            ceil(in_features / 9), 32, 2).
        scale: float32 tensor with one element; the weight is ``W_ternary * scale``.
        bias: optional (out_features,) float tensor, added in float32.
        in_features, out_features: logical sizes K, N (so fake kernels never read ``packed``).
        norm_weight: optional (in_features,) RMSNorm weight of x's dtype: the input is first
            normalised (:func:`torch_bitnet.reference.rms_norm`) in the same pass that
            quantizes it, instead of by a separate norm module.
        norm_eps: the RMSNorm epsilon.

    Returns:
        Tensor (..., out_features) in ``x.dtype``: ``acc * (scale / a) + bias`` computed in float32
        and rounded once, where ``acc`` is the exact int32 product of the quantized input
        with the ternary weight (see :func:`torch_bitnet.reference.bitlinear`).
    """
    if norm_weight is None:  # no float argument for torch.compile(dynamic=True) to make symbolic
        return torch.ops.bitnet.bitlinear.default(x, packed, scale, bias, in_features, out_features)
    return torch.ops.bitnet.bitlinear.default(
        x, packed, scale, bias, in_features, out_features, norm_weight, norm_eps
    )


def bitlinear_shared(
    x: torch.Tensor,
    packed: list[torch.Tensor],
    scales: list[torch.Tensor],
    in_features: int,
    out_features: list[int],
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
) -> list[torch.Tensor]:
    """Several bias-free BitLinear layers of one input (an attention's q/k/v projections).

    The input is normalised (with ``norm_weight``) and quantized once, then multiplied by each
    packed weight; output ``i`` equals ``bitlinear(x, packed[i], scales[i], None, in_features,
    out_features[i], norm_weight, norm_eps)`` bit for bit.
    """
    if norm_weight is None:
        return torch.ops.bitnet.bitlinear_shared.default(x, packed, scales, in_features, out_features)
    return torch.ops.bitnet.bitlinear_shared.default(
        x, packed, scales, in_features, out_features, norm_weight, norm_eps
    )


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
    """The input half of BitNet's MLP: ``relu(gate(x))^2 * up(x)`` (x's dtype, (..., out_features)).

    ``gate`` / ``up`` are packed ternary weights (either format) with their scales; x is
    normalised (optionally) and quantized once for both; the squared-ReLU gating runs in the
    same op (see :func:`torch_bitnet.reference.bitlinear_relu2_glu` for the roundings).
    """
    if norm_weight is None:
        return torch.ops.bitnet.bitlinear_relu2_glu.default(x, gate, gate_scale, up, up_scale, in_features, out_features)
    return torch.ops.bitnet.bitlinear_relu2_glu.default(
        x, gate, gate_scale, up, up_scale, in_features, out_features, norm_weight, norm_eps
    )


def stream_max(buf: torch.Tensor) -> torch.Tensor:
    """Maximum of a uint8 tensor, read once with the widest vector loads (a bandwidth yardstick)."""
    return torch.ops.bitnet.stream_max.default(buf)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer over int8 per-row weights: the quantized lm_head (int8 activations inside).

    Args:
        x: float32, bfloat16 or float16 tensor (..., in_features); any leading shape, M = 0 allowed.
        weight: uint8 codes (out_features, ceil(in_features / 64) * 64), see :mod:`torch_bitnet.int8`
            (:func:`torch_bitnet.int8.quantize_int8_rows` makes them).
        scale: float32 (out_features,), one scale per weight row.
        in_features, out_features: logical sizes K <= 65536, N (so fake kernels never read ``weight``).
        bias: optional (out_features,) float tensor, added in float32.

    Returns:
        Tensor (..., out_features) in ``x.dtype``: ``acc * (scale[n] / a) + bias[n]`` computed in
        float32 and rounded once, where ``a`` is the token's activation scale (as in
        :func:`bitlinear`) and ``acc`` the exact int32 product of the int8 activations with the
        int8 weight. NaN / Inf input rows give NaN rows. Semantics:
        :func:`torch_bitnet.reference.int8_linear`.
    """
    return torch.ops.bitnet.int8_linear.default(x, weight, scale, in_features, out_features, bias)


def int8_embedding(
    ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, embedding_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Embedding lookup in an int8 per-row table (the same buffers :func:`int8_linear` multiplies by).

    Args:
        ids: int64 tensor of any shape, each in [0, rows) (IndexError otherwise).
        weight: uint8 codes (rows, ceil(embedding_dim / 64) * 64); scale: float32 (rows,).
        embedding_dim: D, the logical row length.
        dtype: float32, bfloat16 or float16, the output dtype.

    Returns:
        (*ids.shape, embedding_dim) in ``dtype``: ``(code - 128) * scale[id]`` in float32, rounded
        once (:func:`torch_bitnet.reference.int8_embedding`).
    """
    return torch.ops.bitnet.int8_embedding.default(ids, weight, scale, embedding_dim, dtype)


def int4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer over int4 group weights: the compact lm_head (int8 activations inside).

    Args:
        x: float32, bfloat16 or float16 tensor (..., in_features); any leading shape, M = 0 allowed.
        weight: uint8 codes (ceil(out_features / 16), Kp / 8, 64), Kp = ceil(in_features / 64) * 64,
            see :mod:`torch_bitnet.int4` (:func:`torch_bitnet.int4.quantize_int4_rows` makes them).
        scale: bfloat16 (out_features, Kp / 32), one scale per group of 32 weights of a row.
        in_features, out_features: logical sizes K <= 65536, N (so fake kernels never read ``weight``).
        bias: optional (out_features,) float tensor, added in float32.

    Returns:
        Tensor (..., out_features) in ``x.dtype``. With ``xq, a`` the token's int8 activations and
        scale (as in :func:`bitlinear`) and ``d_g`` the exact int32 dot product of group g:
        ``s = sum_g float(d_g) * scale[n, g]`` in float32, summed in increasing g from 0, then
        ``s / a + bias[n]``, rounded once to x's dtype; bit-identical on every ISA. NaN / Inf
        input rows give NaN rows. Semantics: :func:`torch_bitnet.reference.int4_linear`.
    """
    return torch.ops.bitnet.int4_linear.default(x, weight, scale, in_features, out_features, bias)


def int4_embedding(
    ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, embedding_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Embedding lookup in an int4 group table (the same buffers :func:`int4_linear` multiplies by).

    Args:
        ids: int64 tensor of any shape, each in [0, rows) (IndexError otherwise); rows = scale.shape[0].
        weight: uint8 codes (ceil(rows / 16), Kp / 8, 64); scale: bfloat16 (rows, Kp / 32).
        embedding_dim: D, the logical row length.
        dtype: float32, bfloat16 or float16, the output dtype.

    Returns:
        (*ids.shape, embedding_dim) in ``dtype``: ``(u - 8) * scale[id, k // 32]`` in float32,
        rounded once (:func:`torch_bitnet.reference.int4_embedding`).
    """
    return torch.ops.bitnet.int4_embedding.default(ids, weight, scale, embedding_dim, dtype)


def kv_cache_write(k_cache, k_scale, v_cache, v_scale, k, v, positions) -> None:
    """Quantize new keys and values into an int8 KV cache, in place.

    Args:
        k_cache, v_cache: int8 (batch, kv_heads, max_len, head_dim), contiguous; mutated.
        k_scale, v_scale: float32 (batch, kv_heads, max_len); mutated.
        k, v: float (batch, kv_heads, Q, head_dim), the new tokens' keys and values.
        positions: int64 (Q,), the cache positions they go to (each in [0, max_len)).

    Each vector gets its own scale ``max|x| / 127`` (see :func:`torch_bitnet.reference.kv_quantize`).
    """
    torch.ops.bitnet.kv_cache_write.default(k_cache, k_scale, v_cache, v_scale, k, v, positions)


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

    Args:
        q: float32/bfloat16/float16 (batch, heads, Q, head_dim); heads a multiple of kv_heads.
        k_cache, k_scale, v_cache, v_scale: as written by :func:`kv_cache_write`.
        positions: int64 (Q,), each query's cache position; it attends to positions 0..p.
        scale: the softmax scale, usually head_dim ** -0.5.
        mask: optional bool (batch, Q, Lm), or (batch, 1, Q, Lm) as transformers' sdpa masks
            are laid out, with max(positions) < Lm <= max_len; any strides. True = may attend:
            query i of batch b sees cache position j iff ``j <= positions[i] and mask[b, i, j]``
            (e.g. left padding). The same mask serves every head.

    Returns:
        (batch, heads, Q, head_dim) in ``q.dtype``, computed in float32 with a numerically
        stable online softmax (scores never exponentiated above their running maximum). A
        query that sees no position at all gets zeros (a plain softmax would give NaN; torch's
        SDPA returns zeros too). Semantics: :func:`torch_bitnet.reference.int8_attention`; the
        kernels differ from it only by float32 rounding (bound: tests/test_attention.py).

    Each kv head's keys and values are read from memory once for up to 32 of the query rows
    that share it (its query heads x queries: all of a decode step's); when that leaves too
    few tasks for the threads, the positions are split too (flash-decoding).
    """
    return torch.ops.bitnet.int8_attention.default(q, k_cache, k_scale, v_cache, v_scale, positions, scale, mask)


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
    """A whole BitNet decoder layer over an int8 KV cache, in one op call.

    Args:
        x: float32/bfloat16/float16 (batch, Q, hidden), the layer's input.
        packed, scales: the packed ternary weights and their scales of the q, k, v, o, gate,
            up and down projections (any format, as :func:`bitlinear` takes them).
        norms, eps: the RMSNorm weights (x's dtype) and epsilons of input_layernorm,
            attn_sub_norm, post_attention_layernorm and ffn_sub_norm.
        cos, sin: (batch, Q, head_dim) in x's dtype, the rotary tables of the queries'
            positions (transformers' ``position_embeddings``).
        k_cache, k_scale, v_cache, v_scale: the layer's int8 KV cache (as for
            :func:`kv_cache_write`); the Q new keys and values are written at ``positions``.
        positions: int64 (Q,), the cache positions of the queries.
        scaling: the attention softmax scale; num_heads: query heads (a multiple of the
            cache's kv heads); intermediate_size: the MLP width; mask: as for
            :func:`int8_attention`.

    Returns:
        (batch, Q, hidden) in x's dtype: exactly what :mod:`torch_bitnet.fuse`'s layer forward
        computes with the separate ops (:func:`bitlinear_shared`, the rotary embedding,
        :func:`kv_cache_write`, :func:`int8_attention`, :func:`bitlinear`,
        :func:`bitlinear_relu2_glu` and the residual adds, each rounded to x's dtype); see
        :func:`torch_bitnet.reference.decoder_layer`. One call instead of ten op and kernel
        calls per layer is what it is for: a decode step spends a few microseconds on each call.
    """
    return torch.ops.bitnet.decoder_layer.default(
        x, packed, scales, norms, eps, cos, sin, k_cache, k_scale, v_cache, v_scale, positions, scaling, num_heads,
        intermediate_size, mask,
    )
