"""torch_bitnet.generate: static cache, chunked prefill, compiled decode step, sampling, text.

Models: a random "gqa" BitNet checkpoint (torch_bitnet.checkpoints: 8 heads over 2 key/value
heads, like 2B-4T's 4:1) loaded with torch_bitnet.loading.from_pretrained (BitLinear layers on
our ops: what users run), and the same config as a plain transformers BitNetForCausalLM
(nn.Linear layers). Everything runs in float32, so our greedy tokens must be transformers'
greedy tokens exactly.

A first torch.compile of the decode step costs about 15 s here. Every compiled test uses the
same model, dtype and cache length (MAX_SEQ_LEN), so later compilations of the same graph
(one per session: the step is compiled ahead of time) hit inductor's cache.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from transformers import AutoTokenizer, BitNetForCausalLM, CompileConfig

from torch_bitnet import checkpoints, kv_cache
from torch_bitnet.generate import (
    _MIN_CACHE_LEN,
    _SESSIONS,
    DecodeSession,
    _kept_tokens,
    _TextStream,
    decode_one_token,
    default_chunk_size,
    eos_token_ids,
    generate,
    prefill,
    sample,
)
from torch_bitnet.kv_cache import ATTENTION, _float_attention
from torch_bitnet.loading import from_pretrained

PROMPT = "The quick brown fox jumps over the lazy dog."
MAX_SEQ_LEN = 64  # the one cache length of the compiled tests (prompt ~12 tokens + 32 new)
NEW = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return checkpoints.write_checkpoint(tmp_path_factory.mktemp("gqa"), checkpoints.small_config("gqa"), seed=3)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    """Patched: BitLinear layers running torch.ops.bitnet."""
    return from_pretrained(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def float_head_model(checkpoint):
    """Patched, with the float lm_head (no int8 activation rounding at the very end)."""
    return from_pretrained(checkpoint, dtype=torch.float32, lm_head="bf16")


@pytest.fixture(scope="module")
def plain_model():
    """transformers' BitNetForCausalLM built from the config: ordinary nn.Linear layers."""
    torch.manual_seed(0)
    return BitNetForCausalLM(checkpoints.small_config("gqa")).float().eval()


@pytest.fixture
def eos_config(model):
    """Lets a test change model.generation_config.eos_token_id; restored afterwards."""
    saved = model.generation_config.eos_token_id
    yield model.generation_config
    model.generation_config.eos_token_id = saved


def hf_greedy(model, tokenizer, prompt_ids: list[int], n: int, **kwargs) -> list[int]:
    """transformers' own greedy generate, stopping at the same eos tokens as ours."""
    eos = sorted(eos_token_ids(model, tokenizer))
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0], **kwargs,
        )
    return out[0, len(prompt_ids) :].tolist()


# ---------------------------------------------------------------------------------------------
# Greedy parity with transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_greedy_matches_transformers_generate(model, tokenizer, compile):
    """Our compiled or eager decode = transformers' eager greedy generate, token for token; and
    transformers' generate still works on the model after ours (and ours after it)."""
    ours = generate(model, tokenizer, PROMPT, NEW, compile=compile, max_seq_len=MAX_SEQ_LEN)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert ours.prompt_tokens == len(prompt_ids)
    assert ours.new_tokens == NEW and ours.stop_reason == "length"  # no eos within 32 (seed 3)
    assert ours.token_ids == hf_greedy(model, tokenizer, prompt_ids, NEW)
    again = generate(model, tokenizer, PROMPT, NEW, compile=compile, max_seq_len=MAX_SEQ_LEN)
    assert again.token_ids == ours.token_ids and again.text == ours.text
    assert again.compile_seconds == 0.0  # the session (cache + compiled step) was reused
    assert model.config._attn_implementation == ATTENTION  # from_pretrained switched it on


def test_greedy_matches_transformers_generate_plain_linear_eager(plain_model, tokenizer):
    """Also for a model that was never patched (ordinary nn.Linear layers), with a float32 KV
    cache like transformers' own (the default int8 cache is compared in test_kv_cache.py)."""
    ours = generate(plain_model, tokenizer, PROMPT, NEW, compile=False, kv_cache_dtype="fp32")
    assert ours.new_tokens == NEW
    assert ours.token_ids == hf_greedy(plain_model, tokenizer, tokenizer(PROMPT)["input_ids"], NEW)


