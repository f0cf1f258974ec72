"""torch_bitnet.step_cache: decode steps saved by one session and loaded by later ones.

Each test points ``BITNET_STEP_CACHE_DIR`` at its own directory. The model is the small
random "gqa" checkpoint of test_generate.py (float32); every session has the same cache
length, so compilations after the first hit inductor's cache (~5 s each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_bitnet
from torch_bitnet import checkpoints, step_cache
from torch_bitnet.generate import _COMPILE_OPTIONS, DecodeSession, prefill
from torch_bitnet.loading import from_pretrained

MAX_SEQ_LEN = 48
PROMPT = [[5, 9, 23, 7, 81, 3]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return checkpoints.write_checkpoint(tmp_path_factory.mktemp("gqa"), checkpoints.small_config("gqa"), seed=3)


@pytest.fixture(scope="module")
def model(checkpoint):
    return from_pretrained(checkpoint, dtype=torch.float32)


@pytest.fixture
def step_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_STEP_CACHE_DIR", str(tmp_path / "steps"))
    monkeypatch.delenv("BITNET_STEP_CACHE", raising=False)
    return tmp_path / "steps"


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A session that compiled its step with saving on, its directory and its step's key."""
    directory = tmp_path_factory.mktemp("saved") / "steps"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BITNET_STEP_CACHE_DIR", str(directory))
        env.delenv("BITNET_STEP_CACHE", raising=False)
        session = DecodeSession(model, MAX_SEQ_LEN)
        session.warm_up(model)
    return session, directory, step_cache.step_key(model, session.cache, _COMPILE_OPTIONS)


def greedy_logits(session: DecodeSession, model, n: int = 10) -> list[torch.Tensor]:
    """Logits of n greedy decode steps after PROMPT, the first step checking guards."""
    out = []
    with torch.inference_mode():
        session.reset()
        token = prefill(model, torch.tensor(PROMPT), session.cache).argmax(-1, keepdim=True)
        position = torch.tensor([len(PROMPT[0])])
        for i in range(n):
            out.append(session.step(model, token, position, same_as_last=i > 0))
            token = out[-1].argmax(-1, keepdim=True)
            position += 1
    return out


def saved_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_a_later_session_loads_the_saved_step_and_computes_the_same(model, saved, step_dir):
    """The first session compiled and saved the step (the step and its manifest of source
    hashes, no temporary files left); a second session of the same model loads it, and its
    logits equal the compiling session's bit for bit."""
    first, directory, key = saved
    assert first.ahead_of_time and not first.step_from_disk
    assert saved_files(directory) == [f"{key}.json", f"{key}.step"]
    sources = json.loads((directory / f"{key}.json").read_text())["sources"]
    assert "torch_bitnet.generate" in sources and "transformers.models.bitnet.modeling_bitnet" in sources

    shutil.copytree(directory, step_dir)
    second = DecodeSession(model, MAX_SEQ_LEN)
    second.warm_up(model)
    assert second.step_from_disk
    for a, b in zip(greedy_logits(first, model), greedy_logits(second, model)):
        assert torch.equal(a, b)


def test_saving_off_neither_loads_nor_saves(model, saved, step_dir, monkeypatch):
    """BITNET_STEP_CACHE=0: the session compiles although a saved step is there, and writes nothing."""
    shutil.copytree(saved[1], step_dir)
    before = {name: (step_dir / name).read_bytes() for name in saved_files(step_dir)}
    monkeypatch.setenv("BITNET_STEP_CACHE", "0")
    assert step_cache.step_cache_dir() is None
    session = DecodeSession(model, MAX_SEQ_LEN)
    session.warm_up(model)
    assert session.ahead_of_time and not session.step_from_disk
    assert {name: (step_dir / name).read_bytes() for name in saved_files(step_dir)} == before


def _tamper(how: str, directory, key: str, model_5trit, session_5trit) -> str:
    """Make the saved step of ``key`` unusable in one way; returns the key the next session
    (of ``model_5trit`` for "guards", else of the same model) looks up."""
    if how == "source":  # a traced Python file "changed" since the step was saved
        manifest = json.loads((directory / f"{key}.json").read_text())
        manifest["sources"]["torch_bitnet.generate"] = "0" * 64
        (directory / f"{key}.json").write_text(json.dumps(manifest))
        return key
    if how == "truncated":
        path = directory / f"{key}.step"
        path.write_bytes(path.read_bytes()[:1000])
        return key
    # "guards": another model's step under this model's key: it loads, but its tensor guards
    # (the packed weights' shapes) fail on this model.
    other = step_cache.step_key(model_5trit, session_5trit.cache, _COMPILE_OPTIONS)
    for suffix in (".step", ".json"):
        shutil.copyfile(directory / f"{key}{suffix}", directory / f"{other}{suffix}")
    return other


