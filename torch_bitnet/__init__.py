"""torch_bitnet: BitNet b1.58 inference on CPUs as PyTorch custom operators.

Public API:

* ops (``torch.ops.bitnet.*``, with typed wrappers): :func:`quantize_act`,
  :func:`ternary_mm`, :func:`bitlinear`, :func:`stream_max`
* the packed weight format: :mod:`torch_bitnet.packing`
* plain-PyTorch semantics of every op: :mod:`torch_bitnet.reference`
* SIMD path control: :func:`available_isas`, :func:`get_isa`, :func:`set_isa`, :func:`use_isa`
"""

from . import packing, reference
from .isa import available_isas, get_isa, set_isa, use_isa
from .ops import bitlinear, quantize_act, stream_max, ternary_mm
from .packing import from_hf_packed, pack_ternary, ternarize, to_hf_packed, unpack_ternary

__version__ = "0.1.0"

__all__ = [
    "available_isas",
    "bitlinear",
    "from_hf_packed",
    "get_isa",
    "pack_ternary",
    "packing",
    "quantize_act",
    "reference",
    "set_isa",
    "stream_max",
    "ternarize",
    "ternary_mm",
    "to_hf_packed",
    "unpack_ternary",
    "use_isa",
]
