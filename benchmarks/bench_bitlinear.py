#!/usr/bin/env python3
"""Benchmark torch_bitnet's ``bitlinear`` against a read-bandwidth yardstick, F.linear and transformers.

For every (shape, M) the script times, on the CPU, with the same M x K activations:

* ours      ``torch_bitnet.bitlinear`` on the packed 2-bit weight, and its effective weight
            bandwidth = packed weight bytes / time (meaningful at small M, where the op is memory-bound),
            and the cores it kept busy (process CPU time / wall time: ~1 means it ran on one thread);
* yardstick ``torch_bitnet.stream_max`` over the same number of bytes: a plain sequential read
            with the widest vector loads, i.e. what "streaming the weight at memory speed" means here;
            ours/yd is our GB/s as a fraction of it. (For context the header also gives stream_max
            over one buffer of 4x L3: the machine's sustained read bandwidth in one long read);
* F.linear  with a dense float32 weight (float32 input) and with a bfloat16 weight (bfloat16 input),
            reported as F.linear time / our time (> 1 means we are faster);
* HF        ``transformers.integrations.bitnet.BitLinear`` holding the same ternary weight (converted
            with ``torch_bitnet.to_hf_packed``), in the ``--dtype`` of the activations. It unpacks its
            weight on every call through ``@torch.compile``d helpers: their compilation happens in
            untimed warm-up calls. Its output is checked against ours once per row.

Shapes are ``in_features x out_features`` (K x N); the defaults are the BitLinear layers of
microsoft/bitnet-b1.58-2B-4T: q/o_proj 2560x2560, k/v_proj 2560x640, gate/up_proj 2560x6912,
down_proj 6912x2560. M is the number of tokens: 1 is decode, 128 and 512 are prefill.

Cold weights (the default). One layer's packed weight (4.4 MB for 2560x6912) fits in the 32 MB L3,
so calling an op again and again on one tensor measures cache bandwidth, not memory bandwidth. In a
real model decode streams every layer from DRAM, since all layers together (~520 MB) are far larger
than L3. So for every weight kind (packed for ours, the yardstick buffers, transformers' packed
weight, float32 and bfloat16 weights for F.linear) the script allocates enough distinct copies to
span together at least 4x the L3 size (~134 MB here), the count computed from each copy's bytes (so a
70 MB float32 weight gets 2 copies, a 4.4 MB packed one 31), and each call reads the next copy in a
round-robin that continues across measurements: every call reads the least recently touched copy,
which was evicted from the cache long ago. ``--hot`` uses a single copy instead, to measure the
cache-resident case.

Timing: ``time.perf_counter`` around each call (the ops are synchronous), after a few untimed warm-up
calls; the median is reported. A measurement takes at least ``--repeats`` calls and ``--min-time``
seconds, but an op slower than that (transformers at M=512) stops after ``--max-time`` seconds once
it has 3 calls.

Examples::

    python benchmarks/bench_bitlinear.py                        # 2B-4T shapes, M = 1, 128, 512
    python benchmarks/bench_bitlinear.py --threads 1 --json results.json
    python benchmarks/bench_bitlinear.py --quick                 # smoke run, under 30 s
    python benchmarks/bench_bitlinear.py --dtype bfloat16 --isa avx2 --hot
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.integrations.bitnet import BitLinear

import torch_bitnet as tb
from torch_bitnet.bench import cpu_model
from torch_bitnet.packing import packed_shape

# BitLinear shapes of microsoft/bitnet-b1.58-2B-4T (in_features x out_features).
DEFAULT_SHAPES = "2560x2560,2560x640,2560x6912,6912x2560"
DEFAULT_M = "1,128,512"
DEFAULT_REPEATS, DEFAULT_MIN_TIME, DEFAULT_MAX_TIME = 20, 0.3, 2.0
# --quick: small layers and few calls, for a smoke run.
QUICK_SHAPES = "512x512,512x1536"
QUICK_M = "1,16"
QUICK_REPEATS, QUICK_MIN_TIME, QUICK_MAX_TIME = 5, 0.02, 0.3

WARMUP_CALLS = 3
MIN_CALLS = 3  # the fewest timed calls of a slow op
COLD_L3_MULTIPLE = 4  # cold copies of one weight kind together span this many L3 sizes
FALLBACK_L3_BYTES = 32 << 20
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Largest relative difference (max |ours - HF| / max |ours|) accepted between our output and
# transformers'. bfloat16 needs slack: transformers quantizes bf16 activations in bf16 arithmetic.
HF_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}

TARGET_STREAM_FRACTION, TARGET_DECODE_SPEEDUP, TARGET_PREFILL_SPEEDUP = 0.70, 10.0, 3.0
TARGET_SHAPE = (2560, 6912)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads (default: torch's now)"
    )
    p.add_argument(
        "--shapes",
        help=f"comma-separated in_featuresxout_features (default {DEFAULT_SHAPES}; --quick: {QUICK_SHAPES})",
    )
    p.add_argument("--m", help=f"comma-separated token counts M (default {DEFAULT_M}; --quick: {QUICK_M})")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="activations of ours and HF (default float32)"
    )
    p.add_argument(
        "--isa",
        choices=tb.isa.ISAS,
        help="kernel path (default: the current one, the fastest unless TORCH_BITNET_ISA is set)",
    )
    p.add_argument(
        "--repeats", type=int, help=f"timed calls, at least (default {DEFAULT_REPEATS}; --quick: {QUICK_REPEATS})"
    )
    p.add_argument(
        "--min-time",
        type=float,
        help=f"seconds per measurement, at least (default {DEFAULT_MIN_TIME}; --quick: {QUICK_MIN_TIME})",
    )
    p.add_argument(
        "--max-time",
        type=float,
        help=f"a slow op stops after this many seconds, once it has {MIN_CALLS} calls "
        f"(default {DEFAULT_MAX_TIME}; --quick: {QUICK_MAX_TIME})",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run")
    p.add_argument("--hot", action="store_true", help="time one cache-resident weight instead of cycling cold copies")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args()

    # --quick only changes the defaults; explicit options win.
    defaults = (
        (QUICK_SHAPES, QUICK_M, QUICK_REPEATS, QUICK_MIN_TIME, QUICK_MAX_TIME)
        if args.quick
        else (DEFAULT_SHAPES, DEFAULT_M, DEFAULT_REPEATS, DEFAULT_MIN_TIME, DEFAULT_MAX_TIME)
    )
    for name, default in zip(("shapes", "m", "repeats", "min_time", "max_time"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    try:
        args.shapes = [tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")]
        args.m = [int(v) for v in args.m.split(",")]
    except ValueError:
        p.error("--shapes takes KxN[,KxN...] and --m takes M[,M...], all integers")
    if any(len(s) != 2 or min(s) < 1 or s[1] % 4 for s in args.shapes):
        # transformers' packed layout stores four output rows per byte
        p.error("every shape needs in_features >= 1 and out_features a positive multiple of 4")
    if args.threads < 1 or args.repeats < 1 or min(args.m) < 1:
        p.error("--threads, --repeats and every M must be >= 1")
    args.dtype = DTYPES[args.dtype]
    return args


def l3_bytes() -> int:
    """Size of the L3 cache CPU 0 sees (sysfs), or 32 MiB where sysfs does not tell."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()  # e.g. "32768K"
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            continue
    return FALLBACK_L3_BYTES


