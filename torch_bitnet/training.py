"""Quantization-aware training (QAT) of BitNet b1.58 layers, and the export of trained weights.

Training keeps float master weights; every forward ternarizes them (absmean) and quantizes the
activations (per-token int8) exactly as the inference ops do, and the backward pass treats both
quantizers as the identity (straight-through estimators, STE), as BitNet b1.58 is trained.

Why a plain-PyTorch fake-quant path rather than gradients registered on the C++ ops: the ops
take weights packed once at load time, while in training the weights change at every step (so
they would be repacked at every step), and the backward needs float matmuls against the
dequantized weights and activations anyway. The forward here is nevertheless the inference
op's arithmetic, not an approximation of it: the int8 x ternary products are summed as
integer-valued float32 numbers (exact: every partial sum is an integer below 2^24) and
rescaled with the very expression of :func:`torch_bitnet.reference.bitlinear`. So a trained
layer, packed with :meth:`QATLinear.to_packed`, gives bit for bit the output it gave in
training, and the perplexity measured in training is the one the shipped model has.

* :class:`QATLinear`: an ``nn.Linear`` (same ``weight`` / ``bias`` parameters) whose forward is
  :func:`bitlinear_ste`.
* ``torch_bitnet.replace_linear(model, qat=True)`` puts it into any model (QAT fine-tuning of
  Llama, Qwen2, ... or training a ``BitNetForCausalLM`` built from a config);
  :func:`to_packed` turns the trained layers into inference :class:`torch_bitnet.BitLinear`.
* :func:`export_checkpoint`: a trained ``BitNetForCausalLM`` written in the on-disk format of
  microsoft/bitnet-b1.58-2B-4T (packed uint8 weights, bf16 scales and tables), loadable by
  transformers and by :func:`torch_bitnet.from_pretrained`.
* :func:`perplexity`: held-out perplexity of any causal LM over fixed windows of a token stream.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from . import reference
from .loading import LINEARS
from .nn import BitLinear
from .packing import ternarize, to_hf_packed

__all__ = ["QATLinear", "bitlinear_ste", "export_checkpoint", "perplexity", "to_packed"]

# The float32 integer matmul below is exact while every partial sum stays below 2^24:
# |xq| <= 128 and |wq| <= 1, so K * 128 < 2^24. Larger K falls back to float64 (exact to 2^53).
_FLOAT32_EXACT_K = (1 << 24) // 128 - 1


def _integer_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``xq @ wq^T`` of int8 (M, K) x int8 (N, K) as exact float32 (M, N)."""
    dtype = torch.float32 if xq.shape[-1] <= _FLOAT32_EXACT_K else torch.float64
    return (xq.to(dtype) @ wq.to(dtype).t()).float()


