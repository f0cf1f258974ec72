"""Train torch_bitnet's built-in default model from scratch: a small BitNet b1.58 on the King James Bible.

    python examples/train_default_model.py                 # about an hour on 2 cores
    python examples/train_default_model.py --steps 50 --out /tmp/kjv-test   # a quick trial

Steps (all offline, seeded):

1. Corpus: the King James Version from Debian's ``bible-kjv-text`` package (public domain text;
   the package's reader ``bible`` from ``bible-kjv``). Installed files are used if present,
   otherwise both .debs are fetched with ``apt-get download`` and unpacked into ``--work``
   (no root needed). One verse per line, one document per chapter; every 20th chapter (chapter
   index % 20 == 10, 5% of the text) is held out for evaluation.
2. Tokenizer: byte-level BPE of ``--vocab`` tokens (Llama-3 special tokens in the last 256 ids)
   trained with ``tokenizers`` on the training chapters.
3. Model: ``BitNetForCausalLM`` (relu2, sub-norms, GQA 4:1, tied embeddings) with every linear
   layer a :class:`torch_bitnet.training.QATLinear` (float masters, ternary x int8 forward,
   straight-through gradients), trained with AdamW on random 256-token windows under
   ``torch.compile``.
4. Evaluation on the held-out chapters: perplexity of the training (fake-quant, float32)
   forward, of a unigram model of the same tokenizer (add-one smoothed training counts), and,
   after export, of the exported checkpoint run through torch_bitnet's ops (bf16, int8 / bf16 /
   int4 lm_head); the ops' perplexity must be within 1% of the training forward's.
5. Export in the microsoft/bitnet-b1.58-2B-4T on-disk format to ``--out`` (default: the package's
   ``torch_bitnet/default_model``), the held-out text to ``--heldout``, and the figures
   (``--summary`` JSON, ``--plot`` loss curve PNG).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import torch_bitnet
from torch_bitnet.checkpoints import bitnet_config, write_tokenizer
from torch_bitnet.training import export_checkpoint, perplexity

ROOT = Path(__file__).resolve().parent.parent
HELDOUT_EVERY, HELDOUT_AT = 20, 10  # chapter i is held out when i % 20 == 10

#: The shipped model's shape: ~5.2 M parameters, 3 MB packed.
MODEL = dict(
    hidden_size=256,
    intermediate_size=688,  # 2.69 x hidden, as 2B-4T's 6912 / 2560
    num_hidden_layers=6,
    num_attention_heads=4,  # head_dim 64
    num_key_value_heads=1,  # GQA 4:1, as 2B-4T
    max_position_embeddings=2048,
    rope_theta=10000.0,
)


def _log(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------


def _bible_reader(work: Path) -> tuple[Path, Path]:
    """(bible executable, directory holding bible.data): installed, or unpacked from the .debs."""
    installed = shutil.which("bible")
    if installed and Path("/usr/lib/bible.data").is_file():
        return Path(installed), Path("/usr/lib")
    root = work / "debs" / "root"
    exe, data = root / "usr/bin/bible", root / "usr/lib"
    if not (exe.is_file() and (data / "bible.data").is_file()):
        debs = work / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        _log("fetching bible-kjv and bible-kjv-text with apt-get download")
        try:
            subprocess.run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], cwd=debs, check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            raise SystemExit(
                f"cannot get the corpus ({err}): install Debian's bible-kjv and bible-kjv-text packages "
                "(apt-get install bible-kjv) and run again"
            ) from None
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return exe, data


_VERSE = re.compile(r"^(\w+?)(\d+):(\d+) (.*)$")


def load_chapters(work: Path) -> list[str]:
    """Every chapter of the KJV as one document: its verses, one per line, without references."""
    exe, data = _bible_reader(work)
    out = subprocess.run(
        [str(exe), "-p", str(data), "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    chapters: list[list[str]] = []
    current = None
    for line in out.splitlines():
        match = _VERSE.match(line)
        if match is None:
            if line.strip():
                raise SystemExit(f"unexpected line in the bible output: {line[:80]!r}")
            continue
        book, chapter, _, text = match.groups()
        if (book, chapter) != current:
            chapters.append([])
            current = (book, chapter)
        chapters[-1].append(text.strip())
    if len(chapters) != 1189:  # the KJV has 1189 chapters
        raise SystemExit(f"expected the 1189 chapters of the KJV, got {len(chapters)}")
    return ["\n".join(verses) + "\n" for verses in chapters]


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def encode(tokenizer, docs: list[str]) -> torch.Tensor:
    """One stream: each document with its bos in front (the tokenizer adds it)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, verbose=False)["input_ids"])  # chapters may exceed model_max_length
    return torch.tensor(ids, dtype=torch.int64)


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor, vocab: int, seq_len: int) -> float:
    """Add-one smoothed unigram model of the training stream, on the tokens :func:`perplexity` predicts."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = counts.log() - counts.sum().log()
    windows = heldout[: heldout.numel() // seq_len * seq_len].view(-1, seq_len)[:, 1:]
    return math.exp(-float(logp[windows.reshape(-1)].mean()))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(args) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, BitNetForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    chapters = load_chapters(work)
    train_docs = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY != HELDOUT_AT]
    held_docs = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY == HELDOUT_AT]
    _log(f"corpus: {len(chapters)} chapters, {sum(map(len, chapters)) / 1e6:.2f} MB; "
         f"{len(held_docs)} chapters held out")

    tok_dir = work / "tokenizer"
    write_tokenizer(tok_dir, vocab_size=args.vocab, model_max_length=MODEL["max_position_embeddings"],
                    texts=[line for doc in train_docs for line in doc.splitlines(keepends=True)])
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_ids, held_ids = encode(tokenizer, train_docs), encode(tokenizer, held_docs)
    _log(f"tokens: {train_ids.numel()} train, {held_ids.numel()} held out (vocab {args.vocab})")

    config = bitnet_config(vocab_size=args.vocab, **MODEL)
    config.quantization_config = None  # float masters; QATLinear does the quantization
    config._attn_implementation = "sdpa"
    model = BitNetForCausalLM(config).float()
    torch_bitnet.replace_linear(model, qat=True)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"model: {n_params / 1e6:.2f} M parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    def step_fn(batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach()

    step_compiled = torch.compile(step_fn)
    gen = torch.Generator().manual_seed(args.seed)
    history: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    eval_every = max(1, args.steps // 8)
    model.train()
    t_train = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])
        loss = float(step_compiled(batch))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        history.append((step, loss))
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            model.eval()
            evals.append((step + 1, perplexity(model, held_ids, args.seq_len, batch_size=16)))
            model.train()
            bar.write(f"[train] step {step + 1}: held-out perplexity {evals[-1][1]:.2f}")
    train_seconds = time.perf_counter() - t_train
    model.eval()

    ppl_qat = evals[-1][1]
    ppl_unigram = unigram_perplexity(train_ids, held_ids, args.vocab, args.seq_len)
    _log(f"held-out perplexity: QAT forward {ppl_qat:.3f}, unigram {ppl_unigram:.2f}")

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    export_checkpoint(model, out, tokenizer)
    size = sum(f.stat().st_size for f in out.iterdir())
    _log(f"exported to {out} ({size / 1e6:.2f} MB)")

    # The exported checkpoint through torch_bitnet's ops: float32 activations with the exact
    # (bf16) table for the comparison with the training forward, then the default bf16
    # activations with each lm_head form.
    ops_ppl, greedy = {}, {}
    prompt = tokenizer("And God said", return_tensors="pt")["input_ids"]
    for dtype, head in (("float32", "bf16"), ("bfloat16", "bf16"), ("bfloat16", "int8"), ("bfloat16", "int4")):
        loaded = torch_bitnet.from_pretrained(out, lm_head=head, dtype=getattr(torch, dtype))
        key = f"ops_{dtype}_lm_head_{head}"
        ops_ppl[key] = perplexity(loaded, held_ids, args.seq_len, batch_size=16)
        if dtype == "bfloat16":
            greedy[head] = loaded.generate(prompt, max_new_tokens=64, do_sample=False)[0, prompt.shape[1]:].tolist()
        _log(f"held-out perplexity through the ops, {dtype} activations, lm_head={head}: {ops_ppl[key]:.3f}")
    agreement = {
        head: sum(a == b for a, b in zip(greedy[head], greedy["bf16"])) / len(greedy["bf16"]) for head in greedy
    }
    ops_fp32 = ops_ppl["ops_float32_lm_head_bf16"]
    if abs(ops_fp32 / ppl_qat - 1) > 0.01:
        raise SystemExit(f"the ops' perplexity {ops_fp32:.3f} is not within 1% of the training forward's {ppl_qat:.3f}")

    Path(args.heldout).parent.mkdir(parents=True, exist_ok=True)
    Path(args.heldout).write_text("\n".join(held_docs))  # chapters separated by a blank line
    summary = {
        "command": "python examples/train_default_model.py " + " ".join(sys.argv[1:]),
        "corpus": "King James Version (1611), Debian package bible-kjv-text 4.38 (public domain text)",
        "heldout": f"chapters i % {HELDOUT_EVERY} == {HELDOUT_AT} ({len(held_docs)} of {len(chapters)})",
        "tokens": {"train": train_ids.numel(), "heldout": held_ids.numel()},
        "config": {**MODEL, "vocab_size": args.vocab},
        "parameters": n_params,
        "checkpoint_bytes": size,
        "training": {k: getattr(args, k) for k in ("steps", "batch", "seq_len", "lr", "warmup", "weight_decay", "seed", "threads")},
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "perplexity": {
            "qat_forward_fp32": round(ppl_qat, 4),
            "unigram": round(ppl_unigram, 3),
            **{k: round(v, 4) for k, v in ops_ppl.items()},
        },
        "greedy_agreement_with_bf16_head_64_tokens": agreement,
        "heldout_evals": evals,
        "loss": [round(loss, 4) for _, loss in history],
    }
    Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
    Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    write_model_card(out, summary)
    _plot(history, evals, args.plot)
    _log(f"done in {summary['total_seconds'] / 60:.1f} min; summary in {args.summary}")


def write_model_card(out: Path, summary: dict) -> None:
    """``README.md`` next to the weights: what the model is, its data, licence and figures."""
    ppl, cfg = summary["perplexity"], summary["config"]
    rows = "\n".join(f"| {name} | {value} |" for name, value in ppl.items())
    out.joinpath("README.md").write_text(f"""# torch_bitnet default model