@pytest.mark.slow
def test_greedy_matches_transformers_generate_plain_linear_compiled(plain_model, tokenizer):
    ours = generate(plain_model, tokenizer, PROMPT, NEW, compile=True, max_seq_len=MAX_SEQ_LEN, kv_cache_dtype="fp32")
    assert ours.token_ids == hf_greedy(plain_model, tokenizer, tokenizer(PROMPT)["input_ids"], NEW)


@pytest.mark.slow
def test_transformers_static_cache_compiled_generate(model, tokenizer):
    """transformers' generate(cache_implementation="static") compiled (on CPU it needs
    compile_config._compile_all_devices) gives the same tokens on the patched model."""
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    graphs = counters["stats"]["unique_graphs"]
    compiled = hf_greedy(model, tokenizer, prompt_ids, NEW, cache_implementation="static", compile_config=config)
    assert counters["stats"]["unique_graphs"] > graphs, "transformers did not compile"
    assert compiled == hf_greedy(model, tokenizer, prompt_ids, NEW)
    assert compiled == generate(model, tokenizer, PROMPT, NEW, max_seq_len=MAX_SEQ_LEN).token_ids


# ---------------------------------------------------------------------------------------------
# The compiled decode step: one graph, no break, no recompilation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv", ["fp32", "int8"])
def test_decode_step_one_graph_no_recompile_to_the_end_of_the_cache(float_head_model, tokenizer, kv):
    """Fill a MAX_SEQ_LEN cache to its last position (50+ decode steps) with the compiled step
    under error_on_recompile; compare every step's logits with the eager step fed the same
    tokens. At most one graph is compiled per cache kind (none if an earlier test compiled it).

    fp32 cache: inductor may reassociate float sums, and int8 activation rounding can amplify a
    last-bit change, so allow 1e-3 of the logit range and require the same argmax. int8 cache:
    such a last-bit change in a key or value can also move it across an int8 rounding boundary
    (one quantization step, 1/127 of the vector's max), and this random model amplifies that
    (see test_kv_cache.py), so the logits get 5e-2 of the range; the caches themselves are
    checked instead: the first layer's entries are equal or one step apart, later layers'
    within 4 steps, and fewer than 2% differ. (The float lm_head keeps the last int8
    activation rounding out of these tolerances; the int8 one is compiled in the greedy tests.)
    """
    model = float_head_model
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled = DecodeSession(model, MAX_SEQ_LEN, compile=True, kv_cache_dtype=kv)
    compiled.warm_up(model)
    assert counters["stats"]["unique_graphs"] - graphs <= 1
    eager = DecodeSession(model, MAX_SEQ_LEN, compile=False, kv_cache_dtype=kv)
    graphs = counters["stats"]["unique_graphs"]
    tolerance = 1e-3 if kv == "fp32" else 5e-2

    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        compiled.reset()
        logits = prefill(model, prompt, compiled.cache)
        prefill(model, prompt, eager.cache)
        token = logits.argmax(-1, keepdim=True)
        position = torch.tensor([prompt.shape[1]])
        steps = 0
        with torch._dynamo.config.patch(error_on_recompile=True):
            while int(position) < MAX_SEQ_LEN:
                ours = compiled.step(model, token, position)
                ref = eager.step(model, token, position)
                assert torch.allclose(ours, ref, rtol=0, atol=tolerance * float(ref.abs().max()))
                if kv == "fp32":
                    assert int(ours.argmax()) == int(ref.argmax())
                token = ref.argmax(-1, keepdim=True)
                position += 1
                steps += 1
                assert compiled.seq_length == int(position)  # cache and position in lockstep
    assert steps >= 40
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["graph_break"].values()) == breaks  # (fullgraph=True would raise anyway)
    if kv == "int8":
        for i, (ours, ref) in enumerate(zip(compiled.cache.layers, eager.cache.layers)):
            for a, b in ((ours.keys, ref.keys), (ours.values, ref.values)):
                step = (a.int() - b.int()).abs()
                # Layer 0's keys/values come from the embedding through one norm and projection:
                # at most a rounding-boundary flip. Later layers inherit the upstream drift
                # (measured: ~1% of entries differ, 0.2% by 2-3 steps).
                assert int(step.max()) <= (1 if i == 0 else 4)
                assert float((step > 0).float().mean()) < 2e-2


