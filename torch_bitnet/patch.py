"""Put torch_bitnet's op into existing models.

* :func:`patch` converts the BitNet layers transformers creates when it loads a BitNet
  checkpoint (``AutoBitLinear`` offline or online, ``BitLinear``) into
  :class:`torch_bitnet.nn.BitLinear`, honouring each class's weight-scale convention.
* :func:`replace_linear` ternarizes plain ``nn.Linear`` layers of any model (Llama, Qwen2,
  Mistral, GPT-NeoX...). Ternarizing a model that was not trained for it destroys its
  quality: this path is for BitNet-trained or BitNet-fine-tuned weights, and for measuring
  speed.

Both convert each layer once, eagerly, and drop the layer they replace (its float or
unpacked weight is freed with it).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .fuse import fuse_layers
from .kv_cache import set_kv_cache_dtype
from .memory import place_weights
from .nn import BitLinear, Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from .packing import from_hf_packed
from .training import QATLinear

__all__ = ["patch", "quantize_head", "replace_linear", "convert_module"]

logger = logging.getLogger(__name__)


def _ternary_from_float(weight: torch.Tensor, name: str) -> torch.Tensor:
    """An offline AutoBitLinear's weight holds the ternary values unpacked to float."""
    w = weight.detach()
    wq = w.round()
    if not bool(((wq == w) & (wq.abs() <= 1)).all()):
        raise ValueError(
            f"torch_bitnet: {name}: an offline AutoBitLinear weight must hold only -1, 0 and 1 "
            "(transformers unpacks the packed checkpoint to those values); this one does not. "
            "Was the model loaded with quantization_mode='offline' from a float checkpoint?"
        )
    return wq.to(torch.int8)


def convert_module(module: nn.Module, name: str = "") -> BitLinear | None:
    """The :class:`BitLinear` equivalent of one transformers BitNet layer, or None if it is not one.

    * ``AutoBitLinear`` offline (microsoft/bitnet-b1.58-2B-4T): ternary weight as float,
      ``y = (linear(x_q, W) + b) * weight_scale`` -> scale = weight_scale, bias = b * weight_scale.
    * ``AutoBitLinear`` online (``-bf16`` master weights): absmean-ternarized now, exactly as its
      ``WeightQuant`` does at every forward; ``y = linear(x_q, W_q) + b``.
    * ``BitLinear``: packed uint8 (N/4, K) in transformers' layout,
      ``y = linear(x_q, W) / weight_scale + b`` -> scale = 1 / weight_scale.
    """
    from transformers.integrations.bitnet import AutoBitLinear
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    if isinstance(module, AutoBitLinear):
        rms_norm = module.rms_norm
        if module.online_quant:
            return BitLinear.from_float(module.weight, module.bias, rms_norm)
        scale = module.weight_scale.detach().float()
        bias = None if module.bias is None else module.bias.detach().float() * scale
        return BitLinear.from_ternary(_ternary_from_float(module.weight, name), scale, bias, rms_norm)
    if isinstance(module, HFBitLinear):
        wq = from_hf_packed(module.weight, module.out_features)
        scale = 1.0 / module.weight_scale.detach().float()
        return BitLinear.from_ternary(wq, scale, module.bias, module.rms_norm)
    return None


def patch(
    model: nn.Module, *, kv_cache_dtype: str | None = None, lm_head: str = "int8", fuse: bool = True
) -> nn.Module:
    """Replace every transformers BitNet layer of ``model`` with :class:`torch_bitnet.nn.BitLinear`.

    Handles all the ways transformers 5.x loads BitNet: ``AutoBitLinear`` offline (packed
    checkpoints such as microsoft/bitnet-b1.58-2B-4T, unpacked to float at load), ``AutoBitLinear``
    online (float master weights, ternarized here) and ``BitLinear`` (packed uint8 buffers).
    Norms, embeddings and ``lm_head`` are left as they are. The model is modified in place and
    returned; each replaced layer's float or unpacked weight is freed.

    ``lm_head="int8"`` (default) also quantizes the token embedding and the lm_head per row
    (:func:`quantize_head`), ``"int4"`` to the compact int4 group table; ``"bf16"`` leaves them as
    they are (exact).

    ``fuse=True`` (default) then runs each BitNet decoder layer as four fused ops (norms,
    activation quantization and the relu2 gating inside them: :func:`torch_bitnet.fuse_layers`).

    The model's KV cache then stores keys and values in ``kv_cache_dtype`` (``int8``,
    the default unless ``BITNET_KV_CACHE_DTYPE`` says otherwise, on torch_bitnet's attention
    ops; ``bf16`` / ``fp32`` on SDPA): see :func:`torch_bitnet.kv_cache.set_kv_cache_dtype`.

    Raises:
        ValueError: the model has no BitNet layer to patch, or an offline weight is not ternary.
    """
    converted = 0
    for name, module in list(model.named_modules()):
        new = convert_module(module, name)
        if new is None:
            continue
        model.set_submodule(name, new)
        converted += 1
    if converted == 0:
        raise ValueError(
            "torch_bitnet.patch: the model has no transformers BitNet layer (AutoBitLinear / BitLinear). "
            "Load it with its BitNet quantization_config, or use torch_bitnet.replace_linear for plain "
            "nn.Linear layers."
        )
    logger.info("torch_bitnet.patch: converted %d BitNet layers", converted)
    quantize_head(model, lm_head)
    place_weights(model)
    if fuse:
        fuse_layers(model)
    return set_kv_cache_dtype(model, kv_cache_dtype)


