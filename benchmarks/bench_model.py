#!/usr/bin/env python3
"""Whole-model benchmark at the exact shape of microsoft/bitnet-b1.58-2B-4T (random weights).

    python benchmarks/bench_model.py                  # 512-token prompt, 128 new tokens
    python benchmarks/bench_model.py --threads 1 --skip-transformers

What it measures, each in a fresh child process (so every peak RSS is that run's alone):

* torch_bitnet: ``from_pretrained`` of torch_bitnet's packed checkpoint (load seconds, peak RSS
  after loading), compile of the decode step (seconds), prefill of the prompt (chunked, eager)
  and decode of the new tokens with the compiled step (tokens/s, compile excluded), peak RSS.
* transformers' own BitNet model, its ``BitLinear`` path (packed uint8 weights unpacked at every
  forward): prefill of the same prompt and ``--hf-new-tokens`` decode steps with a dynamic cache
  (a few suffice: it is slow), peak RSS.

The checkpoints (2B-4T on-disk format written by torch_bitnet.checkpoints, converted once to
torch_bitnet's layout; and the same weights with ``linear_class: bitlinear`` for transformers)
are written once into ``--workdir`` (about 1.7 GB) and reused. Weights are random, so the
generated text is meaningless: this measures speed and memory only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_bitlinear import cpu_model  # the sibling script (this directory is on sys.path)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def prepare_checkpoints(workdir: Path) -> tuple[Path, Path]:
    """Write (once) the 2B-4T-shaped checkpoint, our packed conversion and the BitLinear variant."""
    import torch

    from torch_bitnet import convert_checkpoint
    from torch_bitnet.checkpoints import bitnet_config, write_checkpoint

    hf_dir, ours_dir, bitlinear_dir = workdir / "2b4t-offline", workdir / "2b4t-torch_bitnet", workdir / "2b4t-bitlinear"
    if not (hf_dir / "config.json").is_file():
        print(f"writing a random 2B-4T-shaped checkpoint to {hf_dir} (once)", file=sys.stderr)
        write_checkpoint(hf_dir, bitnet_config(), mode="offline", seed=0, progress=True)
    if not (ours_dir / "config.json").is_file():
        print(f"converting it to torch_bitnet's packed layout in {ours_dir} (once)", file=sys.stderr)
        convert_checkpoint(hf_dir, ours_dir, dtype=torch.bfloat16, progress=True)
    if not (bitlinear_dir / "config.json").is_file():
        # Same packed weights; transformers' BitLinear divides by weight_scale instead of
        # multiplying, which changes the numbers but not the work: fine for a speed benchmark.
        bitlinear_dir.mkdir(parents=True, exist_ok=True)
        for f in hf_dir.iterdir():
            if f.name != "config.json" and not (bitlinear_dir / f.name).exists():
                os.link(f, bitlinear_dir / f.name)
        raw = json.loads((hf_dir / "config.json").read_text())
        raw["quantization_config"]["linear_class"] = "bitlinear"
        (bitlinear_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return ours_dir, bitlinear_dir


def worker_ours(path: Path, prompt_len: int, new_tokens: int, chunk_size: int | None) -> dict:
    import torch

    from torch_bitnet import from_pretrained
    from torch_bitnet.generate import prefill, prepare

    t0 = time.perf_counter()
    model = from_pretrained(path)
    load_s, load_rss = time.perf_counter() - t0, _rss_mb()
    session = prepare(model, prompt_len + new_tokens)  # allocates the cache, compiles the step
    ids = torch.randint(0, 128000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        session.reset()
        t0 = time.perf_counter()
        logits = prefill(model, ids, session.cache, chunk_size)
        prefill_s = time.perf_counter() - t0
        token = logits.argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for i in range(new_tokens):
            position = torch.tensor([prompt_len + i])
            token = session.step(model, token, position).argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t0
    return {
        "load_s": load_s,
        "load_peak_rss_mb": load_rss,
        "compile_s": session.compile_seconds,
        "prefill_tok_s": prompt_len / prefill_s,
        "ttft_s": prefill_s,
        "decode_tok_s": new_tokens / decode_s,
        "peak_rss_mb": _rss_mb(),
    }


def worker_transformers(path: Path, prompt_len: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, 128000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :8], use_cache=False)  # compiles transformers' @torch.compile helpers
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t0
    return {
        "load_s": load_s,
        "prefill_tok_s": prompt_len / prefill_s,
        "ttft_s": prefill_s,
        "decode_tok_s": new_tokens / decode_s,
        "peak_rss_mb": _rss_mb(),
    }


def _run_child(args: argparse.Namespace, which: str, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--worker-path", str(path), "--threads", str(args.threads),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--hf-new-tokens", str(args.hf_new_tokens)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    print(f"running {which} ...", file=sys.stderr)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded by torch_bitnet (default 128)")
    parser.add_argument("--hf-new-tokens", type=int, default=3, help="tokens decoded by transformers (default 3)")
    parser.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (default: torch_bitnet's)")
    parser.add_argument("--skip-transformers", action="store_true", help="only measure torch_bitnet")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "torch_bitnet" / "bench",
                        help="where the benchmark checkpoints are written once (~1.7 GB)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "ours":
        print(json.dumps(worker_ours(args.worker_path, args.prompt_len, args.new_tokens, args.chunk_size)))
        return
    if args.worker == "transformers":
        print(json.dumps(worker_transformers(args.worker_path, args.prompt_len, args.hf_new_tokens)))
        return

    ours_dir, bitlinear_dir = prepare_checkpoints(args.workdir)
    results = {"ours": _run_child(args, "ours", ours_dir)}
    if not args.skip_transformers:
        results["transformers"] = _run_child(args, "transformers", bitlinear_dir)

    print(f"CPU: {cpu_model()} | threads: {args.threads} | torch {torch.__version__} | "
          f"{datetime.date.today().isoformat()} | prompt {args.prompt_len} tokens, decode {args.new_tokens} "
          f"(transformers: {args.hf_new_tokens})")
    print("model: random weights at the microsoft/bitnet-b1.58-2B-4T shape (30 layers, 2560/6912, 20/5 heads, "
          "vocab 128256, tied bf16 embeddings)")
    keys = [("load_s", "load s", ".1f"), ("compile_s", "compile s", ".1f"), ("ttft_s", "prefill s", ".2f"),
            ("prefill_tok_s", "prompt tok/s", ".2f"), ("decode_tok_s", "decode tok/s", ".2f"),
            ("load_peak_rss_mb", "RSS after load MB", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f")]
    print(f"{'':22s}" + "".join(f"{label:>18s}" for _, label, _ in keys))
    for name, res in results.items():
        cells = "".join(f"{format(res[k], fmt) if k in res else '-':>18s}" for k, _, fmt in keys)
        print(f"{'torch_bitnet' if name == 'ours' else 'transformers BitLinear':22s}{cells}")
    if "transformers" in results:
        o, t = results["ours"], results["transformers"]
        print(f"ratios: prefill {o['prefill_tok_s'] / t['prefill_tok_s']:.1f}x, decode "
              f"{o['decode_tok_s'] / t['decode_tok_s']:.1f}x, peak RSS {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, **results}, indent=2))


if __name__ == "__main__":
    main()