@pytest.mark.parametrize("how", ["source", "truncated", "guards"])
def test_an_unusable_saved_step_is_compiled_again_and_replaced(checkpoint, model, saved, step_dir, how):
    """A step whose sources changed, whose file does not load, or whose guards fail on the
    session's model is not used: the session compiles (and computes what eager computes) and
    saves its own step in its place, which the next session loads."""
    shutil.copytree(saved[1], step_dir)
    target = model
    if how == "guards":
        target = torch_bitnet.set_ternary_format(from_pretrained(checkpoint, dtype=torch.float32), "5trit")
    probe = DecodeSession(target, MAX_SEQ_LEN, compile=False)
    looked_up = _tamper(how, step_dir, saved[2], target, probe)
    before = (step_dir / f"{looked_up}.step").read_bytes()

    session = DecodeSession(target, MAX_SEQ_LEN)
    session.warm_up(target)
    assert session.ahead_of_time and not session.step_from_disk
    eager = [int(x.argmax()) for x in greedy_logits(probe, target, 6)]
    assert [int(x.argmax()) for x in greedy_logits(session, target, 6)] == eager
    assert (step_dir / f"{looked_up}.step").read_bytes() != before  # replaced by the new step
    assert not any(name.endswith(".tmp") for name in saved_files(step_dir))

    again = DecodeSession(target, MAX_SEQ_LEN)
    again.warm_up(target)
    assert again.step_from_disk


def test_key_follows_what_the_guards_do_not_check(checkpoint, model, monkeypatch):
    """The key differs by thread count (inductor builds its kernels for one), cache length,
    cache kind and weight format, is stable otherwise, and is None for a model with a forward
    hook another process cannot name."""
    session = DecodeSession(model, MAX_SEQ_LEN, compile=False)
    key = step_cache.step_key(model, session.cache, _COMPILE_OPTIONS)
    assert key == step_cache.step_key(model, session.cache, dict(_COMPILE_OPTIONS))
    same = from_pretrained(checkpoint, dtype=torch.float32)
    assert step_cache.step_key(same, DecodeSession(same, MAX_SEQ_LEN, compile=False).cache, _COMPILE_OPTIONS) == key

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert step_cache.step_key(model, session.cache, _COMPILE_OPTIONS) != key
    finally:
        torch.set_num_threads(threads)
    longer = DecodeSession(model, MAX_SEQ_LEN + 16, compile=False).cache
    fp32 = DecodeSession(model, MAX_SEQ_LEN, compile=False, kv_cache_dtype="fp32").cache
    torch_bitnet.set_ternary_format(same, "5trit")
    others = {
        step_cache.step_key(model, longer, _COMPILE_OPTIONS),
        step_cache.step_key(model, fp32, _COMPILE_OPTIONS),
        step_cache.step_key(same, session.cache, _COMPILE_OPTIONS),
        step_cache.step_key(model, session.cache, {**_COMPILE_OPTIONS, "size_asserts": True}),
    }
    assert len(others) == 4 and key not in others

    handle = model.lm_head.register_forward_hook(lambda module, args, out: out)
    try:
        assert step_cache.step_key(model, session.cache, _COMPILE_OPTIONS) is None
    finally:
        handle.remove()
    assert step_cache.step_key(model, session.cache, _COMPILE_OPTIONS) == key


@pytest.mark.slow
def test_a_new_process_loads_the_step_an_earlier_one_saved(checkpoint, step_dir):
    """The real use: two processes in a row. The second loads the step (its fused layer classes
    and cache classes exist only once it has loaded the model) and decodes the same tokens."""
    script = textwrap.dedent(
        f"""
        import torch
        from torch_bitnet.generate import DecodeSession, prefill
        from torch_bitnet.loading import from_pretrained
        model = from_pretrained({str(checkpoint)!r}, dtype=torch.float32)
        session = DecodeSession(model, {MAX_SEQ_LEN})
        session.warm_up(model)
        with torch.inference_mode():
            token = prefill(model, torch.tensor({PROMPT}), session.cache).argmax(-1, keepdim=True)
            position, tokens = torch.tensor([{len(PROMPT[0])}]), []
            for i in range(12):
                token = session.step(model, token, position, same_as_last=i > 0).argmax(-1, keepdim=True)
                position += 1
                tokens.append(int(token))
        print(session.step_from_disk, tokens)
        """
    )
    env = {**os.environ, "BITNET_STEP_CACHE_DIR": str(step_dir)}
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    first, second = (run.stdout.strip().splitlines()[-1] for run in runs)
    assert first.startswith("False ") and second.startswith("True ")
    assert first.split(" ", 1)[1] == second.split(" ", 1)[1]