def _steps(session, model, tokenizer, n: int, same_as_last: bool) -> list[torch.Tensor]:
    """Logits of n greedy decode steps after prefilling PROMPT into a reset cache."""
    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    out = []
    with torch.inference_mode():
        session.reset()
        token = prefill(model, prompt, session.cache).argmax(-1, keepdim=True)
        position = torch.tensor([prompt.shape[1]])
        for i in range(n):
            out.append(session.step(model, token, position, same_as_last=same_as_last and i > 0))
            token = out[-1].argmax(-1, keepdim=True)
            position += 1
    return out


@pytest.mark.parametrize("ahead_of_time", [True, False], ids=["aot", "lazy"])
def test_steady_state_steps_skip_guards_and_give_the_same_logits(model, tokenizer, ahead_of_time):
    """``same_as_last=True`` (no guard check: the ahead-of-time step's explicit one, or dynamo's
    guard evaluation for the lazily compiled step) runs the same compiled graph: the logits of
    12 steps equal, bit for bit, those of the same steps run with every guard checked, from the
    same prompt; and it compiles nothing new."""
    session = DecodeSession(model, MAX_SEQ_LEN, compile=True, ahead_of_time=ahead_of_time)
    session.warm_up(model)
    assert session.ahead_of_time == ahead_of_time
    checked = _steps(session, model, tokenizer, 12, same_as_last=False)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        skipped = _steps(session, model, tokenizer, 12, same_as_last=True)
    assert counters["stats"]["unique_graphs"] == graphs
    for a, b in zip(checked, skipped):
        assert torch.equal(a, b)


class _CountingStep:
    """An ahead-of-time step that counts the calls of its own code (attributes pass through,
    unless ``hide`` names them)."""

    def __init__(self, step, hide: tuple[str, ...] = ()):
        self.step, self.hide, self.calls = step, hide, 0

    def __getattr__(self, name):
        if name in self.hide:
            raise AttributeError(name)
        return getattr(self.step, name)

    def __call__(self, *args):
        self.calls += 1
        return self.step(*args)


def test_steady_state_steps_call_the_recorded_graph(model, tokenizer):
    """From the second step of a loop on, the ahead-of-time session calls the compiled graph it
    recorded on the first step, not the step's own code: the step's code runs once per loop,
    and the logits equal, bit for bit, those of steps that all run it. Without the internals
    the recording needs, every step runs the step's code and gives the same logits."""
    session = DecodeSession(model, MAX_SEQ_LEN)
    session.warm_up(model)
    assert session.ahead_of_time
    checked = _steps(session, model, tokenizer, 8, same_as_last=False)
    step = session._step
    session._step = counting = _CountingStep(step)
    recorded = _steps(session, model, tokenizer, 8, same_as_last=True)
    assert counting.calls == 1 and session._graph_call is not None
    session.reset()
    assert session._graph_call is None
    session._step = counting = _CountingStep(step, hide=("fn",))
    unrecorded = _steps(session, model, tokenizer, 8, same_as_last=True)
    assert counting.calls == 8 and session._graph_call is None
    session._step = step
    for a, b, c in zip(checked, recorded, unrecorded):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_ahead_of_time_step_recompiles_when_the_model_changes(checkpoint, tokenizer, monkeypatch):
    """The ahead-of-time step checks its guards on the first step of a loop: a change of the
    weights' layout (tensor guards) or a new forward hook (the session's code key, which its
    serializable guards cannot express) compiles it again, and the new step computes what the
    changed model computes; an unchanged model compiles nothing. (Saved steps are off, so
    that each new step is compiled here: test_step_cache.py covers loading them.)"""
    import torch_bitnet

    monkeypatch.setenv("BITNET_STEP_CACHE", "0")
    model = from_pretrained(checkpoint, dtype=torch.float32)
    eager = DecodeSession(model, MAX_SEQ_LEN, compile=False)
    session = DecodeSession(model, MAX_SEQ_LEN)
    session.warm_up(model)
    assert session.ahead_of_time
    graphs = counters["stats"]["unique_graphs"]
    before = _steps(session, model, tokenizer, 3, same_as_last=True)
    assert counters["stats"]["unique_graphs"] == graphs

    torch_bitnet.set_ternary_format(model, "5trit")  # other buffer shapes, the same products
    after = _steps(session, model, tokenizer, 3, same_as_last=True)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    for a, b in zip(before, after):
        assert torch.equal(a, b)

    handle = model.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    try:
        hooked = _steps(session, model, tokenizer, 1, same_as_last=False)[0]
        assert counters["stats"]["unique_graphs"] == graphs + 2
        # Not bit for bit: the final RMSNorm (transformers' module, outside our ops) is a float32
        # reduction that inductor and ATen sum in different orders on some ISAs (seen on an
        # AVX2-only Zen 3: 1-ulp differences in the first step's logits, ~1e-6 at |logit| ~4).
        # A missing hook would be off by 1.0.
        torch.testing.assert_close(hooked, _steps(eager, model, tokenizer, 1, same_as_last=False)[0], rtol=0, atol=1e-5)
        assert torch.allclose(hooked, before[0] + 1.0, rtol=0, atol=1e-5)
    finally:
        handle.remove()