def copies_for(nbytes: int, cold_bytes: int) -> int:
    """Copies of an nbytes weight that together reach cold_bytes (1 when hot, cold_bytes = 0)."""
    return max(1, math.ceil(cold_bytes / nbytes))


class Rotation:
    """Distinct copies of one weight, handed out round-robin.

    The position persists across measurements, so the next copy is always the one touched
    longest ago (with enough copies, no longer in any cache).
    """

    def __init__(self, make: Callable[[], torch.Tensor], nbytes: int, cold_bytes: int):
        self.copies = [make() for _ in range(copies_for(nbytes, cold_bytes))]
        self._pos = 0

    def next(self) -> torch.Tensor:
        t = self.copies[self._pos]
        self._pos = (self._pos + 1) % len(self.copies)
        return t


def measure(fn: Callable[[torch.Tensor], object], weights: Rotation, args: argparse.Namespace) -> tuple[float, float]:
    """(median wall seconds of fn(next weight copy), cores busy) after untimed warm-up calls.

    Cores busy = process CPU time / wall time over the timed calls: it shows whether an op
    really runs on the --threads it was given (spinning idle threads count as busy too).
    """
    for _ in range(WARMUP_CALLS):
        fn(weights.next())
    times: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    while True:
        w = weights.next()
        t0 = time.perf_counter()
        fn(w)
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if len(times) >= args.repeats and spent >= args.min_time:
            break
        if len(times) >= MIN_CALLS and spent >= args.max_time:
            break
    return statistics.median(times), (time.process_time() - cpu_start) / spent


