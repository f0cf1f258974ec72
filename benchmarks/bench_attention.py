#!/usr/bin/env python3
"""Decode (and prompt) attention over an int8 KV cache versus SDPA over fp32 and bf16 caches.

    python benchmarks/bench_attention.py [--threads N] [--contexts 512,2048,4096] [--prompts 512] [--paths A,B]

Geometry of microsoft/bitnet-b1.58-2B-4T: 20 query heads, 5 KV heads, head_dim 128, 30
layers. For each context length one decode token attends, in every one of the 30 layers,
to that layer's own cache (30 distinct caches, as in a real decode step, so the caches are
read from DRAM rather than from a warm L3). Reported per token (30 layers): time of
``torch_bitnet.int8_attention`` over int8 caches with float32 queries and with bf16 queries
(the model's: on the AVX2, AVX-512 and AMX paths these use int16 products, see
attention_avx512.cpp and attention_amx.cpp), of ``scaled_dot_product_attention`` (GQA) over
fp32 and bf16 caches, and the cache bytes of each. Median of ``--repeats`` tokens, after
warm-up, all in one run. The 1-minute load average is printed before and after: other
processes on the machine slow the threads down (rerun when it is well below the core count).

``--paths A,B`` (with ``--prompts``) times the prompts' attention of bf16 queries on each of
these kernel paths in turn, in one process, alternating rounds, and prints the ratios (e.g.
``--paths avx512vbmi,amx`` on a CPU with AMX).

``--prompts N,...`` adds the attention of a prompt: N queries, each seeing the positions up to
its own (causal), over one layer's N-position cache, as a prefill computes it once per layer.
Reported per layer: the same four timings (SDPA with ``is_causal``) and the int8 op's
multiply-adds per second (q . k and the weighted values: 2 x heads x head_dim x N(N+1)/2),
which measure the kernels' arithmetic: at these sizes the work is compute-bound, not a read of
the cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import torch_bitnet
from torch_bitnet.bench import cpu_model

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 20, 5, 128


def int8_cache(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The int8 cache (k_cache, k_scale, v_cache, v_scale) holding float keys and values
    (1, KV_HEADS, n, HEAD_DIM) at positions 0 .. n - 1."""
    n = k.shape[2]
    cache = (torch.empty(1, KV_HEADS, n, HEAD_DIM, dtype=torch.int8), torch.empty(1, KV_HEADS, n),
             torch.empty(1, KV_HEADS, n, HEAD_DIM, dtype=torch.int8), torch.empty(1, KV_HEADS, n))
    torch_bitnet.kv_cache_write(*cache, k, v, torch.arange(n))
    return cache


