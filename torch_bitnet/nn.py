"""The modules that put torch_bitnet's ops into a model.

* ``BitLinear``: the packed ternary weight, its scale and an optional bias; ``forward`` is one
  ``bitnet::bitlinear`` call.
* ``Int8Embedding`` / ``Int8Linear``: an int8 per-row table (:mod:`torch_bitnet.int8`) read as
  the embedding (``bitnet::int8_embedding``) and multiplied as the lm_head
  (``bitnet::int8_linear``); a tied model holds one table for both.
* ``Int4Embedding`` / ``Int4Linear``: the same for the compact int4 group table
  (:mod:`torch_bitnet.int4`, ``bitnet::int4_embedding`` / ``bitnet::int4_linear``).

All are buffer holders, converted once (at load or patch time) from whatever a checkpoint or
transformers module holds, so ``torch.compile`` sees a single opaque op per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .isa import get_isa
from .int4 import check_int4_sizes, dequantize_int4_rows, int4_shapes, quantize_int4_rows
from .int8 import check_int8_sizes, dequantize_int8_rows, int8_shape, quantize_int8_rows
from .memory import place_weights
from .packing import (
    FORMATS,
    check_features,
    pack_ternary,
    packed_format,
    packed_shape,
    repack,
    ternarize,
    unpack_ternary,
)

__all__ = [
    "BitLinear",
    "Int8Embedding",
    "Int8Linear",
    "Int4Embedding",
    "Int4Linear",
    "resolve_ternary_format",
    "set_ternary_format",
]


class BitLinear(nn.Module):
    """BitNet b1.58 linear layer: ternary weight x int8 activations (quantized inside the op).

    Buffers (all saved in ``state_dict``, in torch_bitnet's packed form):

    * ``weight``: the packed ternary weight (formats in :mod:`torch_bitnet.packing`): uint8
      (out_features, ceil(in_features / 256) * 64) in the 2-bit format, (out_features,
      ceil(in_features / 320), 64) in the 5-trit one, or (ceil(out_features / 32),
      ceil(in_features / 9), 32, 2) in the 3-trit one (``ternary_format``)
    * ``weight_scale``: float32 (1,); the layer's weight is ``W_ternary * weight_scale``
    * ``bias``: float32 (out_features,) or ``None``

    ``rms_norm``: optional module applied to the input first (transformers' BitNet layers with
    ``use_rms_norm=True`` carry one); ``None`` for BitNet b1.58 2B-4T.

    The output has the input's dtype (float32, bfloat16 or float16).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        rms_norm: nn.Module | None = None,
        ternary_format: str = "2bit",
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight",
            torch.zeros(packed_shape(out_features, in_features, ternary_format), dtype=torch.uint8, device=device),
        )
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None
        )
        self.rms_norm = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return ops.bitlinear(x, self.weight, self.weight_scale, self.bias, self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"weight=ternary packed {self.ternary_format} {tuple(self.weight.shape)} uint8"
        )

    @property
    def ternary_format(self) -> str:
        """``"2bit"``, ``"5trit"`` or ``"3trit"``: the format of the packed ``weight``."""
        return packed_format(self.weight)

    # ---- constructors: each converts once, eagerly ----

    @classmethod
    def from_ternary(
        cls,
        weight: torch.Tensor,
        scale: torch.Tensor | float,
        bias: torch.Tensor | None = None,
        rms_norm: nn.Module | None = None,
        ternary_format: str = "2bit",
    ) -> BitLinear:
        """From a ternary integer weight (out_features, in_features) with values in {-1, 0, 1}.

        ``scale``: the float the ternary weight is multiplied by; ``bias`` is added in float32.
        ``ternary_format``: how the weight is packed (``"2bit"``, ``"5trit"`` or ``"3trit"``).
        """
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, bias=bias is not None, device=weight.device, rms_norm=rms_norm,
            ternary_format=ternary_format,
        )
        layer.weight.copy_(pack_ternary(weight, ternary_format))
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if scale.numel() != 1:
            raise ValueError(f"torch_bitnet: BitLinear needs one weight scale per tensor, got {scale.numel()}")
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"torch_bitnet: BitLinear weight scale is not finite ({scale.item()})")
        layer.weight_scale.copy_(scale)
        if bias is not None:
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"torch_bitnet: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
            layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, rms_norm: nn.Module | None = None
    ) -> BitLinear:
        """Absmean-ternarize a float weight (as BitNet training and transformers' online mode do).

        This destroys the quality of weights that were not trained for ternarization; it is
        meant for BitNet-trained master weights.
        """
        wq, scale = ternarize(weight.detach())
        return cls.from_ternary(wq, scale, bias, rms_norm)

    def ternary_weight(self) -> torch.Tensor:
        """The logical ternary weight, int8 (out_features, in_features) (unpacked copy)."""
        return unpack_ternary(self.weight, self.in_features, self.out_features)


