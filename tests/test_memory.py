"""Packed weights in 2 MiB pages (torch_bitnet.memory): what place_weights moves and what it
keeps. Whether Linux then backs the mapping with huge pages is the kernel's business; these
tests check the placement itself and that results do not change."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

import torch_bitnet
from torch_bitnet import BitLinear, memory
from torch_bitnet.checkpoints import small_config, write_checkpoint

needs_thp = pytest.mark.skipif(not memory.huge_pages_available(), reason="no transparent huge pages here")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("memory") / "ckpt", small_config("odd"), mode="offline", seed=13)


def _packed(model) -> list[torch.Tensor]:
    return [m.weight for m, _ in memory._packed_buffers(model)]


def _ids(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size - 256, (2, 17), generator=torch.Generator().manual_seed(3))


@needs_thp
def test_from_pretrained_places_the_packed_weights(checkpoint, monkeypatch):
    placed = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32)
    monkeypatch.setenv("TORCH_BITNET_HUGE_PAGES", "0")
    plain = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32)
    weights = _packed(placed)
    # one mapping, each weight its own storage, 64-byte aligned, tied table shared
    assert all(w.data_ptr() % 64 == 0 for w in weights)
    assert all(memory._placed.get(id(w)) is w for w in weights)
    storages = {w.untyped_storage().data_ptr() for w in weights}
    assert len(storages) == len({w.data_ptr() for w in weights})
    assert placed.lm_head.weight is placed.model.embed_tokens.weight
    for a, b in zip(weights, _packed(plain)):
        assert torch.equal(a, b)
    # the plain model's weights are the checkpoint's memory map, not placed
    assert not any(memory._placed.get(id(w)) is w for w in _packed(plain))
    with torch.no_grad():
        assert torch.equal(placed(_ids(placed)).logits, plain(_ids(plain)).logits)


@needs_thp
def test_place_weights_is_idempotent_and_follows_repacking(checkpoint):
    model = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32)
    before = _packed(model)
    assert torch_bitnet.place_weights(model) is model
    assert all(a is b for a, b in zip(before, _packed(model)))  # already placed: left as it is
    with torch.no_grad():
        expected = model(_ids(model)).logits
        torch_bitnet.set_ternary_format(model, "3trit")
        after = _packed(model)
        assert all(memory._placed.get(id(w)) is w for w in after)  # every weight moved, tables too
        assert not any(a is b for a, b in zip(before, after))
        assert torch.equal(model(_ids(model)).logits, expected)


@needs_thp
def test_placed_model_saves_and_loads(checkpoint, tmp_path):
    model = torch_bitnet.from_pretrained(checkpoint, dtype=torch.float32)
    saved = torch_bitnet.save_pretrained(model, tmp_path / "saved")
    again = torch_bitnet.from_pretrained(saved, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(_ids(again)).logits, model(_ids(model)).logits)


def test_disabled_by_the_environment(monkeypatch):
    layer = BitLinear.from_ternary(torch.randint(-1, 2, (40, 70), dtype=torch.int8), 0.5)
    model = torch.nn.Sequential(layer)
    weight = layer.weight
    monkeypatch.setenv("TORCH_BITNET_HUGE_PAGES", "0")
    assert not memory.huge_pages_available()
    assert torch_bitnet.place_weights(model) is model and layer.weight is weight


def test_no_transparent_huge_pages(monkeypatch, tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(memory, "_THP_MODE", str(mode))
    assert not memory.huge_pages_available()
    monkeypatch.setattr(memory, "_THP_MODE", str(tmp_path / "missing"))
    assert not memory.huge_pages_available()
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(memory, "_THP_MODE", str(mode))
    assert memory.huge_pages_available() == hasattr(mmap, "MADV_HUGEPAGE")


@needs_thp
def test_release_leaves_anonymous_memory_and_rereads_files(tmp_path):
    """Pages of a file mapping are dropped after the copy (they read back from the file);
    anonymous memory is never touched."""
    anon = torch.arange(3 * mmap.PAGESIZE, dtype=torch.int64).to(torch.uint8)
    expected = anon.clone()
    memory._release_pages(anon.data_ptr(), anon.numel(), memory._file_ranges())
    assert torch.equal(anon, expected)
    path = tmp_path / "bytes"
    data = (np.arange(4 * mmap.PAGESIZE) % 251).astype(np.uint8)
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # private, copy on write: as safetensors maps
    tensor = torch.from_numpy(mapped)
    assert int(tensor.sum()) == int(data.sum())  # touched
    ranges = memory._file_ranges()
    assert any(start <= tensor.data_ptr() < end for start, end in ranges)
    memory._release_pages(tensor.data_ptr(), tensor.numel(), ranges)
    assert torch.equal(tensor, torch.from_numpy(data))
