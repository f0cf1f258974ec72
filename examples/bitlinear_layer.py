"""Turn a float nn.Linear into a BitNet b1.58 layer and run it with torch_bitnet's op.

    python examples/bitlinear_layer.py

Steps: absmean-ternarize the float weight (as BitNet training does), pack it once into the
2-bit format, then call ``torch_bitnet.bitlinear`` eagerly and under
``torch.compile(fullgraph=True)``, and compare with the plain-PyTorch reference.
"""

import torch

import torch_bitnet
from torch_bitnet import reference


class TernaryLinear(torch.nn.Module):
    """Buffer holder: packed ternary weight (N, Kp/4) uint8 + float32 scale; forward is one op."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        wq, scale = torch_bitnet.ternarize(linear.weight.detach())  # int8 (N, K), float32 (1,)
        self.register_buffer("packed", torch_bitnet.pack_ternary(wq))  # packed once, here
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch_bitnet.bitlinear(x, self.packed, self.scale, self.bias, self.in_features, self.out_features)


def main() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(2560, 6912)
    layer = TernaryLinear(dense)
    x = torch.randn(4, 2560, dtype=torch.bfloat16)

    y = layer(x)
    y_ref = reference.bitlinear(x, layer.packed, layer.scale, layer.bias, 2560, 6912)
    y_compiled = torch.compile(layer, fullgraph=True)(x)

    print(f"kernel path         : {torch_bitnet.get_isa()} (available: {', '.join(torch_bitnet.available_isas())})")
    print(f"weight bytes        : {layer.packed.numel():,} packed vs {dense.weight.numel() * 2:,} in bf16")
    print(f"equal to reference  : {torch.equal(y, y_ref)}")
    print(f"compiled == eager   : {torch.equal(y, y_compiled)}")
    rel = (y.float() - dense(x.float())).norm() / dense(x.float()).norm()
    print(f"relative error vs the float layer it was ternarized from: {rel:.3f} "
          "(large: ternarizing weights not trained for it loses information)")


if __name__ == "__main__":
    main()
