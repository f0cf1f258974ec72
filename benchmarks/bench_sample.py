#!/usr/bin/env python3
"""The cost of drawing one token: torch_bitnet's ``sample`` against the textbook torch sampler.

    python benchmarks/bench_sample.py [--threads N] [--vocab 4096,128256] [--rounds 6]

Sampling runs once per generated token, outside the compiled decode step, on the float32
logits (1, vocab). The baseline is the usual torch recipe: logits / temperature, a top-k mask,
a full sort for the nucleus (softmax, cumulative sum, mask, scatter back), then
``torch.multinomial``. ``torch_bitnet.generate.sample`` keeps the same tokens (the 64 largest
by a partial sort, more while the nucleus is larger) and draws with one uniform number (inverse
CDF). For each
vocabulary size, two logit spreads (N(0, 3): a flat distribution whose top-p 0.95 nucleus holds
thousands of tokens; N(0, 8): a peaked one) and three settings, both are timed in the same
process, alternating, ``--rounds`` rounds; medians in milliseconds per token and their ratio.
4,096 is the built-in default model's vocabulary, 128,256 bitnet-b1.58-2B-4T's.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time

import torch

from torch_bitnet.bench import cpu_model
from torch_bitnet.generate import sample

SETTINGS = {
    "temperature 0.8": dict(temperature=0.8),
    "+ top_k 50": dict(temperature=0.8, top_k=50),
    "+ top_p 0.95": dict(temperature=0.8, top_p=0.95),
}


def textbook_sample(logits, *, temperature, top_k=None, top_p=None, generator=None):
    """The usual torch sampler (the baseline): sort and multinomial over the whole vocabulary."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--vocab", default="4096,128256", help="comma-separated vocabulary sizes")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds per case (default 6)")
    args = p.parse_args(argv)
    try:
        args.vocab = [int(v) for v in args.vocab.split(",")]
    except ValueError:
        p.error(f"--vocab must be comma-separated integers, got {args.vocab!r}")
    if args.threads < 1 or args.rounds < 1 or min(args.vocab) < 2:
        p.error("--threads and --rounds must be positive and every --vocab at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} | torch {torch.__version__} | {args.threads} threads | {datetime.date.today()}")
    print(f"{'vocab':>7} {'logits':>9} {'setting':>16} | {'textbook ms':>11} {'sample ms':>9} {'x':>6}")
    g = torch.Generator().manual_seed(0)
    samplers = {"textbook": textbook_sample, "sample": sample}
    for vocab in args.vocab:
        calls = max(3, 800_000 // vocab)  # ~0.8 M logits per timing
        for spread in (3.0, 8.0):
            logits = torch.randn(1, vocab, generator=g) * spread
            for name, kwargs in SETTINGS.items():
                times: dict[str, list[float]] = {k: [] for k in samplers}
                for r in range(args.rounds):
                    for k in list(samplers)[:: 1 if r % 2 == 0 else -1]:
                        start = time.perf_counter()
                        for _ in range(calls):
                            samplers[k](logits, generator=g, **kwargs)
                        times[k].append((time.perf_counter() - start) / calls * 1e3)
                base, ours = statistics.median(times["textbook"]), statistics.median(times["sample"])
                print(f"{vocab:>7} {f'N(0, {spread:g})':>9} {name:>16} | {base:11.3f} {ours:9.3f} {base / ours:5.1f}x")
    print("x = textbook time / sample time (> 1: sample is faster)")


if __name__ == "__main__":
    main()
