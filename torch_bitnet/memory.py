"""The packed weights in 2 MiB pages.

A decode token streams every packed weight and the lm_head table once (816 MB at the 2B-4T shape
with 3-trit weights and the int8 table). In 4 KiB pages, as a memory-mapped checkpoint or
ordinary allocations give them, that stream takes a TLB miss every 4 KiB and the hardware
prefetchers stop at every page boundary: measured on a 2-core Xeon, a decode token took 1.11x
(2 threads) and 1.20x (1 thread) as long as with the same weights in 2 MiB pages (BENCHMARKS.md,
"3-trit weights").

:func:`place_weights` moves them into one anonymous mapping that Linux backs with transparent
huge pages (``madvise(MADV_HUGEPAGE)``): ``from_pretrained``, ``patch``, ``replace_linear`` and
``set_ternary_format`` call it. It does nothing where there are no transparent huge pages (other
systems, or ``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``never``), or when the
environment variable ``TORCH_BITNET_HUGE_PAGES=0``. Each weight gets its own tensor over the
mapping (no two share a storage, so ``torch.compile`` sees no aliasing); the mapping is unmapped
when none of them is used any more. Copying from a memory-mapped checkpoint, the checkpoint's
pages are released from this process as each weight is copied, so the resident memory does not
hold both copies at once.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import weakref

import torch
from torch import nn

__all__ = ["huge_page_buffer", "huge_pages_available", "place_weights"]

_ALIGN = 64  # each weight starts on a cache line, as the kernels' loads want
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# The tensors place_weights made, by id: a model whose packed buffers are all among them is
# left as it is.
_placed: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def huge_pages_available() -> bool:
    """Whether :func:`place_weights` would place weights: Linux with transparent huge pages in
    ``always`` or ``madvise`` mode, and ``TORCH_BITNET_HUGE_PAGES`` not ``0``."""
    if os.environ.get("TORCH_BITNET_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _huge_mapping(nbytes: int) -> mmap.mmap:
    """An anonymous private mapping of nbytes advised MADV_HUGEPAGE before any page is touched."""
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes in the memory place_weights puts weights in (an ordinary one where
    huge pages are not available): what the benchmarks read to measure the bandwidth the
    weights' pages give."""
    if not huge_pages_available():
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(_huge_mapping(nbytes), dtype=torch.uint8)


def _packed_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, buffer name) of every packed weight and quantized table of torch_bitnet's modules."""
    from .nn import BitLinear, Int4Embedding, Int4Linear, Int8Embedding, Int8Linear  # nn imports this module

    kinds = (BitLinear, Int8Embedding, Int8Linear, Int4Embedding, Int4Linear)
    return [(m, "weight") for m in model.modules() if isinstance(m, kinds) and m.weight.device.type == "cpu"]


def _file_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of regular files (/proc/self/maps); safetensors
    maps a checkpoint private and writable (copy on write), so these are the candidates."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].startswith("/"):
                    continue
                path = fields[5].strip()
                if path.startswith("/dev/") or not os.path.isfile(path):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    except OSError:
        pass
    return ranges


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library's functions (madvise), loaded once."""
    return ctypes.CDLL(None, use_errno=True)


def _release_pages(ptr: int, nbytes: int, file_ranges: list[tuple[int, int]]) -> None:
    """Drop this process's mapping of the whole pages of [ptr, ptr + nbytes) if they lie in a file
    mapping: they read back from the file if touched again (torch_bitnet never writes a loaded
    weight, so a private mapping's pages hold the file's bytes); anonymous memory is left alone."""
    if not any(start <= ptr and ptr + nbytes <= end for start, end in file_ranges):
        return
    page = mmap.PAGESIZE
    first, last = -(-ptr // page) * page, (ptr + nbytes) // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def place_weights(model: nn.Module) -> nn.Module:
    """Move the packed ternary weights and quantized tables of ``model`` (torch_bitnet's
    ``BitLinear``, ``Int8*`` and ``Int4*`` modules) into one mapping in 2 MiB pages, in place;
    returns ``model``. Results are unchanged, bit for bit. A no-op without transparent huge pages
    (see :func:`huge_pages_available`), and when every one of them is already placed. Otherwise all
    of them move to a new mapping, so that an earlier one (whose other weights were replaced, e.g.
    by ``set_ternary_format``) is freed. Done eagerly, never inside a compiled graph."""
    if not huge_pages_available():
        return model
    users: dict[int, list[tuple[nn.Module, str]]] = {}  # data_ptr -> modules holding that tensor
    sizes: dict[int, int] = {}
    placed_already = True
    for module, name in _packed_buffers(model):
        tensor = getattr(module, name)
        if tensor.numel() == 0 or not tensor.is_contiguous():
            continue
        users.setdefault(tensor.data_ptr(), []).append((module, name))
        sizes[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        placed_already = placed_already and _placed.get(id(tensor)) is tensor
    if not users or placed_already:
        return model
    mapping = _huge_mapping(sum(-(-n // _ALIGN) * _ALIGN for n in sizes.values()))
    file_ranges = _file_ranges()
    offset = 0
    for ptr, holders in users.items():
        module, name = holders[0]
        source = getattr(module, name)
        # its own storage over the arena's mapping (torch.frombuffer keeps the mapping alive)
        placed = torch.frombuffer(mapping, dtype=source.dtype, count=source.numel(), offset=offset).view(source.shape)
        placed.copy_(source)
        for holder, attr in holders:
            setattr(holder, attr, placed)
        _placed[id(placed)] = placed
        _release_pages(ptr, sizes[ptr], file_ranges)
        del source
        offset += -(-sizes[ptr] // _ALIGN) * _ALIGN
    return model
