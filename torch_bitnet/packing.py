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

The denser 5-trit format (1.6 bits per weight) packs five weights per byte; it is 3-D, so a
packed tensor's rank says which format it is in (every op and :func:`check_packed` accept both)::

    K is padded to Kp5 = ceil(K / 320) * 320 with w = 0
    packed          : uint8 (N, Kp5 / 320, 64): row n, block b, byte j
    byte j of block b encodes the codes u_i = w + 1 of the 5 weights k = 320*b + 64*i + j
    (i = 0..4) as
        c = 64 * (t // 21) + 21 * u4 + t % 21      with  t = u0 + 3*u1 + 9*u2 + 27*u3  (0..80)

Chunk i of a block is again 64 codes for 64 consecutive weights. The code is chosen for the
AVX-512 VBMI decoder: ``c & 63`` alone gives ``u4 = (c & 63) // 21`` (one 64-entry byte
lookup), and one 256-entry lookup gives u0..u3 as a byte of the 2-bit format
(``u0 | u1 << 2 | u2 << 4 | u3 << 6``), so the 2-bit kernel's arithmetic follows unchanged.
Five zero weights encode as 104 (:data:`TRIT5_ZERO`). 13 of the 256 byte values are never
produced; :func:`unpack_ternary` rejects them, and the kernels read them as a fixed pattern
(u0..u3 = 1, u4 = min(2, (c & 63) // 21)) on every path. :func:`repack` converts between the
formats losslessly.

The 3-trit format (1.78 bits per weight, 16 bits per 9 weights) is 4-D, built for a decode
kernel that looks up sums of activations instead of multiplying (one ``VPERMW`` gives 32 rows'
sums over 3 weights each)::

    K is padded to Kp3 = ceil(K / 9) * 9 with w = 0, N to ceil(N / 32) * 32 with zero rows
    packed          : uint8 (ceil(N / 32), Kp3 / 9, 32, 2): tile t, group j, row r, byte
    the little-endian 16-bit word (t, j, r) holds, at bits 0, 5 and 10, the indices
        i_m = u0 + 3*u1 + 9*u2     (m = 0, 1, 2; 0..26)
    of the codes u = w + 1 of row 32*t + r at k = 9*j + 3*m + (0, 1, 2)

Nine zero weights encode as 13741 (:data:`TRIT3_ZERO`: index 13 three times). Bit 15 is never
set and indices 27-31 never produced; :func:`unpack_ternary` rejects both, and the kernels ignore
bit 15 and read indices 27-31 as three zero weights on every path. The padded rows are zero
weights too; the weight's ``out_features`` is not in its shape, so :func:`unpack_ternary` and
:func:`repack` need it for this format. (The words are viewed as ``int16`` on the host, which is
little-endian on every platform torch_bitnet builds for.)

transformers' layout (``transformers.integrations.bitnet.pack_weights``) is different:
uint8 (N/4, K), packed row r holds original rows r, R+r, 2R+r, 3R+r (R = N/4) in bits
1:0, 3:2, 5:4, 7:6 with the same codes w + 1. ``from_hf_packed`` / ``to_hf_packed`` convert.
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK_K",
    "BLOCK_K5",
    "FORMATS",
    "MAX_IN_FEATURES",
    "TRIT5_ZERO",
    "TRIT3_ZERO",
    "GROUP_K3",
    "TILE_N3",
    "padded_in_features",
    "packed_shape",
    "packed_format",
    "pack_ternary",
    "unpack_ternary",
    "repack",
    "ternarize",
    "from_hf_packed",
    "to_hf_packed",
    "check_features",
    "check_packed",
]

#: weights along K per 64-byte block (2-bit format)
BLOCK_K = 256
#: weights along K per 64-byte block (5-trit format)
BLOCK_K5 = 320
#: weights along K per 16-bit word, and output rows per tile (3-trit format)
GROUP_K3 = 9
TILE_N3 = 32
#: the packed formats, by name
FORMATS = ("2bit", "5trit", "3trit")
#: the 5-trit byte of five zero weights
TRIT5_ZERO = 104
#: the 3-trit word of nine zero weights
TRIT3_ZERO = 13 | 13 << 5 | 13 << 10
#: largest supported in_features: keeps |int32 accumulator| <= 128 * K <= 2**24, so the
#: accumulator converts to float32 exactly (and the AVX-512 partial sums cannot overflow).
MAX_IN_FEATURES = 1 << 17


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"torch_bitnet: unknown packed format {format!r}; choose one of {', '.join(FORMATS)}")


