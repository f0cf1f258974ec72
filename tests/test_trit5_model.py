"""Models with 5-trit packed weights: loading, saving, converting and repacking, generation (and
that of 3-trit ones) and the command line. (The formats and the ops on them: tests/test_trit5.py,
tests/test_trit3.py.)

Every 5-trit model here is compared with the same checkpoint loaded in the 2-bit format: the
two formats hold the same ternary weights, so logits and generated tokens must be identical,
bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

import torch_bitnet
from torch_bitnet import BitLinear, bench, cli, set_ternary_format
from torch_bitnet.checkpoints import small_config, write_checkpoint
from torch_bitnet.generate import generate
from torch_bitnet.loading import PACKED_FILE
from torch_bitnet.packing import packed_shape

MODES = ("offline", "online", "bitlinear")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("trit5")
    return {mode: write_checkpoint(root / mode, small_config("odd"), mode=mode, seed=11) for mode in MODES}


def _ids(vocab: int, n: int = 23) -> torch.Tensor:
    return torch.randint(0, vocab - 256, (2, n), generator=torch.Generator().manual_seed(1))


def _formats(model) -> set[str]:
    return {m.ternary_format for m in model.modules() if isinstance(m, BitLinear)}


@pytest.mark.parametrize("mode", MODES)
def test_from_pretrained_packs_5trit_with_the_same_logits(checkpoints, mode):
    two = torch_bitnet.from_pretrained(checkpoints[mode], dtype=torch.float32)
    five = torch_bitnet.from_pretrained(checkpoints[mode], dtype=torch.float32, ternary_format="5trit")
    assert _formats(two) == {"2bit"} and _formats(five) == {"5trit"}
    layer = five.model.layers[0].mlp.down_proj
    assert layer.weight.dim() == 3 and layer.weight.shape[-1] == 64
    assert torch.equal(layer.ternary_weight(), two.model.layers[0].mlp.down_proj.ternary_weight())
    ids = _ids(two.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(two(ids).logits, five(ids).logits)


def test_save_load_convert_record_the_format(checkpoints, tmp_path):
    src = checkpoints["offline"]
    five = torch_bitnet.from_pretrained(src, dtype=torch.float32, ternary_format="5trit")
    two = torch_bitnet.from_pretrained(src, dtype=torch.float32)
    ids = _ids(two.config.vocab_size)
    with torch.no_grad():
        expected = two(ids).logits
        saved = torch_bitnet.save_pretrained(five, tmp_path / "five")
        assert json.loads((saved / "config.json").read_text())["torch_bitnet"]["ternary_format"] == "5trit"
        again = torch_bitnet.from_pretrained(saved, dtype=torch.float32)  # as stored
        assert _formats(again) == {"5trit"} and torch.equal(again(ids).logits, expected)
        back = torch_bitnet.from_pretrained(saved, dtype=torch.float32, ternary_format="2bit")  # repacked at load
        assert _formats(back) == {"2bit"} and torch.equal(back(ids).logits, expected)
    saved_two = torch_bitnet.save_pretrained(two, tmp_path / "two")
    assert json.loads((saved_two / "config.json").read_text())["torch_bitnet"]["ternary_format"] == "2bit"
    converted = torch_bitnet.convert_checkpoint(src, tmp_path / "conv", dtype=torch.float32, ternary_format="5trit",
                                                progress=False)
    assert _formats(torch_bitnet.from_pretrained(converted)) == {"5trit"}
    with safe_open(str(converted / PACKED_FILE), framework="pt") as f:  # stored as the kernels read them
        for name, module in two.named_modules():
            if isinstance(module, BitLinear):
                shape = tuple(f.get_slice(f"{name}.weight").get_shape())
                assert shape == packed_shape(module.out_features, module.in_features, "5trit"), name


def test_set_ternary_format_round_trips_and_recompiles(checkpoints):
    model = torch_bitnet.from_pretrained(checkpoints["online"], dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(model.config.vocab_size, 9)
    with torch.no_grad():
        expected = model(ids).logits
        assert set_ternary_format(model, "5trit") is model and _formats(model) == {"5trit"}
        assert "5trit" in repr(model.model.layers[0].self_attn.q_proj)
        assert torch.equal(model(ids).logits, expected)
        set_ternary_format(model, "2bit")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="ternary_format must be one of 2bit, 5trit, 3trit or auto"):
        set_ternary_format(model, "3bit")


def test_auto_format_follows_the_kernel_path(checkpoints):
    """"auto" is 3trit exactly on the paths with the 3-trit decode and prefill kernels (avx512vbmi,
    amx), 2bit on the others; from_pretrained and set_ternary_format pack to it; named formats pass
    through."""
    assert torch_bitnet.resolve_ternary_format("2bit") == "2bit"
    assert torch_bitnet.resolve_ternary_format("5trit") == "5trit"
    for isa in torch_bitnet.available_isas():
        with torch_bitnet.use_isa(isa):
            expected = "3trit" if isa in ("avx512vbmi", "amx") else "2bit"
            assert torch_bitnet.resolve_ternary_format() == torch_bitnet.resolve_ternary_format("auto") == expected
            model = torch_bitnet.from_pretrained(checkpoints["offline"], dtype=torch.float32, ternary_format="auto")
            assert _formats(model) == {expected}
            assert _formats(set_ternary_format(set_ternary_format(model, "2bit"), "auto")) == {expected}
    with pytest.raises(ValueError, match="ternary_format must be one of 2bit, 5trit, 3trit or auto, got '3bit'"):
        torch_bitnet.resolve_ternary_format("3bit")


def test_format_errors(checkpoints, tmp_path):
    src = checkpoints["offline"]
    with pytest.raises(ValueError, match="ternary_format must be one of"):
        torch_bitnet.from_pretrained(src, ternary_format="1bit")
    model = torch_bitnet.from_pretrained(src, dtype=torch.float32)
    model.model.layers[1].mlp.up_proj.weight = torch_bitnet.repack(
        model.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.in_features, "5trit"
    )
    with pytest.raises(ValueError, match="packed in several formats"):
        torch_bitnet.save_pretrained(model, tmp_path / "mixed")
    # A config that names an unknown format, or claims 5-trit over 2-bit tensors.
    saved = torch_bitnet.save_pretrained(set_ternary_format(model, "2bit"), tmp_path / "ok")
    raw = json.loads((saved / "config.json").read_text())
    for claimed, match in (("4trit", "unknown ternary_format '4trit'"), ("5trit", r"model\.layers\.0\..*has shape")):
        raw["torch_bitnet"]["ternary_format"] = claimed
        (saved / "config.json").write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=match):
            torch_bitnet.from_pretrained(saved)


@pytest.mark.parametrize("fmt", ["5trit", "3trit"])
def test_greedy_tokens_equal_on_every_path(checkpoints, fmt):
    """Eager decoding, one token per step: the VBMI kernel streams the 5-trit weights and the
    AVX-512 paths look up the 3-trit ones, the other paths unpack them; all give the 2-bit
    model's tokens."""
    src = checkpoints["offline"]
    tokenizer = AutoTokenizer.from_pretrained(src)
    expected = generate(torch_bitnet.from_pretrained(src), tokenizer, "Once upon", 10, compile=False, eos=False)
    dense = torch_bitnet.from_pretrained(src, ternary_format=fmt)
    for isa in torch_bitnet.available_isas():
        with torch_bitnet.use_isa(isa):
            got = generate(dense, tokenizer, "Once upon", 10, compile=False, eos=False)
        assert got.token_ids == expected.token_ids, isa


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["5trit", "3trit"])
def test_compiled_generation_equals_2bit(checkpoints, fmt):
    src = checkpoints["offline"]
    tokenizer = AutoTokenizer.from_pretrained(src)
    expected = generate(torch_bitnet.from_pretrained(src), tokenizer, "Once upon", 12, eos=False)
    got = generate(torch_bitnet.from_pretrained(src, ternary_format=fmt), tokenizer, "Once upon", 12, eos=False)
    assert got.token_ids == expected.token_ids


def test_cli_ternary_format_option(checkpoints, capsys):
    src = str(checkpoints["offline"])
    argv = ["generate", "--model", src, "--prompt", "Once upon", "--max-new-tokens", "6", "--ignore-eos",
            "--dtype", "float32", "--no-compile"]
    assert cli.main(argv) == 0
    expected = capsys.readouterr().out
    assert cli.main([*argv, "--ternary-format", "5trit"]) == 0
    assert capsys.readouterr().out == expected
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--ternary-format", "3bit"])
    assert exc.value.code == 2


def test_bench_counts_5trit_bytes(checkpoints):
    two = bench.bytes_by_kind(torch_bitnet.from_pretrained(checkpoints["offline"]))
    five = bench.bytes_by_kind(torch_bitnet.from_pretrained(checkpoints["offline"], ternary_format="5trit"))
    assert five["ternary"] < two["ternary"]
    assert {k: v for k, v in five.items() if k != "ternary"} == {k: v for k, v in two.items() if k != "ternary"}