def machine_stream_gbs(nbytes: int, args: argparse.Namespace) -> float:
    """stream_max over one nbytes buffer (several times L3): the machine's sustained read bandwidth."""
    buf = Rotation(lambda: torch.ones(nbytes, dtype=torch.uint8), nbytes, 0)
    return nbytes / measure(tb.stream_max, buf, args)[0] / 1e9


def bench_shape(k: int, n: int, args: argparse.Namespace, cold_bytes: int) -> list[dict]:
    """Time every op for one weight shape at every M; one result dict per M."""
    gen = torch.Generator().manual_seed(1000 * k + n)
    # Absmean-ternarized Gaussian weights: the ~1/3 zeros of a trained BitNet layer.
    wq, scale = tb.ternarize(torch.randn(n, k, generator=gen))
    packed = tb.pack_ternary(wq)
    dense = wq.float() * scale  # the same weight, dense, for F.linear
    ours_w = Rotation(packed.clone, packed.numel(), cold_bytes)
    yard_w = Rotation(lambda: packed.reshape(-1).clone(), packed.numel(), cold_bytes)
    hf_packed = tb.to_hf_packed(wq)
    hf_w = Rotation(hf_packed.clone, hf_packed.numel(), cold_bytes)
    fp32_w = Rotation(dense.clone, dense.numel() * 4, cold_bytes)
    bf16_w = Rotation(lambda: dense.to(torch.bfloat16), dense.numel() * 2, cold_bytes)

    # transformers' BitLinear divides by weight_scale (see REFERENCE.md): store 1 / scale.
    hf = BitLinear(k, n, bias=False, dtype=args.dtype)
    hf.weight_scale = (1.0 / scale).to(args.dtype)

    rows = []
    for m in args.m:
        x = torch.randn(m, k, generator=gen).to(args.dtype)
        x32, x16 = x.float(), x.to(torch.bfloat16)

        def ours(w: torch.Tensor) -> torch.Tensor:
            return tb.bitlinear(x, w, scale, None, k, n)

        def hf_forward(w: torch.Tensor) -> torch.Tensor:
            hf.weight = w  # cycle the packed buffer like every other weight
            return hf(x)

        # Same weights, same answer (the first HF call also compiles transformers' helpers).
        y_ours, y_hf = ours(ours_w.next()).float(), hf_forward(hf_w.next()).float()
        rel = ((y_ours - y_hf).abs().max() / y_ours.abs().max().clamp(min=1e-30)).item()
        if not rel <= HF_TOLERANCE[args.dtype]:
            raise RuntimeError(f"{k}x{n} M={m}: transformers' BitLinear and bitlinear disagree (rel. diff {rel:.2e})")

        t_ours, cores_ours = measure(ours, ours_w, args)
        t_yard, cores_yard = measure(tb.stream_max, yard_w, args)
        t_fp32, cores_fp32 = measure(lambda w: F.linear(x32, w), fp32_w, args)
        t_bf16, cores_bf16 = measure(lambda w: F.linear(x16, w), bf16_w, args)
        t_hf, cores_hf = measure(hf_forward, hf_w, args)
        row = {
            "in_features": k,
            "out_features": n,
            "m": m,
            "packed_bytes": packed.numel(),
            "ours_ms": t_ours * 1e3,
            "ours_gbs": packed.numel() / t_ours / 1e9,
            "yard_ms": t_yard * 1e3,
            "yard_gbs": packed.numel() / t_yard / 1e9,
            "ours_vs_yard": t_yard / t_ours,  # = ours GB/s / yardstick GB/s
            "fp32_ms": t_fp32 * 1e3,
            "fp32_speedup": t_fp32 / t_ours,
            "bf16_ms": t_bf16 * 1e3,
            "bf16_speedup": t_bf16 / t_ours,
            "hf_ms": t_hf * 1e3,
            "hf_speedup": t_hf / t_ours,
            "hf_rel_diff": rel,
            "cores": {"ours": cores_ours, "yard": cores_yard, "fp32": cores_fp32, "bf16": cores_bf16, "hf": cores_hf},
        }
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


TABLE_HEAD = (
    f"{'K x N':>11} {'M':>4} | {'ours ms':>8} {'GB/s':>6} {'cores':>5} | {'yard ms':>8} {'GB/s':>6} {'ours/yd':>7} | "
    f"{'fp32 ms':>8} {'x':>6} | {'bf16 ms':>8} {'x':>6} | {'HF ms':>9} {'x':>7}"
)


