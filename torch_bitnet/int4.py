"""The int4 group weight format of the compact lm_head / embedding ops (``int4_linear``, ``int4_embedding``).

Format (the same on every ISA; pinned by ``tests/test_int4_head.py::test_golden_bytes``)::

    float weight W  : (N, K)                   N rows (vocabulary / out_features), K = hidden size
    Kp              = ceil(K / 64) * 64        K padded with zero weights
    group           : 32 consecutive weights of a row, k in [32 g, 32 g + 32), g < Kp / 32
    scale           : bfloat16 (N, Kp / 32), scale[n, g] = max_k |W[n, k]| / 7 over the group,
                      rounded UP to bfloat16 (0 for an all-zero group, and for the padding)
    w               : round_half_even(W[n, k] / scale[n, g]) in [-7, 7]   (0 where the scale is 0)
    u               : w + 8 in [1, 15]         (8 in the padding: rows >= N, k >= K)
    codes           : uint8 (ceil(N / 16), Kp / 8, 64): rows in tiles of 16, interleaved

    W[n, k] ~ (u[n, k] - 8) * scale[n, k // 32]          (error <= scale / 2 per element)

One 64-byte line ``codes[t, c]`` holds 8 consecutive weights (k0 = 8 c .. k0 + 7) of the 16 rows
of tile t (rows 16 t + r)::

    byte 4r+j  (r = 0..15, j = 0..3):   bits 7:4 = u[16t + r, k0 + 4 + j]   bits 3:0 = u[16t + r, k0 + j]

    byte:   0    1    2    3    4    5  ...  63
    lo:    r0   r0   r0   r0   r1   r1  ...  r15      k0 + 0, 1, 2, 3, 0, 1, ... 3
    hi:    r0   r0   r0   r0   r1   r1  ...  r15      k0 + 4, 5, 6, 7, 4, 5, ... 7

    lo = line & 0x0F         -> dword lane r = u[row r, k0 .. k0+3]
    hi = (line >> 4) & 0x0F  -> dword lane r = u[row r, k0+4 .. k0+7]

Why these choices:

* 4-bit codes with one scale per 32 weights: 4.5 bits per weight (codes 4, scales 16 / 32),
  56% of the int8 table's bytes; a decode step streams the whole table, so its time follows
  the bytes. A per-group scale follows the local magnitude (a row-wide scale over 15 levels
  would waste most of them on the row's largest element);
* scales in bfloat16 rounded up: float32's range (any table quantizes), half its bytes, and
  never smaller than max|W| / 7, so no weight is clipped; the rounding costs at most 0.8% of a
  step. Converting bf16 to float32 is a shift, on every ISA;
* codes = w + 8: the weight is the unsigned operand of x86's u8 x s8 multiply-adds (AVX-512
  VNNI ``vpdpbusd``; AVX2 ``vpmaddubsw``, where |pair| <= 2 * 15 * 128 never saturates);
  ``sum_k u x = sum_k w x + 8 sum_k x``, and each group's accumulator starts at -8 times the
  group's activation sum;
* 16 rows interleaved, 4 weights per row in each dword: one ``vpdpbusd`` multiplies the 64
  low nibbles of a line (16 rows x 4 weights) with 4 activations broadcast to every lane, so
  the 16 lanes are 16 output rows and a group's int32 dot products need no horizontal sum;
  the float32 sum over groups is then lane-wise, in group order, on every ISA. Both nibble
  planes unpack with one shift and a mask, and a tile is one contiguous stream of
  16 x Kp / 2 bytes (decode reads the table in a single sequential pass per tile);
* scales by logical row, (N, Kp / 32): N is explicit (the embedding checks ids against it),
  and row n's scales are one contiguous run; the kernels load a tile's 16 runs (32 groups at a
  time) and transpose them in registers, so a group's 16 scales sit one per lane, like its sums.

One pair of buffers serves both ops: the embedding reads row ``id`` (``int4_embedding``), the
lm_head multiplies by all of them (``int4_linear``), so a tied model stores the table once.
"""

from __future__ import annotations

import torch

__all__ = [
    "GROUP_SIZE",
    "ROW_TILE",
    "BLOCK_K",
    "MAX_FEATURES",
    "padded_features",
    "int4_shapes",
    "check_int4_sizes",
    "check_int4_weight",
    "quantize_int4_rows",
    "dequantize_int4_rows",
    "unpack_int4_codes",
]

#: weights per scale
GROUP_SIZE = 32
#: rows interleaved in one 64-byte line
ROW_TILE = 16
#: the padding unit of K: two groups, so every row holds an even number of bf16 scales (the
#: kernels fetch them as 32-bit pairs, which then never straddle two rows)
BLOCK_K = 64
#: largest K, as for the int8 table (the int32 activation sums stay exact)
MAX_FEATURES = 1 << 16
#: rows converted at a time by quantize_int4_rows (a multiple of ROW_TILE): bounds its float32
#: temporaries to a few times 64 MB at K = 4096
_QUANTIZE_CHUNK_ROWS = 4096


