"""torch_bitnet.bench and ``torch-bitnet bench`` on a small checkpoint (the 2B-4T default is
what users run; writing it takes minutes, so it is exercised by hand, see BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import torch_bitnet
from torch_bitnet import bench, checkpoints, cli
from torch_bitnet.loading import from_pretrained
from torch_bitnet.nn import BitLinear


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return checkpoints.write_checkpoint(tmp_path_factory.mktemp("bench"), checkpoints.small_config("gqa"), seed=3)


def test_bytes_by_kind_counts_every_tensor_once(checkpoint):
    model = from_pretrained(checkpoint, dtype=torch.bfloat16)
    sizes = bench.bytes_by_kind(model)
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    assert sum(sizes.values()) == sum(unique.values())
    ternary = sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, BitLinear) for t in m.buffers())
    assert sizes["ternary"] == ternary > 0
    embedding = model.get_input_embeddings()  # int8 codes + float32 row scales by default
    assert sizes["embedding"] == embedding.weight.numel() + 4 * embedding.weight_scale.numel()
    assert sizes["lm_head"] == 0  # tied to the embedding (as in 2B-4T): counted once
    assert sizes["norms"] > 0


@pytest.mark.slow
def test_bench_command_measures_in_a_child_and_writes_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--model", str(checkpoint), "--prompt-len", "16,24", "--new-tokens", "4", "--threads",
                     "1", "--kv-cache-dtype", "bf16", "--ternary-format", "5trit", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "prompt tok/s" in printed and "decode tok/s" in printed and "read bandwidth" in printed
    assert "prompt 16,24" in printed  # the header names both configurations
    runs = json.loads(out.read_text())["torch_bitnet"]
    assert [r["prompt_len"] for r in runs] == [16, 24]  # one configuration per prompt length
    # bf16 cache of prompt + 4 positions: 2 layers x (K, V) x 2 kv heads x 32 dims x 2 bytes per position
    assert [r["kv_cache_bytes"] for r in runs] == [2 * 2 * 2 * 32 * 2 * 20, 2 * 2 * 2 * 32 * 2 * 28]
    run = runs[0]
    assert run["threads"] == 1 and run["kv_cache_dtype"] == "bf16" and run["ternary_format"] == "5trit"
    assert run["isa"] in torch_bitnet.available_isas()
    for key in ("load_s", "compile_cold_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "stream_gb_s", "peak_rss_mb"):
        assert run[key] > 0, key
    # the second (warm) child loaded the step the first compiled and saved
    assert run["warm_step_from_disk"] and run["compile_warm_s"] < run["compile_cold_s"]
    assert run["peak_rss_warm_mb"] > 0 and run["decode_tok_s_warm"] > 0
    assert run["peak_rss_mb"] >= run["load_peak_rss_mb"]


def test_bench_errors_are_usage_errors(checkpoint, tmp_path, capsys):
    code = cli.main(["bench", "--model", str(tmp_path), "--threads", "1"])
    assert code == 2 and "config.json" in capsys.readouterr().err
    # 4000 + 128 positions: past the small model's 4096, refused before any child runs
    code = cli.main(["bench", "--model", str(checkpoint), "--prompt-len", "512,4000", "--threads", "1"])
    assert code == 2 and "--prompt-len 4000 + --new-tokens 128 exceed the model's 4096 positions" in capsys.readouterr().err
    for option, value, message in (("--threads", "0", "thread counts"), ("--prompt-len", "512,x", "prompt lengths"),
                                   ("--prompt-len", "0", "prompt lengths")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", option, value])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def _run(threads: int, prompt_len: int, decode: float) -> dict:
    return {"threads": threads, "prompt_len": prompt_len, "prefill_tok_s": 100.0, "decode_tok_s": decode}


def test_plot_is_against_threads_or_the_prompt_length():
    # one prompt length: x is the thread count, a line per implementation
    results = {"torch_bitnet": [_run(2, 512, 30.0), _run(1, 512, 16.0)], "transformers": [_run(1, 512, 0.1)]}
    x_key, lines = bench._plot_series(results)
    assert x_key == "threads" and list(lines) == ["torch_bitnet", "transformers"]
    assert [r["threads"] for r in lines["torch_bitnet"]] == [1, 2]  # sorted along x
    # several prompt lengths: x is the prompt length, a line per implementation and thread count
    results = {"torch_bitnet": [_run(1, 2048, 14.0), _run(1, 512, 16.0), _run(2, 512, 30.0), _run(2, 2048, 26.0)]}
    x_key, lines = bench._plot_series(results)
    assert x_key == "prompt_len" and list(lines) == ["torch_bitnet, 1 thread", "torch_bitnet, 2 threads"]
    assert [r["decode_tok_s"] for r in lines["torch_bitnet, 2 threads"]] == [30.0, 26.0]


def _script(name: str):
    """benchmarks/<name>.py as a module (a script, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _llamacpp_script():
    return _script("bench_llamacpp")


def test_llamacpp_comparison_checks_its_inputs(tmp_path):
    script = _llamacpp_script()
    with pytest.raises(SystemExit, match="--rounds"):
        script.main(["--llama-cpp", str(tmp_path), "--rounds", "0"])
    with pytest.raises(SystemExit, match="no convert_hf_to_gguf.py"):
        script.main(["--llama-cpp", str(tmp_path), "--workdir", str(tmp_path / "work")])


def test_llamacpp_comparison_reads_llama_bench(tmp_path):
    """run_llama passes the sizes and threads to llama-bench and reads its JSON; a failing
    llama-bench is an error that shows its stderr."""
    tools = tmp_path / "build" / "bin"
    tools.mkdir(parents=True)
    fake = tools / "llama-bench"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {tmp_path / "argv"}\n'
        'echo \'[{"n_prompt": 64, "n_gen": 0, "avg_ts": 20.5}, {"n_prompt": 0, "n_gen": 8, "avg_ts": 10.25}]\'\n'
    )
    fake.chmod(0o755)
    script = _llamacpp_script()
    args = script.parse_args(["--llama-cpp", str(tmp_path), "--prompt-len", "64", "--new-tokens", "8"])
    assert script.run_llama(tmp_path, tmp_path / "m.gguf", 2, args) == {"prefill_tok_s": 20.5, "decode_tok_s": 10.25}
    argv = (tmp_path / "argv").read_text().split()
    assert argv[argv.index("-p") + 1] == "64" and argv[argv.index("-n") + 1] == "8" and argv[argv.index("-t") + 1] == "2"
    fake.write_text("#!/bin/sh\necho 'failed to load model' >&2\nexit 3\n")
    with pytest.raises(SystemExit, match="failed to load model"):
        script.run_llama(tmp_path, tmp_path / "m.gguf", 1, args)


