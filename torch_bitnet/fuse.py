"""Fused BitNet decoder layers: fewer passes over the activations, fewer op calls.

A transformers ``BitNetDecoderLayer`` whose projections are :class:`torch_bitnet.nn.BitLinear`
runs, per layer, four RMSNorms, seven bitlinear calls (each quantizing its input) and the
squared-ReLU gating as separate ops. :func:`fuse_layers` gives such layers a forward that
computes the same thing with four ops:

* ``bitlinear_shared``: input_layernorm + one activation quantization + the q, k, v products;
* ``bitlinear``        with ``attn_sub_norm`` fused in: the o projection;
* ``bitlinear_relu2_glu``: post_attention_layernorm + one quantization + gate, up and
  ``relu(gate)^2 * up``;
* ``bitlinear``        with ``ffn_sub_norm`` fused in: the down projection.

On an int8 KV cache layer (torch_bitnet's static or dynamic one) the whole layer, those four
ops with the rotary embedding, the cache write, the attention and the residual adds between
them, is one ``bitnet::decoder_layer`` call (:func:`torch_bitnet.ops.decoder_layer`), with the
same result bit for bit: a compiled decode step then spends its time in kernels rather than in
~10 op and kernel calls per layer (2B-4T, 2 threads: 0.9 ms, 3% of a token). Float caches
and training keep the four ops, with transformers' attention functions.

The modules themselves are unchanged (same submodules, buffers and ``state_dict`` keys): only
the layer's class is swapped for a subclass overriding ``forward``, so saving, loading and
``patch`` work as before. Outputs equal the unfused layer's up to the RMSNorm's mean of
squares, which the fused ops sum in float64 (:func:`torch_bitnet.reference.rms_norm`) where
transformers sums in float32: about one float32 ulp of the variance, which may move an
activation across a quantization boundary now and then.

Why: in eager mode (prefill, ``model.generate`` without compile) each norm and the gating are
several full passes over (tokens, 6912) tensors (the 2B-4T MLP width): they cost ~1.2 s of a
4.2 s 512-token prefill on 2 threads. In a compiled decode step they are small kernels and
op calls of their own at every layer.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from . import ops
from .kv_cache import Int8DynamicLayer, Int8StaticLayer, KVShape
from .nn import BitLinear
from .reference import rope

logger = logging.getLogger("torch_bitnet")

__all__ = ["fuse_layers", "is_fused"]

_FUSED_CLASSES: dict[type, type] = {}


def _plain(layer: nn.Module) -> bool:
    """A BitLinear the fused ops can take: no bias, no norm module of its own."""
    return isinstance(layer, BitLinear) and layer.bias is None and layer.rms_norm is None


def _norm_weight(norm: nn.Module, dtype: torch.dtype) -> bool:
    return (
        type(norm).__name__.endswith("RMSNorm")
        and isinstance(getattr(norm, "weight", None), torch.Tensor)
        and norm.weight.dtype == dtype
        and isinstance(getattr(norm, "variance_epsilon", None), float)
    )


def unfusable_reason(layer: nn.Module, dtype: torch.dtype) -> str | None:
    """Why ``layer`` (a transformers BitNet decoder layer) cannot be fused for activations of
    ``dtype``, or None if it can."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return "not a decoder layer with self_attn and mlp"
    projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(_plain(p) for p in projections):
        return "its projections are not all bias-free torch_bitnet BitLinear layers"
    if type(getattr(mlp, "act_fn", None)).__name__ != "ReLUSquaredActivation":
        return f"its MLP activation is {type(getattr(mlp, 'act_fn', None)).__name__}, not relu2"
    norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.attn_sub_norm, mlp.ffn_sub_norm)
    if not all(_norm_weight(n, dtype) for n in norms):
        return f"its RMSNorm weights are not all {dtype}"
    return None


