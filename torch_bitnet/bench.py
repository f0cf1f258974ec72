"""``torch-bitnet bench``: speed and memory of a whole model, by default at the 2B-4T shape.

    torch-bitnet bench                          # random weights, shape of bitnet-b1.58-2B-4T
    torch-bitnet bench --threads 1,2 --plot threads.png --json out.json
    torch-bitnet bench --prompt-len 512,1024,2048 --plot context.png   # against the context
    torch-bitnet bench --model PATH --prompt-len 256 --new-tokens 64
    torch-bitnet bench --ternary-format 2bit      # weights packed 2 bits each (default: auto)

Each configuration (one per thread count and prompt length) runs twice, each time in a fresh
child process, so each peak RSS is its own process's. A run: the RSS of the runtime alone
(Python, torch, transformers, torch_bitnet, before any weight), load the model (seconds, peak
RSS after loading), prepare the decode step, prefill a prompt (time to first token, prompt
tokens/s), decode new tokens with the compiled step (tokens/s), then the peak RSS of that whole
run (what one ``generate`` call of this size holds at most), the model's bytes by kind, the KV
cache bytes, and the machine's read bandwidth (:func:`torch_bitnet.stream_max` over 1 GiB, same
threads) next to the bandwidth the decode achieved: bytes one decode token reads (every weight
but the embedding table, plus the KV cache at the mean context) times tokens/s.

The first (cold) run starts from an empty inductor cache and compiles the decode step; the
second (warm) run is a later session of the same model: it loads the step the first one saved
(:mod:`torch_bitnet.step_cache`). The table shows the cold run's figures and, from the warm
run, the seconds the step took to load ("load warm s") and the peak RSS ("warm peak MB").
``--plot`` draws prompt and decode tokens/s against the prompt length (the context the decode
starts from) when several are given, else against the thread count.

The default model is written once into ``--workdir`` (random ternary weights in the exact
on-disk format of microsoft/bitnet-b1.58-2B-4T, converted to torch_bitnet's packed layout;
about 1.7 GB together); its text is meaningless, its speed is the real model's.
``--transformers`` also runs transformers' own BitNet path on the same weights, for the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["bytes_by_kind", "cpu_model", "default_workdir", "measure", "prepare_checkpoint", "run"]


def default_workdir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_bitnet" / "bench"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): VmHWM. Not ru_maxrss: Linux carries that
    across exec, so a child would report its parent's peak (the parent may have just converted
    the checkpoint)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    """Resident memory now (not the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def prepare_checkpoint(
    workdir: Path, *, lm_head: str = "int8", transformers_copy: bool = False, ternary_format: str = "2bit"
) -> tuple[Path, Path | None]:
    """Write (once) the random 2B-4T-shaped checkpoint and its torch_bitnet conversions.

    Returns (our packed checkpoint with its embedding / lm_head table stored in ``lm_head``
    form and its BitLinear weights in ``ternary_format``, the same weights in transformers'
    ``bitlinear`` layout if ``transformers_copy``, hard-linked, else None).
    """
    import torch

    from .checkpoints import bitnet_config, write_checkpoint
    from .loading import convert_checkpoint, packed_file_aligned

    def missing(directory: Path) -> bool:
        """No conversion there yet, or one from before 64-byte aligned weights (slower to read)."""
        return not (directory / "config.json").is_file() or not packed_file_aligned(directory)

    hf_dir, ours_dir = workdir / "2b4t-offline", workdir / "2b4t-torch_bitnet"
    if missing(ours_dir):
        if not (hf_dir / "config.json").is_file():
            print(f"writing a random 2B-4T-shaped checkpoint to {hf_dir} (once)", file=sys.stderr)
            write_checkpoint(hf_dir, bitnet_config(), mode="offline", seed=0, progress=True)
        print(f"converting it to torch_bitnet's packed layout in {ours_dir} (once)", file=sys.stderr)
        convert_checkpoint(hf_dir, ours_dir, dtype=torch.bfloat16, progress=True)
    if lm_head != "bf16":  # stored quantized: loads without quantizing the 657 MB table
        quantized_dir = workdir / f"2b4t-torch_bitnet-{lm_head}"
        if missing(quantized_dir):
            print(f"storing its {lm_head} embedding / lm_head in {quantized_dir} (once)", file=sys.stderr)
            convert_checkpoint(ours_dir, quantized_dir, dtype=torch.bfloat16, progress=True, lm_head=lm_head)
        ours_dir = quantized_dir
    if ternary_format != "2bit":
        packed_dir = ours_dir.with_name(f"{ours_dir.name}-{ternary_format}")
        if missing(packed_dir):
            print(f"storing its weights {ternary_format} in {packed_dir} (once)", file=sys.stderr)
            convert_checkpoint(ours_dir, packed_dir, dtype=torch.bfloat16, progress=True, lm_head=lm_head,
                               ternary_format=ternary_format)
        ours_dir = packed_dir
    if not transformers_copy:
        return ours_dir, None
    bitlinear_dir = workdir / "2b4t-bitlinear"
    if not (bitlinear_dir / "config.json").is_file():
        # The same packed weights; transformers' BitLinear divides by weight_scale where
        # AutoBitLinear multiplies: other numbers, the same work, which is what is measured.
        bitlinear_dir.mkdir(parents=True, exist_ok=True)
        for f in hf_dir.iterdir():
            if f.name != "config.json" and not (bitlinear_dir / f.name).exists():
                os.link(f, bitlinear_dir / f.name)
        raw = json.loads((hf_dir / "config.json").read_text())
        raw["quantization_config"]["linear_class"] = "bitlinear"
        (bitlinear_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return ours_dir, bitlinear_dir


def bytes_by_kind(model) -> dict[str, int]:
    """Bytes of the model's tensors: ``ternary`` (packed BitLinear weights and their scales),
    ``embedding``, ``lm_head`` (0 when tied to the embedding), ``norms`` and ``other``."""
    from .nn import BitLinear

    seen: set[int] = set()
    sizes = {"ternary": 0, "embedding": 0, "lm_head": 0, "norms": 0, "other": 0}
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    for module_name, module in model.named_modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            if isinstance(module, BitLinear):
                kind = "ternary"
            elif module is embedding:
                kind = "embedding"
            elif module is head:
                kind = "lm_head"
            elif "norm" in module_name.rsplit(".", 1)[-1]:
                kind = "norms"
            else:
                kind = "other"
            sizes[kind] += tensor.numel() * tensor.element_size()
    return sizes


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "key_scales", "value_scales"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def _stream_gbs(threads: int) -> float:
    """Read bandwidth (GB/s): best of 5 passes of stream_max over 1 GiB, in the kind of pages
    the weights are in (2 MiB ones where place_weights puts them there: 4 KiB pages read ~5-15%
    slower)."""
    from .memory import huge_page_buffer
    from .ops import stream_max

    buf = huge_page_buffer(2**30).fill_(1)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        stream_max(buf)
        best = min(best, time.perf_counter() - start)
    return buf.numel() / best / 1e9


def measure(
    path: Path,
    *,
    prompt_len: int = 512,
    new_tokens: int = 128,
    kv_cache_dtype: str | None = None,
    lm_head: str = "int8",
    chunk_size: int | None = None,
    progress: bool = True,
    ternary_format: str | None = None,
) -> dict:
    """One benchmark run in this process (see the module docstring); returns its figures.

    Meant for a fresh process: peak RSS covers the whole process. ``compile_s`` is the time the
    decode step took to be ready: compiled, or loaded from a saved step (``step_from_disk``);
    ``run`` gives each configuration's children a new inductor cache and step directory.
    """
    import torch
    from tqdm.auto import tqdm

    from .generate import _static_attention, prefill, prepare, sample
    from .isa import get_isa
    from .loading import from_pretrained
    from .nn import BitLinear

    from transformers import BitNetForCausalLM  # noqa: F401  (imported here so the runtime's RSS counts it)

    runtime_rss = _rss_mb()  # Python + torch + transformers + torch_bitnet, before any weight
    stages = tqdm(total=4, desc="bench", disable=not progress, file=sys.stderr)
    stages.set_postfix_str("loading")
    start = time.perf_counter()
    model = from_pretrained(path, kv_cache_dtype=kv_cache_dtype, lm_head=lm_head, progress=False,
                            ternary_format=ternary_format)
    load_s, load_peak, load_rss = time.perf_counter() - start, _peak_rss_mb(), _rss_mb()
    stages.update()
    stages.set_postfix_str("compiling or loading the decode step")
    session = prepare(model, prompt_len + new_tokens)  # allocates the cache, compiles or loads the step
    stages.update()
    stages.set_postfix_str("prefill")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    # As generate(): the attention implementation switched once for the run, not per step.
    with torch.inference_mode(), _static_attention(model, session.cache):
        session.reset()
        start = time.perf_counter()
        logits = prefill(model, ids, session.cache, chunk_size)
        token = sample(logits)  # greedy, as generate
        ttft = time.perf_counter() - start
        stages.update()
        stages.set_postfix_str("decode")
        position = torch.tensor([prompt_len])
        start = time.perf_counter()
        for i in range(new_tokens):
            token = sample(session.step(model, token, position, same_as_last=i > 0))
            position += 1
        decode_s = time.perf_counter() - start
    peak = _peak_rss_mb()  # load + compile + prefill + decode: one generate run
    stages.update()
    stages.close()
    sizes = bytes_by_kind(model)
    cache_bytes = _cache_bytes(session.cache)
    # One decode token reads every weight except the embedding table (one row of it), and the
    # cache up to the current position: prompt_len + new_tokens / 2 positions on average.
    mean_context = prompt_len + new_tokens / 2
    per_token = sum(v for k, v in sizes.items() if k != "embedding") + cache_bytes * mean_context / session.max_seq_len
    if sizes["lm_head"] == 0:  # tied: the lm_head is the embedding table, read whole
        per_token += sizes["embedding"]
    decode_tok_s = new_tokens / decode_s
    stream = _stream_gbs(torch.get_num_threads())
    return {
        "threads": torch.get_num_threads(),
        "prompt_len": prompt_len,
        "kv_cache_dtype": session.kv_cache_dtype,
        "lm_head": lm_head,
        "ternary_format": next(m.ternary_format for m in model.modules() if isinstance(m, BitLinear)),
        "isa": get_isa(),
        "runtime_rss_mb": runtime_rss,
        "load_s": load_s,
        "load_peak_rss_mb": load_peak,
        "rss_after_load_mb": load_rss,
        "compile_s": session.compile_seconds,
        "step_from_disk": session.step_from_disk,
        "ttft_s": ttft,
        "prefill_tok_s": prompt_len / ttft,
        "decode_tok_s": decode_tok_s,
        "peak_rss_mb": peak,
        "weight_bytes": sizes,
        "kv_cache_bytes": cache_bytes,
        "decode_bytes_per_token": per_token,
        "decode_gb_s": per_token * decode_tok_s / 1e9,
        "stream_gb_s": stream,
    }


def measure_transformers(path: Path, *, prompt_len: int, new_tokens: int) -> dict:
    """transformers' own BitNet model (its BitLinear unpacks the weights at every forward):
    prefill and a few decode steps with a dynamic cache, eager, bf16."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from .kv_cache import cache_argument

    runtime_rss = _rss_mb()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - start
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :8], use_cache=False)  # transformers' own @torch.compile'd helpers compile here
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        arg = cache_argument(model)
        out = model(ids, **{arg: cache}, use_cache=True, logits_to_keep=1)
        ttft = time.perf_counter() - start
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, **{arg: cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - start
    return {
        "threads": torch.get_num_threads(),
        "prompt_len": prompt_len,
        "runtime_rss_mb": runtime_rss,
        "load_s": load_s,
        "ttft_s": ttft,
        "prefill_tok_s": prompt_len / ttft,
        "decode_tok_s": new_tokens / decode_s,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _child(which: str, path: Path, threads: int, prompt_len: int, args: argparse.Namespace, cache_dir: str) -> dict:
    """Run one measurement in a fresh Python process; returns its JSON result."""
    spec = {
        "which": which, "path": str(path), "threads": threads, "prompt_len": prompt_len,
        "new_tokens": args.new_tokens if which == "ours" else args.transformers_new_tokens,
        "kv_cache_dtype": args.kv_cache_dtype, "lm_head": args.lm_head, "chunk_size": args.chunk_size,
        "ternary_format": args.ternary_format,
    }
    env = {
        **os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "BITNET_STEP_CACHE_DIR": os.path.join(cache_dir, "steps"),
        "OMP_NUM_THREADS": str(threads),
    }
    env.pop("BITNET_STEP_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch_bitnet.bench", "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {which} benchmark at {threads} threads, prompt {prompt_len}, failed "
                           f"(exit status {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    if spec["which"] == "ours":
        result = measure(Path(spec["path"]), prompt_len=spec["prompt_len"], new_tokens=spec["new_tokens"],
                         kv_cache_dtype=spec["kv_cache_dtype"], lm_head=spec["lm_head"], chunk_size=spec["chunk_size"],
                         ternary_format=spec["ternary_format"])
    else:
        result = measure_transformers(Path(spec["path"]), prompt_len=spec["prompt_len"],
                                      new_tokens=spec["new_tokens"])
    print(json.dumps(result))


_COLUMNS = [
    ("threads", "threads", "d"), ("prompt_len", "prompt", "d"), ("load_s", "load s", ".1f"),
    ("compile_cold_s", "compile cold s", ".1f"),
    ("compile_warm_s", "load warm s", ".1f"), ("ttft_s", "TTFT s", ".2f"), ("prefill_tok_s", "prompt tok/s", ".1f"),
    ("decode_tok_s", "decode tok/s", ".2f"), ("decode_gb_s", "decode GB/s", ".1f"), ("stream_gb_s", "read GB/s", ".1f"),
    ("runtime_rss_mb", "runtime MB", ".0f"), ("load_peak_rss_mb", "load peak MB", ".0f"),
    ("rss_after_load_mb", "after load MB", ".0f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"), ("peak_rss_warm_mb", "warm peak MB", ".0f"),
]


def format_table(results: dict[str, list[dict]]) -> str:
    """The results as a fixed-width text table, one row per run."""
    lines = [f"{'':14s}" + "".join(f"{label:>15s}" for _, label, _ in _COLUMNS)]
    for name, runs in results.items():
        for res in runs:
            cells = "".join(f"{format(res[k], fmt) if k in res else '-':>15s}" for k, _, fmt in _COLUMNS)
            lines.append(f"{name:14s}{cells}")
    return "\n".join(lines)


def _threads(run: dict) -> str:
    return f"{run['threads']} thread{'s' * (run['threads'] > 1)}"


def _plot_series(results: dict[str, list[dict]]) -> tuple[str, dict[str, list[dict]]]:
    """What :func:`_plot` draws: the x key, ``prompt_len`` when the runs have several prompt
    lengths, else ``threads``; and the lines, label -> runs sorted by x (one line per
    implementation, and per thread count when x is the prompt length)."""
    x_key = "prompt_len" if len({r["prompt_len"] for runs in results.values() for r in runs}) > 1 else "threads"
    lines: dict[str, list[dict]] = {}
    for name, runs in results.items():
        for r in runs:
            label = name if x_key == "threads" else f"{name}, {_threads(r)}"
            lines.setdefault(label, []).append(r)
    return x_key, {label: sorted(runs, key=lambda r: r[x_key]) for label, runs in lines.items()}


def _plot(results: dict[str, list[dict]], path: Path, header: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, lines = _plot_series(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prompt tokens/s"), (axes[1], "decode_tok_s", "decode tokens/s")):
        for label, runs in lines.items():
            ax.plot([r[x_key] for r in runs], [r[key] for r in runs], marker="o", label=label)
        ax.set_xticks(sorted({r[x_key] for runs in lines.values() for r in runs}))
        ax.set_xlabel("prompt tokens (decode context)" if x_key == "prompt_len" else "threads")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    # The header is one long " | "-joined line: split it in two so the figure does not clip it.
    parts = header.split(" | ")
    half = (len(parts) + 1) // 2
    fig.suptitle(" | ".join(parts[:half]) + "\n" + " | ".join(parts[half:]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _positive_list(what: str, example: str):
    """An argparse type: comma-separated positive integers."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected {what} like {example}, got {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options (shared by ``torch-bitnet bench`` and ``python -m torch_bitnet.bench``)."""
    parser.add_argument("--model", type=Path, metavar="PATH",
                        help="a BitNet checkpoint directory (default: random weights at the 2B-4T shape)")
    parser.add_argument("--threads", type=_positive_list("thread counts", "2 or 1,2"), default=[os.cpu_count() or 1],
                        metavar="N[,N...]",
                        help="thread counts to run, one child process each (default: all cores)")
    parser.add_argument("--prompt-len", type=_positive_list("prompt lengths", "512 or 512,2048"), default=[512],
                        metavar="N[,N...]", help="prompt tokens, one configuration each (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, metavar="N", help="decoded tokens (default 128)")
    parser.add_argument("--kv-cache-dtype", choices=("int8", "bf16", "fp32"),
                        help="KV cache storage (default: $BITNET_KV_CACHE_DTYPE or int8)")
    parser.add_argument("--lm-head", choices=("int8", "int4", "bf16"), default="int8",
                        help="embedding / lm_head table: int8 per row (default), int4 in groups of 32, or bf16 as "
                        "stored (exact)")
    parser.add_argument("--ternary-format", choices=("auto", "2bit", "5trit", "3trit"),
                        help="how BitLinear weights are packed: 2bit, 5trit (1.6 bits per weight; decode needs "
                        "AVX-512 VBMI), 3trit (1.78 bits per weight; table-lookup decode, needs AVX-512 VBMI for "
                        "prefill) or auto, the fastest here (3trit on the avx512vbmi and amx paths, else 2bit) "
                        "(default: auto, or as --model stores them)")
    parser.add_argument("--chunk-size", type=int, metavar="N", help="prefill chunk (default: $BITNET_CHUNK_SIZE or 256)")
    parser.add_argument("--transformers", action="store_true",
                        help="also run transformers' own BitNet path on the same weights (slow: few decode tokens)")
    parser.add_argument("--transformers-new-tokens", type=int, default=3, metavar="N",
                        help="decode steps for --transformers (default 3)")
    parser.add_argument("--workdir", type=Path, default=default_workdir(), metavar="DIR",
                        help=f"where the default checkpoint is written once, ~1.7 GB (default {default_workdir()})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="plot tokens/s against the prompt length if several are given, else against threads "
                        "(needs matplotlib)")


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; prints the table, returns the results."""
    import torch

    from .nn import resolve_ternary_format

    if args.ternary_format is not None:  # the children load the concrete format, named in the results
        args.ternary_format = resolve_ternary_format(args.ternary_format)
    if args.model is not None:
        if not (args.model / "config.json").is_file():
            raise FileNotFoundError(f"{args.model}: no config.json (not a checkpoint directory)")
        ours, theirs = args.model, (args.model if args.transformers else None)
    else:
        ours, theirs = prepare_checkpoint(args.workdir, lm_head=args.lm_head, transformers_copy=args.transformers,
                                          ternary_format=args.ternary_format or resolve_ternary_format())
    # A run's cache holds prompt + new tokens: past the model's positions its rotary embedding
    # is one it was never trained for, and the figures would be of another model.
    limit = json.loads((ours / "config.json").read_text()).get("max_position_embeddings")
    for prompt_len in args.prompt_len:
        if limit and prompt_len + args.new_tokens > limit:
            raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {args.new_tokens} exceed the model's {limit} "
                             "positions (max_position_embeddings)")
    results: dict[str, list[dict]] = {"torch_bitnet": []}
    for threads, prompt_len in [(t, p) for t in args.threads for p in args.prompt_len]:
        with tempfile.TemporaryDirectory(prefix="torch_bitnet_inductor_") as cache_dir:
            config = f"{threads} threads, prompt {prompt_len}"
            print(f"torch_bitnet, {config}, cold ...", file=sys.stderr)
            cold = _child("ours", ours, threads, prompt_len, args, cache_dir)
            print(f"torch_bitnet, {config}, warm (a second session) ...", file=sys.stderr)
            warm = _child("ours", ours, threads, prompt_len, args, cache_dir)
            if cold["step_from_disk"] or not warm["step_from_disk"]:
                print("warning: the warm run did not load the step the cold run compiled", file=sys.stderr)
            results["torch_bitnet"].append({
                **{k: v for k, v in cold.items() if k not in ("compile_s", "step_from_disk")},
                "compile_cold_s": cold["compile_s"], "compile_warm_s": warm["compile_s"],
                "peak_rss_warm_mb": warm["peak_rss_mb"], "decode_tok_s_warm": warm["decode_tok_s"],
                "warm_step_from_disk": warm["step_from_disk"],
            })
            if theirs is not None:
                print(f"transformers, {config} ...", file=sys.stderr)
                results.setdefault("transformers", []).append(
                    _child("transformers", theirs, threads, prompt_len, args, cache_dir))
    first = results["torch_bitnet"][0]
    header = (
        f"CPU: {cpu_model()} | torch {torch.__version__} | {datetime.date.today().isoformat()} | "
        f"model: {args.model or 'random weights, bitnet-b1.58-2B-4T shape'} | "
        f"prompt {','.join(map(str, args.prompt_len))}, "
        f"decode {args.new_tokens} | KV cache {first['kv_cache_dtype']} | lm_head {first['lm_head']} | "
        f"ternary {first['ternary_format']} | ISA {first['isa']}"
    )
    print(header)
    print(format_table(results))
    print("weights MB: " + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in first["weight_bytes"].items()))
    for ours_run in results["torch_bitnet"]:
        print(f"{_threads(ours_run)}, prompt {ours_run['prompt_len']}: KV cache "
              f"{ours_run['kv_cache_bytes'] / 1e6:.0f} MB, decode reads {ours_run['decode_bytes_per_token'] / 1e6:.0f} "
              "MB/token and streams "
              f"{ours_run['decode_gb_s'] / ours_run['stream_gb_s']:.0%} of the machine's read bandwidth measured in "
              "the same run")
    for ours_run, theirs_run in zip(results["torch_bitnet"], results.get("transformers", [])):
        print(f"{_threads(ours_run)}, prompt {ours_run['prompt_len']}, vs transformers: prefill "
              f"{ours_run['prefill_tok_s'] / theirs_run['prefill_tok_s']:.1f}x, decode "
              f"{ours_run['decode_tok_s'] / theirs_run['decode_tok_s']:.0f}x, peak RSS "
              f"{ours_run['peak_rss_mb'] / theirs_run['peak_rss_mb']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "torch": torch.__version__, **results}, indent=2))
    if args.plot:
        _plot(results, args.plot, header)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torch_bitnet.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return
    run(args)


if __name__ == "__main__":
    main()