class _BitLinearSTE(torch.autograd.Function):
    """Forward: the W1.58A8 linear layer of ``reference.bitlinear``; backward: straight-through.

    Saved for backward: the int8 activations (M, K), their scales (M, 1), the int8 ternary
    weight (N, K) and its scale: a quarter of the float activations' bytes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k = x.shape[-1]
        xq, a = reference.quantize_act(x.reshape(-1, k))  # int8 (M, K), float32 (M, 1)
        wq, scale = ternarize(weight)  # int8 (N, K), float32 (1,) = mean|W|
        y = _integer_matmul(xq, wq) * (scale.reshape(()) / a)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(xq, a, wq, scale)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xq, a, wq, scale = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        n, k = wq.shape
        g = grad.reshape(-1, n).float()  # (M, N)
        grad_x = grad_w = grad_b = None
        # STE: d(quantize)/dx = identity, so these are F.linear's gradients with the
        # dequantized operands x_dq = xq / a (M, K) and W_dq = wq * scale (N, K).
        if ctx.needs_input_grad[0]:
            grad_x = (g @ (wq.float() * scale)).to(x_dtype).reshape(*grad.shape[:-1], k)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ (xq.float() / a)).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b


def bitlinear_ste(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """BitNet b1.58 linear layer on a float master weight, differentiable with STE.

    Forward (bit for bit what :func:`torch_bitnet.bitlinear` computes on ``ternarize(weight)``)::

        xq, a = quantize_act(x)                 # int8 (..., K), per-token scale a
        wq, s = ternarize(weight)               # ternary int8 (N, K), s = mean|W|
        y     = (xq @ wq^T) * (s / a) + bias    # exact integer product, float32 rescale
        y     = y.to(x.dtype)

    Backward (straight-through estimators for both quantizers)::

        grad_x = grad_y @ (wq * s)              # as if x were not quantized
        grad_W = grad_y^T @ (xq / a)            # as if W were not ternarized
        grad_b = sum(grad_y)

    which is the gradient of ``F.linear(x + (x_dq - x).detach(), W + (W_dq - W).detach(), b)``,
    the usual way to write BitNet's STE (and what transformers' online ``AutoBitLinear`` does).
    """
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"torch_bitnet: bitlinear_ste expects a floating-point input, got {getattr(x, 'dtype', type(x))}")
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"torch_bitnet: bitlinear_ste: input of shape {tuple(x.shape)} does not match a weight of "
            f"shape {tuple(weight.shape)} (its last dimension must be in_features = {weight.shape[-1]})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"torch_bitnet: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    return _BitLinearSTE.apply(x, weight, bias)


class QATLinear(nn.Linear):
    """``nn.Linear`` trained as a BitNet b1.58 layer: float master ``weight`` (and ``bias``),
    forward :func:`bitlinear_ste` (ternary weight x int8 activations, straight-through grads).

    Same parameters and ``state_dict`` keys as the ``nn.Linear`` it replaces
    (:meth:`from_linear` reuses its parameter objects, so an optimizer built before the swap
    keeps training them). :meth:`to_packed` gives the inference :class:`torch_bitnet.BitLinear`
    with bit-identical outputs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear_ste(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QATLinear:
        """A QATLinear over ``linear``'s own parameters (no copy)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def to_packed(self) -> BitLinear:
        """The inference layer: ``ternarize(weight)`` packed, its scale, the bias in float32."""
        return BitLinear.from_float(self.weight.detach(), None if self.bias is None else self.bias.detach())


def to_packed(model: nn.Module) -> nn.Module:
    """Replace every :class:`QATLinear` of ``model`` with its packed :class:`torch_bitnet.BitLinear`,
    in place (the float master weights are dropped with the layers). Returns the model in eval
    mode without gradients. Raises ``ValueError`` if the model has no QATLinear."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QATLinear):
            model.set_submodule(name, module.to_packed())
            replaced += 1
    if replaced == 0:
        raise ValueError("torch_bitnet.training.to_packed: the model has no QATLinear layer")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# export in the microsoft/bitnet-b1.58-2B-4T format
# --------------------------------------------------------------------------------------------

def _ternary_layer(module: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary int8 (N, K), scale float32 (1,)) of a QATLinear, nn.Linear (master weight) or BitLinear."""
    if isinstance(module, BitLinear):
        if module.bias is not None:
            raise ValueError(f"torch_bitnet: {name} has a bias, which the 2B-4T format does not store")
        return module.ternary_weight(), module.weight_scale.detach().float().reshape(1)
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise ValueError(f"torch_bitnet: {name} has a bias, which the 2B-4T format does not store")
        return ternarize(module.weight.detach())
    raise TypeError(f"torch_bitnet: {name} is a {type(module).__name__}, not a linear layer this export knows")


def _checkpoint_tensors(model: nn.Module, dtype: torch.dtype) -> Iterable[tuple[str, torch.Tensor]]:
    state = model.state_dict()
    for key, tensor in state.items():
        if key.startswith("model.layers.") and any(f".{n}." in key for n in LINEARS):
            continue  # the linear layers are written below, packed
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: stored once, as model.embed_tokens.weight (as in 2B-4T)
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"torch_bitnet: {key} is {tensor.dtype}; export needs float embeddings and norms")
        yield key, tensor.detach().to(dtype).contiguous()
    for i, layer in enumerate(model.model.layers):
        for name in LINEARS:
            full = f"model.layers.{i}.{name}"
            wq, scale = _ternary_layer(layer.get_submodule(name), full)
            yield f"{full}.weight", to_hf_packed(wq).contiguous()
            yield f"{full}.weight_scale", scale.to(dtype)


def export_checkpoint(
    model: nn.Module, path: str | os.PathLike, tokenizer=None, *, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Write a trained ``BitNetForCausalLM`` in the microsoft/bitnet-b1.58-2B-4T on-disk format.

    ``model.safetensors``: every BitLinear as transformers' packed uint8 (out/4, in) ``weight``
    and a (1,) ``weight_scale`` = mean|W| in ``dtype`` (the output is multiplied by it); the
    embedding and the norms in ``dtype``; a tied lm_head not stored. ``config.json`` with
    ``quantization_config`` autobitlinear / offline, ``generation_config.json``, and the
    tokenizer's files if ``tokenizer`` is given. The linear layers may be :class:`QATLinear`
    (or plain ``nn.Linear`` master weights: ternarized here) or packed
    :class:`torch_bitnet.BitLinear`. Returns the directory.

    Note: the scales are rounded to ``dtype`` (bf16, as in 2B-4T), so the exported model's
    outputs differ from the training forward by that rounding (well under 1% in perplexity).
    """
    from .checkpoints import write_model_files

    if getattr(getattr(model, "config", None), "model_type", None) != "bitnet":
        raise ValueError("torch_bitnet.training.export_checkpoint: expects a transformers BitNetForCausalLM")
    return write_model_files(
        path, model.config, _checkpoint_tensors(model, dtype), mode="offline", dtype=dtype, tokenizer=tokenizer
    )


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    *,
    batch_size: int = 8,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> float:
    """Perplexity of a causal LM over a 1-D token stream, in non-overlapping windows.

    The stream is cut into ``len(ids) // seq_len`` windows of ``seq_len`` tokens (a shorter
    tail is dropped); in each, every token but the first is predicted from the ones before it.
    Returns ``exp(mean negative log-likelihood)`` over all predicted tokens, computed in float64
    from float32 log-softmax. ``progress``: optional wrapper of the batch iterator (e.g. tqdm).
    """
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"torch_bitnet: perplexity expects a 1-D integer token tensor, got {ids.dtype} {tuple(ids.shape)}")
    if seq_len < 2 or ids.numel() < seq_len:
        raise ValueError(f"torch_bitnet: perplexity needs seq_len >= 2 and at least seq_len tokens ({ids.numel()} given)")
    windows = ids[: ids.numel() // seq_len * seq_len].long().view(-1, seq_len)
    batches = range(0, windows.shape[0], batch_size)
    total, count = 0.0, 0
    for start in progress(batches) if progress else batches:
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll.double())
        count += batch[:, 1:].numel()
    return math.exp(total / count)
