"""The ``torch-bitnet`` command: generate text from a prompt, chat, or benchmark a model.

    torch-bitnet generate --prompt "In the beginning"   # the built-in default model
    torch-bitnet generate --model PATH --prompt "Once upon a time"
    torch-bitnet chat [--model PATH]
    torch-bitnet bench [--threads 1,2] [--json FILE] [--plot PNG]

Text goes to stdout as it is produced; progress, speeds and errors go to stderr, so the
output of ``generate`` can be piped. Errors a user can fix (a missing model, a bad option)
print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

#: The model used when --model is not given: the built-in default model shipped inside the
#: package (a small BitNet b1.58 trained on the King James Bible by
#: examples/train_default_model.py; model card in its README.md). The one place to change it.
DEFAULT_MODEL: str | None = str(Path(__file__).resolve().parent / "default_model")

PROG = "torch-bitnet"


class UsageError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, with a message naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    model = common.add_argument_group("model")
    model.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        default=DEFAULT_MODEL,
        help="checkpoint directory, or a Hugging Face hub id already in the local cache (nothing is "
        "downloaded); any BitNet b1.58 layout: microsoft/bitnet-b1.58-2B-4T's, transformers' "
        "BitLinear, bf16 master weights, or torch_bitnet's own"
        + ("" if DEFAULT_MODEL is None else f" (default: the built-in model, {DEFAULT_MODEL})"),
    )
    model.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="dtype of activations, embeddings, norms and the KV cache (default: bfloat16, as the "
        "checkpoint); BitLinear weights are always 2-bit",
    )
    model.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads (torch.set_num_threads; default: torch's choice, one per core)",
    )

    sampling = common.add_argument_group("generation")
    sampling.add_argument(
        "--max-new-tokens", type=_non_negative_int, default=256, metavar="N",
        help="most tokens to generate per answer (default: 256)",
    )
    sampling.add_argument(
        "--temperature", type=_temperature, default=None, metavar="T",
        help="sampling temperature; 0 = greedy (default: 0 for generate, 0.7 for chat)",
    )
    sampling.add_argument("--top-k", type=_positive_int, metavar="K", help="sample among the K most likely tokens only")
    sampling.add_argument(
        "--top-p", type=_probability, metavar="P",
        help="nucleus sampling: among the fewest tokens whose probabilities add up to P, in (0, 1]",
    )
    sampling.add_argument("--seed", type=int, metavar="S", help="random seed, for reproducible sampling")

    engine = common.add_argument_group("engine")
    engine.add_argument(
        "--no-compile", dest="compile", action="store_false",
        help="run the decode step eagerly instead of compiling it with torch.compile (no compile "
        "wait, slower tokens)",
    )
    engine.add_argument(
        "--chunk-size", type=_positive_int, metavar="N",
        help="prompt tokens per prefill forward pass (default: $BITNET_CHUNK_SIZE or 256)",
    )
    engine.add_argument(
        "--max-seq-len", type=_positive_int, metavar="N",
        help="KV cache length in tokens (prompt + answer). Default for generate: the smallest power of "
        "two >= 256 that fits; for chat: 1024, doubled (and recompiled) when the conversation "
        "outgrows it. Every decode step attends over the whole cache, so larger is slower",
    )
    engine.add_argument(
        "--lm-head", choices=("int8", "int4", "bf16"), default="int8",
        help="the embedding / lm_head table: int8 per row (default; half the bytes, ~1%% logit error), "
        "int4 in groups of 32 (28%% of the bytes: faster decode, ~10%% logit error) or bf16 as stored (exact)",
    )
    engine.add_argument(
        "--ternary-format", choices=("auto", "2bit", "5trit", "3trit"),
        help="how the ternary weights are packed in memory: 2bit, 5trit (1.6 bits per weight: the "
        "least memory), 3trit (1.78 bits per weight: the fastest decode on CPUs with AVX-512 VBMI) or "
        "auto (3trit where its kernels run, else 2bit); the denser formats are slow on CPUs without "
        "AVX-512 VBMI (default: as the checkpoint stores them, else 2bit)",
    )
    engine.add_argument(
        "--kv-cache-dtype", choices=("int8", "bf16", "fp32"),
        help="how the KV cache stores keys and values: int8 (torch_bitnet's int8 attention, half the "
        "bytes of bf16) or a float cache attended by PyTorch's SDPA (default: $BITNET_KV_CACHE_DTYPE "
        "or int8)",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run BitNet b1.58 models (ternary weights) on the CPU with torch_bitnet's kernels. "
        "Text goes to stdout as it is generated; progress, speeds (prompt and decode tokens/s) and "
        "peak memory go to stderr.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate",
        parents=[common],
        help="continue a prompt",
        description="Generate a continuation of --prompt, streamed to stdout; then print speeds and "
        "peak memory to stderr.",
    )
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt; '-' reads it from stdin")
    gen.add_argument(
        "--chat", action="store_true",
        help="send the prompt as a user message through the model's chat template",
    )
    gen.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help="stop when the output contains TEXT (not printed); may be repeated",
    )
    gen.add_argument(
        "--ignore-eos", action="store_true",
        help="do not stop at end-of-sequence tokens (generate exactly --max-new-tokens; for benchmarks)",
    )

    chat = commands.add_parser(
        "chat",
        parents=[common],
        help="interactive chat",
        description="Chat with the model: type a message and press Enter. The conversation is kept "
        "and sent through the model's chat template every turn. Commands: /reset forgets the "
        "conversation, /exit (or end of input, Ctrl-D) quits; Ctrl-C stops an answer. Speeds and "
        "peak memory are printed to stderr after every answer.",
    )
    chat.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")

    from .bench import add_arguments

    bench = commands.add_parser(
        "bench",
        help="measure speed and memory (default: random weights at the 2B-4T shape)",
        description="Measure a whole model, each thread count in a fresh process: load time, decode-step "
        "compile time (cold and with a warm inductor cache), time to first token and prompt tokens/s, "
        "decode tokens/s, peak RSS, weight and KV cache bytes, and the decode's memory bandwidth against "
        "the machine's read bandwidth measured in the same run. Without --model it writes (once) a "
        "random-weight checkpoint with the exact shape and on-disk format of "
        "microsoft/bitnet-b1.58-2B-4T.",
    )
    add_arguments(bench)
    return parser


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _info(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def _report(result) -> None:
    """One stderr line: prompt and decode speeds, compile time if any, peak RSS."""
    parts = [
        f"prompt {result.prompt_tokens} tokens at {result.prompt_tokens_per_second:.1f} tok/s",
        f"decode {result.new_tokens} tokens at {result.decode_tokens_per_second:.1f} tok/s",
    ]
    if result.compile_seconds:
        parts.append(f"decode step ready in {result.compile_seconds:.1f} s (not counted)")
    parts.append(f"peak RSS {_peak_rss_mib():.0f} MiB")
    _info(" | ".join(parts))


def _load(args):
    """(model, tokenizer) from --model; UsageError for anything the user can fix."""
    import torch

    path = args.model or DEFAULT_MODEL
    if path is None:
        raise UsageError("no model given: pass --model PATH_OR_ID")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from .loading import from_pretrained, resolve_model_path

    from .kv_cache import default_kv_cache_dtype

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    try:
        kv_cache_dtype = args.kv_cache_dtype or default_kv_cache_dtype()
    except ValueError as err:  # a bad BITNET_KV_CACHE_DTYPE
        raise UsageError(str(err)) from None
    _info(f"loading {path} ({args.dtype}, {kv_cache_dtype} KV cache, {torch.get_num_threads()} threads)")
    start = time.perf_counter()
    try:
        directory = resolve_model_path(path)
        model = from_pretrained(
            directory, dtype=dtype, kv_cache_dtype=kv_cache_dtype, lm_head=args.lm_head,
            ternary_format=args.ternary_format,
        )
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:  # missing files (FileNotFoundError), not a BitNet checkpoint
        raise UsageError(f"cannot load model {path!r}: {err}") from None
    _info(f"loaded in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def _sampling(args, default_temperature: float) -> dict:
    return dict(
        temperature=default_temperature if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        compile=args.compile,
        chunk_size=args.chunk_size,
    )


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------


def run_generate(args) -> int:
    from .generate import generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = _load(args)
    try:
        result = generate(
            model, tokenizer, prompt, args.max_new_tokens,
            stop=args.stop, eos=not args.ignore_eos, stream=_write, chat=args.chat,
            max_seq_len=args.max_seq_len, **_sampling(args, 0.0),
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    _write("\n")
    _report(result)
    return 0


_CHAT_CACHE_LEN = 1024  # chat's first KV cache; see --max-seq-len


def run_chat(args) -> int:
    from .generate import prepare

    model, tokenizer = _load(args)
    if getattr(tokenizer, "chat_template", None) is None:
        raise UsageError(f"the tokenizer of {args.model!r} has no chat template; use 'generate' instead")
    limit = getattr(model.config, "max_position_embeddings", None) or _CHAT_CACHE_LEN
    # Compile before the first question rather than in the middle of the first answer.
    prepare(model, args.max_seq_len or min(_CHAT_CACHE_LEN, limit), compile=args.compile)

    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        _info("type a message; /reset forgets the conversation, /exit or Ctrl-D quits")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = list(system)
            _info("conversation cleared")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            result = _chat_turn(model, tokenizer, history, args)
        except ValueError as err:
            history.pop()
            _info(f"{err}; /reset starts a new conversation")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat (at the prompt it quits)
            history.pop()
            _write("\n")
            _info("answer interrupted and dropped")
            continue
        history.append({"role": "assistant", "content": result.text})
        _report(result)
        if result.stop_reason == "max_seq_len":
            _info("the answer was cut: the conversation fills the context; /reset starts a new one")
    return 0


def _chat_turn(model, tokenizer, history: list[dict], args):
    from .generate import generate

    result = generate(
        model, tokenizer, history, args.max_new_tokens, stream=_write, max_seq_len=args.max_seq_len,
        **_sampling(args, 0.7),
    )
    _write("\n")
    return result


def run_bench(args) -> int:
    from .bench import run

    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    try:
        run(args)
    except (OSError, RuntimeError, ValueError) as err:  # a missing checkpoint, a failed child, too many positions
        raise UsageError(str(err)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torch-bitnet`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # generate.py logs when it compiles (tens of seconds for a large model): show it.
    log = logging.getLogger("torch_bitnet")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    try:
        if args.command == "bench":
            return run_bench(args)
        return run_generate(args) if args.command == "generate" else run_chat(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