def resolve_ternary_format(ternary_format: str = "auto") -> str:
    """The packed format ``ternary_format`` stands for: itself, or for ``"auto"`` the one that
    runs faster on the kernel path in use now: ``"3trit"`` on ``avx512vbmi`` and ``amx`` (the
    paths that decode 3-trit weights by table lookup and prefill them straight from their
    packing), else ``"2bit"`` (the other paths unpack the denser formats on every call). Measured
    at the 2B-4T shape on a 2-core Xeon with AMX (BENCHMARKS.md, "3-trit weights", same-process
    A/Bs): a decode token 1.17x (2 threads) and 1.23x (1 thread) faster than with 5-trit weights,
    whose decode kernel is arithmetic-bound there, and 1.10x faster than with 2-bit ones; prefill
    3-5% slower than both; 58 MB less memory than 2-bit, 46 MB more than 5-trit.

    Raises:
        ValueError: ``ternary_format`` is none of ``"2bit"``, ``"5trit"``, ``"3trit"``, ``"auto"``.
    """
    if ternary_format not in (*FORMATS, "auto"):
        raise ValueError(
            f"torch_bitnet: ternary_format must be one of {', '.join(FORMATS)} or auto, got {ternary_format!r}"
        )
    if ternary_format != "auto":
        return ternary_format
    return "3trit" if get_isa() in ("avx512vbmi", "amx") else "2bit"


def set_ternary_format(model: nn.Module, ternary_format: str) -> nn.Module:
    """Repack every :class:`BitLinear` of ``model`` into ``ternary_format``, in place; returns it.

    ``"2bit"``: 2 bits per weight, the default. ``"5trit"``: 1.6 bits per weight, 20% fewer
    bytes for the ternary weights (104 MB less memory at the 2B-4T shape); its decode kernel
    needs AVX-512 VBMI (the ``avx512vbmi`` and ``amx`` paths) and is arithmetic-bound on the
    Xeon of BENCHMARKS.md (as fast as 2-bit on a Zen 4). ``"3trit"``: 16 bits per 9 weights
    (1.78 bits, 11% fewer bytes than 2-bit), decoded by table lookups (AVX-512 BW) that stream at
    the memory's speed, prefilled on panels decoded straight from the packing (VBMI; on ``amx``
    into the AMX tiles' layout): the fastest decode where both run (BENCHMARKS.md, "3-trit
    weights"). The paths without a format's kernels unpack its weights to 2 bits on every call:
    correct, but slow.
    ``"auto"``: the fastest on the current path (:func:`resolve_ternary_format`).

    Lossless (the same products bit for bit). Done eagerly, once, never inside a compiled graph:
    compile after it (a model compiled before is recompiled, as its weights changed shape).
    """
    ternary_format = resolve_ternary_format(ternary_format)
    for module in model.modules():
        if isinstance(module, BitLinear) and module.ternary_format != ternary_format:
            module.weight = repack(module.weight, module.in_features, ternary_format, module.out_features)
    return place_weights(model)