def median_seconds(step, repeats: int) -> float:
    """Median seconds of one call of step, after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--contexts", default="512,2048,4096", help="comma-separated context lengths")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompts", default="", help="comma-separated prompt lengths (default: none)")
    parser.add_argument("--paths", default="",
                        help="two or more kernel paths, e.g. avx512vbmi,amx: the prompts' attention of bf16 queries "
                             "on each, in one process, alternating rounds (default: only the current path)")
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if paths and not args.prompts:
        parser.error("--paths compares prompt attention: give --prompts too")
    missing = [p for p in paths if p not in torch_bitnet.available_isas()]
    if missing:
        available = ", ".join(torch_bitnet.available_isas())
        parser.error(f"this CPU cannot run {', '.join(missing)} (available: {available})")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} | threads: {args.threads} | torch {torch.__version__} | ISA: {torch_bitnet.get_isa()}")
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")
    print(f"geometry: {LAYERS} layers x {HEADS} heads / {KV_HEADS} kv heads x head_dim {HEAD_DIM}; one decode token")
    print(f"{'context':>8} | {'int8 ms':>8} {'MB':>7} {'GB/s':>5} {'bf16 q ms':>9} | {'sdpa fp32 ms':>12} {'MB':>7} "
          f"{'x':>5} | {'sdpa bf16 ms':>12} {'MB':>7} {'x':>5}")
    g = torch.Generator().manual_seed(0)
    scale = HEAD_DIM**-0.5
    with torch.inference_mode():
        for ctx in (int(c) for c in args.contexts.split(",")):
            q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=g)
            pos = torch.tensor([ctx - 1])
            int8_caches, f32_caches = [], []
            for _ in range(LAYERS):
                k = torch.randn(1, KV_HEADS, ctx, HEAD_DIM, generator=g)
                v = torch.randn(1, KV_HEADS, ctx, HEAD_DIM, generator=g)
                int8_caches.append(int8_cache(k, v))
                f32_caches.append((k, v))
            bf16_caches = [(k.bfloat16(), v.bfloat16()) for k, v in f32_caches]
            qb = q.bfloat16()

            def ours(query):
                def run():
                    for cache in int8_caches:
                        torch_bitnet.int8_attention(query, *cache, pos, scale)
                return run

            def sdpa(caches, query):
                def run():
                    for k, v in caches:
                        F.scaled_dot_product_attention(query, k, v, enable_gqa=True)
                return run

            t8 = median_seconds(ours(q), args.repeats)
            t8b = median_seconds(ours(qb), args.repeats)
            t32 = median_seconds(sdpa(f32_caches, q), args.repeats)
            t16 = median_seconds(sdpa(bf16_caches, qb), args.repeats)
            mb8 = sum(t.numel() * t.element_size() for c in int8_caches for t in c) / 1e6
            mb32 = sum(t.numel() * t.element_size() for c in f32_caches for t in c) / 1e6
            mb16 = mb32 / 2
            print(f"{ctx:>8} | {t8 * 1e3:8.2f} {mb8:7.0f} {mb8 / t8 / 1e3:5.1f} {t8b * 1e3:9.2f} | {t32 * 1e3:12.2f} "
                  f"{mb32:7.0f} {t32 / t8:5.1f} | "
                  f"{t16 * 1e3:12.2f} {mb16:7.0f} {t16 / t8:5.1f}")
    print("x = SDPA time / int8 time (float32 queries; > 1: int8 attention is faster); MB = cache bytes of all")
    print("30 layers;")
    print("GB/s = int8 cache bytes / int8 time (the rate the caches are read at)")
    if args.prompts:
        prompts(g, [int(n) for n in args.prompts.split(",")], args.repeats)
    if paths:
        compare_paths(g, [int(n) for n in args.prompts.split(",")], paths, args.repeats)
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


def prompt_inputs(g: torch.Generator, n: int) -> tuple:
    """A prompt of n tokens: float keys and values (1, KV_HEADS, n, HEAD_DIM), float queries (1,
    HEADS, n, HEAD_DIM), the int8 cache holding the keys and values, and the positions 0 .. n - 1."""
    k = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g)
    v = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g)
    q = torch.randn(1, HEADS, n, HEAD_DIM, generator=g)
    return k, v, q, int8_cache(k, v), torch.arange(n)


def prompts(g: torch.Generator, lengths: list[int], repeats: int) -> None:
    """The prompt rows (module docstring): per layer, N causal queries over N positions."""
    print(f"one layer's prompt attention: {HEADS} heads / {KV_HEADS} kv heads x head_dim {HEAD_DIM}, causal")
    print(f"{'prompt':>8} | {'int8 ms':>8} {'bf16 q ms':>9} {'bf16 q GMAC/s':>13} | {'sdpa fp32 ms':>12} {'x':>5} | "
          f"{'sdpa bf16 ms':>12} {'x':>5}")
    scale = HEAD_DIM**-0.5
    with torch.inference_mode():
        for n in lengths:
            k, v, q, cache, pos = prompt_inputs(g, n)
            qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
            t8 = median_seconds(lambda: torch_bitnet.int8_attention(q, *cache, pos, scale), repeats)
            t8b = median_seconds(lambda: torch_bitnet.int8_attention(qb, *cache, pos, scale), repeats)
            t32 = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                 repeats)
            t16 = median_seconds(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True),
                                 repeats)
            macs = 2 * HEADS * HEAD_DIM * n * (n + 1) // 2
            print(f"{n:>8} | {t8 * 1e3:8.2f} {t8b * 1e3:9.2f} {macs / t8b / 1e9:13.1f} | {t32 * 1e3:12.2f} "
                  f"{t32 / t8:5.1f} | {t16 * 1e3:12.2f} {t16 / t8:5.1f}")
    print("x = SDPA time / int8 time (float32 queries); a prefill runs this once per layer")


def compare_paths(g: torch.Generator, lengths: list[int], paths: list[str], rounds: int) -> None:
    """The prompt rows' int8 attention of bf16 queries on each kernel path: ``rounds`` rounds, each
    timing every path in turn (median of 3 calls), so a slow phase of the machine hits them alike."""
    print(f"prompt attention of bf16 queries by path: median of {rounds} alternating rounds (ms)")
    print(f"{'prompt':>8} | " + " ".join(f"{p:>11}" for p in paths) + f" | {paths[0]} / each")
    scale = HEAD_DIM**-0.5
    with torch.inference_mode():
        for n in lengths:
            _, _, q, cache, pos = prompt_inputs(g, n)
            qb = q.bfloat16()
            times = {p: [] for p in paths}
            for _ in range(rounds):
                for p in paths:
                    with torch_bitnet.use_isa(p):
                        times[p].append(median_seconds(lambda: torch_bitnet.int8_attention(qb, *cache, pos, scale), 3))
            med = {p: statistics.median(t) for p, t in times.items()}
            print(f"{n:>8} | " + " ".join(f"{med[p] * 1e3:11.2f}" for p in paths) + " | "
                  + " ".join(f"{med[paths[0]] / med[p]:.2f}x" for p in paths[1:]))


if __name__ == "__main__":
    main()