def padded_features(features: int) -> int:
    """K rounded up to a multiple of :data:`BLOCK_K`."""
    return -(-features // BLOCK_K) * BLOCK_K


def int4_shapes(rows: int, features: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """(shape of the uint8 codes, shape of the bfloat16 scales) of a (rows, features) weight."""
    kp = padded_features(features)
    return (-(-rows // ROW_TILE), kp // 8, 64), (rows, kp // GROUP_SIZE)


def check_int4_sizes(features: int, rows: int, what: str = "int4_linear") -> None:
    """Raise ValueError unless (features K, rows N) is a size the int4 kernels support."""
    if features < 1 or rows < 1:
        raise ValueError(f"bitnet: {what} sizes must be >= 1, got {features} features and {rows} rows")
    if features > MAX_FEATURES:
        raise ValueError(
            f"bitnet: {what} has {features} features; the supported maximum is {MAX_FEATURES} "
            "(int32 accumulation must stay exact)"
        )


def check_int4_weight(weight: torch.Tensor, scale: torch.Tensor, features: int, rows: int, what: str) -> None:
    """Raise TypeError/ValueError unless (weight, scale) hold a valid int4 table of (rows, features).

    The same checks and messages as the C++ operators (and so as their fake kernels).
    """
    check_int4_sizes(features, rows, what)
    if weight.dtype != torch.uint8:
        raise TypeError(f"bitnet: {what} weight must be uint8 codes, got {weight.dtype}")
    codes_shape, scale_shape = int4_shapes(rows, features)
    if tuple(weight.shape) != codes_shape:
        raise ValueError(f"bitnet: {what} weight has shape {tuple(weight.shape)}, expected {codes_shape}")
    if scale.dtype != torch.bfloat16 or tuple(scale.shape) != scale_shape:
        raise ValueError(
            f"bitnet: {what} scale must be bfloat16 of shape {scale_shape}, got {scale.dtype} of shape "
            f"{tuple(scale.shape)}"
        )


def _bf16_at_least(s: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= s, for finite s >= 0 (float32)."""
    b = s.to(torch.bfloat16)  # nearest
    # For a non-negative bf16, bits + 1 is the next value up (0 -> the smallest subnormal);
    # s <= float32 max / 7 keeps it finite.
    return torch.where(b.float() < s, (b.view(torch.int16) + 1).view(torch.bfloat16), b)


def _interleave(u: torch.Tensor) -> torch.Tensor:
    """Codes u uint8 (16 T, Kp) -> the tiled layout (T, Kp / 8, 64)."""
    rows, kp = u.shape
    v = u.view(rows // ROW_TILE, ROW_TILE, kp // 8, 2, 4)  # (tile, r, line, nibble plane, j)
    byte = v[:, :, :, 0, :] | (v[:, :, :, 1, :] << 4)  # (tile, r, line, j)
    return byte.permute(0, 2, 1, 3).reshape(rows // ROW_TILE, kp // 8, 64)


def unpack_int4_codes(codes: torch.Tensor, rows: int) -> torch.Tensor:
    """The tiled codes (T, Kp / 8, 64) -> uint8 codes u (rows, Kp) in row order (a new tensor)."""
    tiles, lines, _ = codes.shape
    b = codes.reshape(tiles, lines, ROW_TILE, 4)  # (tile, line, r, j)
    u = torch.stack([b & 0x0F, b >> 4], dim=3)  # (tile, line, r, nibble plane, j)
    return u.permute(0, 2, 1, 3, 4).reshape(tiles * ROW_TILE, lines * 8)[:rows]


def quantize_int4_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight (N, K) -> (codes uint8 (ceil(N/16), Kp/8, 64), scale bfloat16 (N, Kp/32)).

    In the format above, computed in float32 (``W.float() / scale``, one rounding, then round
    half to even), a few thousand rows at a time so a 128256 x 2560 bf16 table never has a
    full float32 copy. Raises ValueError for NaN / Inf weights.
    """
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"torch_bitnet: quantize_int4_rows expects a floating-point tensor, got {got}")
    if weight.dim() != 2:
        raise ValueError(
            f"torch_bitnet: quantize_int4_rows expects a 2-D (N, K) weight, got shape {tuple(weight.shape)}"
        )
    n, k = weight.shape
    check_int4_sizes(k, n, "quantize_int4_rows")
    kp = padded_features(k)
    codes_shape, scale_shape = int4_shapes(n, k)
    codes = torch.empty(codes_shape, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(scale_shape, dtype=torch.bfloat16, device=weight.device)
    for r0 in range(0, n, _QUANTIZE_CHUNK_ROWS):
        chunk = weight[r0 : r0 + _QUANTIZE_CHUNK_ROWS].detach()
        rows = chunk.shape[0]
        # float32 (rows up to a whole tile, Kp), zero in the padding; divided in place below
        w = torch.zeros(rows + -rows % ROW_TILE, kp, dtype=torch.float32, device=weight.device)
        w[:rows, :k] = chunk
        if not bool(torch.isfinite(w).all()):
            raise ValueError("torch_bitnet: quantize_int4_rows: the weight has NaN or Inf values")
        groups = w.view(-1, kp // GROUP_SIZE, GROUP_SIZE)
        s = _bf16_at_least(groups.abs().amax(dim=2) / 7.0)
        sf = s.float()
        safe = torch.where(sf > 0, sf, torch.ones_like(sf)).unsqueeze(2)  # zero groups: w / 1 = 0
        u = groups.div_(safe).round_().clamp_(-7, 7).add_(8).to(torch.uint8).view(-1, kp)
        codes[r0 // ROW_TILE : r0 // ROW_TILE + u.shape[0] // ROW_TILE] = _interleave(u)
        scale[r0 : r0 + rows] = s[:rows]
    return codes, scale


def dequantize_int4_rows(codes: torch.Tensor, scale: torch.Tensor, features: int) -> torch.Tensor:
    """Inverse of :func:`quantize_int4_rows`: float32 (N, features) = (u - 8) * scale, N = scale rows.

    The same float32 products ``int4_embedding`` computes (one rounding each).
    """
    rows = scale.shape[0] if scale.dim() == 2 else 0
    check_int4_weight(codes, scale, features, rows, "dequantize_int4_rows")
    w = unpack_int4_codes(codes, rows)[:, :features].float() - 8.0
    return w * scale.float().repeat_interleave(GROUP_SIZE, dim=1)[:, :features]