def _float_table(embedding: nn.Embedding | torch.Tensor, cls: str) -> torch.Tensor:
    """The float table of an ``nn.Embedding`` (or the tensor itself) for ``cls.from_float``."""
    if isinstance(embedding, nn.Embedding):
        if embedding.max_norm is not None:
            raise ValueError(f"torch_bitnet: {cls} does not support nn.Embedding(max_norm=...)")
        return embedding.weight
    if isinstance(embedding, torch.Tensor):
        return embedding
    raise TypeError(
        f"torch_bitnet: {cls}.from_float expects an nn.Embedding or a tensor, got {type(embedding).__name__}"
    )


def _float_weight(
    linear_or_weight: nn.Linear | torch.Tensor, bias: torch.Tensor | None, cls: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of an ``nn.Linear`` or of a weight tensor plus optional bias, for ``cls.from_float``."""
    if isinstance(linear_or_weight, nn.Linear):
        if bias is not None and linear_or_weight.bias is not None:
            raise ValueError(f"torch_bitnet: {cls}.from_float got both a bias and an nn.Linear with one")
        return linear_or_weight.weight, linear_or_weight.bias if bias is None else bias
    if isinstance(linear_or_weight, torch.Tensor):
        return linear_or_weight, bias
    raise TypeError(
        f"torch_bitnet: {cls}.from_float expects an nn.Linear or a tensor, got {type(linear_or_weight).__name__}"
    )


def _linear_from_codes(cls, codes, scale, in_features: int, out_features: int, bias: torch.Tensor | None):
    """A ``cls`` (Int8Linear / Int4Linear) holding quantized codes and scales, plus a float32 bias."""
    layer = cls(in_features, out_features, device="meta")
    layer.weight, layer.weight_scale = codes, scale  # no second copy of the table
    if bias is not None:
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"torch_bitnet: bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        layer.bias = bias.detach().to(device=codes.device, dtype=torch.float32, copy=True)
    return layer


def _tied_linear(cls, embedding: nn.Module, table_cls: type):
    """A ``cls`` lm_head over ``embedding``'s own buffers (``embedding`` must be a ``table_cls``)."""
    if not isinstance(embedding, table_cls):
        raise TypeError(
            f"torch_bitnet: {cls.__name__}.tied_to expects an {table_cls.__name__}, got {type(embedding).__name__}"
        )
    layer = cls(embedding.embedding_dim, embedding.num_embeddings, device="meta")
    layer.weight, layer.weight_scale = embedding.weight, embedding.weight_scale
    return layer


class Int8Embedding(nn.Module):
    """Embedding table stored as int8 per-row codes; ``forward(ids)`` is one ``int8_embedding`` call.

    Buffers (saved in ``state_dict`` in the int8 form of :mod:`torch_bitnet.int8`):

    * ``weight``: uint8 (num_embeddings, ceil(embedding_dim / 64) * 64), the codes w + 128
    * ``weight_scale``: float32 (num_embeddings,); row i is ``(weight[i] - 128) * weight_scale[i]``

    ``output_dtype``: the dtype of the vectors returned (float32, bfloat16 or float16). For a
    tied model, :meth:`Int8Linear.tied_to` builds the lm_head over the same two buffers.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        output_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int8_sizes(embedding_dim, num_embeddings, "Int8Embedding")
        if output_dtype not in ops._FLOAT_DTYPES:
            raise ValueError(
                f"torch_bitnet: Int8Embedding output_dtype must be float32, bfloat16 or float16, got {output_dtype}"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.output_dtype = output_dtype
        shape = int8_shape(num_embeddings, embedding_dim)
        self.register_buffer("weight", torch.full(shape, 128, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(num_embeddings, dtype=torch.float32, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.int8_embedding(ids, self.weight, self.weight_scale, self.embedding_dim, self.output_dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, output_dtype={self.output_dtype}, "
            f"weight=int8 per-row {tuple(self.weight.shape)} uint8"
        )

    @classmethod
    def from_float(
        cls, embedding: nn.Embedding | torch.Tensor, output_dtype: torch.dtype | None = None
    ) -> Int8Embedding:
        """Quantize an ``nn.Embedding`` (or a float (num_embeddings, embedding_dim) table) per row.

        ``output_dtype`` defaults to the table's dtype. ``max_norm`` (renormalising at lookup)
        is not supported; ``padding_idx`` only concerns training and is dropped.
        """
        table = _float_table(embedding, "Int8Embedding")
        codes, scale = quantize_int8_rows(table)
        module = cls(*table.shape, output_dtype=output_dtype or table.dtype, device="meta")
        module.weight, module.weight_scale = codes, scale  # no second copy of the table
        return module

    def dequantize(self) -> torch.Tensor:
        """The table the codes stand for, float32 (num_embeddings, embedding_dim) (a new tensor)."""
        return dequantize_int8_rows(self.weight, self.weight_scale, self.embedding_dim)


class Int8Linear(nn.Module):
    """Linear layer over an int8 per-row weight (the quantized lm_head); int8 activations inside the op.

    Buffers (saved in ``state_dict``):

    * ``weight``: uint8 (out_features, ceil(in_features / 64) * 64), the codes w + 128
      (format in :mod:`torch_bitnet.int8`)
    * ``weight_scale``: float32 (out_features,), one scale per output row
    * ``bias``: float32 (out_features,) or ``None``

    ``forward(x)`` is one ``int8_linear`` call; the output has x's dtype. :meth:`tied_to` makes
    the lm_head of a tied model share an :class:`Int8Embedding`'s buffers (no second table).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        check_int8_sizes(in_features, out_features, "Int8Linear")
        self.in_features = in_features
        self.out_features = out_features
        shape = int8_shape(out_features, in_features)
        self.register_buffer("weight", torch.full(shape, 128, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight, self.weight_scale, self.in_features, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=int8 per-row {tuple(self.weight.shape)} uint8"
        )

    @classmethod
    def from_float(cls, linear_or_weight: nn.Linear | torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantize an ``nn.Linear`` (its bias included) or a float (out_features, in_features) weight.

        ``bias`` (any float dtype, (out_features,)) is for a plain weight; it is kept in float32.
        """
        weight, bias = _float_weight(linear_or_weight, bias, "Int8Linear")
        codes, scale = quantize_int8_rows(weight)
        return _linear_from_codes(cls, codes, scale, weight.shape[1], weight.shape[0], bias)

    @classmethod
    def tied_to(cls, embedding: Int8Embedding) -> Int8Linear:
        """The lm_head of a tied model: logits = h @ table^T over ``embedding``'s own buffers.

        The two modules hold the same ``weight`` / ``weight_scale`` tensors (one copy in
        memory, and ``load_state_dict`` writes both through either).
        """
        return _tied_linear(cls, embedding, Int8Embedding)

    def dequantize(self) -> torch.Tensor:
        """The weight the codes stand for, float32 (out_features, in_features) (a new tensor)."""
        return dequantize_int8_rows(self.weight, self.weight_scale, self.in_features)


class Int4Embedding(nn.Module):
    """Embedding table stored as int4 group codes; ``forward(ids)`` is one ``int4_embedding`` call.

    Buffers (saved in ``state_dict`` in the int4 form of :mod:`torch_bitnet.int4`):

    * ``weight``: uint8 (ceil(num_embeddings / 16), Kp / 8, 64), the codes w + 8, 16 rows
      interleaved per 64-byte line, Kp = ceil(embedding_dim / 64) * 64
    * ``weight_scale``: bfloat16 (num_embeddings, Kp / 32), one scale per group of 32 weights

    4.5 bits per weight (56% of :class:`Int8Embedding`'s bytes, 28% of bf16's), at the cost of
    about 10x the int8 table's rounding error. ``output_dtype``: the dtype of the vectors
    returned (float32, bfloat16 or float16). For a tied model, :meth:`Int4Linear.tied_to`
    builds the lm_head over the same two buffers.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        output_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int4_sizes(embedding_dim, num_embeddings, "Int4Embedding")
        if output_dtype not in ops._FLOAT_DTYPES:
            raise ValueError(
                f"torch_bitnet: Int4Embedding output_dtype must be float32, bfloat16 or float16, got {output_dtype}"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.output_dtype = output_dtype
        codes_shape, scale_shape = int4_shapes(num_embeddings, embedding_dim)
        self.register_buffer("weight", torch.full(codes_shape, 0x88, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(scale_shape, dtype=torch.bfloat16, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.int4_embedding(ids, self.weight, self.weight_scale, self.embedding_dim, self.output_dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, output_dtype={self.output_dtype}, "
            f"weight=int4 groups of 32 {tuple(self.weight.shape)} uint8"
        )

    @classmethod
    def from_float(
        cls, embedding: nn.Embedding | torch.Tensor, output_dtype: torch.dtype | None = None
    ) -> Int4Embedding:
        """Quantize an ``nn.Embedding`` (or a float (num_embeddings, embedding_dim) table) in groups of 32.

        ``output_dtype`` defaults to the table's dtype. ``max_norm`` (renormalising at lookup)
        is not supported; ``padding_idx`` only concerns training and is dropped.
        """
        table = _float_table(embedding, "Int4Embedding")
        codes, scale = quantize_int4_rows(table)
        module = cls(*table.shape, output_dtype=output_dtype or table.dtype, device="meta")
        module.weight, module.weight_scale = codes, scale  # no second copy of the table
        return module

    def dequantize(self) -> torch.Tensor:
        """The table the codes stand for, float32 (num_embeddings, embedding_dim) (a new tensor)."""
        return dequantize_int4_rows(self.weight, self.weight_scale, self.embedding_dim)


class Int4Linear(nn.Module):
    """Linear layer over an int4 group weight (the compact lm_head); int8 activations inside the op.

    Buffers (saved in ``state_dict``):

    * ``weight``: uint8 (ceil(out_features / 16), Kp / 8, 64), the codes w + 8
      (format in :mod:`torch_bitnet.int4`), Kp = ceil(in_features / 64) * 64
    * ``weight_scale``: bfloat16 (out_features, Kp / 32), one scale per group of 32 weights
    * ``bias``: float32 (out_features,) or ``None``

    ``forward(x)`` is one ``int4_linear`` call; the output has x's dtype. :meth:`tied_to` makes
    the lm_head of a tied model share an :class:`Int4Embedding`'s buffers (no second table).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        check_int4_sizes(in_features, out_features, "Int4Linear")
        self.in_features = in_features
        self.out_features = out_features
        codes_shape, scale_shape = int4_shapes(out_features, in_features)
        self.register_buffer("weight", torch.full(codes_shape, 0x88, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(scale_shape, dtype=torch.bfloat16, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int4_linear(x, self.weight, self.weight_scale, self.in_features, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=int4 groups of 32 {tuple(self.weight.shape)} uint8"
        )

    @classmethod
    def from_float(cls, linear_or_weight: nn.Linear | torch.Tensor, bias: torch.Tensor | None = None) -> Int4Linear:
        """Quantize an ``nn.Linear`` (its bias included) or a float (out_features, in_features) weight.

        ``bias`` (any float dtype, (out_features,)) is for a plain weight; it is kept in float32.
        """
        weight, bias = _float_weight(linear_or_weight, bias, "Int4Linear")
        codes, scale = quantize_int4_rows(weight)
        return _linear_from_codes(cls, codes, scale, weight.shape[1], weight.shape[0], bias)

    @classmethod
    def tied_to(cls, embedding: Int4Embedding) -> Int4Linear:
        """The lm_head of a tied model: logits = h @ table^T over ``embedding``'s own buffers.

        The two modules hold the same ``weight`` / ``weight_scale`` tensors (one copy in
        memory, and ``load_state_dict`` writes both through either).
        """
        return _tied_linear(cls, embedding, Int4Embedding)

    def dequantize(self) -> torch.Tensor:
        """The weight the codes stand for, float32 (out_features, in_features) (a new tensor)."""
        return dequantize_int4_rows(self.weight, self.weight_scale, self.in_features)
