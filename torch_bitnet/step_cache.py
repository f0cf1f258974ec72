"""Compiled decode steps saved on disk, so that a later process loads its step instead of compiling it.

:class:`torch_bitnet.generate.DecodeSession` compiles its decode step ahead of time, in every
process: 18-21 s at the 2B-4T shape, 4-7 s for the default model (torch cannot reuse its own
caches for an ahead-of-time compilation), and the compilation's memory stays in the process
(~90 MB at 2B-4T). So a session saves the step it compiled, and later sessions of a model of
the same kind load it: 3-4 s at 2B-4T and ~2 s for the default model while inductor's cache
holds the step's kernels (13 s for the default model when they had to be rebuilt):

* **Where**: ``BITNET_STEP_CACHE_DIR``, else ``torch_bitnet_steps`` in inductor's cache
  directory (``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_<user>``), where the
  step's kernels are built: the two are cleared together. ``BITNET_STEP_CACHE=0`` turns saving
  and loading off.
* **Which file**: a hash of what decides the compiled code beyond the step's own guards: the
  versions of Python, torch and torch_bitnet (the bytes of its compiled library and of its
  Python files), the thread count (inductor builds its kernels for it), the vector
  instruction set inductor builds for, the model's modules (names, classes, forward hooks),
  parameters and buffers (names, dtypes, shapes, strides) and config, the KV cache (classes,
  lengths, dtypes), and the compile options.
* **When a saved step is used**: the Python files it was traced from (transformers',
  torch_bitnet's) are unchanged (their hashes are saved next to it), it loads, and its guards
  (the dtypes, shapes and strides of every tensor the step reads, the attributes it read) pass
  on the session's arguments. Otherwise the step is compiled and the file replaced.
* **Never** for a model with a per-instance ``forward``, or with a forward hook, module
  class or cache class that another process cannot import by its name (lambdas, local
  functions and classes, partials, bound methods): neither the hash nor the step's guards could
  identify them there. (torch_bitnet's own cache hook is a module-level function.)

Loading unpickles the file, which can run code: the directory must be as trusted as inductor's
own cache.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("torch_bitnet")

__all__ = ["step_cache_dir", "step_key", "load_step", "save_step"]

_FORMAT = 1  # bump when what is saved, or how the key is made, changes


def step_cache_dir() -> Path | None:
    """Where decode steps are saved (module docstring), or None when ``BITNET_STEP_CACHE=0``."""
    if os.environ.get("BITNET_STEP_CACHE", "1").strip() == "0":
        return None
    configured = os.environ.get("BITNET_STEP_CACHE_DIR")
    if configured:
        return Path(configured)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "torch_bitnet_steps"


@functools.lru_cache(maxsize=None)
def _file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=None)
def _package_sources_hash() -> str:
    """One hash of torch_bitnet's Python files: some of them shape the compiled step without being
    traced into it (the fake kernels that give our ops' output shapes, the module setup)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + _file_hash(str(path)).encode())
    return digest.hexdigest()


def _qualified(obj) -> str | None:
    """``module.qualname`` of a class or function that another process can import by that
    name, else None (local classes and functions, lambdas, partials, bound methods)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    found = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}.{qualname}" if found is obj else None


def _tensor_entry(name: str, t: torch.Tensor) -> list:
    return [name, str(t.dtype), list(t.shape), list(t.stride())]


def _cache_entries(cache) -> list | None:
    """The KV cache: its class, and each layer's class with its tensors' and numbers' values
    that are not per-token state (dtypes, shapes, lengths); None if a class cannot be named."""
    entries: list = [_qualified(type(cache))]
    for layer in getattr(cache, "layers", ()):
        fields = []
        for name, value in sorted(vars(layer).items()):
            if isinstance(value, torch.Tensor):
                fields.append(_tensor_entry(name, value))
            elif isinstance(value, (bool, int, float, str)) or value is None:
                fields.append([name, repr(value)])
            elif isinstance(value, torch.dtype):
                fields.append([name, str(value)])
        entries.append([_qualified(type(layer)), fields])
    return None if entries[0] is None or any(entry[0] is None for entry in entries[1:]) else entries


def step_key(model: nn.Module, cache, options: dict) -> str | None:
    """The file name (a hash) of ``model``'s decode step on ``cache`` compiled with inductor
    ``options``, or None if such a step must not be saved (module docstring)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from . import __version__, _C

    modules = []
    for name, module in model.named_modules():
        # pre-hooks, then hooks: each one's name and whether it takes keyword arguments (not
        # their handle ids, which count up per process)
        hooks = [
            [[_qualified(hook), i in with_kwargs] for i, hook in table.items()]
            for table, with_kwargs in (
                (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                (module._forward_hooks, module._forward_hooks_with_kwargs),
            )
        ]
        cls = _qualified(type(module))
        if cls is None or any(hook[0] is None for kind in hooks for hook in kind) or "forward" in vars(module):
            return None
        modules.append([name, cls, hooks])
    cache_entries = _cache_entries(cache)
    if cache_entries is None:
        return None
    tensors = [_tensor_entry(n, t) for n, t in model.named_parameters()]
    tensors += [_tensor_entry(n, t) for n, t in model.named_buffers()]
    config = getattr(model, "config", None)
    config_text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    description = {
        "format": _FORMAT,
        "python": sys.version,
        "torch": torch.__version__,
        "torch_bitnet": [__version__, _file_hash(_C.__file__), _package_sources_hash()],
        "threads": torch.get_num_threads(),
        "vec_isa": str(pick_vec_isa()),
        "modules": modules,
        "tensors": tensors,
        "config": hashlib.sha256(config_text.encode()).hexdigest(),
        "cache": cache_entries,
        "options": {k: repr(v) for k, v in sorted(options.items())},
    }
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:32]


def _sources_hold(manifest: dict) -> bool:
    """Whether every Python module the saved step was traced from still has the same file."""
    for name, digest in manifest.items():
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
            if _file_hash(module.__file__) != digest:
                return False
        except (ImportError, OSError, TypeError, AttributeError):  # gone, or a module without a file
            return False
    return True


def load_step(key: str):
    """The saved step of ``key`` (an ahead-of-time compiled function), or None if there is
    none, its sources changed, or it does not load. Call it where the step will run (inside
    ``torch.inference_mode``): a loaded step's guards compare the tensors' dispatch state
    with that of the context it was loaded in."""
    directory = step_cache_dir()
    if directory is None:
        return None
    path, manifest_path = directory / f"{key}.step", directory / f"{key}.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if not _sources_hold(manifest.get("sources", {})):
        logger.info("torch_bitnet: the saved decode step %s was traced from files that changed since", path)
        return None
    try:
        with open(path, "rb") as f:
            return torch.compiler.load_compiled_function(f)
    except Exception as error:  # a truncated, stale or foreign file: compile instead
        logger.info("torch_bitnet: the saved decode step %s does not load (%s)", path, error)
        return None


def save_step(key: str, step) -> None:
    """Save an ahead-of-time compiled step under ``key`` with the hashes of the Python files it
    was traced from. Failures are logged, not raised: saving only saves time."""
    directory = step_cache_dir()
    if directory is None:
        return
    temporary: list[str] = []
    try:
        modules = {source.module for source in step.source_info().inlined_sources}
        sources = {name: _file_hash(sys.modules[name].__file__) for name in sorted(modules)}
        directory.mkdir(parents=True, exist_ok=True)
        # Written to temporary files and renamed, so that a concurrent reader sees whole files.
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
            temporary.append(f.name)
        step.save_compiled_function(temporary[0])
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
            temporary.append(f.name)
            json.dump({"sources": sources}, f)
        os.replace(temporary[0], directory / f"{key}.step")
        os.replace(temporary[1], directory / f"{key}.json")
    except Exception as error:
        logger.info("torch_bitnet: could not save the decode step under %s (%s)", directory, error)
        for name in temporary:
            Path(name).unlink(missing_ok=True)