#: the quantized lm_head forms: (embedding module, lm_head module) of each
_HEAD_MODULES = {"int8": (Int8Embedding, Int8Linear), "int4": (Int4Embedding, Int4Linear)}


def quantize_head(model: nn.Module, lm_head: str = "int8") -> nn.Module:
    """Quantize a transformers model's token embedding and lm_head, in place.

    ``lm_head="int8"``: the embedding becomes :class:`torch_bitnet.Int8Embedding` (same output
    dtype) and the lm_head :class:`torch_bitnet.Int8Linear` (int8 per row, half the bytes of
    bf16); ``"int4"``: :class:`torch_bitnet.Int4Embedding` / :class:`torch_bitnet.Int4Linear`
    (4-bit codes with a bf16 scale per 32 weights, 28% of bf16's bytes). A tied lm_head is
    built over the embedding's table, so the model keeps one table. ``"bf16"`` leaves both
    unchanged. Layers already quantized (in either form) are left as they are. Returns the model.
    """
    if lm_head not in ("int8", "int4", "bf16"):
        raise ValueError(f"torch_bitnet: lm_head must be 'int8', 'int4' or 'bf16', got {lm_head!r}")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if lm_head == "bf16" or isinstance(embedding, (Int8Embedding, Int4Embedding)):
        return model
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"torch_bitnet: cannot quantize an input embedding of type {type(embedding).__name__}")
    embedding_cls, head_cls = _HEAD_MODULES[lm_head]
    tied = isinstance(head, nn.Linear) and head.weight.data_ptr() == embedding.weight.data_ptr()
    table = embedding_cls.from_float(embedding)
    model.set_input_embeddings(table)
    if tied:
        model.set_output_embeddings(head_cls.tied_to(table))
    elif isinstance(head, nn.Linear):
        model.set_output_embeddings(head_cls.from_float(head))
    return model


def _default_filter(skip: tuple[str, ...]) -> Callable[[nn.Module, str], bool]:
    def keep(module: nn.Module, fqn: str) -> bool:
        return not any(fqn == s or fqn.endswith("." + s) for s in skip)

    return keep


def _is_master_bitlinear(module: nn.Module) -> bool:
    """transformers' online ``AutoBitLinear`` without an input norm: float master weights (the
    ``-bf16`` checkpoints) computing exactly what a :class:`QATLinear` computes, so QAT can
    fine-tune them in place."""
    from transformers.integrations.bitnet import AutoBitLinear

    return isinstance(module, AutoBitLinear) and module.online_quant and module.rms_norm is None


def replace_linear(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    skip: tuple[str, ...] = ("lm_head",),
    kv_cache_dtype: str | None = None,
    qat: bool = False,
) -> nn.Module:
    """Replace plain ``nn.Linear`` layers with ternary :class:`BitLinear` layers (absmean).

    ``qat=True`` replaces them with :class:`torch_bitnet.training.QATLinear` instead, for
    quantization-aware training or fine-tuning: the float master weights stay (the same
    parameter objects) and train with straight-through estimators, the forward computing
    exactly what the packed layer will; :func:`torch_bitnet.training.to_packed` then packs them.
    With ``qat=True`` transformers' online ``AutoBitLinear`` layers (a ``-bf16`` master-weight
    BitNet checkpoint loaded by transformers) are converted too: that fine-tunes a released
    BitNet from its master weights.

    Args:
        model: any model; modified in place and returned.
        filter_fn: ``filter_fn(module, fqn) -> bool``; only ``nn.Linear`` layers for which it
            returns True are replaced (as in torchao's ``quantize_``). Default: all but ``skip``.
        skip: module names (or name suffixes) left alone when ``filter_fn`` is None; ``lm_head``
            by default.
        kv_cache_dtype: for transformers models (those with a ``config``), how the KV cache
            stores keys and values, as in :func:`patch`; other modules are not affected (nor QAT models, which train on transformers' attention).

    Ternarizing weights that were not trained for it destroys a model's quality; use this for
    BitNet-trained or BitNet-fine-tuned weights, or to measure speed. Warns if nothing matched.
    """
    keep = filter_fn if filter_fn is not None else _default_filter(skip)
    replaced = 0
    for name, module in list(model.named_modules()):
        plain = type(module) is nn.Linear or (qat and _is_master_bitlinear(module))
        if not plain or not keep(module, name):
            continue
        model.set_submodule(name, QATLinear.from_linear(module) if qat else BitLinear.from_float(module.weight, module.bias))
        replaced += 1
    if replaced == 0:
        warnings.warn("torch_bitnet.replace_linear: no nn.Linear layer matched; the model is unchanged", stacklevel=2)
        return model
    if not qat:
        place_weights(model)
    if hasattr(model, "config") and not qat:
        set_kv_cache_dtype(model, kv_cache_dtype)
    return model
