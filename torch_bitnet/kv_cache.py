"""The KV cache of patched models: int8 on torch_bitnet's attention ops, or float on SDPA.

``kv_cache_dtype`` chooses how a model stores its keys and values:

* ``"int8"`` (the default): one int8 vector and one float32 scale per token and KV head
  (:func:`torch_bitnet.kv_cache_write`), attended by :func:`torch_bitnet.int8_attention`.
  For 2B-4T (30 layers x 5 KV heads x head_dim 128) a position costs 39 KB against 77 KB in
  bf16 and 154 KB in fp32, and decode reads the whole cache at every token;
* ``"bf16"`` / ``"fp32"``: a plain float cache in that dtype, attended by PyTorch's
  ``scaled_dot_product_attention`` (queries cast to the cache dtype), to compare against.

How it reaches transformers models, with no change to their code:

* cache layers (:class:`Int8StaticLayer`, :class:`Int8DynamicLayer` and their float
  counterparts) fit transformers' ``StaticCache`` / ``DynamicCache``. The int8 layers'
  ``update`` quantizes the new keys and values into the cache and returns :class:`Int8KV`
  records (cache, scales, the positions just written) instead of float tensors;
* an attention function registered with transformers as ``"torch_bitnet"`` runs the int8 op on
  those records and SDPA on float tensors (:func:`attention`); torch_bitnet's decode sessions
  run it as ``"torch_bitnet_int8"`` on their int8 caches, whose masks are only for padding
  (the op applies causality from the positions);
* :func:`set_kv_cache_dtype` (called by ``patch``, ``replace_linear`` and ``from_pretrained``)
  selects that attention function and adds a forward pre-hook that gives every empty
  transformers cache the model is called with (the ``DynamicCache`` or ``StaticCache`` that
  ``model.generate`` creates, or one the caller made) layers of the chosen kind. A forward
  without a cache object (``use_cache=False``, or the cache transformers creates inside the
  forward) runs SDPA on the float keys and values.

:func:`torch_bitnet.generate` builds its static cache with :func:`new_static_cache` directly.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer

__all__ = [
    "ATTENTION",
    "ATTENTION_INT8",
    "KV_CACHE_DTYPES",
    "FloatDynamicLayer",
    "FloatStaticLayer",
    "Int8DynamicLayer",
    "Int8KV",
    "KVShape",
    "Int8StaticLayer",
    "attention",
    "cache_argument",
    "convert_cache",
    "default_kv_cache_dtype",
    "get_kv_cache_dtype",
    "is_int8_cache",
    "new_dynamic_cache",
    "new_static_cache",
    "set_kv_cache_dtype",
]

KV_CACHE_DTYPES = {"int8": torch.int8, "bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTION = "torch_bitnet"  # the name of :func:`attention` in transformers' AttentionInterface
# :func:`attention` again, for models whose cache is all int8 (the decode sessions' caches): its
# mask function skips the plain causal mask, which the int8 op applies from the positions.
ATTENTION_INT8 = "torch_bitnet_int8"
_ENV = "BITNET_KV_CACHE_DTYPE"
_ATTR = "_torch_bitnet_kv_cache_dtype"  # where set_kv_cache_dtype keeps the choice on the model
# A dynamic int8 layer grows its buffers to the next power of two of the positions it needs,
# from this floor: log2(4096 / 256) = 4 reallocations (copies) up to 2B-4T's 4096 positions.
_MIN_CAPACITY = 256


def check_kv_cache_dtype(name: str) -> str:
    """``name`` if it is one of ``int8``, ``bf16``, ``fp32``; else a ValueError listing them."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return name


def default_kv_cache_dtype() -> str:
    """``BITNET_KV_CACHE_DTYPE`` from the environment if set, else ``"int8"``."""
    value = os.environ.get(_ENV)
    if value is None:
        return "int8"
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"{_ENV} must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Cache layers
# --------------------------------------------------------------------------------------------


class Int8KV(NamedTuple):
    """What an int8 layer's ``update`` hands to the attention function, for keys or values."""

    data: torch.Tensor  # int8 (B, KVH, L, D), the whole cache buffer
    scale: torch.Tensor  # float32 (B, KVH, L)
    positions: torch.Tensor  # int64 (Q,), cache positions of the tokens just written (= the queries)


