#!/usr/bin/env python3
"""The fixed cost of one ``bitnet::decoder_layer`` call: what a decode token pays per layer
beyond the bytes its kernels stream.

    python benchmarks/bench_layer_call.py
    python benchmarks/bench_layer_call.py --threads 2 --hidden 2560 --context 512

One decode token (Q = 1) through a random layer, called in a loop from Python as the compiled
step's wrapper calls it. At the default small shape (hidden 256, 4 heads of 64, one kv head,
MLP 512, 8 cached positions; ~0.5 M weights, in L2) the kernels take a few microseconds and
the rest is the op's own cost: argument conversion, checks, allocations, the serial steps
between the parallel products, the fork / join of each. Measured in the same run as a
baseline: the same layer as the separate ops it fuses (``bitlinear_shared``, the rotary
embedding, ``kv_cache_write``, ``int8_attention``, ``bitlinear``, ``bitlinear_relu2_glu``,
``bitlinear``, and the residual adds), alternating rounds. Prints the median microseconds per
call of each over ``--rounds`` rounds of ``--calls`` calls and their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

import torch_bitnet
from torch_bitnet import reference
from torch_bitnet.bench import cpu_model
from torch_bitnet.packing import pack_ternary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    p.add_argument("--heads", type=int, default=4, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=1, help="key / value heads (default 1)")
    p.add_argument("--intermediate", type=int, default=512, help="MLP width (default 512)")
    p.add_argument("--context", type=int, default=8, help="cached positions before the token (default 8)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="activations (default bf16)")
    p.add_argument("--calls", type=int, default=2000, help="calls per round (default 2000)")
    p.add_argument("--rounds", type=int, default=7, help="rounds per variant, alternating (default 7)")
    args = p.parse_args(argv)
    if args.hidden % args.heads or (args.hidden // args.heads) % 2 or args.heads % args.kv_heads:
        p.error("--hidden must split into --heads heads of even size, and --heads into --kv-heads groups")
    if min(args.threads, args.context, args.calls, args.rounds, args.intermediate) < 1:
        p.error("--threads, --context, --calls, --rounds and --intermediate must be positive")
    return args


def make_layer(args: argparse.Namespace):
    """(the op's arguments, a function running the same layer as separate ops)."""
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden, heads, kvh, inter = args.hidden, args.heads, args.kv_heads, args.intermediate
    d = hidden // heads
    sizes = [(hidden, hidden), (hidden, kvh * d), (hidden, kvh * d), (hidden, hidden), (hidden, inter),
             (hidden, inter), (inter, hidden)]  # (in, out) of q, k, v, o, gate, up, down
    packed = [pack_ternary(torch.randint(-1, 2, (n, k), generator=g)) for k, n in sizes]
    scales = [torch.rand((), generator=g) + 0.05 for _ in sizes]
    norms = [(torch.rand(k, generator=g) + 0.5).to(dtype) for k in (hidden, hidden, hidden, inter)]
    eps = [1e-5] * 4
    x = torch.randn(1, 1, hidden, generator=g).to(dtype)
    angle = torch.rand(1, 1, d, generator=g) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    length = args.context + 1
    k_cache = torch.randint(-127, 128, (1, kvh, length, d), generator=g, dtype=torch.int8)
    v_cache = torch.randint(-127, 128, (1, kvh, length, d), generator=g, dtype=torch.int8)
    k_scale, v_scale = torch.rand(1, kvh, length, generator=g) * 0.05, torch.rand(1, kvh, length, generator=g) * 0.05
    positions = torch.tensor([args.context])
    op_args = (x, packed, scales, norms, eps, cos, sin, k_cache, k_scale, v_cache, v_scale, positions, d**-0.5,
               heads, inter, None)
    ops = torch_bitnet.ops

    def separate():
        q, k, v = ops.bitlinear_shared(x, packed[:3], scales[:3], hidden, [hidden, kvh * d, kvh * d], norms[0], eps[0])
        q, k, v = (t.view(1, 1, -1, d).transpose(1, 2) for t in (q, k, v))
        q, k = reference.rope(q, cos, sin), reference.rope(k, cos, sin)
        ops.kv_cache_write(k_cache, k_scale, v_cache, v_scale, k, v, positions)
        out = ops.int8_attention(q, k_cache, k_scale, v_cache, v_scale, positions, d**-0.5, None)
        h = x + ops.bitlinear(out.transpose(1, 2).reshape(1, 1, hidden), packed[3], scales[3], None, hidden, hidden,
                              norms[1], eps[1])
        gated = ops.bitlinear_relu2_glu(h, packed[4], scales[4], packed[5], scales[5], hidden, inter, norms[2], eps[2])
        return h + ops.bitlinear(gated, packed[6], scales[6], None, inter, hidden, norms[3], eps[3])

    return op_args, separate


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    op_args, separate = make_layer(args)
    layer = torch.ops.bitnet.decoder_layer.default
    variants = {"decoder_layer op": lambda: layer(*op_args), "separate ops": separate}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm up
            for _ in range(args.calls // 10 + 1):
                fn()
        for r in range(args.rounds):
            for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
                fn = variants[name]
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    print(
        f"CPU: {cpu_model()} | torch {torch.__version__} | ISA {torch_bitnet.get_isa()} | {args.threads} threads | "
        f"{datetime.date.today()} | hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv, MLP "
        f"{args.intermediate}, context {args.context}, {args.dtype}"
    )
    medians = {name: statistics.median(v) for name, v in times.items()}
    for name, m in medians.items():
        print(f"{name:18s} median {m:8.1f} us per call (rounds: {', '.join(f'{v:.1f}' for v in times[name])})")
    print(f"decoder_layer op / separate ops: {medians['decoder_layer op'] / medians['separate ops']:.2f}")


if __name__ == "__main__":
    main()
