#!/usr/bin/env python3
"""The denser weight formats (5-trit, 3-trit) against the 2-bit one, in one process, on the same
ternary weights.

    python benchmarks/bench_trit5.py                  # 1 and 2 threads, all three formats
    python benchmarks/bench_trit5.py --threads 2 --pairs 40 --json trit5.json
    python benchmarks/bench_trit5.py --formats 2bit,3trit
    python benchmarks/bench_trit5.py --quick          # smoke run, a few seconds

Two measurements per thread count:

* stack: one decode token (M = 1) through the 30 layers x 7 BitLinear weights of 2B-4T
  (q/k/v/o 2560 -> 2560/640/640/2560, gate/up 2560 -> 6912, down 6912 -> 2560; random ternary
  weights, 521 MB packed 2-bit, 417 MB 5-trit, 463 MB 3-trit, so every call reads its weight
  from DRAM), as ``bitlinear`` calls on bf16 activations. The formats run as alternating passes
  (the order rotated every round), so a change in what the shared machine gives affects all
  alike; reported: the median pass time of each, its ratio to the first format's, in how many
  rounds it was faster than the first, and the rate it streamed its weight bytes at. (Each call
  also pays ~5-10 us of Python and dispatch, ~1.5 ms per pass.)
* hot: ``ternary_mm`` of one token with a 1024 x 2560 weight that stays in L2, repeated: the
  kernels' arithmetic rate in G weights/s with memory out of the way. A format whose hot rate
  is below what a core reads from DRAM cannot stream at memory speed.

The ISA is the process's (``TORCH_BITNET_ISA`` or the best one); 5-trit decode needs
``avx512vbmi`` to run without unpacking, 3-trit decode ``avx512``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import torch_bitnet as tb
from torch_bitnet.bench import cpu_model
from torch_bitnet.packing import FORMATS

#: (out_features, in_features) of one 2B-4T decoder layer's BitLinears
LAYER = [(2560, 2560), (640, 2560), (640, 2560), (2560, 2560), (6912, 2560), (6912, 2560), (2560, 6912)]
LAYERS = 30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated formats, the first the baseline (default {','.join(FORMATS)})")
    p.add_argument("--pairs", type=int, default=30, help="alternating rounds per thread count (default 30)")
    p.add_argument("--quick", action="store_true", help="4 layers, 4 rounds: a smoke run")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    args.formats = args.formats.split(",")
    if not args.formats or not set(args.formats) <= set(FORMATS):
        p.error(f"--formats takes some of {', '.join(FORMATS)}")
    return args


def stack(layers: int, formats: list[str]) -> dict[str, list[list[torch.Tensor]]]:
    """The same random ternary weights packed in each format, per layer."""
    g = torch.Generator().manual_seed(0)
    packed: dict[str, list[list[torch.Tensor]]] = {f: [] for f in formats}
    for _ in range(layers):
        w = [torch.randint(-1, 2, shape, dtype=torch.int8, generator=g) for shape in LAYER]
        for f in formats:
            packed[f].append([tb.pack_ternary(x, f) for x in w])
    return packed


def one_token(weights: list[list[torch.Tensor]], xs: dict[int, torch.Tensor], scale: torch.Tensor) -> float:
    start = time.perf_counter()
    for layer in weights:
        for (n, k), w in zip(LAYER, layer):
            tb.bitlinear(xs[k], w, scale, None, k, n)
    return time.perf_counter() - start


def hot_rate(packed: torch.Tensor, n: int, k: int, calls: int = 200) -> float:
    """G weights/s of ternary_mm, one token, weight resident in L2 (best of 5 batches)."""
    xq = torch.randint(-128, 128, (1, k), dtype=torch.int8)
    for _ in range(20):
        tb.ternary_mm(xq, packed, k, n)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            tb.ternary_mm(xq, packed, k, n)
        best = min(best, (time.perf_counter() - start) / calls)
    return n * k / best / 1e9


def main() -> None:
    args = parse_args()
    layers, pairs = (4, 4) if args.quick else (LAYERS, args.pairs)
    formats = args.formats
    packed = stack(layers, formats)
    nbytes = {f: sum(w.numel() for layer in ws for w in layer) for f, ws in packed.items()}
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in (2560, 6912)}
    scale = torch.ones(1)
    hot_w = torch.randint(-1, 2, (1024, 2560), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    hot = {f: tb.pack_ternary(hot_w, f) for f in formats}
    header = (f"CPU: {cpu_model()} | torch {torch.__version__} | ISA {tb.get_isa()} | "
              f"{datetime.date.today().isoformat()} | {layers} layers: "
              + ", ".join(f"{f} {nbytes[f] / 1e6:.0f} MB" for f in formats))
    print(header)
    base = formats[0]
    print(f"{'threads':>7s} {'format':>7s} {'ms':>8s} {'/' + base:>8s} {'faster':>7s} {'GB/s':>6s} {'hot Gw/s':>9s}")
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for _ in range(2):  # warm-up: page in every stack, start the thread pool
            for f in formats:
                one_token(packed[f], xs, scale)
        times: dict[str, list[float]] = {f: [] for f in formats}
        for i in range(pairs):
            for j in range(len(formats)):
                f = formats[(i + j) % len(formats)]
                times[f].append(one_token(packed[f], xs, scale))
        for f in formats:
            ms = statistics.median(times[f]) * 1e3
            row = {
                "threads": threads, "format": f, "ms": ms, "ratio": ms / (statistics.median(times[base]) * 1e3),
                "faster_than_base": sum(a < b for a, b in zip(times[f], times[base])), "rounds": pairs,
                "gb_s": nbytes[f] / ms / 1e6, "hot_gw_s": hot_rate(hot[f], 1024, 2560),
            }
            results.append(row)
            print(f"{threads:7d} {f:>7s} {ms:8.2f} {row['ratio']:8.3f} {row['faster_than_base']:>3d}/{pairs:<3d} "
                  f"{row['gb_s']:6.1f} {row['hot_gw_s']:9.0f}")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
