"""Plain-PyTorch semantics of every torch_bitnet op.

These functions define what the C++ kernels compute; tests compare the kernels against
them (the integer parts bit for bit), and they are the place to read the math.
They are slow and allocate freely: use them for checking and debugging, not for speed.
"""

from __future__ import annotations

import torch

from .packing import check_packed, unpack_ternary

__all__ = ["quantize_act", "ternary_mm", "bitlinear", "stream_max"]


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
    w = unpack_ternary(packed, in_features)
    # int64 matmul is exact; the kernels' int32 cannot overflow for K <= MAX_IN_FEATURES.
    acc = xq.to(torch.int64) @ w.to(torch.int64).t()
    return acc.to(torch.int32)


def bitlinear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    """W1.58A8 linear layer: float (..., K) -> float (..., N) in the input's dtype.

    In float32::

        xq, a = quantize_act(x)
        acc   = ternary_mm(xq, packed)                     # exact int32
        y     = acc * (scale / a)  (+ bias)                # one factor per token
        y     = y.to(x.dtype)                              # one rounding at the end

    This equals ``(xq @ W^T) / a * scale`` up to float32 rounding; the kernels compute
    exactly this expression, so they match this function bit for bit.
    """
    xq, a = quantize_act(x)
    acc = ternary_mm(xq, packed, in_features, out_features)
    y = acc.float() * (scale.float().reshape(()) / a)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def stream_max(buf: torch.Tensor) -> torch.Tensor:
    """Maximum byte of a uint8 tensor, as a uint8 scalar tensor (0 for an empty tensor).

    The kernel reads the buffer once, sequentially, with the widest loads the CPU has; the
    benchmarks use it as the yardstick for the machine's read bandwidth.
    """
    if buf.numel() == 0:
        return torch.zeros((), dtype=torch.uint8)
    return buf.max()
