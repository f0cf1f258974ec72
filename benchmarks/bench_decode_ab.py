#!/usr/bin/env python3
"""Decode speed of two variants of the whole 2B-4T model, in one process.

    python benchmarks/bench_decode_ab.py                    # 2-bit vs 5-trit weights, 2 threads
    python benchmarks/bench_decode_ab.py --threads 1 --blocks 24 --lm-head int4
    python benchmarks/bench_decode_ab.py --compare step     # ahead-of-time vs lazily compiled step
    python benchmarks/bench_decode_ab.py --compare alignment --ternary-format 5trit --threads 1
    python benchmarks/bench_decode_ab.py --compare layer-op --ternary-format 5trit
    python benchmarks/bench_decode_ab.py --compare causal-mask --cache-len 4096
    python benchmarks/bench_decode_ab.py --compare graph-call

``--compare formats`` (default): two weight formats, ``--formats`` (2-bit and 5-trit unless told). ``--compare step``:
one model (``--ternary-format``) with two decode sessions, the ahead-of-time compiled step
(``generate``'s) and the lazily compiled one (``DecodeSession(ahead_of_time=False)``: dynamo's
guarded call, its guard evaluation skipped after the first step of a block). ``--compare
alignment``: one model (``--ternary-format``) loaded from its checkpoint, whose packed weights
``save_pretrained`` puts at 64-byte offsets, and from a copy written with safetensors'
``save_file`` (tensors at 8-byte offsets, as torch_bitnet wrote them before; made once, next
to the checkpoint). ``--compare layer-op``: one model (``--ternary-format``) with two decode
sessions, one compiled while its fused layers run the separate ops (bitlinear_shared, rotary
embedding kernels, kv_cache_write, int8_attention, bitlinear, bitlinear_relu2_glu, residual adds)
and one with each layer as one ``bitnet::decoder_layer`` call (what fused layers do on int8
caches). ``--compare causal-mask``: one model, two decode sessions on int8 caches, one compiled
with the (B, 1, 1, L) causal mask that transformers builds for sdpa passed to every layer (what
ran before the sessions' ``"torch_bitnet_int8"`` attention left it out; inductor computes it
once per layer) and one without it (the int8 op masks by position). Its cost grows with the
cache length L: ``--cache-len`` allocates the sessions' caches longer than the run needs.
``--compare graph-call``: one model, two sessions with the same ahead-of-time step, one
running the step's own code on every step (what ran before the sessions recorded its graph
call: the ~700 inputs fetched from the model and the cache, the attention implementation
switched around each step) and one calling the recorded graph from the second step of a block.

Separate processes on this shared machine are not comparable: the read bandwidth one process
gets moves by a third between runs minutes apart (``torch-bitnet bench`` prints it). So both
variants (on the random-weight 2B-4T checkpoints of ``torch-bitnet bench``, written once into
``--workdir``) are loaded and compiled in this process, each prefills the same
``--context``-token prompt, and then they decode in alternating blocks of ``--steps`` tokens
(compiled decode steps, as ``generate`` runs them), the first block of each pair alternating
between the variants. Printed: the median ms per token of each, the median paired difference
(second minus first) and in how many pairs the second was faster.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shutil
import statistics
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

import torch_bitnet as tb
from torch_bitnet import fuse, kv_cache
from torch_bitnet.bench import cpu_model, default_workdir, prepare_checkpoint
from torch_bitnet.loading import PACKED_FILE
from torch_bitnet.packing import FORMATS


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=("formats", "step", "alignment", "layer-op", "causal-mask", "graph-call"),
                   default="formats",
                   help="what differs (default formats)")
    p.add_argument("--ternary-format", choices=FORMATS, default="2bit",
                   help="weights for the comparisons of one model")
    p.add_argument("--formats", default="2bit,5trit",
                   help="the two weight formats --compare formats compares, comma-separated (default 2bit,5trit)")
    p.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    p.add_argument("--blocks", type=int, default=24, help="timed blocks per format (default 24)")
    p.add_argument("--steps", type=int, default=10, help="decode steps per block (default 10)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before decoding (default 512)")
    p.add_argument("--lm-head", choices=("int8", "int4", "bf16"), default="int8", help="table form (default int8)")
    p.add_argument("--workdir", type=Path, default=default_workdir(), help="where the checkpoints are written once")
    p.add_argument("--cache-len", type=int, default=0,
                   help="positions of the sessions' caches, if more than the run needs (default: what it needs)")
    return p.parse_args()


def unaligned_copy(path: Path) -> Path:
    """``path`` with its packed file rewritten by safetensors' save_file (once), beside it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    copy = path.with_name(f"{path.name}-unaligned")
    if not (copy / PACKED_FILE).is_file():
        shutil.copytree(path, copy, ignore=shutil.ignore_patterns(PACKED_FILE), dirs_exist_ok=True)
        with safe_open(str(path / PACKED_FILE), framework="pt") as f:
            metadata = f.metadata()
        save_file(load_file(path / PACKED_FILE), copy / PACKED_FILE, metadata=metadata)
    return copy