def test_a_step_that_cannot_be_compiled_ahead_of_time_is_compiled_lazily(checkpoint, tokenizer):
    """A module whose forward is an instance attribute (a bound lambda) gives a guard that
    aot_compile cannot serialize: the session falls back to the lazily compiled step, which
    gives the eager step's greedy tokens."""
    import types

    model = from_pretrained(checkpoint, dtype=torch.float32)
    norm = model.model.norm
    norm.forward = types.MethodType(lambda self, x: type(self).forward(self, x), norm)
    session = DecodeSession(model, MAX_SEQ_LEN)
    session.warm_up(model)
    assert not session.ahead_of_time
    eager = DecodeSession(model, MAX_SEQ_LEN, compile=False)
    ours = [int(x.argmax()) for x in _steps(session, model, tokenizer, 8, same_as_last=True)]
    assert ours == [int(x.argmax()) for x in _steps(eager, model, tokenizer, 8, same_as_last=False)]


def test_generate_does_not_recompile_across_calls_and_under_inference_mode(model, tokenizer):
    generate(model, tokenizer, PROMPT, 4, max_seq_len=MAX_SEQ_LEN)  # compiled (or reused) here
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        first = generate(model, tokenizer, PROMPT, 40, max_seq_len=MAX_SEQ_LEN, eos=False)
        second = generate(model, tokenizer, "Once upon a time", 40, max_seq_len=MAX_SEQ_LEN, eos=False)
    assert counters["stats"]["unique_graphs"] == graphs
    assert first.compile_seconds == second.compile_seconds == 0.0
    assert first.new_tokens == second.new_tokens == 40 and first.decode_steps == 39
    assert first.decode_seconds > 0 and first.decode_tokens_per_second > 0
    assert first.prefill_seconds > 0 and first.prompt_tokens_per_second > 0


def test_session_is_reused_while_it_fits_and_grows_when_needed(model, tokenizer):
    _SESSIONS.pop(model, None)  # whatever earlier tests left
    small = generate(model, tokenizer, PROMPT, 8, compile=False)
    session = _SESSIONS[model]
    assert session.max_seq_len == _MIN_CACHE_LEN and not session.compiled
    generate(model, tokenizer, PROMPT, 20, compile=False)
    assert _SESSIONS[model] is session
    long = generate(model, tokenizer, PROMPT, 250, compile=False, eos=False)  # > 256 positions
    assert _SESSIONS[model].max_seq_len == 512 and long.new_tokens == 250
    assert long.token_ids[:8] == small.token_ids


