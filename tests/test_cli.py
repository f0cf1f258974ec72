"""The torch-bitnet command line (torch_bitnet.cli), run in-process on a random tiny checkpoint.

The eager decode step (--no-compile) keeps these tests fast; one slow test runs the default
compiled bfloat16 path.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from torch_bitnet import checkpoints, cli
from torch_bitnet.generate import generate
from torch_bitnet.loading import from_pretrained

PROMPT = "Once upon a time"
FAST = ["--dtype", "float32", "--no-compile"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(checkpoints.write_checkpoint(tmp_path_factory.mktemp("cli"), checkpoints.small_config("tiny"), seed=5))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same model and tokenizer, to compute what the command should print."""
    return from_pretrained(checkpoint, dtype=torch.float32), AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [[], ["generate"], ["chat"]], ids=["main", "generate", "chat"])
def test_help_explains_every_option(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    expected = ["generate", "chat"] if not argv else [
        "--model", "--threads", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
        "--no-compile", "--chunk-size", "--dtype", "--max-seq-len", "--kv-cache-dtype", "--lm-head",
        "--ternary-format",
    ]
    per_command = {
        "generate": ["--prompt", "--stop", "--ignore-eos", "--chat"],
        "chat": ["/reset", "/exit", "--system"],
    }
    expected += per_command.get(argv[0] if argv else "", [])
    for word in expected:
        assert word in out, word


def test_generate_streams_the_text_and_reports_speed_and_memory(capsys, checkpoint, reference, threads):
    code, out, err = run(capsys, ["generate", "--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "12",
                                  "--ignore-eos", "--threads", "1", *FAST])
    assert code == 0
    model, tokenizer = reference
    expected = generate(model, tokenizer, PROMPT, 12, compile=False, eos=False)
    assert out == expected.text + "\n"
    assert torch.get_num_threads() == 1
    assert "loading" in err and "1 threads" in err
    assert re.search(r"prompt \d+ tokens at [\d.]+ tok/s \| decode 12 tokens at [\d.]+ tok/s \| peak RSS \d+ MiB", err)


def test_generate_options_reach_generate(capsys, checkpoint, reference, monkeypatch):
    model, tokenizer = reference
    full = generate(model, tokenizer, PROMPT, 16, compile=False, eos=False)
    stop = full.text[len(full.text) // 2 :][:3]
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    argv = ["generate", "--model", checkpoint, "--prompt", "-", "--max-new-tokens", "16", "--ignore-eos",
            "--stop", stop, "--chunk-size", "3", *FAST]
    code, out, _ = run(capsys, argv)
    assert code == 0 and out == full.text[: full.text.find(stop)] + "\n"

    sampled = generate(model, tokenizer, PROMPT, 10, compile=False, eos=False, temperature=0.9, top_k=20, top_p=0.9,
                       seed=7, chat=True)
    argv = ["generate", "--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "10", "--ignore-eos", "--chat",
            "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "7", *FAST]
    code, out, _ = run(capsys, argv)
    assert code == 0 and out == sampled.text + "\n"


@pytest.mark.parametrize("kv", ["fp32", "bf16", "int8"])
def test_kv_cache_dtype_option_and_environment(capsys, checkpoint, reference, monkeypatch, kv):
    """--kv-cache-dtype reaches the model; without it BITNET_KV_CACHE_DTYPE does; a bad value
    in the environment is a usage error (status 2)."""
    model, tokenizer = reference
    expected = generate(model, tokenizer, PROMPT, 8, compile=False, eos=False, kv_cache_dtype=kv)
    argv = ["generate", "--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "8", "--ignore-eos", *FAST]
    code, out, err = run(capsys, [*argv, "--kv-cache-dtype", kv])
    assert code == 0 and out == expected.text + "\n" and f"{kv} KV cache" in err
    monkeypatch.setenv("BITNET_KV_CACHE_DTYPE", kv)
    code, out, err = run(capsys, argv)
    assert code == 0 and out == expected.text + "\n" and f"{kv} KV cache" in err
    monkeypatch.setenv("BITNET_KV_CACHE_DTYPE", "fp8")
    code, out, err = run(capsys, argv)
    assert code == 2 and "BITNET_KV_CACHE_DTYPE" in err and "Traceback" not in err


def test_lm_head_option(capsys, checkpoint):
    """--lm-head bf16 generates what the float-lm_head model generates."""
    model = from_pretrained(checkpoint, dtype=torch.float32, lm_head="bf16")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = generate(model, tokenizer, PROMPT, 8, compile=False, eos=False)
    code, out, _ = run(capsys, ["generate", "--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "8",
                                "--ignore-eos", "--lm-head", "bf16", *FAST])
    assert code == 0 and out == expected.text + "\n"


def test_chat_keeps_history_and_resets(capsys, checkpoint, reference, monkeypatch):
    model, tokenizer = reference
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n\nTell me more.\n/reset\nTell me more.\n/exit\nunread\n"))
    code, out, err = run(capsys, ["chat", "--model", checkpoint, "--max-new-tokens", "6", "--temperature", "0",
                                  "--system", "Be brief.", *FAST])
    assert code == 0

    def prompt_tokens(messages):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    system = {"role": "system", "content": "Be brief."}
    first = generate(model, tokenizer, [system, {"role": "user", "content": "Hello!"}], 6, compile=False)
    second_history = [system, {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": first.text},
                      {"role": "user", "content": "Tell me more."}]
    second = generate(model, tokenizer, second_history, 6, compile=False)
    third = generate(model, tokenizer, [system, {"role": "user", "content": "Tell me more."}], 6, compile=False)
    assert out == first.text + "\n" + second.text + "\n" + third.text + "\n"
    counts = [int(n) for n in re.findall(r"prompt (\d+) tokens", err)]
    assert counts == [prompt_tokens(m) for m in (second_history[:2], second_history, [system, second_history[-1]])]
    assert err.count("peak RSS") == 3 and "conversation cleared" in err


def test_chat_ends_at_end_of_input(capsys, checkpoint, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    code, out, err = run(capsys, ["chat", "--model", checkpoint, "--max-new-tokens", "3", *FAST])
    assert code == 0 and err.count("decode") == 1


def test_missing_model_is_a_clear_error_with_status_2(capsys, tmp_path):
    code, out, err = run(capsys, ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", *FAST])
    assert code == 2 and out == ""
    assert "error" in err and "nowhere" in err and "Traceback" not in err


def test_no_model_is_a_usage_error_without_a_default(capsys, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_MODEL", None)
    code, _, err = run(capsys, ["generate", "--prompt", "x"])
    assert code == 2 and "--model" in err


def test_bad_options_exit_2(capsys, checkpoint):
    for bad in (["--top-p", "1.5"], ["--temperature", "-1"], ["--top-k", "0"], ["--dtype", "float8"],
                ["--kv-cache-dtype", "int4"], ["--lm-head", "fp8"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["generate", "--model", checkpoint, "--prompt", "x", *bad])
        assert exc.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_console_process_exit_status_without_traceback(tmp_path):
    """As a real process (what the console script runs): status 2, one error line."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch_bitnet", "chat", "--model", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nowhere" in proc.stderr


@pytest.mark.slow
def test_generate_compiled_bfloat16_default(capsys, checkpoint):
    code, out, err = run(capsys, ["generate", "--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "8",
                                  "--ignore-eos"])
    assert code == 0 and out.endswith("\n")
    assert "compiling the decode step" in err and "not counted" in err