def padded_in_features(in_features: int, format: str = "2bit") -> int:
    """K rounded up to a whole number of blocks of ``format`` (the kernels' K)."""
    _check_format(format)
    block = {"2bit": BLOCK_K, "5trit": BLOCK_K5, "3trit": GROUP_K3}[format]
    return -(-in_features // block) * block


def packed_shape(out_features: int, in_features: int, format: str = "2bit") -> tuple[int, ...]:
    """Shape of the packed uint8 tensor for an (out_features, in_features) weight in ``format``."""
    if format == "5trit":
        return (out_features, padded_in_features(in_features, format) // BLOCK_K5, 64)
    if format == "3trit":
        return (-(-out_features // TILE_N3), padded_in_features(in_features, format) // GROUP_K3, TILE_N3, 2)
    return (out_features, padded_in_features(in_features, format) // 4)


def packed_format(packed: torch.Tensor) -> str:
    """The format of a packed weight, from its rank: ``"3trit"`` if 4-D, ``"5trit"`` if 3-D, else
    ``"2bit"``."""
    return {4: "3trit", 3: "5trit"}.get(packed.dim(), "2bit")


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
    """Raise TypeError/ValueError unless ``packed`` is a valid packed weight for the sizes,
    in any format (2-D: 2-bit, 3-D: 5-trit, 4-D: 3-trit).

    The same checks, with the same messages, as the C++ operators and their fake kernels.
    """
    check_features(in_features, out_features)
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"bitnet: packed weight must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"bitnet: packed weight must be uint8, got {packed.dtype}")
    if tuple(packed.shape) != packed_shape(out_features, in_features, packed_format(packed)):
        raise ValueError(
            f"bitnet: packed weight has shape {tuple(packed.shape)}, expected "
            f"{packed_shape(out_features, in_features)} (2-bit), "
            f"{packed_shape(out_features, in_features, '5trit')} (5-trit) or "
            f"{packed_shape(out_features, in_features, '3trit')} (3-trit) for "
            f"in_features={in_features}, out_features={out_features}"
        )


def _check_ternary(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"torch_bitnet: {what} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if w.dtype.is_floating_point or w.dtype.is_complex or w.dtype == torch.bool:
        raise TypeError(f"torch_bitnet: {what} must be an integer tensor with values in {{-1, 0, 1}}, got {w.dtype}")
    if w.numel() and (w.min() < -1 or w.max() > 1):
        raise ValueError(f"torch_bitnet: {what} has values outside {{-1, 0, 1}}")


def pack_ternary(w: torch.Tensor, format: str = "2bit") -> torch.Tensor:
    """Pack a ternary integer matrix (N, K) with values in {-1, 0, 1} into ``format``.

    2-bit: uint8 (N, Kp/4); 5-trit: uint8 (N, Kp5/320, 64); 3-trit: uint8 (ceil(N/32), Kp3/9,
    32, 2). Lossless: ``unpack_ternary(pack_ternary(w, format), K, N) == w``.
    """
    _check_format(format)
    _check_ternary(w, "ternary weight")
    n, k = w.shape
    check_features(k, n)
    kp = padded_in_features(k, format)
    codes = torch.ones((n, kp), dtype=torch.uint8, device=w.device)
    codes[:, :k] = (w + 1).to(torch.uint8)
    if format == "5trit":
        # (N, blocks, chunk i, byte j) -> byte j gets the 5 chunks' codes as one base-3 code
        u = codes.view(n, kp // BLOCK_K5, 5, 64)
        t = u[:, :, 0] + 3 * u[:, :, 1] + 9 * u[:, :, 2] + 27 * u[:, :, 3]
        return (64 * (t // 21) + 21 * u[:, :, 4] + t % 21).contiguous()
    if format == "3trit":
        # (N_pad, groups j, index m, code d) -> word (tile, j, row) of the indices at bits 5m
        tiles = -(-n // TILE_N3)
        padded = torch.ones((tiles * TILE_N3, kp), dtype=torch.int32, device=w.device)
        padded[:n] = codes
        u = padded.view(tiles * TILE_N3, kp // GROUP_K3, 3, 3)
        idx = u[..., 0] + 3 * u[..., 1] + 9 * u[..., 2]
        words = (idx[..., 0] | idx[..., 1] << 5 | idx[..., 2] << 10).to(torch.int16)
        words = words.view(tiles, TILE_N3, kp // GROUP_K3).transpose(1, 2).contiguous()
        return words.view(torch.uint8).view(tiles, kp // GROUP_K3, TILE_N3, 2)
    # (N, blocks, plane i, byte j) -> byte j gets plane i at bits 2i+1:2i
    planes = codes.view(n, kp // BLOCK_K, 4, 64)
    packed = planes[:, :, 0] | (planes[:, :, 1] << 2) | (planes[:, :, 2] << 4) | (planes[:, :, 3] << 6)
    return packed.reshape(n, kp // 4).contiguous()


def _codes(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed weight (any format) -> (codes uint8 (N, Kp) in logical K order, bool (N, Kp):
    the byte or word holding the code is one no weights encode to). 3-trit: all ceil(N/32) * 32
    rows."""
    n = packed.shape[0]
    if packed_format(packed) == "3trit":
        tiles, groups = packed.shape[0], packed.shape[1]
        words = packed.view(torch.int16).view(tiles, groups, TILE_N3).to(torch.int32) & 0xFFFF
        words = words.transpose(1, 2).reshape(tiles * TILE_N3, groups, 1)
        idx = (words >> torch.tensor([0, 5, 10], dtype=torch.int32, device=packed.device)) & 31  # (rows, j, m)
        digits = torch.stack([idx % 3, idx // 3 % 3, idx // 9], dim=3)  # (rows, j, m, d)
        bad = ((idx >= 27) | (words >= 1 << 15)).unsqueeze(3).expand(digits.shape)
        return digits.to(torch.uint8).reshape(tiles * TILE_N3, -1), bad.reshape(tiles * TILE_N3, -1)
    if packed_format(packed) == "5trit":
        c = packed.to(torch.int16)
        low = c & 63
        t = 21 * (c >> 6) + low % 21
        digits = torch.stack([t % 3, t // 3 % 3, t // 9 % 3, t // 27, low // 21], dim=2)  # (N, blocks, 5, 64)
        bad = ((low == 63) | (t > 80)).unsqueeze(2).expand(digits.shape)
        return digits.to(torch.uint8).reshape(n, -1), bad.reshape(n, -1)
    row_bytes = packed.shape[1]
    blocks = packed.view(n, row_bytes // 64, 1, 64)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    codes = ((blocks >> shifts) & 3).reshape(n, row_bytes * 4)
    return codes, codes == 3


def _out_features(packed: torch.Tensor, out_features: int | None) -> int:
    """out_features of a packed weight: given, or its row count (2-bit, 5-trit); a 3-trit weight's
    shape holds only ceil(N / 32)."""
    if out_features is not None:
        return out_features
    if packed_format(packed) == "3trit":
        raise ValueError("torch_bitnet: a 3-trit packed weight needs out_features (its shape holds ceil(N / 32) tiles)")
    return packed.shape[0]


def unpack_ternary(packed: torch.Tensor, in_features: int, out_features: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`, any format: packed -> int8 (N, in_features).

    ``out_features`` (N) defaults to the 2-bit or 5-trit weight's row count; a 3-trit weight needs
    it. Raises ValueError if the packed data holds a code no weight encodes to (3 in the 2-bit
    format) or non-zero padding.
    """
    if packed.dim() not in (2, 3, 4):
        raise ValueError(
            "torch_bitnet: packed weight must be 2-D (2-bit), 3-D (5-trit) or 4-D (3-trit), got shape "
            f"{tuple(packed.shape)}"
        )
    n = _out_features(packed, out_features)
    check_packed(packed, in_features, n)
    codes, bad = _codes(packed.contiguous())
    if bool(bad.any()):
        if packed_format(packed) == "5trit":
            raise ValueError("torch_bitnet: packed 5-trit weight holds a byte that encodes no five ternary weights")
        if packed_format(packed) == "3trit":
            raise ValueError("torch_bitnet: packed 3-trit weight holds a word that encodes no nine ternary weights")
        raise ValueError("torch_bitnet: packed weight holds the invalid code 3 (only 0, 1, 2 encode -1, 0, +1)")
    if bool((codes[:, in_features:] != 1).any()):
        raise ValueError("torch_bitnet: packed weight has non-zero values in the K padding")
    if bool((codes[n:] != 1).any()):
        raise ValueError("torch_bitnet: packed 3-trit weight has non-zero values in the rows past out_features")
    return codes[:n, :in_features].to(torch.int8) - 1


def repack(packed: torch.Tensor, in_features: int, format: str, out_features: int | None = None) -> torch.Tensor:
    """A packed weight (any format) converted to ``format``, losslessly; ``packed`` itself if it
    already is in that format. ``out_features`` as for :func:`unpack_ternary`. Done once when a
    model is loaded or patched, never inside a compiled graph."""
    _check_format(format)
    if packed_format(packed) == format:
        check_packed(packed, in_features, _out_features(packed, out_features))
        return packed
    return pack_ternary(unpack_ternary(packed, in_features, out_features), format)


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
