#!/usr/bin/env python3
"""torch_bitnet against llama.cpp on this machine, the same random 2B-4T weights, alternating.

    python benchmarks/bench_llamacpp.py --llama-cpp /path/to/llama.cpp
    python benchmarks/bench_llamacpp.py --llama-cpp DIR --threads 1,2 --rounds 3 --lm-head int4

The peer of the issue's targets is llama.cpp as vendored in llama-cpp-python 0.3.36, with
TQ2_0 BitLinear weights and a Q6_K token embedding / output table (what ``llama-quantize
TQ2_0`` chooses), measured by ``llama-bench -p 512 -n 128``. Its source and a build of the two
tools this script runs (no internet needed beyond PyPI)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llp
    tar xzf /tmp/llp/llama_cpp_python-0.3.36.tar.gz -C /tmp/llp
    cd /tmp/llp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build build -j --target llama-bench llama-quantize

(``GGML_NATIVE``, on by default, builds llama.cpp for this CPU: the peer at its best here.)

Once, into ``--workdir``: the random 2B-4T checkpoint of ``torch-bitnet bench`` (the on-disk
format of microsoft/bitnet-b1.58-2B-4T) is converted by llama.cpp's own
``convert_hf_to_gguf.py`` to a bf16 GGUF and quantized to TQ2_0 (770.9 MiB; the bf16 file is
deleted). Three things of that converter are adjusted in its process, not in its files: the
2B-4T tensor names ``attn_sub_norm`` / ``ffn_sub_norm`` are added to its name map (it knows
only older BitNet names); the vocabulary is read as byte-level BPE under the Llama-3
pre-tokenizer (the bench checkpoint ships a ``tokenizer.json``, no sentencepiece model, and its
random vocabulary has no known hash); tensors are converted eagerly (``--no-lazy``: its lazy
meta tensors fail under torch 2.13).

Then ``--rounds`` rounds, each thread count in turn: one ``llama-bench`` run (``-r 1``) and one
fresh process of :func:`torch_bitnet.bench.measure` (the ``torch-bitnet bench`` figures: load,
the saved decode step, a 512-token prompt, 128 decoded tokens), which of the two goes first
alternating between rounds. The first process per thread count compiles and saves the decode
step before the rounds, so every timed run of ours is a later session. Printed: both engines'
prompt and decode tokens/s per round, ours / llama.cpp per round, and the medians. This
machine's speed moves by a third within minutes: only the per-round ratios are comparable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import runpy
import statistics
import subprocess
import sys
from pathlib import Path

from torch_bitnet.bench import cpu_model, default_workdir, prepare_checkpoint

GGUF_NAME = "2b4t-llamacpp-tq2_0.gguf"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", type=Path, required=True,
                   help="a llama.cpp source tree with build/bin/llama-bench and build/bin/llama-quantize")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per thread count (default 3)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (default 128)")
    p.add_argument("--lm-head", choices=("int8", "int4", "bf16"), default="int8",
                   help="torch_bitnet's embedding / lm_head table (default int8)")
    p.add_argument("--workdir", type=Path, default=default_workdir(), help="where the checkpoints are written once")
    p.add_argument("--json", type=Path, help="also write every run's figures as JSON")
    p.add_argument("--convert-worker", nargs=3, metavar=("LLAMA_CPP", "HF_DIR", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--ours-worker", metavar="SPEC", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def convert_worker(llama_cpp: str, hf_dir: str, out: str) -> None:
    """In a child process: llama.cpp's converter with the three adjustments of the docstring."""
    sys.path[:0] = [llama_cpp, os.path.join(llama_cpp, "gguf-py")]
    import gguf
    from conversion import base, bitnet
    from gguf import tensor_mapping

    names = tensor_mapping.TensorNameMap.block_mappings_cfg
    names[gguf.MODEL_TENSOR.ATTN_SUB_NORM] += ("model.layers.{bid}.self_attn.attn_sub_norm",)
    names[gguf.MODEL_TENSOR.FFN_SUB_NORM] += ("model.layers.{bid}.mlp.ffn_sub_norm",)
    bitnet.BitnetModel.set_vocab = lambda self: self._set_vocab_gpt2()
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "llama-bpe"
    script = os.path.join(llama_cpp, "convert_hf_to_gguf.py")
    sys.argv = [script, hf_dir, "--no-lazy", "--outtype", "bf16", "--outfile", out]
    runpy.run_path(script, run_name="__main__")


def tool(llama_cpp: Path, name: str) -> Path:
    path = llama_cpp / "build" / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: build it first (see --help)")
    return path


