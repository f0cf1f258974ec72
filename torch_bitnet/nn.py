"""``BitLinear``: the module that puts torch_bitnet's op into a model.

A buffer holder: the packed ternary weight, its scale and an optional bias, converted once
(at load or patch time) from whatever a checkpoint or transformers module holds; ``forward``
is one ``bitnet::bitlinear`` call, so ``torch.compile`` sees a single opaque op per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .packing import check_features, pack_ternary, packed_shape, ternarize, unpack_ternary

__all__ = ["BitLinear"]


class BitLinear(nn.Module):
    """BitNet b1.58 linear layer: ternary weight x int8 activations (quantized inside the op).

    Buffers (all saved in ``state_dict``, in torch_bitnet's packed form):

    * ``weight``: uint8 (out_features, ceil(in_features / 256) * 64), the packed ternary weight
      (format in :mod:`torch_bitnet.packing`)
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
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight", torch.zeros(packed_shape(out_features, in_features), dtype=torch.uint8, device=device)
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
            f"bias={self.bias is not None}, weight=ternary packed 2-bit {tuple(self.weight.shape)} uint8"
        )

    # ---- constructors: each converts once, eagerly ----

    @classmethod
    def from_ternary(
        cls,
        weight: torch.Tensor,
        scale: torch.Tensor | float,
        bias: torch.Tensor | None = None,
        rms_norm: nn.Module | None = None,
    ) -> BitLinear:
        """From a ternary integer weight (out_features, in_features) with values in {-1, 0, 1}.

        ``scale``: the float the ternary weight is multiplied by; ``bias`` is added in float32.
        """
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, device=weight.device, rms_norm=rms_norm)
        layer.weight.copy_(pack_ternary(weight))
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
        return unpack_ternary(self.weight, self.in_features)
