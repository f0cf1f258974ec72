"""Write BitNet b1.58 checkpoints with random weights, in the exact on-disk formats transformers reads.

No model can be downloaded where this project is built and tested, so tests, demos and
benchmarks make their own: :func:`write_checkpoint` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads like the real
``microsoft/bitnet-b1.58-2B-4T`` (random weights, same tensor names, shapes and dtypes), and
:func:`write_tokenizer` a small byte-level BPE tokenizer with Llama-3 special tokens.

Three ``mode`` s, one per format transformers 5 can load (``quantization_config``):

============  =====================================  ===============================================
mode          quantization_config                    each BitLinear on disk
============  =====================================  ===============================================
"offline"     autobitlinear / offline (2B-4T repo)   ``weight`` uint8 (out/4, in) packed, ``weight_scale``
                                                     (1,) = mean|W| (the output is MULTIPLIED by it)
"online"      autobitlinear / online (``-bf16``)     ``weight`` float master (out, in); no scale
"bitlinear"   bitlinear (transformers' BitLinear)    ``weight`` uint8 (out/4, in) packed, ``weight_scale``
                                                     (1,) = 1 / mean|W| (the output is DIVIDED by it)
============  =====================================  ===============================================

All three modes hold the SAME model for a given ``(config, seed, dtype)``: every BitLinear is
drawn as a float master weight W (rounded to ``dtype``), and the packed modes store
``ternarize(W)`` (absmean, exactly what transformers' online ``WeightQuant`` computes). So a
test can load one seed in every format and compare them; :func:`random_linear_weight` and
:func:`random_ternary_weights` regenerate what the writer wrote, tensor by tensor.

Every random tensor has its own generator, seeded from ``(seed, tensor name)``: the writer can
generate and drop tensors one at a time (the 2B-4T shape never holds all float weights), and
a test can regenerate any single tensor without the others.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import save_file

from .packing import ternarize, to_hf_packed

__all__ = [
    "BITNET_2B4T",
    "CHAT_TEMPLATE",
    "MODES",
    "NUM_SPECIAL_TOKENS",
    "SMALL_CONFIGS",
    "bitnet_config",
    "linear_shapes",
    "random_linear_weight",
    "random_ternary_weights",
    "small_config",
    "special_token_ids",
    "special_tokens",
    "write_checkpoint",
    "write_model_files",
    "write_tokenizer",
]

MODES = ("offline", "online", "bitlinear")

#: microsoft/bitnet-b1.58-2B-4T (config.json of the Hub repo; REFERENCE.md section 2).
BITNET_2B4T: Mapping[str, Any] = MappingProxyType(
    {
        "vocab_size": 128256,
        "hidden_size": 2560,
        "intermediate_size": 6912,
        "num_hidden_layers": 30,
        "num_attention_heads": 20,
        "num_key_value_heads": 5,
        "hidden_act": "relu2",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "attention_bias": False,
    }
)

#: Small shapes for fast tests, all with tied embeddings. Every out_features is a multiple of 4
#: (transformers' packed layout needs it) and every hidden = heads * head_dim (transformers'
#: attn_sub_norm has hidden_size features but normalizes the heads * head_dim attention output).
SMALL_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        # plain multi-head attention (kv heads = heads), intermediate not a power of two
        "tiny": MappingProxyType(
            dict(vocab_size=768, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4)
        ),
        # GQA 4:1 like 2B-4T, intermediate / hidden = 2.69 like 2B-4T (6912 / 2560 = 2.7)
        "gqa": MappingProxyType(
            dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2)
        ),
        # sizes that are not multiples of 256 (the kernels' K block) anywhere: hidden 192,
        # intermediate 520, GQA 3:1, head_dim 64, 3 layers, vocab 1000
        "odd": MappingProxyType(
            dict(vocab_size=1000, hidden_size=192, intermediate_size=520, num_hidden_layers=3,
                 num_attention_heads=3, num_key_value_heads=1)
        ),
    }
)

#: Llama-3 reserves the last 256 ids of its 128256-token vocabulary for special tokens; the
#: tokenizer written here does the same at every vocabulary size, so bos = vocab_size - 256
#: (128000 for the 2B-4T vocabulary), eos = bos + 1 and <|eot_id|> = bos + 9, as in Llama 3.
NUM_SPECIAL_TOKENS = 256

# Offsets of the named special tokens from the first special id, as in Meta-Llama-3
# (128000 <|begin_of_text|>, 128001 <|end_of_text|>, 128002-128005 reserved 0-3,
# 128006/128007 header ids, 128008 reserved 4, 128009 <|eot_id|>, 128010+ reserved 5-250).
_NAMED_SPECIAL = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "<|eot_id|>",
}

#: Llama-3-Instruct style chat template: bos once, then per message
#: ``<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>``.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# The pre-tokenizer split pattern of the Llama-3 tokenizer (tiktoken cl100k style).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def bitnet_config(**overrides: Any):
    """The ``microsoft/bitnet-b1.58-2B-4T`` ``transformers.BitNetConfig``, with ``overrides``.

    Any ``BitNetConfig`` field can be overridden (e.g. small sizes for tests:
    ``bitnet_config(**SMALL_CONFIGS["gqa"])``). ``rope_theta=...`` is accepted and moved into
    ``rope_parameters``, which is where transformers 5 reads it (``BitNetRotaryEmbedding`` uses
    ``config.rope_parameters["rope_theta"]``; a bare ``rope_theta`` attribute is ignored once
    ``rope_parameters`` holds one). Unless given explicitly, ``bos_token_id`` / ``eos_token_id``
    follow ``vocab_size`` with the Llama-3 layout of :func:`write_tokenizer`
    (``vocab_size - 256`` and ``vocab_size - 255``: 128000 / 128001 for the 2B-4T vocabulary).
    The ``quantization_config`` is the 2B-4T one (autobitlinear, offline);
    :func:`write_checkpoint` replaces it according to its ``mode``.
    """
    from transformers import BitNetConfig

    params: dict[str, Any] = dict(BITNET_2B4T)
    params.update(overrides)
    theta = float(params.pop("rope_theta"))
    if params.get("rope_parameters") is None:
        params["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    if "vocab_size" in overrides:
        if "bos_token_id" not in overrides:
            params["bos_token_id"] = params["vocab_size"] - NUM_SPECIAL_TOKENS
        if "eos_token_id" not in overrides:
            params["eos_token_id"] = params["vocab_size"] - NUM_SPECIAL_TOKENS + 1
    params.setdefault(
        "quantization_config",
        {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
    )
    params.setdefault("architectures", ["BitNetForCausalLM"])
    params.setdefault("dtype", "bfloat16")
    return BitNetConfig(**params)


def small_config(name: str, **overrides: Any):
    """``bitnet_config`` of the preset ``SMALL_CONFIGS[name]``, with further ``overrides``."""
    if name not in SMALL_CONFIGS:
        raise KeyError(f"torch_bitnet: unknown small config {name!r}; choose one of {sorted(SMALL_CONFIGS)}")
    return bitnet_config(**{**SMALL_CONFIGS[name], **overrides})


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim else config.hidden_size // config.num_attention_heads


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """Every BitLinear of the model: module name -> (out_features, in_features), in file order."""
    h, i, hd = config.hidden_size, config.intermediate_size, _head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out = {}
    for layer in range(config.num_hidden_layers):
        for name in _ATTN:
            out[f"model.layers.{layer}.self_attn.{name}"] = shapes[name]
        for name in _MLP:
            out[f"model.layers.{layer}.mlp.{name}"] = shapes[name]
    return out


def _check_config(config, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"torch_bitnet: mode must be one of {MODES}, got {mode!r}")
    hd = _head_dim(config)
    if config.num_attention_heads * hd != config.hidden_size:
        # BitNetAttention normalizes its (heads * head_dim)-wide output with an RMSNorm of
        # hidden_size features (attn_sub_norm): transformers cannot run any other shape.
        raise ValueError(
            f"torch_bitnet: num_attention_heads * head_dim ({config.num_attention_heads} * {hd}) must equal "
            f"hidden_size ({config.hidden_size}) for transformers' BitNet attention (attn_sub_norm)"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("torch_bitnet: num_attention_heads must be a multiple of num_key_value_heads")
    if mode != "online":
        for name, (n, _) in linear_shapes(config).items():
            if n % 4:
                raise ValueError(
                    f"torch_bitnet: {name} has out_features={n}; transformers' packed layout needs a multiple of 4"
                )


# --------------------------------------------------------------------------------------------
# random tensors
# --------------------------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator of its own per tensor: same (seed, name) -> same tensor, in any order."""
    digest = hashlib.sha256(f"torch_bitnet.checkpoints/{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_linear_weight(
    config, name: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The BitLinear ``name`` (e.g. ``"model.layers.0.mlp.up_proj"``) that the writer writes.

    Returns ``(master, wq, scale)``: the float master weight (out, in) in ``dtype`` (what mode
    "online" stores), its absmean ternarization ``wq`` int8 (out, in) and ``scale`` float32 (1,)
    = mean|master| (what the packed modes store, the latter rounded to ``dtype``).

    The master is normal with a per-tensor mean|W| drawn uniformly in [0.5, 3]: trained
    checkpoints have per-tensor scales of that order (2B-4T: about 1.2-1.8, see
    :func:`write_checkpoint`). About 31 % of the ternary weights are 0 and 34.5 % each -1 / +1,
    the mix absmean ternarization gives for a normal distribution (threshold 0.5 mean|W|).
    """
    shapes = linear_shapes(config)
    if name not in shapes:
        raise KeyError(f"torch_bitnet: {name!r} is not a BitLinear of this config")
    g = _generator(seed, name)
    target = 0.5 + 2.5 * torch.rand((), generator=g, dtype=torch.float64).item()
    std = target * math.sqrt(math.pi / 2)  # E|N(0, std^2)| = std * sqrt(2 / pi)
    master = torch.randn(shapes[name], generator=g).mul_(std).to(dtype)
    wq, scale = ternarize(master)
    return master, wq, scale


def random_ternary_weights(
    config, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (wq int8 (out, in), scale float32 (1,))}`` for every BitLinear.

    Exactly the ternary weights :func:`write_checkpoint` packs for ``(config, seed, dtype)``
    (and the ternarization transformers' online mode computes from the master weights).
    Holds all of them at once: meant for small configs.
    """
    out = {}
    for name in linear_shapes(config):
        _, wq, scale = random_linear_weight(config, name, seed, dtype)
        out[name] = (wq, scale)
    return out


def _random_norm(n: int, seed: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    # Uniform in [0.5, 1.5], not all ones: a loader or kernel that drops or misplaces a norm
    # weight then changes the output.
    return (0.5 + torch.rand(n, generator=_generator(seed, name))).to(dtype)


def _random_embedding(rows: int, cols: int, seed: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    # std 2 / sqrt(hidden): with tied embeddings the logits (final-normed h, rms ~1, dot a row)
    # then have a std of about 2 at every size: neither flat nor one-hot softmax outputs.
    # Generated in row chunks so the 2B-4T table (128256 x 2560) never exists in float32.
    g = _generator(seed, name)
    out = torch.empty((rows, cols), dtype=dtype)
    std = 2.0 / math.sqrt(cols)
    chunk = max(1, (1 << 22) // cols)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        out[start:stop] = torch.randn((stop - start, cols), generator=g) * std
    return out


def _model_tensors(config, mode: str, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the whole checkpoint, one layer at a time, in the order of the file."""
    h = config.hidden_size
    yield "model.embed_tokens.weight", _random_embedding(config.vocab_size, h, seed, "model.embed_tokens.weight", dtype)
    shapes = linear_shapes(config)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for norm, n in (("input_layernorm", h), ("post_attention_layernorm", h),
                        ("self_attn.attn_sub_norm", h), ("mlp.ffn_sub_norm", config.intermediate_size)):
            yield f"{prefix}{norm}.weight", _random_norm(n, seed, f"{prefix}{norm}.weight", dtype)
        for name in shapes:
            if not name.startswith(prefix):
                continue
            master, wq, scale = random_linear_weight(config, name, seed, dtype)
            if mode == "online":
                yield f"{name}.weight", master
                continue
            del master
            yield f"{name}.weight", to_hf_packed(wq).contiguous()
            # weight_scale has shape (1,) and the float dtype of the checkpoint (bf16 in 2B-4T):
            # a public script that reads every scale of microsoft/bitnet-b1.58-2B-4T documents
            # them as "shape [1], BFloat16" with values 1.21875 (q_proj) and 1.796875 (k_proj),
            # both exact bf16 numbers; transformers' PR #33410 (the BitNet quantizer) says the
            # models "were trained on bfloat16 precision for the scales"; transformers creates the
            # buffer in the model dtype (torch.ones((1), dtype=dtype)) in both classes.
            value = scale if mode == "offline" else 1.0 / scale  # BitLinear divides by it
            yield f"{name}.weight_scale", value.to(dtype).reshape(1)
    yield "model.norm.weight", _random_norm(h, seed, "model.norm.weight", dtype)
    if not config.tie_word_embeddings:
        # transformers never converts lm_head (modules_to_not_convert): a plain float weight.
        yield "lm_head.weight", _random_embedding(config.vocab_size, h, seed, "lm_head.weight", dtype)


# --------------------------------------------------------------------------------------------
# safetensors writing (single file or shards)
# --------------------------------------------------------------------------------------------

_METADATA = {"format": "pt"}  # transformers refuses safetensors files without format "pt"
_SHARD_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


class _ShardWriter:
    """Collects tensors and writes them with safetensors' save_file.

    ``max_shard_bytes=None``: everything goes to ``model.safetensors`` at :meth:`close` (the
    dict holds every tensor, as save_file needs: about 1.2 GB for 2B-4T offline, 4.8 GB
    online). Otherwise a shard is written as soon as the next tensor would overflow it, so
    memory stays at about one shard; names become ``model-0000i-of-0000N.safetensors`` at the
    end, when N is known, with a ``model.safetensors.index.json`` as transformers expects.
    """

    def __init__(self, directory: Path, max_shard_bytes: int | None):
        if max_shard_bytes is not None and max_shard_bytes < 1:
            raise ValueError(f"torch_bitnet: max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_shard_bytes is not None and self.current and self.current_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.current[name] = tensor
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def _tmp(self, index: int) -> Path:
        return self.directory / f".tmp-model-shard-{index:05d}.safetensors"

    def _flush(self) -> None:
        save_file(self.current, str(self._tmp(len(self.shards))), metadata=_METADATA)
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.max_shard_bytes is None:
            path = self.directory / "model.safetensors"
            save_file(self.current, str(path), metadata=_METADATA)
            self.current = {}
            return [path]
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            final = self.directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp(i), final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files


def _clear_weights(directory: Path) -> None:
    """Remove weight files a previous write may have left (stale shards would be loaded too)."""
    for entry in directory.iterdir():
        if _SHARD_RE.match(entry.name) or entry.name == "model.safetensors.index.json" or (
            entry.name.startswith(".tmp-model-shard-")
        ):
            entry.unlink()


# --------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_checkpoint(
    path: str | os.PathLike,
    config,
    *,
    mode: str = "offline",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: bool = True,
    max_shard_bytes: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Write a random-weight BitNet checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads.

    Args:
        path: output directory (created; weight files of an earlier write are replaced).
        config: a ``BitNetConfig`` (see :func:`bitnet_config`, :data:`SMALL_CONFIGS`); it is
            copied, not modified. Its ``quantization_config`` and ``dtype`` are set from ``mode``
            and ``dtype``.
        mode: ``"offline"`` (the 2B-4T format: packed uint8 weights + weight_scale = mean|W|,
            autobitlinear / offline), ``"online"`` (the ``-bf16`` master checkpoint: float
            weights, autobitlinear / online) or ``"bitlinear"`` (transformers' ``BitLinear``:
            packed uint8 weights + weight_scale = 1 / mean|W|). The same ``(config, seed,
            dtype)`` gives the same model in every mode (see the module docstring).
        seed: random seed; see :func:`random_linear_weight` / :func:`random_ternary_weights`.
        dtype: float dtype of embeddings, norms, weight_scale and online master weights.
        tokenizer: also write the tokenizer of :func:`write_tokenizer` (vocab_size =
            ``config.vocab_size``); the config's bos/eos ids must then be the tokenizer's
            (``vocab_size - 256`` / ``- 255``, which :func:`bitnet_config` sets).
        max_shard_bytes: ``None`` writes one ``model.safetensors`` (as the 2B-4T repo); a byte
            count writes ``model-0000i-of-0000N.safetensors`` shards of at most that size (a
            bigger single tensor gets a shard of its own) plus ``model.safetensors.index.json``.
        progress: show a tqdm bar over the tensors; default: when the model has more than 4 layers.

    Memory and time: tensors are generated one at a time and the float masters of the packed
    modes are dropped at once, so a single-file 2B-4T "offline" write holds about the file
    (1.18 GB: 0.52 GB packed + 0.66 GB embeddings; measured peak RSS 1.9 GB with torch and
    transformers imported) and takes about 25 s on 2 cores (mostly torch.randn); "online" holds
    its 4.8 GB of bf16 masters unless ``max_shard_bytes`` bounds it to about one shard.

    Returns the directory as a ``Path``.
    """
    _check_config(config, mode)
    if not dtype.is_floating_point:
        raise TypeError(f"torch_bitnet: dtype must be a floating-point dtype, got {dtype}")
    first_special = config.vocab_size - NUM_SPECIAL_TOKENS
    llama3_layout = config.bos_token_id == first_special and config.eos_token_id == first_special + 1
    if tokenizer and not llama3_layout:
        raise ValueError(
            f"torch_bitnet: the written tokenizer has bos={first_special}, eos={first_special + 1} for "
            f"vocab_size={config.vocab_size} (Llama-3 layout), but the config has bos={config.bos_token_id}, "
            f"eos={config.eos_token_id}; build the config with bitnet_config() or pass tokenizer=False"
        )
    n_tensors = 2 + config.num_hidden_layers * (4 + 7 * (1 if mode == "online" else 2))
    n_tensors += 0 if config.tie_word_embeddings else 1
    directory = write_model_files(
        path, config, _model_tensors(config, mode, seed, dtype), mode=mode, dtype=dtype,
        max_shard_bytes=max_shard_bytes, total=n_tensors,
        progress=config.num_hidden_layers > 4 if progress is None else progress,
    )
    if tokenizer:
        write_tokenizer(directory, vocab_size=config.vocab_size, model_max_length=config.max_position_embeddings)
    return directory


def write_model_files(
    path: str | os.PathLike,
    config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    mode: str,
    dtype: torch.dtype,
    tokenizer=None,
    max_shard_bytes: int | None = None,
    progress: bool = False,
    total: int | None = None,
) -> Path:
    """Write ``(name, tensor)`` pairs as a BitNet checkpoint of ``mode`` (see :func:`write_checkpoint`).

    The weight file(s) (one ``model.safetensors``, or shards of at most ``max_shard_bytes``),
    ``config.json`` (a copy of ``config`` with the ``quantization_config`` of ``mode`` and
    ``dtype``), ``generation_config.json`` (eos = ``<|end_of_text|>`` and, with the Llama-3
    special-token layout, ``<|eot_id|>``) and, if given, ``tokenizer.save_pretrained``'s files.
    The tensors are written as given: the caller packs them for ``mode``. Returns the directory.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    _check_config(config, mode)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.quantization_config = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear" if mode == "bitlinear" else "autobitlinear",
        "quantization_mode": "online" if mode == "online" else "offline",
    }
    config.dtype = dtype
    config.architectures = ["BitNetForCausalLM"]

    _clear_weights(directory)
    writer = _ShardWriter(directory, max_shard_bytes)
    with tqdm(total=total, desc=f"writing {mode} checkpoint", unit="tensor", disable=not progress) as bar:
        for name, tensor in tensors:
            writer.add(name, tensor)
            bar.update(1)
        weight_files = writer.close()

    # config.json in the transformers 5 form (rope_parameters), plus the two keys the Hub
    # config of 2B-4T has and older readers (transformers 4, llama.cpp's converter) look for.
    # transformers 5 ignores them: rope_parameters wins, dtype and torch_dtype agree.
    cfg = config.to_dict()
    cfg["rope_theta"] = config.rope_parameters["rope_theta"]
    cfg["torch_dtype"] = _dtype_name(dtype)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # safetensors creates its files with mode 0600; give them the mode any other file gets here
    # (the umask's), so a checkpoint written by one user or container is readable like the rest.
    file_mode = (directory / "config.json").stat().st_mode & 0o777
    for weight_file in weight_files:
        os.chmod(weight_file, file_mode)

    first_special = config.vocab_size - NUM_SPECIAL_TOKENS
    eos = [config.eos_token_id]
    if config.bos_token_id == first_special and config.eos_token_id == first_special + 1:
        eos.append(first_special + 9)  # <|eot_id|> ends a chat turn, as in Llama-3-Instruct
    generation = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id)
    generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

# Training text for the tokenizer, written for this module (no download, no licence question).
# Plain English of several registers, numbers, code and a little non-ASCII, so the merges look
# like a real tokenizer's (frequent words, " the", digits, indentation) at small sizes.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A ternary network stores every weight as one of
three values: minus one, zero or plus one. Multiplying by such a weight is an addition, a
subtraction or nothing at all, which is why these models can run quickly on ordinary CPUs.

Once upon a time there was a small village at the edge of a great forest. The people of the
village were farmers and weavers, and every autumn they held a market where travellers came
from far away to buy wool, honey and apples. One year a stranger arrived with a cart full of
books. "I will trade a story for a meal," she said, and the children gathered around her.

In 1969, people walked on the Moon for the first time. The journey of about 384,400 km took
three days; the crew spent 21 hours and 36 minutes on the surface and brought back 21.5 kg of
rock. Today a phone holds more computing power than the whole mission had in 1969.

To make a cup of tea, boil fresh water, warm the pot, add one spoon of leaves per person and
let it steep for three to five minutes. Some people add milk, some add lemon, and some add
nothing at all. Whatever you choose, drink it while it is hot and share it with a friend.

def mean_abs(values):
    \"\"\"Return the mean of the absolute values of a list of numbers.\"\"\"
    total = 0.0
    for value in values:
        total += abs(value)
    return total / max(len(values), 1)

if __name__ == "__main__":
    print(mean_abs([-1, 0, 1, 2]))  # prints 1.0

The weather today is cloudy with a chance of rain in the afternoon. Temperatures will reach
18 degrees in the north and 24 degrees in the south, with a light wind from the west. Tomorrow
should be sunny and warm, a good day for a walk in the park or a trip to the seaside.

Learning a language takes time. You learn new words every day, you practise speaking with
other people, you read books and you listen to music. Mistakes are normal: they show that
you are trying. Ask questions, be patient, and one day you will notice that you understand.

A café in Zürich serves crème brûlée, and the menu says "naïve" in small letters — naïve
indeed! Prices: 4.50 € or $5. Other scripts appear too: Привет, γειά σου, こんにちは, 你好, 😀.

Questions and answers. What is the capital of France? Paris. How many legs does a spider
have? Eight. Which planet is the largest? Jupiter. Why is the sky blue? Because air scatters
blue light more than red light. Who wrote the play? We do not know, but it was a good one.
"""


def special_tokens() -> list[str]:
    """The 256 special tokens in id order, named and placed as in Meta-Llama-3."""
    names, reserved = [], 0
    for offset in range(NUM_SPECIAL_TOKENS):
        if offset in _NAMED_SPECIAL:
            names.append(_NAMED_SPECIAL[offset])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return names


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Ids of the named special tokens of the tokenizer of that size (bos = vocab_size - 256, ...)."""
    first = vocab_size - NUM_SPECIAL_TOKENS
    return {name: first + offset for offset, name in _NAMED_SPECIAL.items()}


def _build_tokenizer(vocab_size: int, texts: Iterable[str] | None = None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < NUM_SPECIAL_TOKENS + 256:
        raise ValueError(
            f"torch_bitnet: vocab_size must be >= {NUM_SPECIAL_TOKENS + 256} (256 byte tokens + "
            f"{NUM_SPECIAL_TOKENS} special tokens), got {vocab_size}"
        )
    n_bpe = vocab_size - NUM_SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknowns
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) if texts is None else texts, trainer=trainer)

    # A small corpus gives fewer merges than n_bpe (the built-in one a few thousand); fill the BPE vocabulary up to
    # n_bpe with tokens no merge produces (so encoding never emits them), so the special tokens
    # land at vocab_size - 256 at every size (128000 for the 2B-4T vocabulary, as in Llama 3).
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), n_bpe):
        vocab[f"<|unused_bpe_token_{i}|>"] = i
    spec["model"]["ignore_merges"] = True  # as in Llama 3's tokenizer.json
    tok = Tokenizer.from_str(json.dumps(spec))
    assert tok.get_vocab_size() == n_bpe

    tok.add_special_tokens(special_tokens())
    bos = special_token_ids(vocab_size)["<|begin_of_text|>"]
    # bos in front of every encoded text (Llama 3's post-processor); pairs get a bos each.
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id("<|begin_of_text|>") == bos
    return tok


def write_tokenizer(
    path: str | os.PathLike,
    vocab_size: int = 128256,
    *,
    model_max_length: int = 4096,
    texts: Iterable[str] | None = None,
) -> Path:
    """Write a byte-level BPE tokenizer with Llama-3 special tokens into directory ``path``.

    Trained deterministically with the ``tokenizers`` library on ``texts`` (an iterable of
    strings, e.g. lines of a corpus), by default a small built-in English text (Llama-3
    pre-tokenizer regex, byte-level, no unknown tokens: any UTF-8 text round-trips).
    ``len(tokenizer) == vocab_size``; the last 256 ids are the special tokens in Llama-3 order:
    ``<|begin_of_text|>`` = vocab_size - 256 (bos, prepended on encode), ``<|end_of_text|>`` =
    vocab_size - 255 (eos), ``<|start_header_id|>`` / ``<|end_header_id|>`` = + 6 / + 7,
    ``<|eot_id|>`` = + 9 (see :func:`special_token_ids`). Writes ``tokenizer.json``,
    ``tokenizer_config.json`` (with a Llama-3 style ``chat_template``) and
    ``special_tokens_map.json``; ``transformers.AutoTokenizer.from_pretrained(path)`` loads it as
    ``PreTrainedTokenizerFast``. Returns the directory.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer(vocab_size, texts)
    tok.save(str(directory / "tokenizer.json"))

    added = {
        str(vocab_size - NUM_SPECIAL_TOKENS + i): {
            "content": name, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for i, name in enumerate(special_tokens())
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": CHAT_TEMPLATE,
        # False: decode(encode(text)) must give text back exactly (True rewrites " ." to ".").
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return directory