def test_layer_call_baseline_computes_the_same_layer():
    """bench_layer_call.py times the op against the separate ops: both must compute the same
    layer (output and cache write), or the comparison would mean nothing."""
    script = _script("bench_layer_call")
    args = script.parse_args(["--hidden", "64", "--heads", "2", "--intermediate", "96", "--context", "3"])
    op_args, separate = script.make_layer(args)
    caches = op_args[7:11]
    with torch.inference_mode():
        expected = separate()
        written = [c.clone() for c in caches]
        for c in caches:
            c.zero_()  # the op must write the token's keys and values itself
        for c, w in zip(caches, written):
            c[:, :, :3] = w[:, :, :3]
        got = torch.ops.bitnet.decoder_layer.default(*op_args)
    assert torch.equal(got, expected)
    for c, w in zip(caches, written):
        assert torch.equal(c, w)
    with pytest.raises(SystemExit):
        script.parse_args(["--hidden", "65"])


def test_attention_bench_prints_decode_and_prompt_rows(capsys):
    """bench_attention.py --prompts adds one row per prompt length after the decode rows, each
    with the four timings and the int8 op's multiply-add rate."""
    script = _script("bench_attention")
    script.main(["--threads", "1", "--contexts", "8", "--prompts", "8,16", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("one layer's prompt attention"))
    assert any(line.split("|")[0].strip() == "8" for line in lines[:first])  # the decode row
    rows = [line for line in lines[first + 2:] if "|" in line]
    assert [row.split("|")[0].strip() for row in rows] == ["8", "16"]
    for row in rows:
        numbers = [float(v) for part in row.split("|")[1:] for v in part.split()]
        assert len(numbers) == 7 and all(v > 0 for v in numbers)


def test_sample_baseline_keeps_the_same_tokens():
    """bench_sample.py times sample() against a textbook sort + multinomial sampler: both must
    draw only from the tokens the setting keeps, or the comparison would mean nothing."""
    script = _script("bench_sample")
    g = torch.Generator().manual_seed(0)
    logits = torch.linspace(4.0, -4.0, 500).unsqueeze(0)  # token i more probable than i + 1
    probs = torch.softmax(logits[0].double() / 0.8, 0)
    limits = {"temperature 0.8": 500, "+ top_k 50": 50,
              "+ top_p 0.95": int(((torch.cumsum(probs, 0) - probs) < 0.95).sum())}
    assert 64 < limits["+ top_p 0.95"] < 500  # past sample()'s first top-k of 64
    for name, kwargs in script.SETTINGS.items():
        for sampler in (script.sample, script.textbook_sample):
            drawn = torch.cat([sampler(logits, generator=g, **kwargs) for _ in range(300)])
            assert int(drawn.max()) < limits[name] and int(drawn.min()) >= 0, (name, sampler)
    with pytest.raises(SystemExit):
        script.parse_args(["--vocab", "x"])


@pytest.mark.slow
@pytest.mark.parametrize("lm_head", ["int8", "int4"])
def test_step_ops_bench_splits_the_step_time(checkpoint, capsys, lm_head):
    figures = _script("bench_step_ops").main(["--model", str(checkpoint), "--threads", "1", "--context", "8",
                                              "--steps", "3", "--top", "3", "--rounds", "2", "--lm-head", lm_head])
    printed = capsys.readouterr().out
    assert "ms per token under the profiler" in printed and "bitnet::decoder_layer" in printed
    assert 0 < figures["ops_ms"] < figures["ms_per_token"]
    alone = figures["alone"]
    assert set(alone) == {"decode step", "ternary products", "plain read of them", "lm_head product", "plain read of it"}
    assert all(ms > 0 for ms in alone.values())
    assert "ternary products at" in printed and "lm_head product at" in printed
    for bad in (["--steps", "0"], ["--rounds", "-1"]):
        with pytest.raises(SystemExit):
            _script("bench_step_ops").parse_args(bad)
