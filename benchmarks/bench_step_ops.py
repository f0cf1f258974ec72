#!/usr/bin/env python3
"""Where a compiled decode step's time goes: torch.profiler over steady-state decode steps.

    python benchmarks/bench_step_ops.py                       # random-weight 2B-4T, all cores
    python benchmarks/bench_step_ops.py --threads 1 --steps 24
    python benchmarks/bench_step_ops.py --model PATH --lm-head int4
    python benchmarks/bench_step_ops.py --rounds 30       # more rounds of the products alone

Loads the model (without ``--model``, the random-weight 2B-4T checkpoint of ``torch-bitnet
bench``, written once into ``--workdir``), prefills a ``--context``-token prompt, runs a few
decode steps as ``generate`` does (compiled ahead of time, the recorded graph call from the
second step on, greedy), then profiles ``--steps`` more. Printed: the wall time per token under
the profiler, the share of it spent inside torch_bitnet's ops (``bitnet::*``: the kernels and
their C++ adapters), and the entries with the most self time per token. The profiler adds a
little time per recorded event, so the share is a lower bound.

Then, without the profiler, ``--rounds`` rounds alternate: the decode step (``--steps`` steps,
going on from the profiled ones, so the context grows by ``--steps`` per round), every
BitLinear weight of the model alone as ``ternary_mm`` of one token, the lm_head module alone
(whichever ``--lm-head``: its codes and scales), and ``stream_max`` (a plain read) over the same
bytes. Printed: each one's median ms and GB/s, and each product's speed as a fraction of the
plain read of the same bytes, so a kernel that falls behind the memory shows up as such. (The
ternary products are called one by one from Python, ~10-20 us each, which the fused layer's
calls do not pay.)
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import torch_bitnet as tb
from torch_bitnet.bench import cpu_model, default_workdir, prepare_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="a checkpoint directory (default: random 2B-4T)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the profiled steps (default 512)")
    p.add_argument("--steps", type=int, default=16, help="profiled decode steps (default 16)")
    p.add_argument("--lm-head", choices=("int8", "int4", "bf16"), default="int8", help="table form (default int8)")
    p.add_argument("--top", type=int, default=8, help="entries listed (default 8)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of the products alone (default 10; 0: skip)")
    p.add_argument("--workdir", type=Path, default=default_workdir(), help="where the 2B-4T checkpoint is written once")
    args = p.parse_args(argv)
    if min(args.threads, args.context, args.steps, args.top) < 1 or args.rounds < 0:
        p.error("--threads, --context, --steps and --top must be positive, --rounds not negative")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the measurement; returns its figures (ms per token, the share in bitnet:: ops)."""
    args = parse_args(argv)
    gen = importlib.import_module("torch_bitnet.generate")  # the module (tb.generate is the function)
    torch.set_num_threads(args.threads)
    path = args.model or prepare_checkpoint(args.workdir, lm_head=args.lm_head)[0]
    model = tb.from_pretrained(path, lm_head=args.lm_head, progress=False)
    warm = 4
    # the profiled steps, then those of the products-alone rounds, continue the same sequence
    session = gen.prepare(model, args.context + warm + args.steps * (1 + args.rounds) + 1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), gen._static_attention(model, session.cache):
        session.reset()
        token = gen.prefill(model, ids, session.cache).argmax(-1, keepdim=True)
        position = torch.tensor([args.context])
        for i in range(warm):
            token = session.step(model, token, position, same_as_last=i > 0).argmax(-1, keepdim=True)
            position += 1
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                token = session.step(model, token, position, same_as_last=True).argmax(-1, keepdim=True)
                position += 1
            wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    events = prof.key_averages()
    ours_ms = sum(e.self_cpu_time_total for e in events if e.key.startswith("bitnet::")) / args.steps / 1e3
    print(f"CPU: {cpu_model()} | torch {torch.__version__} | ISA {tb.get_isa()} | {args.threads} threads | "
          f"{datetime.date.today().isoformat()} | lm_head {args.lm_head} | context {args.context}")
    print(f"{wall_ms:.2f} ms per token under the profiler, {ours_ms:.2f} ms of it in bitnet:: ops "
          f"({ours_ms / wall_ms:.1%})")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {e.key[:48]:48s} {e.self_cpu_time_total / args.steps / 1e3:8.3f} ms  {e.count / args.steps:4.0f} calls")
    figures = {"ms_per_token": wall_ms, "ops_ms": ours_ms}
    if args.rounds:
        with torch.inference_mode(), gen._static_attention(model, session.cache):
            figures["alone"] = products_alone(model, session, token, position, args)
    return figures


def products_alone(model, session, token, position, args) -> dict:
    """Median ms of the decode step and of the model's products run alone, against a plain read
    of the same bytes (see the module docstring); printed and returned by name."""
    ternary = [(m.weight, m.in_features, m.out_features) for m in model.modules() if isinstance(m, tb.BitLinear)]
    head = model.get_output_embeddings()  # the table as a module: Int8Linear, Int4Linear or a bf16 Linear
    table = list({t.data_ptr(): t.detach() for t in [*head.parameters(), *head.buffers()]}.values())
    table_bytes = sum(t.numel() * t.element_size() for t in table)
    xq = {k: torch.randint(-128, 128, (1, k), dtype=torch.int8) for k in {k for _, k, _ in ternary}}
    x = torch.randn(1, head.in_features, dtype=torch.bfloat16)
    ternary_bytes = sum(w.numel() for w, _, _ in ternary)

    def steps():  # the decode goes on where the profiled steps stopped (the cache has room)
        for _ in range(args.steps):
            session.step(model, token, position, same_as_last=True)
            position.add_(1)

    def ternary_products():
        for w, k, n in ternary:
            tb.ternary_mm(xq[k], w, k, n)

    def table_product():
        head(x)

    def read(buffers):  # any dtype, read as its bytes
        for b in buffers:
            tb.stream_max(b.reshape(-1).view(torch.uint8))

    runs = {
        "decode step": (steps, args.steps, ternary_bytes + table_bytes),
        "ternary products": (ternary_products, 1, ternary_bytes),
        "plain read of them": (lambda: read([w for w, _, _ in ternary]), 1, ternary_bytes),
        "lm_head product": (table_product, 1, table_bytes),
        "plain read of it": (lambda: read(table), 1, table_bytes),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (fn, per, _) in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / per * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(f"alone, median of {args.rounds} alternating rounds (ms; GB/s of the bytes each reads):")
    for name, (_, _, nbytes) in runs.items():
        print(f"  {name:20s} {ms[name]:8.2f} ms  {nbytes / ms[name] / 1e6:6.1f} GB/s")
    for product, plain in (("ternary products", "plain read of them"), ("lm_head product", "plain read of it")):
        print(f"  {product} at {ms[plain] / ms[product]:.0%} of the plain read of the same bytes")
    return ms


if __name__ == "__main__":
    main()
