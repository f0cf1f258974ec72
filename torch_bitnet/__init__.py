"""torch_bitnet: BitNet b1.58 inference on CPUs as PyTorch custom operators.

Public API:

* ops (``torch.ops.bitnet.*``, with typed wrappers): :func:`quantize_act`,
  :func:`ternary_mm`, :func:`bitlinear` (optionally with its input's RMSNorm fused in), the
  shared-input forms :func:`bitlinear_shared` (q/k/v) and :func:`bitlinear_relu2_glu`
  (gate/up + squared-ReLU gating), :func:`stream_max`, the int8 lm_head / embedding
  ops :func:`int8_linear`, :func:`int8_embedding`, their compact int4 counterparts
  :func:`int4_linear`, :func:`int4_embedding`, the int8 KV cache ops
  :func:`kv_cache_write`, :func:`int8_attention`, and a whole decoder layer over that cache,
  :func:`decoder_layer`
* the packed weight format: :mod:`torch_bitnet.packing`; the int8 per-row table of the
  lm_head / embedding: :mod:`torch_bitnet.int8` (:func:`quantize_int8_rows`), and the int4
  group table: :mod:`torch_bitnet.int4` (:func:`quantize_int4_rows`)
* plain-PyTorch semantics of every op: :mod:`torch_bitnet.reference`
* SIMD path control: :func:`available_isas`, :func:`get_isa`, :func:`set_isa`, :func:`use_isa`
* models: :class:`BitLinear` (the module), :class:`Int8Embedding` / :class:`Int8Linear` (the
  int8 embedding table and lm_head, tied with :meth:`Int8Linear.tied_to`), their int4
  counterparts :class:`Int4Embedding` / :class:`Int4Linear`, :func:`patch`
  (transformers BitNet models), :func:`replace_linear` (plain nn.Linear layers), :func:`fuse_layers`
  (BitNet decoder layers as four fused ops; done by ``patch`` / ``from_pretrained``), :func:`from_pretrained`,
  :func:`save_pretrained`, :func:`convert_checkpoint`
* training: :mod:`torch_bitnet.training` (quantization-aware training with straight-through
  estimators: ``replace_linear(model, qat=True)``, :func:`training.to_packed`,
  :func:`training.export_checkpoint` in the 2B-4T format, :func:`training.perplexity`)
* :data:`DEFAULT_MODEL`: the directory of the built-in default model (a small BitNet b1.58
  trained on the King James Bible), for :func:`from_pretrained` and the command line
* generation: :func:`generate` (static KV cache, compiled decode step), :class:`GenerationResult`
* the KV cache of patched models (int8 on :func:`int8_attention`, or float on SDPA):
  :mod:`torch_bitnet.kv_cache`, :func:`set_kv_cache_dtype`
"""

from . import int4, int8, kv_cache, packing, reference, training
from .cli import DEFAULT_MODEL
from .fuse import fuse_layers
from .generate import GenerationResult, generate
from .kv_cache import set_kv_cache_dtype
from .isa import available_isas, get_isa, set_isa, use_isa
from .loading import convert_checkpoint, from_pretrained, save_pretrained
from .int4 import dequantize_int4_rows, quantize_int4_rows
from .int8 import dequantize_int8_rows, quantize_int8_rows
from .nn import BitLinear, Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from .nn import resolve_ternary_format, set_ternary_format
from .ops import (
    bitlinear,
    bitlinear_relu2_glu,
    bitlinear_shared,
    decoder_layer,
    int4_embedding,
    int4_linear,
    int8_attention,
    int8_embedding,
    int8_linear,
    kv_cache_write,
    quantize_act,
    stream_max,
    ternary_mm,
)
from .memory import place_weights
from .packing import from_hf_packed, pack_ternary, repack, ternarize, to_hf_packed, unpack_ternary
from .patch import patch, replace_linear

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "BitLinear",
    "Int4Embedding",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "available_isas",
    "convert_checkpoint",
    "decoder_layer",
    "from_pretrained",
    "GenerationResult",
    "generate",
    "dequantize_int4_rows",
    "dequantize_int8_rows",
    "int4",
    "int4_embedding",
    "int4_linear",
    "int8",
    "int8_attention",
    "int8_embedding",
    "int8_linear",
    "kv_cache",
    "kv_cache_write",
    "patch",
    "replace_linear",
    "save_pretrained",
    "bitlinear",
    "bitlinear_relu2_glu",
    "bitlinear_shared",
    "from_hf_packed",
    "fuse_layers",
    "get_isa",
    "pack_ternary",
    "packing",
    "place_weights",
    "quantize_act",
    "quantize_int4_rows",
    "quantize_int8_rows",
    "reference",
    "repack",
    "resolve_ternary_format",
    "set_isa",
    "set_kv_cache_dtype",
    "set_ternary_format",
    "stream_max",
    "ternarize",
    "ternary_mm",
    "to_hf_packed",
    "training",
    "unpack_ternary",
    "use_isa",
]
