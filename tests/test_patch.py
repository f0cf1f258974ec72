"""BitLinear module, patch() and replace_linear().

Equality with transformers' own BitNet layers is checked per layer kind (the integer part is
exact on both sides; the float tolerance is derived in test_transformers_parity.py). Whole
models through replace_linear are compared with the same model running
``torch_bitnet.reference.bitlinear`` (plain PyTorch): the kernels match it bit for bit, so the
logits must be identical.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.bitnet import AutoBitLinear
from transformers.integrations.bitnet import BitLinear as HFBitLinear

import torch_bitnet
from torch_bitnet import BitLinear, reference
from torch_bitnet.patch import convert_module


def _ternary(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


def test_bitlinear_module_buffers_repr_and_state_dict_round_trip():
    w = _ternary(40, 300, 0)
    layer = BitLinear.from_ternary(w, torch.tensor([0.25]), torch.randn(40))
    assert (layer.in_features, layer.out_features) == (300, 40)
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (40, 128)
    assert "in_features=300, out_features=40, bias=True" in repr(layer)
    assert torch.equal(layer.ternary_weight(), w)
    # A fresh module loads the packed state and computes the same thing.
    again = BitLinear(300, 40, bias=True)
    again.load_state_dict(layer.state_dict())
    x = torch.randn(3, 300)
    assert torch.equal(again(x), layer(x))
    assert not list(layer.parameters())  # buffers only: nothing for an optimizer to touch


def test_bitlinear_forward_is_the_op():
    w = _ternary(16, 64, 1)
    layer = BitLinear.from_ternary(w, 0.5)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    expected = reference.bitlinear(x, layer.weight, layer.weight_scale, None, 64, 16)
    assert torch.equal(layer(x), expected)


def test_bitlinear_constructor_errors():
    with pytest.raises(ValueError, match="one weight scale per tensor"):
        BitLinear.from_ternary(_ternary(4, 8, 0), torch.ones(2))
    with pytest.raises(ValueError, match="not finite"):
        BitLinear.from_ternary(_ternary(4, 8, 0), float("nan"))
    with pytest.raises(ValueError, match="bias has shape"):
        BitLinear.from_ternary(_ternary(4, 8, 0), 1.0, torch.zeros(5))
    with pytest.raises(ValueError, match="must be >= 1"):
        BitLinear(0, 4)


def _fill_autobitlinear(module: AutoBitLinear, w: torch.Tensor, scale: float, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        module.weight.copy_(w.float())
        if not module.online_quant:
            module.weight_scale.fill_(scale)
        if bias is not None:
            module.bias.copy_(bias)


@pytest.mark.parametrize("with_bias", [False, True])
def test_patch_autobitlinear_offline_matches_transformers(with_bias):
    torch.manual_seed(0)
    hf = AutoBitLinear(256, 96, bias=with_bias, dtype=torch.float32, online_quant=False)
    _fill_autobitlinear(hf, _ternary(96, 256, 2), 1.7, torch.randn(96) if with_bias else None)
    ours = convert_module(hf, "layer")
    x = torch.randn(4, 256)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        expected = hf(x)
    # (acc / a + b) * s versus acc * (s / a) + b * s: a few float32 roundings apart.
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-4)


def test_patch_autobitlinear_online_ternarizes_like_weightquant():
    torch.manual_seed(1)
    hf = AutoBitLinear(256, 64, bias=False, dtype=torch.float32, online_quant=True)
    ours = convert_module(hf, "layer")
    x = torch.randn(3, 256)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        expected = hf(x)
    # WeightQuant divides by 1/mean, we multiply by mean: one float32 rounding apart.
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_patch_hf_bitlinear_divides_by_its_scale():
    hf = HFBitLinear(256, 64, bias=True, dtype=torch.float32)
    w = _ternary(64, 256, 3)
    with torch.no_grad():
        hf.weight.copy_(torch_bitnet.to_hf_packed(w))
        hf.weight_scale.fill_(0.8)
        hf.bias.copy_(torch.randn(64))
    ours = convert_module(hf, "layer")
    assert torch.equal(ours.ternary_weight(), w)
    x = torch.randn(5, 256)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        expected = hf(x)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_patch_rejects_offline_weights_that_are_not_ternary():
    hf = AutoBitLinear(64, 8, bias=False, dtype=torch.float32, online_quant=False)
    with torch.no_grad():
        hf.weight.fill_(0.3)
    with pytest.raises(ValueError, match="must hold only -1, 0 and 1"):
        convert_module(hf, "model.layers.0.mlp.up_proj")


def test_patch_model_without_bitnet_layers_is_an_error():
    with pytest.raises(ValueError, match="no transformers BitNet layer"):
        torch_bitnet.patch(nn.Sequential(nn.Linear(4, 4)))


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


class _ReferenceBitLinear(nn.Module):
    """The same layer computed by torch_bitnet.reference (plain PyTorch)."""

    def __init__(self, layer: BitLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        return reference.bitlinear(x, m.weight, m.weight_scale, m.bias, m.in_features, m.out_features)


def test_replace_linear_llama_matches_plain_pytorch_reference():
    model = torch_bitnet.replace_linear(_tiny_llama())
    replaced = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(replaced) == 2 * 7 and "lm_head" not in replaced  # q,k,v,o,gate,up,down per layer
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ours = model(ids).logits
        for name in replaced:
            model.set_submodule(name, _ReferenceBitLinear(model.get_submodule(name)))
        expected = model(ids).logits
    assert torch.equal(ours, expected)


def test_replace_linear_layer_matches_fake_quant_float_math():
    # Independent of torch_bitnet.reference: absmean ternarization and per-token fake
    # quantization written out in float64. Float32 rounding of the scale products is the only
    # difference, so the tolerance is a few float32 ulps of the output magnitude.
    torch.manual_seed(4)
    linear = nn.Linear(200, 50)
    x = torch.randn(6, 200)
    layer = torch_bitnet.replace_linear(nn.Sequential(linear))[0]
    w = linear.weight.double()
    s = w.abs().mean().clamp(min=1e-5)
    wq = (w / s).round().clamp(-1, 1)
    a = 127 / x.double().abs().amax(-1, keepdim=True)
    xq = (x.double() * a).round().clamp(-128, 127)
    expected = (xq @ wq.t()) * s / a + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_replace_linear_filter_fn_and_skip():
    model = torch_bitnet.replace_linear(_tiny_llama(), filter_fn=lambda m, fqn: fqn.endswith("mlp.down_proj"))
    replaced = sorted(n for n, m in model.named_modules() if isinstance(m, BitLinear))
    assert replaced == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    model = torch_bitnet.replace_linear(_tiny_llama(), skip=("lm_head", "q_proj"))
    names = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    assert not any(n.endswith("q_proj") for n in names) and len(names) == 12


def test_replace_linear_warns_when_nothing_matches():
    with pytest.warns(UserWarning, match="no nn.Linear layer matched"):
        torch_bitnet.replace_linear(nn.Sequential(nn.ReLU()))