def prepare_gguf(llama_cpp: Path, workdir: Path) -> Path:
    """The TQ2_0 GGUF of the bench checkpoint, made once."""
    gguf_path = workdir / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{llama_cpp} has no convert_hf_to_gguf.py: is it a llama.cpp source tree?")
    quantize = tool(llama_cpp, "llama-quantize")
    prepare_checkpoint(workdir)  # writes workdir / 2b4t-offline, the on-disk format of 2B-4T
    hf_dir, bf16 = workdir / "2b4t-offline", workdir / "llamacpp-bf16.gguf"
    print(f"converting {hf_dir} to {bf16} with llama.cpp's converter (once)", file=sys.stderr)
    subprocess.run([sys.executable, __file__, "--llama-cpp", str(llama_cpp),
                    "--convert-worker", str(llama_cpp), str(hf_dir), str(bf16)], check=True)
    print(f"quantizing it to TQ2_0: {gguf_path}", file=sys.stderr)
    # llama-quantize reads a second argument that starts with a digit as the type: absolute paths
    subprocess.run([str(quantize), str(bf16.resolve()), str(gguf_path.resolve()), "TQ2_0"], check=True,
                   stdout=subprocess.DEVNULL)
    bf16.unlink()
    return gguf_path


def run_llama(llama_cpp: Path, gguf_path: Path, threads: int, args: argparse.Namespace) -> dict:
    """One llama-bench run: prompt and decode tokens/s."""
    proc = subprocess.run(
        [str(tool(llama_cpp, "llama-bench")), "-m", str(gguf_path), "-p", str(args.prompt_len),
         "-n", str(args.new_tokens), "-t", str(threads), "-r", "1", "-o", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed (exit status {proc.returncode}):\n{proc.stderr[-2000:]}")
    tests = json.loads(proc.stdout)
    prompt = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    decode = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return {"prefill_tok_s": prompt["avg_ts"], "decode_tok_s": decode["avg_ts"]}


def run_ours(path: Path, threads: int, args: argparse.Namespace, prompt_len: int, new_tokens: int) -> dict:
    """One fresh process of torch_bitnet.bench.measure; the decode step is saved under --workdir."""
    cache = args.workdir / "llamacpp-compare-cache"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "BITNET_STEP_CACHE_DIR": str(cache / "steps")}
    env.pop("BITNET_STEP_CACHE", None)
    spec = {"path": str(path), "threads": threads, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "lm_head": args.lm_head}
    proc = subprocess.run([sys.executable, __file__, "--llama-cpp", str(args.llama_cpp), "--ours-worker",
                           json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours_worker(spec_json: str) -> None:
    import torch

    from torch_bitnet.bench import measure

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    result = measure(Path(spec["path"]), prompt_len=spec["prompt_len"], new_tokens=spec["new_tokens"],
                     lm_head=spec["lm_head"], progress=False)
    print(json.dumps({k: result[k] for k in ("prefill_tok_s", "decode_tok_s", "step_from_disk", "isa")}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.convert_worker:
        convert_worker(*args.convert_worker)
        return
    if args.ours_worker:
        ours_worker(args.ours_worker)
        return
    import torch

    threads = [int(t) for t in args.threads.split(",")]
    if args.rounds < 1 or any(t < 1 for t in threads):
        raise SystemExit("--rounds and every --threads entry must be >= 1")
    gguf_path = prepare_gguf(args.llama_cpp, args.workdir)
    ours_path, _ = prepare_checkpoint(args.workdir, lm_head=args.lm_head)
    runs = []
    for t in threads:  # compile and save each thread count's decode step before timing anything
        print(f"torch_bitnet, {t} threads: preparing the decode step", file=sys.stderr)
        run_ours(ours_path, t, args, 16, 2)
    for r in range(args.rounds):
        for t in threads:
            order = ("llama.cpp", "torch_bitnet") if r % 2 == 0 else ("torch_bitnet", "llama.cpp")
            row = {"round": r + 1, "threads": t}
            for engine in order:
                print(f"round {r + 1}, {t} threads: {engine}", file=sys.stderr)
                if engine == "llama.cpp":
                    row[engine] = run_llama(args.llama_cpp, gguf_path, t, args)
                else:
                    row[engine] = run_ours(ours_path, t, args, args.prompt_len, args.new_tokens)
            runs.append(row)
    header = (f"CPU: {cpu_model()} | torch {torch.__version__} | {datetime.date.today()} | random 2B-4T weights | "
              f"prompt {args.prompt_len}, decode {args.new_tokens} | torch_bitnet: lm_head {args.lm_head}, "
              f"ISA {runs[0]['torch_bitnet']['isa']} | llama.cpp: TQ2_0 + Q6_K table")
    print(header)
    print(f"{'threads':>7} {'round':>6} | {'prompt tok/s: llama.cpp':>24} {'ours':>7} {'ratio':>6} | "
          f"{'decode tok/s: llama.cpp':>24} {'ours':>7} {'ratio':>6}")
    for t in threads:
        rows = [row for row in runs if row["threads"] == t]
        ratios = {"prefill_tok_s": [], "decode_tok_s": []}
        for row in rows:
            cells = []
            for key in ratios:
                peer, ours = row["llama.cpp"][key], row["torch_bitnet"][key]
                ratios[key].append(ours / peer)
                cells.append(f"{peer:>24.2f} {ours:>7.2f} {ours / peer:>5.2f}x")
            print(f"{t:>7} {row['round']:>6} | {cells[0]} | {cells[1]}")
        print(f"{t:>7} {'median':>6} | {'':>32} {statistics.median(ratios['prefill_tok_s']):>5.2f}x | "
              f"{'':>32} {statistics.median(ratios['decode_tok_s']):>5.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
