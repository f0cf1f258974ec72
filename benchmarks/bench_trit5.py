#!/usr/bin/env python3
"""The 5-trit weight format against the 2-bit one, in one process, on the same ternary weights.

    python benchmarks/bench_trit5.py                  # 1 and 2 threads
    python benchmarks/bench_trit5.py --threads 2 --pairs 40 --json trit5.json
    python benchmarks/bench_trit5.py --quick          # smoke run, a few seconds

Two measurements per thread count:

* stack: one decode token (M = 1) through the 30 layers x 7 BitLinear weights of 2B-4T
  (q/k/v/o 2560 -> 2560/640/640/2560, gate/up 2560 -> 6912, down 6912 -> 2560; random ternary
  weights, 521 MB packed 2-bit, 417 MB 5-trit, so every call reads its weight from DRAM), as
  ``bitlinear`` calls on bf16 activations. The two formats run as alternating passes (the
  order swapped every pair), so a change in what the shared machine gives affects both alike;
  reported: the median pass time of each, their ratio (5-trit / 2-bit), in how many pairs
  5-trit was faster, and the rate each streamed its weight bytes at.
* hot: ``ternary_mm`` of one token with a 1024 x 2560 weight that stays in L2, repeated: the
  kernels' arithmetic rate in G weights/s with memory out of the way. A format whose hot rate
  is below what a core reads from DRAM cannot stream at memory speed.

The ISA is the process's (``TORCH_BITNET_ISA`` or the best one); 5-trit decode needs
``avx512vbmi`` to run without unpacking.
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

#: (out_features, in_features) of one 2B-4T decoder layer's BitLinears
LAYER = [(2560, 2560), (640, 2560), (640, 2560), (2560, 2560), (6912, 2560), (6912, 2560), (2560, 6912)]
LAYERS = 30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--pairs", type=int, default=30, help="alternating pass pairs per thread count (default 30)")
    p.add_argument("--quick", action="store_true", help="4 layers, 4 pairs: a smoke run")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    return p.parse_args()


def stack(layers: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The same random ternary weights packed both ways, per layer."""
    g = torch.Generator().manual_seed(0)
    two, five = [], []
    for _ in range(layers):
        w = [torch.randint(-1, 2, shape, dtype=torch.int8, generator=g) for shape in LAYER]
        two.append([tb.pack_ternary(x) for x in w])
        five.append([tb.pack_ternary(x, "5trit") for x in w])
    return two, five


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
    two, five = stack(layers)
    nbytes = {f: sum(w.numel() for layer in ws for w in layer) for f, ws in (("2bit", two), ("5trit", five))}
    xs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in (2560, 6912)}
    scale = torch.ones(1)
    hot_w = torch.randint(-1, 2, (1024, 2560), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    hot = {"2bit": tb.pack_ternary(hot_w), "5trit": tb.pack_ternary(hot_w, "5trit")}
    header = (f"CPU: {cpu_model()} | torch {torch.__version__} | ISA {tb.get_isa()} | "
              f"{datetime.date.today().isoformat()} | {layers} layers: 2bit {nbytes['2bit'] / 1e6:.0f} MB, "
              f"5trit {nbytes['5trit'] / 1e6:.0f} MB")
    print(header)
    print(f"{'threads':>7s} {'2bit ms':>9s} {'5trit ms':>9s} {'5t/2b':>7s} {'5t wins':>8s} {'2bit GB/s':>10s} "
          f"{'5trit GB/s':>11s} {'hot 2bit Gw/s':>14s} {'hot 5trit Gw/s':>15s}")
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for _ in range(2):  # warm-up: page in both stacks, start the thread pool
            one_token(two, xs, scale)
            one_token(five, xs, scale)
        t2, t5 = [], []
        for i in range(pairs):
            order = [(two, t2), (five, t5)] if i % 2 else [(five, t5), (two, t2)]
            for weights, times in order:
                times.append(one_token(weights, xs, scale))
        m2, m5 = statistics.median(t2), statistics.median(t5)
        row = {
            "threads": threads, "ms_2bit": m2 * 1e3, "ms_5trit": m5 * 1e3, "ratio": m5 / m2,
            "wins_5trit": sum(b < a for a, b in zip(t2, t5)), "pairs": pairs,
            "gb_s_2bit": nbytes["2bit"] / m2 / 1e9, "gb_s_5trit": nbytes["5trit"] / m5 / 1e9,
            "hot_gw_s_2bit": hot_rate(hot["2bit"], 1024, 2560), "hot_gw_s_5trit": hot_rate(hot["5trit"], 1024, 2560),
        }
        results.append(row)
        print(f"{threads:7d} {row['ms_2bit']:9.2f} {row['ms_5trit']:9.2f} {row['ratio']:7.3f} "
              f"{row['wins_5trit']:>4d}/{pairs:<3d} {row['gb_s_2bit']:10.1f} {row['gb_s_5trit']:11.1f} "
              f"{row['hot_gw_s_2bit']:14.0f} {row['hot_gw_s_5trit']:15.0f}")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2))


if __name__ == "__main__":
    main()