def _int8_layer(cache, layer_idx: int):
    """The int8 cache layer (:class:`Int8StaticLayer` / :class:`Int8DynamicLayer`) of
    ``layer_idx`` in a transformers cache, or None."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, (Int8StaticLayer, Int8DynamicLayer)) else None


class _FusedDecoderLayer:
    """Mixin of the fused forward; combined with the layer's own class by :func:`fuse_layers`."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,  # the cache argument's name from transformers 5.24 on
        **kwargs,
    ) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = cache if cache is not None else past_key_values
        attn, mlp = self.self_attn, self.mlp
        int8_layer = None if attn.training else _int8_layer(cache, attn.layer_idx)
        if int8_layer is not None:
            return self._one_op(hidden_states, attention_mask, position_embeddings, int8_layer)
        q_proj, k_proj, v_proj, o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        norm = self.input_layernorm

        # Attention: hidden_states (B, Q, hidden) -> q (B, H, Q, D), k / v (B, KVH, Q, D).
        residual = hidden_states
        q, k, v = ops.bitlinear_shared(
            hidden_states,
            [q_proj.weight, k_proj.weight, v_proj.weight],
            [q_proj.weight_scale, k_proj.weight_scale, v_proj.weight_scale],
            q_proj.in_features,
            [q_proj.out_features, k_proj.out_features, v_proj.out_features],
            norm.weight,
            norm.variance_epsilon,
        )
        input_shape = hidden_states.shape[:-1]
        head_shape = (*input_shape, -1, attn.head_dim)
        q, k, v = (t.view(head_shape).transpose(1, 2) for t in (q, k, v))
        cos, sin = position_embeddings
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn.config._attn_implementation, sys.modules[type(attn).__module__].eager_attention_forward
        )
        out, _ = attention(
            attn,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not attn.training else attn.attention_dropout,
            scaling=attn.scaling,
            position_ids=position_ids,
            use_cache=use_cache,
            **kwargs,
        )  # (B, Q, H, D)
        sub_norm = attn.attn_sub_norm
        out = ops.bitlinear(
            out.reshape(*input_shape, -1),
            o_proj.weight,
            o_proj.weight_scale,
            None,
            o_proj.in_features,
            o_proj.out_features,
            sub_norm.weight,
            sub_norm.variance_epsilon,
        )
        hidden_states = residual + out

        # MLP: down(ffn_sub_norm(relu(gate(x))^2 * up(x))), x = post_attention_layernorm(h).
        residual = hidden_states
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        norm, sub_norm = self.post_attention_layernorm, mlp.ffn_sub_norm
        gated = ops.bitlinear_relu2_glu(
            hidden_states,
            gate.weight,
            gate.weight_scale,
            up.weight,
            up.weight_scale,
            gate.in_features,
            gate.out_features,
            norm.weight,
            norm.variance_epsilon,
        )
        out = ops.bitlinear(
            gated,
            down.weight,
            down.weight_scale,
            None,
            down.in_features,
            down.out_features,
            sub_norm.weight,
            sub_norm.variance_epsilon,
        )
        return residual + out

    def _one_op(self, hidden_states, attention_mask, position_embeddings, int8_layer) -> torch.Tensor:
        """The whole layer as one ``bitnet::decoder_layer`` call, on an int8 cache layer: the
        same result as the forward above (the same ops inside, in the same order), with one
        op call instead of ten op and kernel calls (what a decode step spends most of its time
        outside the kernels on)."""
        attn, mlp = self.self_attn, self.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        norms = (self.input_layernorm, attn.attn_sub_norm, self.post_attention_layernorm, mlp.ffn_sub_norm)
        batch, count = hidden_states.shape[:2]
        kv_heads = attn.k_proj.out_features // attn.head_dim
        positions = int8_layer.reserve(
            KVShape(batch, kv_heads, count, attn.head_dim, hidden_states.dtype, hidden_states.device)
        )
        cos, sin = (t.expand(batch, count, attn.head_dim) for t in position_embeddings)  # (1 or B, Q, D)
        return ops.decoder_layer(
            hidden_states,
            [p.weight for p in projections],
            [p.weight_scale for p in projections],
            [n.weight for n in norms],
            [n.variance_epsilon for n in norms],
            cos,
            sin,
            int8_layer.keys,
            int8_layer.key_scales,
            int8_layer.values,
            int8_layer.value_scales,
            positions,
            attn.scaling,
            attn.q_proj.out_features // attn.head_dim,
            mlp.gate_proj.out_features,
            attention_mask,
        )


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        name = f"Fused{cls.__name__}"
        fused = type(name, (_FusedDecoderLayer, cls), {"__module__": __name__})
        # Reachable as torch_bitnet.fuse.<name>, so pickle can name it: the ahead-of-time
        # compiled decode step (torch_bitnet.generate) serializes its guards, which name the
        # layers' classes. (One base class per name: transformers has one BitNetDecoderLayer.)
        globals()[name] = fused
        _FUSED_CLASSES[cls] = fused
    return _FUSED_CLASSES[cls]


def is_fused(layer: nn.Module) -> bool:
    """Whether ``layer`` runs the fused forward of :func:`fuse_layers`."""
    return isinstance(layer, _FusedDecoderLayer)


def fuse_layers(model: nn.Module) -> int:
    """Give every fusable BitNet decoder layer of ``model`` the fused forward (module docstring).

    A layer is fusable when its seven projections are bias-free :class:`torch_bitnet.nn.BitLinear`
    layers, its MLP uses relu2 and its four RMSNorm weights have the model's activation dtype
    (transformers BitNet models loaded by :func:`torch_bitnet.from_pretrained` or
    :func:`torch_bitnet.patch`). Other layers are left as they are (logged). Idempotent;
    returns the number of fused layers in the model.
    """
    from .kv_cache import activation_dtype

    dtype = activation_dtype(model)
    fused = 0
    for name, module in model.named_modules():
        if type(module).__name__ != "BitNetDecoderLayer" and not is_fused(module):
            continue
        if not is_fused(module):
            reason = unfusable_reason(module, dtype)
            if reason is not None:
                logger.info("torch_bitnet: not fusing %s: %s", name, reason)
                continue
            module.__class__ = _fused_class(type(module))
        fused += 1
    return fused