def test_packed_gqa_attention_equals_repeated_heads():
    """The decode attention (query heads folded onto their kv head) = transformers' sdpa with
    the kv heads repeated (what it does under torch.compile), for one query token over a
    masked static cache. The compiled decode step runs it: see the greedy and step tests."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attention(torch.nn.Module):
        num_key_value_groups = 1  # the key/value given to transformers below are already repeated
        is_causal = True

    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 8, 1, 16, generator=g)
    key, value = torch.randn(2, 1, 2, 40, 16, generator=g)
    mask = (torch.arange(40) < 23).view(1, 1, 1, 40)
    repeated_key, repeated_value = key.repeat_interleave(4, dim=1), value.repeat_interleave(4, dim=1)
    expected, _ = sdpa_attention_forward(Attention().eval(), query, repeated_key, repeated_value, mask, scaling=0.25)
    grouped = Attention().eval()
    grouped.num_key_value_groups = 4
    ours, weights = _float_attention(grouped, query, key, value, mask, scaling=0.25)
    assert weights is None and ours.shape == expected.shape == (1, 1, 8, 16)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["patched", "plain"])
@pytest.mark.parametrize("kv", ["fp32", "int8"])
def test_chunked_prefill_equals_one_shot(model, plain_model, which, kv):
    """Chunks of 1, 7 and 16 tokens vs the whole 45-token prompt at once; with an fp32 cache
    also vs the model's own forward without a cache (full attention, no static cache, no
    chunking).

    Tolerance: 1e-4 of the logit range. Chunking only changes the row count of each matmul
    (float32 GEMM blocking may reassociate, ~1e-7 relative) and the query blocks of attention;
    the bitlinear kernels are exact per row, and the int8 cache quantizes each token's key and
    value on its own, whatever the chunk. Measured: 0 (patched), 2e-7 (plain).
    """
    net = model if which == "patched" else plain_model
    ids = torch.randint(0, 500, (1, 45), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = prefill(net, ids, DecodeSession(net, MAX_SEQ_LEN, compile=False, kv_cache_dtype=kv).cache, 256)
        if kv == "fp32":
            no_cache = net(ids, use_cache=False).logits[:, -1]
            assert torch.allclose(whole, no_cache, rtol=0, atol=1e-4 * float(no_cache.abs().max()))
        for chunk in (1, 7, 16):
            session = DecodeSession(net, MAX_SEQ_LEN, compile=False, kv_cache_dtype=kv)
            chunked = prefill(net, ids, session.cache, chunk_size=chunk)
            assert session.seq_length == 45
            assert chunked.shape == whole.shape == (1, net.config.vocab_size) and chunked.dtype == torch.float32
            assert torch.allclose(chunked, whole, rtol=0, atol=1e-4 * float(whole.abs().max()))


def test_chunk_size_from_environment(model, tokenizer, monkeypatch):
    monkeypatch.setenv("BITNET_CHUNK_SIZE", "5")
    assert default_chunk_size() == 5
    five = generate(model, tokenizer, PROMPT, 8, compile=False)
    monkeypatch.setenv("BITNET_CHUNK_SIZE", "zero")
    with pytest.raises(ValueError, match="BITNET_CHUNK_SIZE"):
        default_chunk_size()
    monkeypatch.delenv("BITNET_CHUNK_SIZE")
    assert default_chunk_size() == 256
    assert generate(model, tokenizer, PROMPT, 8, compile=False).token_ids == five.token_ids


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seed(model, tokenizer):
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.95, compile=False, eos=False)
    a = generate(model, tokenizer, PROMPT, 24, seed=1, **kwargs)
    torch.manual_seed(123)  # the global RNG plays no part
    b = generate(model, tokenizer, PROMPT, 24, seed=1, **kwargs)
    c = generate(model, tokenizer, PROMPT, 24, seed=2, **kwargs)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_sampling_limits_reduce_to_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPT, 16, compile=False, eos=False).token_ids
    for kwargs in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = generate(model, tokenizer, PROMPT, 16, temperature=2.0, seed=0, compile=False, eos=False, **kwargs)
        assert sampled.token_ids == greedy, kwargs


def test_sample_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)

    def draws(**kwargs) -> torch.Tensor:
        return torch.cat([sample(logits, temperature=1.0, generator=g, **kwargs) for _ in range(2000)]).flatten()

    assert set(draws(top_k=2).tolist()) == {1, 3}
    assert set(draws(top_p=0.79).tolist()) == {1, 3}  # 0.5 + 0.3 reaches 0.79: token 2 not needed
    assert set(draws(top_p=0.81).tolist()) == {1, 2, 3}
    assert set(draws(top_k=3, top_p=0.5).tolist()) == {1}
    counts = torch.bincount(draws(), minlength=4) / 2000.0  # no filter: the softmax itself
    assert torch.allclose(counts, probs[0], atol=0.04)
    assert int(sample(logits)) == 1  # temperature 0: argmax


@given(
    rows=st.integers(1, 3),
    vocab=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    specials=st.lists(st.tuples(st.integers(0, 299), st.sampled_from([math.inf, -math.inf, math.nan, 0.0, 1.0])),
                      max_size=6),
    seed=st.integers(0, 2**16),
)
def test_greedy_sample_is_argmax(rows, vocab, dtype, specials, seed):
    """temperature 0 takes the first largest logit, as torch.argmax does: ties (few distinct
    values), infinities and NaN included."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (rows, vocab), generator=g).to(dtype)  # many ties
    for i, (column, value) in enumerate(specials):
        logits[i % rows, column % vocab] = value
    assert torch.equal(sample(logits), logits.argmax(dim=-1, keepdim=True))