def main() -> None:
    args = parse_args()
    gen = importlib.import_module("torch_bitnet.generate")  # the module (tb.generate is the function)
    torch.set_num_threads(args.threads)
    max_len = max(args.cache_len, args.context + 2 * args.blocks * args.steps + 1)
    runs = {}
    if args.compare == "formats":
        formats = args.formats.split(",")
        if len(formats) != 2 or not set(formats) <= set(FORMATS):
            raise SystemExit(f"--formats takes two of {', '.join(FORMATS)}, got {args.formats!r}")
        for fmt in formats:
            path, _ = prepare_checkpoint(args.workdir, lm_head=args.lm_head, ternary_format=fmt)
            model = tb.from_pretrained(path, lm_head=args.lm_head, progress=False)
            runs[fmt] = {"model": model, "session": gen.prepare(model, max_len)}
    elif args.compare == "alignment":
        path, _ = prepare_checkpoint(args.workdir, lm_head=args.lm_head, ternary_format=args.ternary_format)
        for name, where in (("unaligned", unaligned_copy(path)), ("aligned", path)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the unaligned copy's load warns, as it should
                model = tb.from_pretrained(where, lm_head=args.lm_head, progress=False)
            runs[name] = {"model": model, "session": gen.prepare(model, max_len)}
    elif args.compare == "layer-op":
        path, _ = prepare_checkpoint(args.workdir, lm_head=args.lm_head, ternary_format=args.ternary_format)
        model = tb.from_pretrained(path, lm_head=args.lm_head, progress=False)
        os.environ["BITNET_STEP_CACHE"] = "0"  # compile both: a saved step has one or the other graph
        for name in ("ops", "layer_op"):
            session = gen.DecodeSession(model, max_len)
            # "ops": traced while the fused layers see no int8 cache layer, so they call the ops
            # one by one (the compiled step keeps that graph afterwards)
            with mock.patch.object(fuse, "_int8_layer", lambda *a: None) if name == "ops" else nullcontext():
                session.warm_up(model)
            runs[name] = {"model": model, "session": session}
    elif args.compare == "causal-mask":
        from transformers.masking_utils import sdpa_mask

        path, _ = prepare_checkpoint(args.workdir, lm_head=args.lm_head, ternary_format=args.ternary_format)
        model = tb.from_pretrained(path, lm_head=args.lm_head, progress=False)
        os.environ["BITNET_STEP_CACHE"] = "0"  # compile both: a saved step has one or the other graph
        for name in ("mask", "no_mask"):
            session = gen.DecodeSession(model, max_len, kv_cache_dtype="int8")
            # "mask": traced with sdpa's mask function in place of the int8 one (the compiled step
            # keeps that graph afterwards)
            with mock.patch.object(kv_cache, "_int8_cache_mask", sdpa_mask) if name == "mask" else nullcontext():
                session.warm_up(model)
            runs[name] = {"model": model, "session": session}
    elif args.compare == "graph-call":
        path, _ = prepare_checkpoint(args.workdir, lm_head=args.lm_head, ternary_format=args.ternary_format)
        model = tb.from_pretrained(path, lm_head=args.lm_head, progress=False)
        for name in ("step_code", "graph_call"):
            session = gen.DecodeSession(model, max_len)
            session.warm_up(model)
            if name == "step_code":  # never records, so every step runs the step's own code
                session._run_recording = lambda step_args, session=session: session._step(*step_args)
            runs[name] = {"model": model, "session": session}
    else:
        path, _ = prepare_checkpoint(args.workdir, lm_head=args.lm_head, ternary_format=args.ternary_format)
        model = tb.from_pretrained(path, lm_head=args.lm_head, progress=False)
        for name, aot in (("lazy", False), ("aot", True)):
            session = gen.DecodeSession(model, max_len, ahead_of_time=aot)
            session.warm_up(model)
            runs[name] = {"model": model, "session": session}
    names = list(runs)
    for run in runs.values():
        run["ms"] = []
    ids = torch.randint(0, 128000, (1, args.context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for run in runs.values():
            run["session"].reset()
            run["token"] = gen.prefill(run["model"], ids, run["session"].cache).argmax(-1, keepdim=True)
            run["position"] = torch.tensor([args.context])
        for b in range(2 * args.blocks):
            run = runs[names[(b + b // 2) % 2]]  # pairs alternate which variant goes first
            token, position = run["token"], run["position"]
            start = time.perf_counter()
            for i in range(args.steps):
                logits = run["session"].step(run["model"], token, position, same_as_last=i > 0)
                token = logits.argmax(-1, keepdim=True)
                position += 1
            run["ms"].append((time.perf_counter() - start) / args.steps * 1e3)
            run["token"] = token
    first, second = (runs[name]["ms"] for name in names)
    diff = [b - a for a, b in zip(first, second)]
    print(f"CPU: {cpu_model()} | torch {torch.__version__} | ISA {tb.get_isa()} | {args.threads} threads | "
          f"{datetime.date.today().isoformat()} | lm_head {args.lm_head} | context {args.context}")
    for name in names:
        ms = runs[name]["ms"]
        print(f"{name:9s} median {statistics.median(ms):6.2f} ms/token ({1e3 / statistics.median(ms):5.1f} tok/s)  "
              f"blocks: {' '.join(f'{x:.1f}' for x in ms)}")
    print(f"{names[1]} - {names[0]}: median {statistics.median(diff):+.2f} ms/token, {names[1]} faster in "
          f"{sum(d < 0 for d in diff)}/{len(diff)} block pairs")

if __name__ == "__main__":
    main()
