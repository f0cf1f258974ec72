#!/usr/bin/env python3
"""Benchmark the int8 and int4 lm_heads (``int8_linear``, ``int4_linear``) against F.linear and a bandwidth yardstick.

    python benchmarks/bench_lm_head.py                      # 2B-4T lm_head, M = 1 and 512, 1 and 2 threads
    python benchmarks/bench_lm_head.py --rounds 5 --json lm_head.json
    python benchmarks/bench_lm_head.py --quick              # smoke run, well under a minute

The shape is microsoft/bitnet-b1.58-2B-4T's tied lm_head: vocab 128256 x hidden 2560
(``--vocab``, ``--hidden``). The table is a random bf16 matrix, quantized once with ``quantize_int8_rows``
(328 MB of int8 codes + row scales) and once with ``quantize_int4_rows`` (185 MB of int4 codes +
bf16 group scales); F.linear gets the same table in bf16 (657 MB) and in fp32 (1.3 GB). M is the
number of tokens: 1 is a decode step, 512 a prefill that computes every position's logits.
Activations are bf16 for int8, int4 and bf16 F.linear, fp32 for fp32 F.linear.

For each thread count, in every round and at every M, one process times:

* int8      ``int8_linear`` (bf16 in, bf16 out), and its weight read rate = table bytes / time
            (meaningful at small M, where the op is memory-bound; M = 512 is compute-bound);
* int4      ``int4_linear`` the same way; 8/4 = int8 time / int4 time;
* yardstick ``stream_max`` over the 328 MB of int8 codes: one sequential read with the widest
            loads, what "streaming the weight at memory speed" means here; /yd = an op's rate as
            a fraction of it (the target at M = 1 is >= 80%);
* F.linear  in bf16 and in fp32 on the same table, reported as F.linear time / int8 time and
            / int4 time.

Cold weights: every table is several times the L3 cache, so each call reads it from DRAM (the
previous call's tail is all the cache holds, and a call starts at the head). Timing: the
median of the calls of a measurement (at least ``--repeats`` calls and ``--min-time`` seconds,
at least 2 calls for ops slower than ``--max-time``), after one untimed warm-up call.

The machine is shared (2 cores): other processes distort the figures. Each round prints the
1-minute load average; the summary reports, per (threads, M), the round whose yardstick was
fastest (the quietest one), with the ratios measured in that same round.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_bitnet as tb
from torch_bitnet.bench import cpu_model

VOCAB, HIDDEN = 128256, 2560
TARGET_STREAM_FRACTION = 0.80


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--m", default="1,512", help="comma-separated token counts M (default 1,512)")
    p.add_argument("--vocab", type=int, default=VOCAB, help=f"rows of the table (default {VOCAB})")
    p.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden size K (default {HIDDEN})")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of the whole measurement (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, at least (default 5)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement, at least (default 0.5)")
    p.add_argument("--max-time", type=float, default=4.0, help="a slow op stops after this many seconds (default 4)")
    p.add_argument("--isa", choices=tb.isa.ISAS, help="kernel path (default: the current one)")
    p.add_argument("--quick", action="store_true", help="vocab 32768, M = 1 and 16, one round: a smoke run")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every round's results as JSON")
    args = p.parse_args()
    if args.quick:
        args.vocab, args.m, args.rounds, args.repeats, args.min_time = 32768, "1,16", 1, 3, 0.1
    try:
        args.threads = [int(v) for v in args.threads.split(",")]
        args.m = [int(v) for v in str(args.m).split(",")]
    except ValueError:
        p.error("--threads and --m take comma-separated integers")
    if min(args.threads) < 1 or min(args.m) < 1 or args.rounds < 1 or args.repeats < 1:
        p.error("thread counts, M, --rounds and --repeats must be >= 1")
    return args


def measure(fn: Callable[[], object], args: argparse.Namespace) -> float:
    """Median wall seconds of fn() after one untimed warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if len(times) >= args.repeats and spent >= args.min_time:
            break
        if len(times) >= 2 and spent >= args.max_time:
            break
    return statistics.median(times)


def table_bytes(tables: dict, head: str) -> int:
    """Bytes an lm_head op reads: codes and scales."""
    return sum(t.numel() * t.element_size() for t in tables[head])