A small BitNet b1.58 language model (ternary weights, 8-bit activations) trained from scratch
with quantization-aware training by `examples/train_default_model.py` of torch_bitnet, and
shipped inside the package as its default model. It is a demonstration and test model: it
writes King-James-style English and knows nothing else.

- Architecture: transformers `BitNetForCausalLM`, hidden {cfg["hidden_size"]}, {cfg["num_hidden_layers"]} layers,
  {cfg["num_attention_heads"]} heads / {cfg["num_key_value_heads"]} KV head, relu2 MLP of {cfg["intermediate_size"]}, tied embeddings,
  vocabulary {cfg["vocab_size"]} (byte-level BPE, Llama-3 special tokens in the last 256 ids);
  {summary["parameters"] / 1e6:.2f} M parameters.
- Format: the one of microsoft/bitnet-b1.58-2B-4T (packed uint8 ternary weights, bf16 scales,
  embedding and norms; quantization_config autobitlinear / offline); {summary["checkpoint_bytes"] / 1e6:.2f} MB.
- Data: {summary["corpus"]}; held out: {summary["heldout"]}.
  The text is public domain. Training tokens: {summary["tokens"]["train"]}; held-out tokens: {summary["tokens"]["heldout"]}.
- Training: {summary["training"]}; {summary["train_seconds"] / 60:.0f} min on 2 CPU cores, torch {summary["torch"]}.
- Reproduce: `{summary["command"]}`

