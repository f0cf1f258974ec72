"""The int8 per-row weight format of the lm_head / embedding ops (``int8_linear``, ``int8_embedding``).

Format (the same on every ISA; pinned by ``tests/test_int8_head.py::test_golden_bytes``)::

    float weight W  : (N, K)                   N rows (vocabulary / out_features), K = hidden size
    scale           : float32 (N,), s_n = max_k |W[n, k]| / 127       (0 for an all-zero row)
    w               : round_half_even(W[n] / s_n) clamped to [-127, 127]  (0 where s_n = 0)
    codes           : uint8 (N, Kp), codes[n, k] = w[n, k] + 128 for k < K, 128 (w = 0) for K <= k < Kp
    Kp              = ceil(K / 64) * 64

    W ~ (codes[:, :K] - 128) * scale[:, None]       (error <= s_n / 2 per element)

Why these choices:

* one scale per row: a vocabulary row is one token's vector; rows differ in norm, and a per-row
  scale keeps a large row from coarsening the others (the same reason the KV cache has one
  scale per vector);
* codes = w + 128: the u8 x s8 multiply-adds of x86 (AVX-512 VNNI ``vpdpbusd``) take the weight
  as the unsigned operand. ``sum_k (w + 128) x = sum_k w x + 128 sum_k x``, and the int8
  activations' sum (which ``quantize_act`` computes anyway) removes the offset once per token;
* w in [-127, 127], never -128: symmetric, and ``-w`` always fits in int8 (the AVX2 kernel
  moves the activations' signs onto the weight);
* Kp a multiple of 64: one 64-byte vector per step on every path, and a row of a contiguous
  tensor starts on a cache line whenever its first row does.

One buffer serves both ops: the embedding reads row ``id`` (``int8_embedding``), the lm_head
multiplies by all of them (``int8_linear``), so a tied model stores the table once.
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK_K",
    "MAX_FEATURES",
    "padded_features",
    "int8_shape",
    "check_int8_sizes",
    "check_int8_weight",
    "quantize_int8_rows",
    "dequantize_int8_rows",
]

#: the padding unit of K (one 64-byte vector of codes)
BLOCK_K = 64
#: largest K: the kernels' int32 sums of (w + 128) * x stay below 255 * 128 * K < 2**31
MAX_FEATURES = 1 << 16
#: rows converted at a time by quantize_int8_rows: bounds its float32 temporaries to ~64 MB at K = 4096
_QUANTIZE_CHUNK_ROWS = 4096


def padded_features(features: int) -> int:
    """K rounded up to a multiple of :data:`BLOCK_K` (the row length of the codes)."""
    return -(-features // BLOCK_K) * BLOCK_K


def int8_shape(rows: int, features: int) -> tuple[int, int]:
    """Shape of the uint8 codes of a (rows, features) weight."""
    return (rows, padded_features(features))


def check_int8_sizes(features: int, rows: int, what: str = "int8_linear") -> None:
    """Raise ValueError unless (features K, rows N) is a size the int8 kernels support."""
    if features < 1 or rows < 1:
        raise ValueError(f"bitnet: {what} sizes must be >= 1, got {features} features and {rows} rows")
    if features > MAX_FEATURES:
        raise ValueError(
            f"bitnet: {what} has {features} features; the supported maximum is {MAX_FEATURES} "
            "(int32 accumulation must stay exact)"
        )


def check_int8_weight(weight: torch.Tensor, scale: torch.Tensor, features: int, rows: int, what: str) -> None:
    """Raise TypeError/ValueError unless (weight, scale) hold a valid int8 table of (rows, features).

    The same checks and messages as the C++ operators (and so as their fake kernels).
    """
    check_int8_sizes(features, rows, what)
    if weight.dtype != torch.uint8:
        raise TypeError(f"bitnet: {what} weight must be uint8 codes, got {weight.dtype}")
    expected = int8_shape(rows, features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"bitnet: {what} weight has shape {tuple(weight.shape)}, expected {expected}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
        raise ValueError(
            f"bitnet: {what} scale must be float32 of shape ({rows},), got {scale.dtype} of shape {tuple(scale.shape)}"
        )


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight (N, K) -> (codes uint8 (N, Kp), scale float32 (N,)) in the format above.

    Computed in float32 (``W.float() / s``, one rounding, then round half to even), a few
    thousand rows at a time so a 128256 x 2560 bf16 table never has a full float32 copy.
    Raises ValueError for NaN / Inf weights.
    """
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"torch_bitnet: quantize_int8_rows expects a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(
            f"torch_bitnet: quantize_int8_rows expects a 2-D (N, K) weight, got shape {tuple(weight.shape)}"
        )
    n, k = weight.shape
    check_int8_sizes(k, n, "quantize_int8_rows")
    codes = torch.full(int8_shape(n, k), 128, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, _QUANTIZE_CHUNK_ROWS):
        w = weight[r0 : r0 + _QUANTIZE_CHUNK_ROWS].detach().to(torch.float32, copy=True)  # divided in place
        if not bool(torch.isfinite(w).all()):
            raise ValueError("torch_bitnet: quantize_int8_rows: the weight has NaN or Inf values")
        s = w.abs().amax(dim=1) / 127.0
        safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)  # zero rows: w / 1 = 0
        codes[r0 : r0 + w.shape[0], :k] = (w.div_(safe).round_().clamp_(-127, 127) + 128).to(torch.uint8)
        scale[r0 : r0 + w.shape[0]] = s
    return codes, scale


def dequantize_int8_rows(codes: torch.Tensor, scale: torch.Tensor, features: int) -> torch.Tensor:
    """Inverse of :func:`quantize_int8_rows`: float32 (N, features) = (codes - 128) * scale.

    The same float32 products ``int8_embedding`` computes (one rounding each).
    """
    check_int8_weight(codes, scale, features, codes.shape[0] if codes.dim() else 0, "dequantize_int8_rows")
    return (codes[:, :features].float() - 128.0) * scale.unsqueeze(1)
