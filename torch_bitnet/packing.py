"""The packed ternary weight format used by every torch_bitnet kernel, and lossless conversions.

Format (the same on every ISA; pinned by ``tests/test_packing.py::test_golden_bytes``)::

    logical weight W: int8 (N, K), values in {-1, 0, +1}    N = out_features, K = in_features
    code            : u = w + 1 in {0, 1, 2}                 (3 never occurs)
    K is padded to Kp = ceil(K / 256) * 256 with w = 0 (code 1)
    packed          : uint8 (N, Kp / 4), one row per output feature, rows contiguous

    Row n is a run of 64-byte blocks; block b holds the 256 weights k = 256*b .. 256*b + 255:

        byte j of block b (j = 0..63):
          bit  7 6 | 5 4 | 3 2 | 1 0
               u3  | u2  | u1  | u0      with  u_i = code of weight k = 256*b + 64*i + j

So the i-th 2-bit plane of a block is 64 codes for 64 *consecutive* weights: a kernel
loads 64 bytes, masks plane i, and multiplies it against the 64 contiguous activations
``xq[256*b + 64*i : 256*b + 64*i + 64]``. That works the same with 16-, 32- or 64-byte
vectors and with plain scalar code, which is why the layout does not depend on the ISA.
One float32 scale per tensor multiplies the integer result (see ``reference.bitlinear``).

transformers' layout (``transformers.integrations.bitnet.pack_weights``) is different:
uint8 (N/4, K), packed row r holds original rows r, R+r, 2R+r, 3R+r (R = N/4) in bits
1:0, 3:2, 5:4, 7:6 with the same codes w + 1. ``from_hf_packed`` / ``to_hf_packed`` convert.
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK_K",
    "MAX_IN_FEATURES",
    "padded_in_features",
    "packed_shape",
    "pack_ternary",
    "unpack_ternary",
    "ternarize",
    "from_hf_packed",
    "to_hf_packed",
    "check_features",
    "check_packed",
]

#: weights along K per 64-byte block
BLOCK_K = 256
#: largest supported in_features: keeps |int32 accumulator| <= 128 * K <= 2**24, so the
#: accumulator converts to float32 exactly (and the AVX-512 partial sums cannot overflow).
MAX_IN_FEATURES = 1 << 17


def padded_in_features(in_features: int) -> int:
    """K rounded up to a multiple of :data:`BLOCK_K` (the kernels' K)."""
    return -(-in_features // BLOCK_K) * BLOCK_K


def packed_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the packed uint8 tensor for an (out_features, in_features) weight."""
    return (out_features, padded_in_features(in_features) // 4)


def check_features(in_features: int, out_features: int) -> None:
    """Raise ValueError unless (in_features, out_features) is a size the kernels support."""
    if in_features < 1 or out_features < 1:
        raise ValueError(
            f"bitnet: in_features and out_features must be >= 1, got in_features={in_features}, "
            f"out_features={out_features}"
        )
    if in_features > MAX_IN_FEATURES:
        raise ValueError(
            f"bitnet: in_features={in_features} exceeds the supported maximum {MAX_IN_FEATURES} "
            "(int32 accumulation must stay exact)"
        )


def check_packed(packed: torch.Tensor, in_features: int, out_features: int) -> None:
    """Raise TypeError/ValueError unless ``packed`` is a valid packed weight for the sizes.

    The same checks, with the same messages, as the C++ operators and their fake kernels.
    """
    check_features(in_features, out_features)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"bitnet: packed weight must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"bitnet: packed weight must be uint8, got {packed.dtype}")
    expected = packed_shape(out_features, in_features)
    if tuple(packed.shape) != expected:
        raise ValueError(
            f"bitnet: packed weight has shape {tuple(packed.shape)}, expected {expected} for "
            f"in_features={in_features}, out_features={out_features}"
        )


def _check_ternary(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"torch_bitnet: {what} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if w.dtype.is_floating_point or w.dtype.is_complex or w.dtype == torch.bool:
        raise TypeError(f"torch_bitnet: {what} must be an integer tensor with values in {{-1, 0, 1}}, got {w.dtype}")
    if w.numel() and (w.min() < -1 or w.max() > 1):
        raise ValueError(f"torch_bitnet: {what} has values outside {{-1, 0, 1}}")


def pack_ternary(w: torch.Tensor) -> torch.Tensor:
    """Pack a ternary integer matrix (N, K) with values in {-1, 0, 1} into uint8 (N, Kp/4).

    Lossless: ``unpack_ternary(pack_ternary(w), K) == w``.
    """
    _check_ternary(w, "ternary weight")
    n, k = w.shape
    check_features(k, n)
    kp = padded_in_features(k)
    codes = torch.ones((n, kp), dtype=torch.uint8, device=w.device)
    codes[:, :k] = (w + 1).to(torch.uint8)
    # (N, blocks, plane i, byte j) -> byte j gets plane i at bits 2i+1:2i
    planes = codes.view(n, kp // BLOCK_K, 4, 64)
    packed = planes[:, :, 0] | (planes[:, :, 1] << 2) | (planes[:, :, 2] << 4) | (planes[:, :, 3] << 6)
    return packed.reshape(n, kp // 4).contiguous()


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, Kp/4) -> codes uint8 (N, Kp) in logical K order."""
    n, row_bytes = packed.shape
    blocks = packed.view(n, row_bytes // 64, 1, 64)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    return ((blocks >> shifts) & 3).reshape(n, row_bytes * 4)


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: uint8 (N, Kp/4) -> int8 (N, in_features).

    Raises ValueError if the packed data holds the unused code 3 or non-zero padding.
    """
    if packed.dim() != 2:
        raise ValueError(f"torch_bitnet: packed weight must be 2-D, got shape {tuple(packed.shape)}")
    check_packed(packed, in_features, packed.shape[0])
    codes = _codes(packed.contiguous())
    if bool((codes == 3).any()):
        raise ValueError("torch_bitnet: packed weight holds the invalid code 3 (only 0, 1, 2 encode -1, 0, +1)")
    if bool((codes[:, in_features:] != 1).any()):
        raise ValueError("torch_bitnet: packed weight has non-zero values in the K padding")
    return codes[:, :in_features].to(torch.int8) - 1


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarization of float master weights, exactly as transformers' ``WeightQuant``.

    ``s = mean(|W|).clamp(min=1e-5)`` in float32, ``Wq = round(W * (1 / s)).clamp(-1, 1)``
    (round half to even). Returns ``(Wq int8 (N, K), scale float32 (1,))`` with
    ``scale = s``, so the layer's weight is ``Wq * scale``. (transformers divides by ``1 / s``;
    the two differ by at most one float32 rounding.)
    """
    if not weight.dtype.is_floating_point:
        raise TypeError(f"torch_bitnet: ternarize expects a floating-point weight, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"torch_bitnet: ternarize expects a 2-D weight, got shape {tuple(weight.shape)}")
    # A float32 working copy, updated in place: the same operations (so the same bits) as
    # (w * inv).round().clamp(-1, 1) without three more full-size temporaries.
    w = weight.float() if weight.dtype != torch.float32 else weight.clone()
    mean = w.abs().mean().clamp(min=1e-5)
    inv = 1.0 / mean
    wq = w.mul_(inv).round_().clamp_(-1, 1).to(torch.int8)
    return wq, mean.reshape(1)


def from_hf_packed(hf_packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """transformers' packed uint8 (N/4, K) -> ternary int8 (N, K).

    ``out_features`` defaults to ``4 * hf_packed.shape[0]``; it must equal that (transformers'
    ``BitLinear`` only stores out_features divisible by 4).
    """
    if not isinstance(hf_packed, torch.Tensor) or hf_packed.dtype != torch.uint8:
        got = hf_packed.dtype if isinstance(hf_packed, torch.Tensor) else type(hf_packed).__name__
        raise TypeError(f"torch_bitnet: transformers-packed weight must be a uint8 tensor, got {got}")
    if hf_packed.dim() != 2:
        raise ValueError(f"torch_bitnet: transformers-packed weight must be 2-D, got shape {tuple(hf_packed.shape)}")
    rows = hf_packed.shape[0]
    if out_features is not None and out_features != 4 * rows:
        raise ValueError(
            f"torch_bitnet: transformers-packed weight of shape {tuple(hf_packed.shape)} holds "
            f"{4 * rows} output rows, but out_features={out_features}"
        )
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=hf_packed.device).view(4, 1, 1)
    codes = (hf_packed.unsqueeze(0) >> shifts) & 3  # (4, R, K): plane i = rows i*R .. i*R+R-1
    if bool((codes == 3).any()):
        raise ValueError("torch_bitnet: transformers-packed weight holds the invalid code 3")
    return codes.reshape(4 * rows, hf_packed.shape[1]).to(torch.int8) - 1


def to_hf_packed(w: torch.Tensor) -> torch.Tensor:
    """Ternary int8 (N, K), N divisible by 4 -> transformers' packed uint8 (N/4, K)."""
    _check_ternary(w, "ternary weight")
    n, k = w.shape
    if n % 4:
        raise ValueError(f"torch_bitnet: transformers' packed layout needs out_features divisible by 4, got {n}")
    codes = (w + 1).to(torch.uint8).view(4, n // 4, k)
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)