def format_row(r: dict) -> str:
    return (
        f"{r['in_features']:>5}x{r['out_features']:<5} {r['m']:>4} | {r['ours_ms']:8.3f} {r['ours_gbs']:6.1f} "
        f"{r['cores']['ours']:5.2f} | "
        f"{r['yard_ms']:8.3f} {r['yard_gbs']:6.1f} {r['ours_vs_yard']:6.0%} | "
        f"{r['fp32_ms']:8.3f} {r['fp32_speedup']:5.1f}x | {r['bf16_ms']:8.3f} {r['bf16_speedup']:5.1f}x | "
        f"{r['hf_ms']:9.2f} {r['hf_speedup']:6.0f}x"
    )


def summary(rows: list[dict]) -> tuple[str, dict]:
    """The issue's targets, as measured on the 2560 -> 6912 layer (reported, not asserted)."""
    by_m = {r["m"]: r for r in rows if (r["in_features"], r["out_features"]) == TARGET_SHAPE}
    k, n = TARGET_SHAPE
    parts, values = [], {}
    if 1 in by_m:
        values["m1_stream_fraction"] = by_m[1]["ours_vs_yard"]
        values["m1_fp32_speedup"] = by_m[1]["fp32_speedup"]
        parts.append(
            f"M=1 {k}->{n}: streams at {values['m1_stream_fraction']:.0%} of yardstick "
            f"(target >= {TARGET_STREAM_FRACTION:.0%}), {values['m1_fp32_speedup']:.1f} x faster than fp32 "
            f"F.linear (target >= {TARGET_DECODE_SPEEDUP:g}x)"
        )
    if 512 in by_m:
        values["m512_fp32_speedup"] = by_m[512]["fp32_speedup"]
        parts.append(
            f"M=512: {values['m512_fp32_speedup']:.1f} x faster than fp32 F.linear "
            f"(target >= {TARGET_PREFILL_SPEEDUP:g}x)"
        )
    if not parts:
        return f"targets not measured in this run (they need shape {k}x{n} with M=1 and M=512)", values
    return "; ".join(parts), values


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    isa = args.isa or tb.get_isa()
    l3 = l3_bytes()
    cold_bytes = 0 if args.hot else COLD_L3_MULTIPLE * l3
    header = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa": isa,
        "dtype": str(args.dtype).removeprefix("torch."),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "l3_bytes": l3,
        # other processes on the cores distort every figure: show how busy the machine was
        "load_avg_1min": os.getloadavg()[0],
        "weights": "hot" if args.hot else "cold",
        # copies of each weight kind per call cycle, by shape (Rotation allocates exactly these)
        "copies": {
            f"{k}x{n}": {
                "packed": copies_for(math.prod(packed_shape(n, k)), cold_bytes),
                "fp32": copies_for(4 * n * k, cold_bytes),
                "bf16": copies_for(2 * n * k, cold_bytes),
            }
            for k, n in args.shapes
        },
    }
    print(f"CPU: {header['cpu']} | threads: {header['threads']} | torch {header['torch']} | ISA: {isa}")
    print(
        f"activations: {header['dtype']} | date: {header['date']} | L3: {l3 / 2**20:.0f} MiB | "
        f"load avg (1 min) before start: {header['load_avg_1min']:.2f}"
    )
    if args.hot:
        print("weights: HOT - every call reads the same (cache-resident where it fits) weight tensor")
    else:
        print(
            f"weights: COLD - each call reads the next of N distinct copies spanning >= {cold_bytes / 1e6:.0f} MB "
            f"({COLD_L3_MULTIPLE}x L3) per weight kind, as decode streams every layer from DRAM (--hot: cached)"
        )
        print(
            "copies (packed/fp32/bf16): "
            + ", ".join(f"{shape} {c['packed']}/{c['fp32']}/{c['bf16']}" for shape, c in header["copies"].items())
        )
    print(
        "GB/s = packed weight bytes / time; cores = CPU time / wall time of ours; "
        "yard = stream_max over the same bytes; x = other time / ours time"
    )
    rows = []
    with tb.use_isa(isa), torch.inference_mode():
        # Context for the per-layer yardstick column: one long read, no per-call start-up.
        big = COLD_L3_MULTIPLE * l3
        header["machine_stream_gbs"] = machine_stream_gbs(big, args)
        print(f"stream_max over one {big / 1e6:.0f} MB buffer: {header['machine_stream_gbs']:.1f} GB/s")
        print()
        print(TABLE_HEAD)
        for k, n in args.shapes:
            rows += bench_shape(k, n, args, cold_bytes)
    print()
    text, values = summary(rows)
    print("summary: " + text)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows, "summary": values}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