Held-out perplexity (256-token windows):

| forward | perplexity |
|---|---|
{rows}
""")


def _plot(history, evals, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in history]
    losses = [v for _, v in history]
    smooth, acc = [], None
    for v in losses:
        acc = v if acc is None else 0.98 * acc + 0.02 * v
        smooth.append(acc)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="0.8", lw=0.6, label="training loss (per step)")
    ax.plot(steps, smooth, color="C0", label="training loss (EMA 0.98)")
    ax.plot([s for s, _ in evals], [math.log(p) for _, p in evals], "o-", color="C1", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("torch_bitnet default model: BitNet b1.58 QAT on the KJV")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "torch_bitnet" / "default_model"), help="checkpoint directory")
    p.add_argument("--work", default=os.path.expanduser("~/.cache/torch_bitnet/train_default"),
                   help="corpus and tokenizer cache")
    p.add_argument("--heldout", default=str(ROOT / "tests" / "data" / "kjv_heldout.txt"),
                   help="where to write the held-out text (the tests read it)")
    p.add_argument("--summary", default=str(ROOT / "docs" / "default_model.json"), help="figures, JSON")
    p.add_argument("--plot", default=str(ROOT / "docs" / "default_model_loss.png"), help="loss curve, PNG")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: 3000, about an hour)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training / evaluation window")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay to 10%%)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of the matrices")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer size, incl. 256 special tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all)")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