def _nucleus_by_full_sort(x: torch.Tensor, top_k, top_p) -> list[float]:
    """The logits sample() may draw from, by the plain definition: sort the whole row, keep the
    top_k largest and any equal to the k-th, then the tokens before which the cumulative
    probability is still below top_p. Returned sorted, as values: tied tokens are interchangeable."""
    values = np.sort(x.double().numpy())[::-1]
    top = values[0]
    if top_k is not None and top_k < len(values):
        values = values[values >= values[top_k - 1]]
        weights = np.exp(values - top)
        probs = weights / weights.sum()
    else:
        probs = np.exp(values - top) / float(torch.exp(x - float(x.max())).sum())
    if top_p is not None and top_p < 1.0:
        values = values[np.cumsum(probs) - probs < top_p]
    return sorted(values.tolist())


@given(
    vocab=st.integers(1, 5000),
    spread=st.sampled_from([0.0, 0.05, 1.0, 4.0, 20.0]),  # 0: all tied; 0.05: a nucleus of thousands
    rounding=st.sampled_from([None, 0.5]),  # 0.5: logits on a grid, many ties
    top_k=st.one_of(st.none(), st.integers(1, 200)),
    top_p=st.one_of(st.none(), st.floats(0.01, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_kept_tokens_are_those_of_a_full_sort(vocab, spread, rounding, top_k, top_p, seed):
    """sample() keeps the same tokens as sorting the whole vocabulary would (it takes a top-k of
    64 and grows it only while the nucleus is larger), ties included."""
    x = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * spread
    if rounding:
        x = (x / rounding).round() * rounding
    _check_kept_tokens(x, top_k, top_p)


@pytest.mark.parametrize("top_p", [0.7, 0.9, 0.9999999])
@pytest.mark.parametrize("rounding", [None, 0.01])
@pytest.mark.parametrize("spread", [0.7, 2.0])
def test_kept_tokens_of_a_large_nucleus(spread, top_p, rounding):
    """A nucleus past the top-k's growth (thousands of tokens of 128,256: the random-weight
    2B-4T's flat logits) is taken from the sorted values, the 32,768 largest first (spread 2.0
    and top_p <= 0.9: 8,900-30,000 tokens), all of them when it is larger: the same tokens as a
    full sort, ties at its edge included (``rounding``: logits on a grid)."""
    x = torch.randn(128256, generator=torch.Generator().manual_seed(1)) * spread
    if rounding:
        x = (x / rounding).round() * rounding
    assert _check_kept_tokens(x, None, top_p) > 4096


def _check_kept_tokens(x: torch.Tensor, top_k, top_p) -> int:
    """_kept_tokens(x) against _nucleus_by_full_sort; returns how many tokens it kept."""
    vocab = x.numel()
    ids, weights = _kept_tokens(x, float(x.max()), top_k, top_p)
    expected = _nucleus_by_full_sort(x, top_k, top_p)
    if ids is None:  # no filter: every token
        assert top_k is None or top_k >= vocab
        assert weights.shape == (vocab,) and expected == sorted(x.double().tolist())
        return vocab
    assert len(set(ids.tolist())) == len(ids)
    assert sorted(x.double()[torch.from_numpy(ids)].tolist()) == expected
    np.testing.assert_allclose(weights, np.exp(x.double()[torch.from_numpy(ids)].numpy() - float(x.max())))
    return len(ids)


def test_sample_draws_the_nucleus_in_proportion():
    """Past the first top-k of 64: 300 tokens, a nucleus of ~150; every draw from it, and the
    frequencies those of the renormalised probabilities (2 sigma of 6000 draws ~ 0.013)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.linspace(3.0, -3.0, 300).unsqueeze(0)
    probs = torch.softmax(logits[0].double(), 0)
    keep = int(((torch.cumsum(probs, 0) - probs) < 0.8).sum())
    assert 64 < keep < 300
    draws = torch.cat([sample(logits, temperature=1.0, top_p=0.8, generator=g) for _ in range(6000)]).flatten()
    assert int(draws.max()) < keep
    expected = probs[:keep] / probs[:keep].sum()
    counts = torch.bincount(draws, minlength=keep).double() / len(draws)
    assert float((counts[:10] - expected[:10]).abs().max()) < 0.02


def test_sample_keeps_the_most_probable_token_at_top_p_zero():
    """top_p = 0 drops every token after the first (the nucleus keeps at least one)."""
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0]])
    assert int(sample(logits, temperature=1.0, top_p=0.0, generator=torch.Generator().manual_seed(0))) == 1


def test_sample_rows_and_bad_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, -math.inf], [9.0, -math.inf, 0.0]])
    out = sample(logits, temperature=0.1, generator=g)
    assert out.shape == (2, 1) and out.dtype == torch.long and out.flatten().tolist() == [1, 0]
    for bad in ([[0.0, math.nan]], [[0.0, math.inf]], [[-math.inf, -math.inf]]):
        with pytest.raises(ValueError, match="cannot sample"):
            sample(torch.tensor(bad), temperature=1.0, top_p=0.9, generator=g)


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------


def test_stop_string_cuts_the_text_and_streams_only_what_is_kept(model, tokenizer):
    full = generate(model, tokenizer, PROMPT, NEW, compile=False, eos=False)
    # A stop string made of characters from the middle of the text, first seen there.
    start = len(full.text) // 2
    stop = full.text[start : start + 3]
    cut = full.text.find(stop)
    pieces: list[str] = []
    result = generate(model, tokenizer, PROMPT, NEW, compile=False, eos=False, stop=["never appears", stop],
                      stream=pieces.append)
    assert result.stop_reason == "stop"
    assert result.text == full.text[:cut]
    assert "".join(pieces) == result.text
    assert result.token_ids == full.token_ids[: result.new_tokens] and result.new_tokens < NEW


def test_eos_token_stops_generation(model, tokenizer, eos_config):
    full = generate(model, tokenizer, PROMPT, NEW, compile=False, eos=False)
    k = 5
    eos = full.token_ids[k]
    k = full.token_ids.index(eos)  # its first occurrence
    eos_config.eos_token_id = eos
    result = generate(model, tokenizer, PROMPT, NEW, compile=False)
    assert result.stop_reason == "eos"
    assert result.token_ids == full.token_ids[: k + 1]  # the eos token is returned, as transformers does
    assert result.text == tokenizer.decode(full.token_ids[:k], skip_special_tokens=True)
    assert hf_greedy(model, tokenizer, tokenizer(PROMPT)["input_ids"], NEW) == result.token_ids
    assert generate(model, tokenizer, PROMPT, NEW, compile=False, eos=False).stop_reason == "length"


def test_eos_ids_include_tokenizer_eos_eot_and_generation_config(model, tokenizer):
    special = checkpoints.special_token_ids(len(tokenizer))
    ids = eos_token_ids(model, tokenizer)
    assert {special["<|end_of_text|>"], special["<|eot_id|>"]} <= ids
    config_eos = model.generation_config.eos_token_id
    assert set([config_eos] if isinstance(config_eos, int) else config_eos) <= ids


def test_cache_full_stops_with_max_seq_len(model, tokenizer):
    n_prompt = len(tokenizer(PROMPT)["input_ids"])
    result = generate(model, tokenizer, PROMPT, 100, compile=False, eos=False, max_seq_len=n_prompt + 6)
    # The last token is never fed back, so a cache of P + 6 positions yields 7 new tokens.
    assert result.stop_reason == "max_seq_len" and result.new_tokens == 7
    exact = generate(model, tokenizer, PROMPT, 7, compile=False, eos=False, max_seq_len=n_prompt + 6)
    assert exact.stop_reason == "length" and exact.token_ids == result.token_ids


# ---------------------------------------------------------------------------------------------
# Text: streaming, UTF-8, chat template
# ---------------------------------------------------------------------------------------------


def test_streamed_pieces_add_up_to_the_text(model, tokenizer):
    pieces: list[str] = []
    result = generate(model, tokenizer, PROMPT, NEW, max_seq_len=MAX_SEQ_LEN, eos=False, stream=pieces.append)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stream_never_splits_a_multibyte_character(tokenizer):
    text = "Zürich crème brûlée: 你好, こんにちは 😀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # The byte-level tokenizer does split characters across tokens (else this tests nothing).
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces: list[str] = []
    stream = _TextStream(tokenizer, [], pieces.append)
    for i in ids:
        assert not stream.push(i)
    assert stream.finish() == text
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_a_possible_stop_string(tokenizer):
    text = "the fox jumps, the fox! sleeps"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces: list[str] = []
    stream = _TextStream(tokenizer, ["fox!"], pieces.append)
    stopped_at = next(n for n, i in enumerate(ids) if stream.push(i))
    assert tokenizer.decode(ids[: stopped_at + 1]).endswith("!")  # stopped at the token completing it
    assert stream.text == "the fox jumps, the "
    assert "".join(pieces) == stream.text  # "fox" was held back at both places until decided
    # Without a stop string in the text, everything held back is released by finish().
    pieces.clear()
    stream = _TextStream(tokenizer, ["fox!!"], pieces.append)
    for i in tokenizer("the fox!", add_special_tokens=False)["input_ids"]:
        stream.push(i)
    assert "".join(pieces) == "the " and stream.finish() == "the fox!" and "".join(pieces) == "the fox!"


def test_chat_template_prompt(model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected_ids = tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert expected.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert expected_ids.count(tokenizer.bos_token_id) == 1  # bos from the template only
    result = generate(model, tokenizer, messages, 8, compile=False, eos=False)
    assert result.prompt_tokens == len(expected_ids)
    hf = hf_greedy(model, tokenizer, expected_ids, 8)  # may stop earlier, at an eos token
    assert result.token_ids[: len(hf)] == hf
    # A string with chat=True is one user message.
    one = generate(model, tokenizer, "Hello there!", 8, chat=True, compile=False, eos=False)
    direct = generate(model, tokenizer, [{"role": "user", "content": "Hello there!"}], 8, compile=False, eos=False)
    assert one.token_ids == direct.token_ids and one.prompt_tokens == direct.prompt_tokens


def test_chat_without_a_template_is_a_clear_error(model, tokenizer):
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        generate(model, bare, "hi", 4, chat=True, compile=False)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(stop=[""]), "stop"),
        (dict(max_seq_len=4), "more than the KV cache"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(prompt=[{"content": "no role"}]), "role"),
        (dict(prompt="word " * 5000), "max_position_embeddings = 4096"),
    ],
)
def test_bad_arguments_raise_value_error(model, tokenizer, kwargs, match):
    args = dict(prompt=PROMPT, max_new_tokens=4, compile=False)
    args.update(kwargs)
    before = _SESSIONS.get(model)
    with pytest.raises(ValueError, match=match):
        generate(model, tokenizer, **args)
    assert _SESSIONS.get(model) is before  # a refused call leaves the model's session alone


def test_zero_new_tokens_returns_at_once(model, tokenizer):
    result = generate(model, tokenizer, PROMPT, 0)
    assert result.text == "" and result.token_ids == [] and result.new_tokens == 0 and result.stop_reason == "length"


def test_decode_one_token_writes_one_position(model, tokenizer):
    session = DecodeSession(model, 16, compile=False)
    with torch.inference_mode():
        prefill(model, torch.tensor([[1, 2, 3]]), session.cache)
        logits = decode_one_token(model, torch.tensor([[4]]), torch.tensor([3]), session.cache,
                                  kv_cache.cache_argument(model))
        whole = prefill(model, torch.tensor([[1, 2, 3, 4]]), DecodeSession(model, 16, compile=False).cache)
    assert session.seq_length == 4
    assert logits.shape == (1, model.config.vocab_size) and logits.dtype == torch.float32
    assert torch.allclose(logits, whole, rtol=0, atol=1e-4 * float(whole.abs().max()))


@pytest.mark.parametrize(
    "token, position, match",
    [
        (torch.zeros((1, 2), dtype=torch.long), torch.tensor([0]), r"token must be int64 of shape \(1, 1\)"),
        (torch.zeros((1, 1), dtype=torch.int32), torch.tensor([0]), "token must be int64"),
        (torch.zeros((1, 1), dtype=torch.long), torch.tensor(0), r"cache_position must be int64 of shape \(1,\)"),
        (torch.zeros((1, 1), dtype=torch.long), torch.tensor([0.0]), "cache_position must be int64"),
    ],
)
def test_step_rejects_bad_token_or_position(model, token, position, match):
    session = DecodeSession(model, 8, compile=False)
    with pytest.raises(ValueError, match=match):
        session.step(model, token, position)


def test_step_takes_inference_and_ordinary_tensors_without_recompiling(model, tokenizer):
    """The step copies the caller's token and position into its own tensors: alternating
    ordinary and inference-mode tensors (which a compiled step's guards tell apart) compiles
    nothing new and gives the same logits."""
    session = DecodeSession(model, MAX_SEQ_LEN)
    session.warm_up(model)
    graphs = counters["stats"]["unique_graphs"]
    logits = []
    for inference in (False, True, False):
        with torch.inference_mode(inference):
            token, position = torch.tensor([[7]]), torch.tensor([0])
        session.reset()  # (outside inference mode too)
        logits.append(session.step(model, token, position))
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
