"""The built-in default model (torch_bitnet/default_model, trained by examples/train_default_model.py).

Its figures are in docs/default_model.json (written by the training run). The held-out text is
tests/data/kjv_heldout.txt: the 59 chapters (i % 20 == 10) of the King James Bible that
training never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import torch_bitnet
from torch_bitnet import cli
from torch_bitnet.training import perplexity

MODEL = Path(torch_bitnet.DEFAULT_MODEL)
HELDOUT = Path(__file__).parent / "data" / "kjv_heldout.txt"
SEQ_LEN = 256  # the training and evaluation window

#: Held-out perplexity through torch_bitnet's ops with the default options (bf16 activations,
#: int8 lm_head): the training run measured RECORDED (docs/default_model.json); the threshold
#: leaves 1% for other torch builds' float rounding. A unigram model of the same tokenizer has
#: UNIGRAM on the same tokens.
RECORDED = 26.603
THRESHOLD = 26.87
UNIGRAM = 428.17

PROMPT = "And God said"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def heldout_ids(tokenizer):
    chapters = HELDOUT.read_text().split("\n\n")  # one chapter per document, as in training
    ids = [i for doc in chapters for i in tokenizer(doc.strip("\n") + "\n", verbose=False)["input_ids"]]
    return torch.tensor(ids)


@pytest.fixture(scope="module")
def model():
    return torch_bitnet.from_pretrained(MODEL)


def test_shipped_in_the_2b4t_format_within_10_mb():
    files = {f.name for f in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert sum(f.stat().st_size for f in MODEL.iterdir()) <= 10 * 1024 * 1024
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["hidden_act"] == "relu2" and config["tie_word_embeddings"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["quantization_config"]["quantization_mode"] == "offline"
    with safe_open(str(MODEL / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert w.dtype == torch.uint8 and w.shape[0] * 4 == config["hidden_size"]
        assert "lm_head.weight" not in f.keys()


def test_heldout_perplexity_through_the_ops_is_below_the_recorded_threshold(model, heldout_ids):
    ppl = perplexity(model, heldout_ids, SEQ_LEN, batch_size=16)
    assert ppl <= THRESHOLD, (ppl, RECORDED)
    assert ppl < UNIGRAM / 4


def test_transformers_own_model_gives_the_same_perplexity(heldout_ids):
    """An independent implementation: transformers' offline AutoBitLinear (bf16 ternary weights,
    its own fake-quant forward), run in float32, vs torch_bitnet's ops in float32: within 1%."""
    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    for tensor in [*hf.parameters(), *hf.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.float()
    ours = torch_bitnet.from_pretrained(MODEL, dtype=torch.float32, lm_head="bf16")
    ids = heldout_ids[: 24 * SEQ_LEN]
    theirs, mine = perplexity(hf, ids, SEQ_LEN), perplexity(ours, ids, SEQ_LEN)
    assert abs(mine / theirs - 1) <= 0.01, (mine, theirs)


def test_greedy_generation_is_deterministic_and_sensible(model, tokenizer):
    first = torch_bitnet.generate(model, tokenizer, PROMPT, 24, compile=False)
    again = torch_bitnet.generate(model, tokenizer, PROMPT, 24, compile=False)
    assert first.token_ids == again.token_ids and first.text == again.text
    words = first.text.split()
    assert len(words) >= 8 and sum(w.isalpha() for w in words) >= len(words) // 2  # English words, not bytes


@pytest.mark.slow
def test_greedy_generation_compiled_equals_eager(model, tokenizer):
    eager = torch_bitnet.generate(model, tokenizer, PROMPT, 32, compile=False, eos=False)
    compiled = torch_bitnet.generate(model, tokenizer, PROMPT, 32, compile=True, eos=False)
    assert compiled.token_ids == eager.token_ids


def test_command_line_uses_it_without_model(capsys, model, tokenizer):
    assert cli.DEFAULT_MODEL == str(MODEL)
    code = cli.main(["generate", "--prompt", PROMPT, "--max-new-tokens", "16", "--no-compile"])
    out, err = capsys.readouterr()
    want = torch_bitnet.generate(model, tokenizer, PROMPT, 16, compile=False)
    assert code == 0 and out == want.text + "\n"
    assert str(MODEL) in err
