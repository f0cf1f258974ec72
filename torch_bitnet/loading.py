"""Load BitNet checkpoints straight into a patched model, and save it in torch_bitnet's form.

:func:`from_pretrained` reads a directory (or a hub id already in the local Hugging Face
cache: nothing is downloaded) in any of these layouts:

* microsoft/bitnet-b1.58-2B-4T's: ``config.json`` with ``model_type`` ``bitnet`` and a
  ``quantization_config`` (``linear_class`` ``autobitlinear``, ``quantization_mode`` ``offline``),
  safetensors with packed uint8 (out/4, in) BitLinear weights and a ``weight_scale`` each;
* transformers' ``BitLinear`` layout (``linear_class`` ``bitlinear``: same packing, the scale
  divides);
* float master weights (``quantization_mode`` ``online``, the ``-bf16`` repos): ternarized here;
* torch_bitnet's own (written by :func:`save_pretrained`): already in the kernels' packed
  form (2-bit, 5-trit or 3-trit, recorded in ``config.json``), loaded without any conversion.

The model is built on the ``meta`` device and every tensor is read from the memory-mapped
safetensors files and converted layer by layer, so no float copy of the BitNet weights
ever exists (transformers' own offline path unpacks all of them to bf16, ~4.8 GB for 2B-4T).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .fuse import fuse_layers
from .kv_cache import set_kv_cache_dtype
from .memory import huge_pages_available, place_weights
from .int4 import int4_shapes, quantize_int4_rows
from .int8 import int8_shape, quantize_int8_rows
from .nn import (
    BitLinear,
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    resolve_ternary_format,
    set_ternary_format,
)
from .packing import FORMATS, from_hf_packed, packed_shape, ternarize

__all__ = ["from_pretrained", "save_pretrained", "convert_checkpoint", "resolve_model_path"]

CONFIG_FILE = "config.json"
#: torch_bitnet's weights file, written by save_pretrained
PACKED_FILE = "torch_bitnet.safetensors"
#: config.json entry that marks torch_bitnet's layout
FORMAT_KEY = "torch_bitnet"
FORMAT_VERSION = 1
#: Byte alignment of the packed weights and tables in our safetensors file (one cache line, one
#: AVX-512 vector): a kernel load from an unaligned row touches two cache lines.
ALIGNMENT = 64
# safetensors' dtype names of the dtypes a patched model stores.
_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL",
}
#: BitLinear layers of every decoder layer of BitNetForCausalLM
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
#: lm_head / embedding forms from_pretrained can build
LM_HEADS = ("int8", "int4", "bf16")
#: the quantized forms: (embedding module, lm_head module) of each
_QUANTIZED_HEADS = {"int8": (Int8Embedding, Int8Linear), "int4": (Int4Embedding, Int4Linear)}
#: files copied along when converting a checkpoint
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


def resolve_model_path(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local directory, or the snapshot of a hub id in the local Hugging Face cache.

    Raises FileNotFoundError if it is neither (torch_bitnet never downloads).
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"torch_bitnet: {path} is a file; pass the checkpoint directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_id), revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(
            f"torch_bitnet: {str(path_or_id)!r} is neither a directory nor a model in the local Hugging Face "
            "cache (torch_bitnet never downloads; fetch it first, e.g. with `hf download`)"
        ) from err


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"torch_bitnet: {file} is missing; a checkpoint directory needs a config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"torch_bitnet: {file} is not valid JSON ({err})") from err
    if raw.get("model_type") != "bitnet":
        raise ValueError(
            f"torch_bitnet: {file} has model_type {raw.get('model_type')!r}; from_pretrained loads BitNet "
            "checkpoints (model_type 'bitnet'). For other architectures use transformers plus "
            "torch_bitnet.replace_linear."
        )
    if FORMAT_KEY not in raw:
        qc = raw.get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != "bitnet":
            raise ValueError(f"torch_bitnet: {file} has no BitNet quantization_config (quant_method 'bitnet')")
        if qc.get("linear_class", "bitlinear") not in ("bitlinear", "autobitlinear"):
            raise ValueError(f"torch_bitnet: {file}: unknown quantization_config.linear_class {qc['linear_class']!r}")
        if qc.get("quantization_mode", "offline") not in ("offline", "online"):
            raise ValueError(
                f"torch_bitnet: {file}: unknown quantization_config.quantization_mode {qc['quantization_mode']!r}"
            )
    return raw


class _Checkpoint:
    """The tensors of one checkpoint, over one or several memory-mapped safetensors files."""

    def __init__(self, path: Path, stack: contextlib.ExitStack, ours: bool) -> None:
        if ours:
            files = [path / PACKED_FILE]
        elif (path / "model.safetensors.index.json").is_file():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = sorted({path / f for f in index["weight_map"].values()})
        else:
            files = [path / "model.safetensors"]
        self.where: dict[str, Path] = {}
        self.handles = {}
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"torch_bitnet: checkpoint file {file} is missing")
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"torch_bitnet: {file} is not a readable safetensors file ({err})") from err
            self.handles[file] = handle
            for key in handle.keys():
                self.where[key] = file
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, shape: tuple[int, ...] | None = None, dtypes: tuple[torch.dtype, ...] = ()) -> torch.Tensor:
        """Read one tensor, checking it exists and has the expected shape and dtype."""
        if key not in self.where:
            raise ValueError(f"torch_bitnet: the checkpoint has no tensor {key!r}")
        file = self.where[key]
        tensor = self.handles[file].get_tensor(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"torch_bitnet: tensor {key!r} in {file.name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        if dtypes and tensor.dtype not in dtypes:
            raise ValueError(
                f"torch_bitnet: tensor {key!r} in {file.name} has dtype {tensor.dtype}, expected one of "
                f"{', '.join(str(d) for d in dtypes)}"
            )
        self.used.add(key)
        return tensor


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _load_linear(ckpt: _Checkpoint, prefix: str, layer: BitLinear, kind: str) -> dict[str, torch.Tensor]:
    """State of one BitLinear (keys relative to it) from the checkpoint, converted to our form
    (packed in the format of ``layer``'s weight)."""
    n, k = layer.out_features, layer.in_features
    has_bias = layer.bias is not None
    if kind == "ours":
        state = {
            "weight": ckpt.get(f"{prefix}.weight", packed_shape(n, k, layer.ternary_format), (torch.uint8,)),
            "weight_scale": ckpt.get(f"{prefix}.weight_scale", (1,), (torch.float32,)),
        }
        if has_bias:
            state["bias"] = ckpt.get(f"{prefix}.bias", (n,), (torch.float32,))
        return state
    bias = ckpt.get(f"{prefix}.bias", (n,), _FLOATS).float() if has_bias else None
    if kind == "online":
        wq, scale = ternarize(ckpt.get(f"{prefix}.weight", (n, k), _FLOATS))
    else:
        if n % 4:
            raise ValueError(f"torch_bitnet: {prefix}: packed BitNet checkpoints need out_features divisible by 4, got {n}")
        wq = from_hf_packed(ckpt.get(f"{prefix}.weight", (n // 4, k), (torch.uint8,)), n)
        stored = ckpt.get(f"{prefix}.weight_scale", (1,), _FLOATS).float()
        if kind == "autobitlinear":  # y = (linear(x_q, W) + b) * weight_scale
            scale = stored
            bias = None if bias is None else bias * stored
        else:  # transformers' BitLinear: y = linear(x_q, W) / weight_scale + b
            scale = 1.0 / stored
    if not bool(torch.isfinite(scale).all()) or float(scale) == 0.0:
        raise ValueError(f"torch_bitnet: {prefix}.weight_scale gives the unusable scale {float(scale)}")
    state = {
        "weight": BitLinear.from_ternary(wq, scale, ternary_format=layer.ternary_format).weight,
        "weight_scale": scale.reshape(1),
    }
    if has_bias:
        state["bias"] = bias
    return state


def _load_quantized_tables(model, ckpt: _Checkpoint, tied: bool, lm_head: str) -> dict[str, torch.Tensor]:
    """State of the int8 / int4 embedding (and untied lm_head): read as stored if the checkpoint
    has that form, else quantized from its float table (memory-mapped, in chunks)."""
    state: dict[str, torch.Tensor] = {}
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    if lm_head == "int8":
        (codes_shape, scale_shape), scale_dtype = (int8_shape(vocab, hidden), (vocab,)), torch.float32
        quantize = quantize_int8_rows
    else:
        (codes_shape, scale_shape), scale_dtype = int4_shapes(vocab, hidden), torch.bfloat16
        quantize = quantize_int4_rows
    for name in ("model.embed_tokens",) + (() if tied else ("lm_head",)):
        if f"{name}.weight_scale" in ckpt:
            state[f"{name}.weight"] = ckpt.get(f"{name}.weight", codes_shape, (torch.uint8,))
            state[f"{name}.weight_scale"] = ckpt.get(f"{name}.weight_scale", scale_shape, (scale_dtype,))
        else:
            table = ckpt.get(f"{name}.weight", (vocab, hidden), _FLOATS)
            state[f"{name}.weight"], state[f"{name}.weight_scale"] = quantize(table)
    if tied and "lm_head.weight" in ckpt:  # a tied checkpoint may still carry the copy; it is not needed
        ckpt.used.add("lm_head.weight")
    return state


def _progress(items: list, desc: str, enabled: bool) -> Iterator:
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit="layer", leave=False))


def from_pretrained(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    revision: str | None = None,
    progress: bool | None = None,
    kv_cache_dtype: str | None = None,
    lm_head: str = "int8",
    fuse: bool = True,
    ternary_format: str | None = None,
) -> torch.nn.Module:
    """Load a BitNet checkpoint into a ``BitNetForCausalLM`` running on torch_bitnet's ops.

    Args:
        path_or_id: checkpoint directory, or a hub id whose files are in the local Hugging Face
            cache (nothing is downloaded).
        dtype: dtype of the activations, embeddings and norms (bfloat16 like the checkpoint, or
            float32); BitLinear weights are always packed ternary (``ternary_format``).
        revision: hub revision, for hub ids.
        progress: show a progress bar over layers (default: for models of more than 4 layers).
        kv_cache_dtype: ``int8`` | ``bf16`` | ``fp32``, how the model's KV cache stores keys
            and values (:func:`torch_bitnet.kv_cache.set_kv_cache_dtype`); default
            ``BITNET_KV_CACHE_DTYPE``, else int8.
        lm_head: ``"int8"`` (default): the token embedding and the lm_head (one table when
            tied, as in 2B-4T) quantized per row to int8 (:class:`torch_bitnet.Int8Embedding`,
            :class:`torch_bitnet.Int8Linear`): half the bytes of bf16, and the float table is
            never resident (it is quantized from the memory-mapped file a few thousand rows at
            a time, or read as stored from a checkpoint saved with an int8 table).
            ``"int4"``: the same with the compact int4 table (:class:`torch_bitnet.Int4Embedding`,
            :class:`torch_bitnet.Int4Linear`: 4-bit codes, a bf16 scale per 32 weights; 56% of
            int8's bytes, so a faster decode, at about 10x int8's logit error).
            ``"bf16"``: the table as stored, unquantized, in ``dtype`` (exact).
        fuse: run each decoder layer as four fused ops (norms, activation quantization and
            the relu2 gating inside them; :func:`torch_bitnet.fuse_layers`). ``False`` keeps
            transformers' own layer forward over the same modules.
        ternary_format: how BitLinear weights are packed, ``"2bit"``, ``"5trit"``, ``"3trit"`` or ``"auto"``
            (the faster on this CPU, :func:`torch_bitnet.resolve_ternary_format`;
            :func:`torch_bitnet.set_ternary_format` says which is faster where). Default: as a
            torch_bitnet checkpoint stores them, else ``"2bit"``. Asking a torch_bitnet
            checkpoint for the other format repacks every weight after loading, and the stored
            weights' pages stay resident until the model is freed (2B-4T, 2-bit checkpoint
            loaded as 5-trit: 6.6 s and 1.41 GB resident, against 0.1-2.5 s and 0.42 GB for a
            checkpoint stored 5-trit): convert once with ``convert_checkpoint(...,
            ternary_format=...)`` instead.

    Returns:
        The model in eval mode, without gradients, equal to
        ``torch_bitnet.patch(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))``.
        Load the tokenizer with ``transformers.AutoTokenizer.from_pretrained(path)``.

    Raises:
        FileNotFoundError: missing directory, config.json or safetensors file.
        ValueError: not a BitNet checkpoint, or a tensor missing or of the wrong shape/dtype
            (the message names the tensor and its file).
    """
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.models.bitnet.modeling_bitnet import BitNetRotaryEmbedding

    if dtype not in _FLOATS:
        raise TypeError(f"torch_bitnet: dtype must be float32, bfloat16 or float16, got {dtype}")
    if lm_head not in LM_HEADS:
        raise ValueError(f"torch_bitnet: lm_head must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
    if ternary_format is not None:
        ternary_format = resolve_ternary_format(ternary_format)
    path = resolve_model_path(path_or_id, revision)
    raw = _read_config(path)
    ours = FORMAT_KEY in raw
    # The format the BitLinear weights are read in: as stored in our layout, else packed
    # straight into the one asked for.
    read_format = raw[FORMAT_KEY].get("ternary_format", "2bit") if ours else (ternary_format or "2bit")
    if read_format not in FORMATS:
        raise ValueError(f"torch_bitnet: {path / CONFIG_FILE} has an unknown ternary_format {read_format!r}")
    stored_head = raw[FORMAT_KEY].get("lm_head", "bf16") if ours else "bf16"
    if stored_head != "bf16" and lm_head != stored_head:
        raise ValueError(
            f"torch_bitnet: {path} stores an {stored_head} embedding / lm_head; lm_head={lm_head!r} needs the float "
            f"table, which it does not contain (load it with lm_head={stored_head!r}, or convert the original "
            "checkpoint again)"
        )
    qc = raw.get("quantization_config") or {}
    if ours:
        kind = "ours"
    elif qc.get("quantization_mode", "offline") == "online":
        kind = "online"
    else:
        kind = qc.get("linear_class", "bitlinear")
    config = BitNetConfig.from_dict({k: v for k, v in raw.items() if k != FORMAT_KEY})
    config.dtype = dtype

    # Skeleton on the meta device: no memory until the real tensors are assigned below.
    with torch.device("meta"):
        model = BitNetForCausalLM(config)
        for layer in model.model.layers:
            for name in LINEARS:
                old = layer.get_submodule(name)
                rms_norm = None
                if qc.get("use_rms_norm"):
                    from transformers.models.llama.modeling_llama import LlamaRMSNorm

                    rms_norm = LlamaRMSNorm(old.in_features, eps=qc.get("rms_norm_eps", 1e-6))
                layer.set_submodule(
                    name,
                    BitLinear(
                        old.in_features, old.out_features, old.bias is not None, "meta", rms_norm, read_format
                    ),
                )
        if lm_head in _QUANTIZED_HEADS:
            embedding_cls, head_cls = _QUANTIZED_HEADS[lm_head]
            model.model.embed_tokens = embedding_cls(config.vocab_size, config.hidden_size, dtype, "meta")
            model.lm_head = head_cls(config.hidden_size, config.vocab_size, device="meta")

    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(path, stack, ours)
        state: dict[str, torch.Tensor] = {}
        layers = list(enumerate(model.model.layers))
        show = progress if progress is not None else len(layers) > 4
        for i, layer in _progress(layers, "loading", show):
            for name in LINEARS:
                prefix = f"model.layers.{i}.{name}"
                for key, tensor in _load_linear(ckpt, prefix, layer.get_submodule(name), kind).items():
                    state[f"{prefix}.{key}"] = tensor
        tied = bool(config.tie_word_embeddings)
        if lm_head in _QUANTIZED_HEADS:
            state.update(_load_quantized_tables(model, ckpt, tied, lm_head))
        # Everything else (float embeddings, norms, untied lm_head, pre-norms) as stored, in `dtype`.
        for key, meta in model.state_dict().items():
            if key in state or (tied and key.startswith("lm_head.")):  # a tied lm_head is re-tied below
                continue
            state[key] = ckpt.get(key, tuple(meta.shape), _FLOATS).to(dtype)
        unused = sorted(set(ckpt.where) - ckpt.used - ({"lm_head.weight"} if tied else set()))
        if unused:
            raise ValueError(
                f"torch_bitnet: the checkpoint has tensors this BitNet config does not use: {unused[:5]}"
                f"{' ...' if len(unused) > 5 else ''} (does config.json match the weights?)"
            )
        model.load_state_dict(state, strict=False, assign=True)

    if tied:
        if lm_head in _QUANTIZED_HEADS:
            model.lm_head = _QUANTIZED_HEADS[lm_head][1].tied_to(model.model.embed_tokens)
        else:
            model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (RoPE frequencies) are not in checkpoints: rebuild them for real.
    model.model.rotary_emb = BitNetRotaryEmbedding(config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"torch_bitnet: these tensors were not found in the checkpoint: {left[:5]}")
    if (path / "generation_config.json").is_file():  # e.g. eos = [<|end_of_text|>, <|eot_id|>]
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval().requires_grad_(False)
    # (place_weights copies the weights to aligned places anyway where it runs)
    if ours and not huge_pages_available() and not packed_file_aligned(path):
        warnings.warn(
            f"torch_bitnet: {path / PACKED_FILE} stores its packed weights at offsets that are not multiples of "
            f"{ALIGNMENT} bytes (it was written by an older torch_bitnet), so every vector load of them spans two "
            "cache lines: decode is slower. Save the model again with torch_bitnet.save_pretrained (or "
            "torch_bitnet.convert_checkpoint) to align them.",
            stacklevel=2,
        )
    if ternary_format is not None:
        set_ternary_format(model, ternary_format)
    place_weights(model)
    if fuse:
        fuse_layers(model)
    return set_kv_cache_dtype(model, kv_cache_dtype)


def _save_aligned(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` as a safetensors file whose data starts and whose tensors of a multiple
    of ALIGNMENT bytes all lie at multiples of ALIGNMENT in the file, so in the memory map.

    safetensors' own ``save_file`` orders tensors by dtype and pads the header to 8 bytes only,
    which leaves the packed weights at arbitrary offsets mod 64. The format allows any order
    but no gaps, so those tensors go first (packed weights and tables always are: their rows
    are padded to multiples of 64 bytes), the others after them, and the JSON header is padded
    with spaces (which the format permits) to end at a multiple of ALIGNMENT.
    """
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"torch_bitnet: cannot store tensor {name!r} of dtype {t.dtype} in safetensors")
    names = sorted(tensors, key=lambda n: (tensors[n].nbytes % ALIGNMENT != 0, n))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    # Written to a temporary file beside it, then renamed over it: the tensors may be
    # memory-mapped from the file being replaced (a model saved where it was loaded from), and
    # truncating that file while reading them would lose their bytes. The rename leaves the old
    # mapping intact; a failed write leaves the old file and no temporary one.
    with tempfile.NamedTemporaryFile(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp", delete=False) as f:
        try:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                # bytes of the tensor in memory order (bfloat16 has no numpy dtype: go through uint8)
                f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, file)


def packed_file_aligned(path: str | Path) -> bool:
    """Whether ``path``'s torch_bitnet.safetensors (save_pretrained's file) exists and has every
    uint8 tensor at a multiple of ALIGNMENT bytes; reads only the header."""
    file = Path(path) / PACKED_FILE
    if not file.is_file():
        return False
    with open(file, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
    return all(
        (8 + length + entry["data_offsets"][0]) % ALIGNMENT == 0
        for name, entry in header.items()
        if name != "__metadata__" and entry["dtype"] == "U8"
    )


def save_pretrained(model: torch.nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write a patched BitNet model in torch_bitnet's layout (read back by :func:`from_pretrained`).

    ``config.json`` (the model's config plus a ``torch_bitnet`` format entry) and
    ``torch_bitnet.safetensors`` with every BitLinear's packed ``weight`` (in its format,
    recorded as ``"ternary_format"``; all layers must share one), float32
    ``weight_scale`` (and ``bias``), the embedding / lm_head as they are in the model (int8
    codes and row scales, recorded as ``"lm_head": "int8"``; int4 codes and group scales,
    ``"lm_head": "int4"``; or float), and the other tensors
    as they are; a tied ``lm_head`` is not stored twice. ``tokenizer``: saved alongside if given. Returns the directory.
    """
    if getattr(model.config, "model_type", None) != "bitnet":
        raise ValueError("torch_bitnet.save_pretrained: expects a BitNetForCausalLM")
    for i, layer in enumerate(model.model.layers):
        for name in LINEARS:
            if not isinstance(layer.get_submodule(name), BitLinear):
                raise ValueError(
                    f"torch_bitnet.save_pretrained: model.layers.{i}.{name} is not a torch_bitnet BitLinear; "
                    "patch the model first"
                )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    embedding = model.get_input_embeddings()
    head = next((kind for kind, (cls, _) in _QUANTIZED_HEADS.items() if isinstance(embedding, cls)), "bf16")
    output = model.get_output_embeddings()
    if any(isinstance(output, head_cls) != (kind == head) for kind, (_, head_cls) in _QUANTIZED_HEADS.items()):
        raise ValueError(
            "torch_bitnet.save_pretrained: the embedding and the lm_head must be of one form (both int8, both int4 "
            "or both float)"
        )
    formats = sorted({m.ternary_format for m in model.modules() if isinstance(m, BitLinear)})
    if len(formats) != 1:
        raise ValueError(
            f"torch_bitnet.save_pretrained: the BitLinear weights are packed in several formats {formats}; "
            "make them one with torch_bitnet.set_ternary_format"
        )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state.pop("lm_head.weight_scale", None)
    _save_aligned(state, path / PACKED_FILE, {"format": "pt", FORMAT_KEY: str(FORMAT_VERSION)})
    raw = model.config.to_dict()
    raw[FORMAT_KEY] = {
        "format_version": FORMAT_VERSION, "weights": PACKED_FILE, "lm_head": head, "ternary_format": formats[0]
    }
    (path / CONFIG_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True, default=str) + "\n")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool | None = None,
    lm_head: str = "bf16",
    ternary_format: str = "2bit",
) -> Path:
    """Convert any checkpoint :func:`from_pretrained` reads (e.g. a ``-bf16`` master checkpoint,
    ternarized layer by layer with a progress bar) into torch_bitnet's packed layout at ``dst``,
    copying the tokenizer files along. ``lm_head="int8"`` (or ``"int4"``) stores the embedding /
    lm_head quantized (loads faster, half (int4: 28%) the bytes of bf16; it can then only be loaded
    in that form); the default ``"bf16"`` keeps the float table, from which any form can be loaded.
    ``ternary_format``: how the BitLinear weights are stored (``"2bit"``, ``"5trit"``, ``"3trit"`` or ``"auto"``:
    the one that decodes faster on the machine converting, :func:`torch_bitnet.resolve_ternary_format`)."""
    src_path = resolve_model_path(src)
    model = from_pretrained(src_path, dtype=dtype, progress=progress, lm_head=lm_head, ternary_format=ternary_format)
    dst_path = save_pretrained(model, dst)
    for name in TOKENIZER_FILES:
        if (src_path / name).is_file():
            shutil.copy2(src_path / name, dst_path / name)
    return dst_path