class KVShape(NamedTuple):
    """What the int8 layers need to know of the keys / values they will hold: (B, KVH, Q, D)
    and the model's dtype and device (:meth:`Int8StaticLayer.reserve`)."""

    batch: int
    heads: int
    count: int  # Q, the new positions
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, states: torch.Tensor) -> KVShape:
        return cls(*states.shape, states.dtype, states.device)


class _Int8Storage:
    """Buffers shared by the int8 layers: keys/values int8 (B, KVH, L, D), scales float32
    (B, KVH, L). Positions past the written ones are never read, so they are left empty."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor
    value_scales: torch.Tensor

    def _allocate(self, like: KVShape, length: int) -> None:
        self.keys = torch.zeros(like.batch, like.heads, length, like.head_dim, dtype=torch.int8, device=like.device)
        self.values = torch.zeros_like(self.keys)
        self.key_scales = torch.zeros(like.batch, like.heads, length, dtype=torch.float32, device=like.device)
        self.value_scales = torch.zeros_like(self.key_scales)
        self.dtype, self.device = like.dtype, like.device  # dtype: that of the model's keys

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor):
        torch.ops.bitnet.kv_cache_write(
            self.keys, self.key_scales, self.values, self.value_scales, key_states, value_states, positions
        )
        return Int8KV(self.keys, self.key_scales, positions), Int8KV(self.values, self.value_scales, positions)

    def _map_batch(self, fn) -> None:
        """Apply fn to the batch dimension of all four buffers (beam search, batch selection)."""
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.key_scales, self.value_scales = fn(self.key_scales), fn(self.value_scales)


class Int8StaticLayer(_Int8Storage, StaticLayer):
    """A ``StaticLayer`` whose keys and values are int8 with a float32 scale per token and head.

    Allocated once at ``max_cache_len`` positions (at fixed addresses, for torch.compile); the
    write position is the tensor ``cumulative_length``, as in transformers' ``StaticLayer``.
    Writing past ``max_cache_len`` raises (the op checks every position).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._initialize(KVShape.of(key_states))

    def _initialize(self, like: KVShape) -> None:
        self._allocate(like, self.max_cache_len)
        self.batch_size, self.num_heads = like.batch, like.heads
        self.k_head_dim = self.v_head_dim = like.head_dim
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():  # as StaticLayer: fixed addresses for the compiled step
            for t in (self.keys, self.values, self.key_scales, self.value_scales, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def reserve(self, like: KVShape) -> torch.Tensor:
        """Allocate the buffers on first use and take the next ``like.count`` positions; returns
        them, int64 (Q,), for the caller to write (``update``, or ``bitnet::decoder_layer``)."""
        if not self.is_initialized:
            self._initialize(like)
        positions = torch.arange(like.count, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(like.count)
        return positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantize key/value states (B, KVH, Q, D) into the next Q positions; returns
        ``(Int8KV, Int8KV)`` for keys and values."""
        return self._write(key_states, value_states, self.reserve(KVShape.of(key_states)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:  # copies into the same buffers: their addresses stay fixed
            index = beam_idx.to(self.device)
            for t in (self.keys, self.values, self.key_scales, self.value_scales):
                t.copy_(t.index_select(0, index))


class Int8DynamicLayer(_Int8Storage, DynamicLayer):
    """A ``DynamicLayer`` storing int8 keys and values with a float32 scale per token and head.

    The buffers grow to the next power of two of the positions needed (at least 256); the
    positions held are ``cumulative_length`` (an int).
    """

    is_croppable = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._initialize(KVShape.of(key_states))

    def _initialize(self, like: KVShape) -> None:
        self._allocate(like, _MIN_CAPACITY)
        self.is_initialized = True

    def reserve(self, like: KVShape) -> torch.Tensor:
        """Take the next ``like.count`` positions, allocating or growing the buffers as needed;
        returns them, int64 (Q,), for the caller to write."""
        if not self.is_initialized:
            self._initialize(like)
        start, count = self.cumulative_length, like.count
        if start + count > self.keys.shape[2]:
            capacity = max(_MIN_CAPACITY, 1 << (start + count - 1).bit_length())
            old = (self.keys, self.values, self.key_scales, self.value_scales)
            self._allocate(like, capacity)
            for new, held in zip((self.keys, self.values, self.key_scales, self.value_scales), old):
                new[:, :, :start] = held[:, :, :start]
        self.cumulative_length = start + count
        return torch.arange(start, start + count, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantize key/value states (B, KVH, Q, D) into the next Q positions, growing the
        buffers if needed; returns ``(Int8KV, Int8KV)``."""
        return self._write(key_states, value_states, self.reserve(KVShape.of(key_states)))

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' convention: negative)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.cumulative_length = max(0, self.cumulative_length + tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            index = beam_idx.to(self.device)
            self._map_batch(lambda t: t.index_select(0, index))


class FloatStaticLayer(StaticLayer):
    """transformers' ``StaticLayer`` storing keys and values in ``dtype`` (cast on write)."""

    def __init__(self, max_cache_len: int, dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(max_cache_len, **kwargs)
        self.kv_dtype = dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states.to(self.kv_dtype), value_states.to(self.kv_dtype))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(key_states.to(self.kv_dtype), value_states.to(self.kv_dtype), *args, **kwargs)


class FloatDynamicLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` storing keys and values in ``dtype`` (cast on write)."""

    def __init__(self, dtype: torch.dtype = torch.float32, **kwargs):
        super().__init__(**kwargs)
        self.kv_dtype = dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states.to(self.kv_dtype), value_states.to(self.kv_dtype))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(key_states.to(self.kv_dtype), value_states.to(self.kv_dtype), *args, **kwargs)


def _static_layer(kv_cache_dtype: str, max_cache_len: int) -> StaticLayer:
    if kv_cache_dtype == "int8":
        return Int8StaticLayer(max_cache_len)
    return FloatStaticLayer(max_cache_len, KV_CACHE_DTYPES[kv_cache_dtype])


def _dynamic_layer(kv_cache_dtype: str) -> DynamicLayer:
    return Int8DynamicLayer() if kv_cache_dtype == "int8" else FloatDynamicLayer(KV_CACHE_DTYPES[kv_cache_dtype])


def _num_layers(config) -> int:
    return config.get_text_config(decoder=True).num_hidden_layers


def _config_and_kind(model_or_config, kv_cache_dtype: str | None):
    """(config, checked kv_cache_dtype): an explicit kind, else the model's setting, else the default."""
    is_model = isinstance(model_or_config, nn.Module)
    if kv_cache_dtype is None:
        kv_cache_dtype = (get_kv_cache_dtype(model_or_config) if is_model else None) or default_kv_cache_dtype()
    return (model_or_config.config if is_model else model_or_config), check_kv_cache_dtype(kv_cache_dtype)


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's activations (and so of its keys and values): what its input
    embedding returns (an int8 table's ``output_dtype``, else the table's dtype)."""
    embedding = model.get_input_embeddings()
    return getattr(embedding, "output_dtype", None) or embedding.weight.dtype


def allocate_now(cache: Cache, model: nn.Module, batch_size: int = 1) -> None:
    """Allocate every layer of ``cache`` for ``model`` now (``early_initialization``) rather
    than in the first forward, so the buffers have their final addresses before compiling."""
    text = model.config.get_text_config(decoder=True)
    cache.early_initialization(
        batch_size=batch_size,
        num_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        dtype=activation_dtype(model),
        device=model.get_input_embeddings().weight.device,
    )


def new_static_cache(
    model_or_config,
    max_cache_len: int,
    kv_cache_dtype: str | None = None,
    *,
    batch_size: int = 1,
    early: bool = True,
) -> StaticCache:
    """A transformers ``StaticCache`` of ``max_cache_len`` positions with torch_bitnet layers.

    Args:
        model_or_config: a transformers model or its config (layer count, heads, head_dim).
        kv_cache_dtype: ``int8`` | ``bf16`` | ``fp32``; default: the model's setting
            (:func:`get_kv_cache_dtype`), else :func:`default_kv_cache_dtype`.
        batch_size: rows of the cache (used when ``early``).
        early: allocate every layer now (needs a model: its dtype and device), so the buffers
            have their final addresses before anything is compiled.
    """
    config, kv_cache_dtype = _config_and_kind(model_or_config, kv_cache_dtype)
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [_static_layer(kv_cache_dtype, max_cache_len) for _ in cache.layers]
    if early:
        if not isinstance(model_or_config, nn.Module):
            raise ValueError("new_static_cache(early=True) needs the model (its dtype and device), not a config")
        allocate_now(cache, model_or_config, batch_size)
    return cache


def new_dynamic_cache(model_or_config, kv_cache_dtype: str | None = None) -> DynamicCache:
    """A transformers ``DynamicCache`` with torch_bitnet layers (growing as tokens arrive)."""
    config, kv_cache_dtype = _config_and_kind(model_or_config, kv_cache_dtype)
    cache = DynamicCache(config=config)
    cache.layers = [_dynamic_layer(kv_cache_dtype) for _ in range(_num_layers(config))]
    return cache


def convert_cache(cache: Cache, kv_cache_dtype: str) -> bool:
    """Give an empty transformers cache torch_bitnet layers of ``kv_cache_dtype``, in place.

    Only caches made of transformers' own full-attention layers (``StaticLayer`` /
    ``DynamicLayer``, exactly) that hold no position yet are converted; returns whether this
    one was. A ``DynamicCache`` built without a config (layers added lazily) gets them too.
    """
    check_kv_cache_dtype(kv_cache_dtype)
    layers = cache.layers
    if not layers:
        if cache.layer_class_to_replicate is DynamicLayer:
            cache.layer_class_to_replicate = functools.partial(_dynamic_layer, kv_cache_dtype)
            return True
        return False
    kinds = {type(layer) for layer in layers}
    if kinds == {StaticLayer}:
        if any(int(layer.get_seq_length()) for layer in layers):
            return False
        cache.layers = [_static_layer(kv_cache_dtype, layer.max_cache_len) for layer in layers]
        return True
    if kinds == {DynamicLayer}:
        if any(layer.get_seq_length() for layer in layers):
            return False
        cache.layers = [_dynamic_layer(kv_cache_dtype) for _ in layers]
        return True
    return False


# --------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function ``"torch_bitnet"``: query (B, H, Q, D); key/value either
    :class:`Int8KV` records from an int8 layer or float (B, KVH, L, D) tensors; mask
    (B, 1, Q, L) bool (True = attend) or None (causal). Returns (B, Q, H, D) and no weights.

    * int8 records: :func:`torch_bitnet.int8_attention` over the cache, the queries at the
      positions just written (causal), the mask (padding) on top.
    * float tensors: SDPA (:func:`_float_attention`), queries cast to the cache dtype.
    """
    if isinstance(key, Int8KV):
        if dropout and module.training:
            raise NotImplementedError("torch_bitnet's int8 KV cache is for inference: attention dropout is not supported")
        head_dim = query.shape[-1]
        scale = float(scaling) if scaling is not None else head_dim**-0.5
        out = torch.ops.bitnet.int8_attention(
            query, key.data, key.scale, value.data, value.scale, key.positions, scale, attention_mask
        )  # (B, H, Q, D)
        return out.transpose(1, 2), None
    if query.dtype != key.dtype:  # a float cache in another dtype than the model's
        out, weights = _float_attention(
            module, query.to(key.dtype), key, value, attention_mask, scaling, dropout=dropout, **kwargs
        )
        return out.to(query.dtype), weights
    return _float_attention(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)


# transformers' sdpa function with two shortcuts for static caches:
#
# * One query token (decode): transformers repeats the key/value heads of grouped-query
#   attention (repeat_kv: a copy of the whole cache, in every layer, at every step) whenever it
#   runs under torch.compile; only in eager mode does it fold the query heads of each key/value
#   head into rows of one attention call (views only). This always folds. Measured on 4
#   layers of the 2B-4T shape (20 heads over 5 kv heads, head dim 128, bf16, 1 thread), the
#   compiled decode step costs 9.5 -> 5.7 ms per token with a 256-token cache, 26 -> 6.2 ms at
#   1024, 91 -> 13 ms at 4096.
# * A prefill chunk (eager): a static cache is max_seq_len long, but the chunk's queries see
#   only the positions up to the last one the mask allows; attention over just those positions
#   gives the same result with less work (2B-4T, bf16, 2 threads, a 1024-token prompt into a
#   2048-token cache in 256-token chunks: 104 -> 128 prompt tokens/s).
def _float_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, head_dim = query.shape
    if q_len == 1 and groups > 1 and (attention_mask is None or attention_mask.shape[1] == 1):
        # Query head h = g * groups + r reads kv head g: rows r of batch entry g (repeat_kv's order).
        folded = query.reshape(batch, heads // groups, groups, head_dim)  # (B, KVH, groups, D)
        out = torch.nn.functional.scaled_dot_product_attention(
            folded, key, value, attn_mask=attention_mask, scale=scaling
        )
        return out.reshape(batch, 1, heads, head_dim), None
    if (
        q_len > 1
        and attention_mask is not None
        and attention_mask.dtype == torch.bool
        and not torch.compiler.is_compiling()
    ):
        seen = attention_mask.any(dim=2).any(dim=1).any(dim=0)  # (L,): key positions any query sees
        live = int(seen.nonzero().max()) + 1 if bool(seen.any()) else key.shape[2]
        if live < key.shape[2]:
            key, value = key[:, :, :live], value[:, :, :live]  # (B, KVH, live, D)
            attention_mask = attention_mask[..., :live]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _int8_cache_mask(*args, **kwargs):
    """transformers mask function of ``"torch_bitnet_int8"``: None for a plain causal mask with
    no padding (the int8 attention op sees each query's keys up to its position without one),
    else sdpa's boolean mask. A compiled decode step would otherwise compute the (B, 1, Q, L)
    mask once per layer: inductor recomputes a cheap mask for each op that takes it (30 x L
    values per 2B-4T token, ~1 ms at L = 4096 on a slow core)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    # Not allow_is_causal_skip: transformers clears it for every one-token step on a static
    # cache (sdpa would see the empty positions); a mask with more than causality (sliding
    # window, packed sequences, or / and masks) comes as another mask_function.
    if (
        not args
        and kwargs.get("attention_mask") is None
        and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
        and kwargs.get("local_size") is None
    ):
        return None
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register :func:`attention` with transformers as ``"torch_bitnet"`` (with sdpa's boolean
    masks) and as ``"torch_bitnet_int8"`` (masks only for padding, for all-int8 caches)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    AttentionInterface.register(ATTENTION_INT8, attention)
    AttentionMaskInterface.register(ATTENTION_INT8, _int8_cache_mask)


def is_int8_cache(cache) -> bool:
    """Whether every layer of a transformers cache is an int8 layer of this module."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, _Int8Storage) for layer in layers)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the model's attention cannot run on torch_bitnet's (None if it can)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return "it is not a transformers model"
    text = config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None) is not None or getattr(text, "attention_chunk_size", None) is not None:
        return "it uses sliding-window or chunked attention"
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "it caps attention logits"
    if any(kind != "full_attention" for kind in (getattr(text, "layer_types", None) or [])):
        return "not all of its layers use full attention"
    if config._attn_implementation not in ("sdpa", "eager", ATTENTION, ATTENTION_INT8):
        return f"it uses the {config._attn_implementation!r} attention implementation"
    return None


def cache_argument(model: nn.Module) -> str:
    """The name under which the model's forward takes its cache object: ``cache`` from
    transformers 5.24 on, ``past_key_values`` before (still accepted there, deprecated)."""
    return _cache_argument_of(type(model))


@functools.lru_cache(maxsize=None)
def _cache_argument_of(model_class: type) -> str:  # once per class: generate asks at every step
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _convert_cache_hook(module: nn.Module, args, kwargs):
    """Forward pre-hook: the empty transformers cache the model is called with gets the
    model's kind of layers (model.generate's DynamicCache / StaticCache, or the caller's)."""
    if torch.compiler.is_compiling():  # a compiled step runs on a cache converted eagerly before
        return None
    for name in ("cache", "past_key_values"):  # transformers >= 5.24 / before
        cache = kwargs.get(name)
        if isinstance(cache, Cache):
            convert_cache(cache, getattr(module, _ATTR))
    return None


def set_kv_cache_dtype(model: nn.Module, kv_cache_dtype: str | None = None) -> nn.Module:
    """Make ``model`` keep its KV cache in ``kv_cache_dtype`` (``int8`` | ``bf16`` | ``fp32``).

    ``None`` reads ``BITNET_KV_CACHE_DTYPE`` (default ``int8``). Switches the model to the
    ``"torch_bitnet"`` attention function and installs a forward pre-hook that converts every
    empty transformers cache the model is called with (see the module docstring). Models whose
    attention is not plain causal full attention (sliding windows, logit soft-capping, flash
    attention...) are left unchanged, with a warning. Returns the model.
    """
    kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype) if kv_cache_dtype is not None else default_kv_cache_dtype()
    reason = unsupported_reason(model)
    if reason is not None:
        warnings.warn(
            f"torch_bitnet: kv_cache_dtype is not applied to this model: {reason}; its attention is unchanged",
            stacklevel=2,
        )
        return model
    register_attention()
    model.config._attn_implementation = ATTENTION
    setattr(model, _ATTR, kv_cache_dtype)
    if _convert_cache_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_convert_cache_hook, with_kwargs=True)
    return model


def get_kv_cache_dtype(model: nn.Module) -> str | None:
    """The model's ``kv_cache_dtype`` set by :func:`set_kv_cache_dtype`, or None if never set."""
    return getattr(model, _ATTR, None)