def bench_round(m: int, tables: dict, args: argparse.Namespace, gen: torch.Generator) -> dict:
    """One measurement of every op at M tokens."""
    (codes8, scale8), (codes4, scale4), w16, w32 = tables["int8"], tables["int4"], tables["bf16"], tables["fp32"]
    n, k = args.vocab, args.hidden
    x16 = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    x32 = x16.float()
    flat = codes8.view(-1)
    t8 = measure(lambda: tb.int8_linear(x16, codes8, scale8, k, n), args)
    t4 = measure(lambda: tb.int4_linear(x16, codes4, scale4, k, n), args)
    t_yard = measure(lambda: tb.stream_max(flat), args)
    t_bf16 = measure(lambda: F.linear(x16, w16), args)
    t_fp32 = measure(lambda: F.linear(x32, w32), args)
    yard_gbs = flat.numel() / t_yard / 1e9
    row = {"m": m, "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0], "yard_gbs": yard_gbs}
    for head, t in (("int8", t8), ("int4", t4)):
        gbs = table_bytes(tables, head) / t / 1e9
        row |= {f"{head}_ms": t * 1e3, f"{head}_gbs": gbs, f"{head}_vs_yard": gbs / yard_gbs}
    return row | {
        "int4_speedup": t8 / t4,
        "bf16_ms": t_bf16 * 1e3,
        "bf16_vs_int8": t_bf16 / t8,
        "bf16_vs_int4": t_bf16 / t4,
        "fp32_ms": t_fp32 * 1e3,
        "fp32_vs_int8": t_fp32 / t8,
        "fp32_vs_int4": t_fp32 / t4,
    }


HEAD = (
    f"{'thr':>3} {'M':>4} {'load':>5} | {'yard GB/s':>9} | {'int8 ms':>8} {'GB/s':>5} {'/yd':>4} | "
    f"{'int4 ms':>8} {'GB/s':>5} {'/yd':>4} {'8/4':>5} | {'bf16 ms':>8} {'/int8':>6} {'/int4':>6} | "
    f"{'fp32 ms':>8} {'/int8':>6} {'/int4':>6}"
)


def format_row(r: dict) -> str:
    return (
        f"{r['threads']:>3} {r['m']:>4} {r['load_avg_1min']:5.2f} | {r['yard_gbs']:9.1f} | "
        f"{r['int8_ms']:8.2f} {r['int8_gbs']:5.1f} {r['int8_vs_yard']:4.0%} | "
        f"{r['int4_ms']:8.2f} {r['int4_gbs']:5.1f} {r['int4_vs_yard']:4.0%} {r['int4_speedup']:4.2f}x | "
        f"{r['bf16_ms']:8.2f} {r['bf16_vs_int8']:5.1f}x {r['bf16_vs_int4']:5.1f}x | "
        f"{r['fp32_ms']:8.2f} {r['fp32_vs_int8']:5.1f}x {r['fp32_vs_int4']:5.1f}x"
    )


def main() -> None:
    args = parse_args()
    isa = args.isa or tb.get_isa()
    n, k = args.vocab, args.hidden
    header = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "isa": isa,
        "shape": [n, k],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_avg_1min": os.getloadavg()[0],
    }
    print(f"CPU: {header['cpu']} | threads: {args.threads} | torch {header['torch']} | ISA: {isa}")
    gen = torch.Generator().manual_seed(0)
    w16 = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16)
    tables = {"int8": tb.quantize_int8_rows(w16), "int4": tb.quantize_int4_rows(w16), "bf16": w16, "fp32": w16.float()}
    print(
        f"lm_head {n} x {k}: int8 {table_bytes(tables, 'int8') / 1e6:.0f} MB, "
        f"int4 {table_bytes(tables, 'int4') / 1e6:.0f} MB, "
        f"bf16 {w16.numel() * 2 / 1e6:.0f} MB, fp32 {w16.numel() * 4 / 1e6:.0f} MB (cold: each > L3); "
        f"date {header['date']}; load avg before start {header['load_avg_1min']:.2f}"
    )
    print(
        "int8 / int4 = int8_linear / int4_linear bf16 -> bf16; GB/s = table bytes (codes + scales) / time; "
        "yard = stream_max over the int8 codes; /yd = GB/s / yard; 8/4 = int8 time / int4 time; "
        "/int8, /int4 = F.linear time / that op's time"
    )
    print()
    print(HEAD)
    rows = []
    with tb.use_isa(isa), torch.inference_mode():
        for rnd in range(args.rounds):
            for threads in args.threads:
                torch.set_num_threads(threads)
                for m in args.m:
                    row = bench_round(m, tables, args, gen) | {"round": rnd}
                    print(format_row(row), flush=True)
                    rows.append(row)
    print()
    print("summary: per (threads, M) the quietest round (fastest yardstick), its same-round ratios")
    print(HEAD)
    best = {}
    for r in rows:
        key = (r["threads"], r["m"])
        if key not in best or r["yard_gbs"] > best[key]["yard_gbs"]:
            best[key] = r
    for key in sorted(best):
        print(format_row(best[key]))
    for (threads, m), r in sorted(best.items()):
        if m == 1:
            for head in ("int8", "int4"):
                verdict = "meets" if r[f"{head}_vs_yard"] >= TARGET_STREAM_FRACTION else "misses"
                print(
                    f"M=1, {threads} thread(s), {head}: {r[f'{head}_vs_yard']:.0%} of the yardstick ({verdict} the "
                    f">= {TARGET_STREAM_FRACTION:.0%} target), {r[f'bf16_vs_{head}']:.1f}x faster than bf16 F.linear"
                )
            print(f"M=1, {threads} thread(s): int4 {r['int4_speedup']:.2f}x faster than int8")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
