"""Text generation with a static KV cache and one compiled decode step (after gpt-fast).

Three small functions do the work:

* :func:`prefill` runs the prompt through the model in chunks (eager: prompt lengths vary);
* :func:`decode_one_token` runs one token; it is compiled once, ahead of time, with
  ``torch.compile(fullgraph=True, dynamic=False)`` (see :class:`DecodeSession`). Every tensor
  it sees has a fixed shape (the cache is allocated once at its full length, the position is
  a tensor), so one graph serves every step up to the cache length, with no recompilation;
* :func:`generate` tokenizes, prefills, samples, detokenizes incrementally and times it all.

The cache is a transformers ``StaticCache`` whose layers come from :mod:`torch_bitnet.kv_cache`:
int8 keys and values on torch_bitnet's attention ops (``kv_cache_dtype="int8"``, the default),
or a float cache on SDPA (``"bf16"`` / ``"fp32"``). The model's attention code fills it; both
steps run the model with the ``"torch_bitnet"`` attention function (switched on for the call if
the model uses transformers' sdpa or eager attention). A ``StaticCache`` keeps its write
position as a tensor (``cumulative_length``) and advances it itself on every forward; the
position we pass (``position_ids``, for RoPE) is always the same number, kept in lockstep by
the functions below.

The cache and its compiled step live on a :class:`DecodeSession`; :func:`generate` keeps one
session per model (looked up weakly, so it never keeps a model alive) and reuses it as long as
it is long enough, so a chat loop compiles once, not once per turn.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import kv_cache, step_cache

__all__ = [
    "DecodeSession",
    "GenerationResult",
    "decode_one_token",
    "default_chunk_size",
    "eos_token_ids",
    "generate",
    "prefill",
    "prepare",
    "sample",
]

logger = logging.getLogger(__name__)

# Prefill chunk length. The bitlinear kernels reach their per-token throughput by M = 128
# (README op table: 2560x6912 costs 50 us/token at M = 128 and at M = 512), and attention only
# covers the positions a chunk can see, so longer chunks buy nothing: measured on 2B-4T (bf16,
# 2 threads, a 1024-token prompt) 125 / 128 / 125 / 128 prompt tokens/s with chunks of
# 128 / 256 / 512 / 1024. Shorter chunks bound activation memory (the float32 copies of the
# 6912-wide MLP activations are 7 MB per chunk of 256, 28 MB per 1024). 256: past the knee.
_DEFAULT_CHUNK_SIZE = 256
# Automatic cache lengths are powers of two from this floor up to max_position_embeddings: a
# chat whose history grows recompiles the decode step at most log2(4096 / 256) = 4 times, and
# attention never reads more than twice the cache it needs (every decode step attends over the
# whole cache: 2 * 30 layers * 5 kv heads * 128 * 2 bytes = 77 KB per position for 2B-4T).
_MIN_CACHE_LEN = 256

STOP_REASONS = ("eos", "stop", "length", "max_seq_len")


def default_chunk_size() -> int:
    """The prefill chunk length: ``BITNET_CHUNK_SIZE`` from the environment, else 256."""
    value = os.environ.get("BITNET_CHUNK_SIZE")
    if value is None:
        return _DEFAULT_CHUNK_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"BITNET_CHUNK_SIZE must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"BITNET_CHUNK_SIZE must be a positive integer, got {value!r}")
    return size


@dataclass
class GenerationResult:
    """What :func:`generate` produced and how long it took.

    ``token_ids`` holds the new tokens only (an end-of-sequence token that stopped generation
    is included, as in transformers' ``generate``); ``text`` is their decoded text without
    special tokens, cut before a stop string if one ended generation. Decode timings exclude
    the one-time compilation, or loading of a step saved by an earlier session
    (``compile_seconds``, 0 when the session's compiled step was reused).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float  # the prompt's forward passes (all chunks)
    decode_seconds: float  # the decode steps and sampling after the first new token
    compile_seconds: float
    stop_reason: str  # one of STOP_REASONS
    decode_steps: int = 0  # forward passes of one token (new_tokens - 1 at most)

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# The model steps
# --------------------------------------------------------------------------------------------


def decode_one_token(
    model: nn.Module, token: torch.Tensor, cache_position: torch.Tensor, cache, cache_arg: str = "past_key_values"
) -> torch.Tensor:
    """One forward pass of one token; the function that gets compiled.

    Args:
        model: a causal LM taking a cache object (transformers ``BitNetForCausalLM``).
        token: int64 (1, 1), the token at ``cache_position``.
        cache_position: int64 (1,), its position. A tensor, not an int, so that the compiled
            graph does not specialise on it; it must equal ``cache.get_seq_length()``
            (the ``StaticCache`` keeps its own count, as a tensor, to place the keys and values).
        cache: the ``StaticCache`` holding positions ``0 .. cache_position - 1``; this call
            writes the token's keys and values at ``cache_position`` and advances the cache.
        cache_arg: the name of the model's cache argument
            (:func:`torch_bitnet.kv_cache.cache_argument`, looked up outside the compiled step).

    Returns:
        float32 (1, vocab) logits of the next token.
    """
    out = model(
        input_ids=token,
        position_ids=cache_position.view(1, 1),
        **{cache_arg: cache},
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


@torch.inference_mode()  # the cache's tensors are inference tensors
def prefill(model: nn.Module, input_ids: torch.Tensor, cache, chunk_size: int | None = None) -> torch.Tensor:
    """Run the prompt through the model into ``cache``, ``chunk_size`` tokens at a time.

    Args:
        input_ids: int64 (1, P), the prompt; the cache must hold ``P`` more positions.
        cache: a ``StaticCache`` (possibly holding earlier positions: the prompt continues them).
        chunk_size: tokens per forward pass (default :func:`default_chunk_size`). Chunking
            bounds activation memory; the logits do not depend on it beyond float rounding.

    Returns:
        float32 (1, vocab) logits after the prompt's last token.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"prefill expects input_ids of shape (1, P), got {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    if length == 0:
        raise ValueError("prefill needs at least one prompt token")
    chunk_size = default_chunk_size() if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    start = int(cache.get_seq_length())
    device = input_ids.device
    for begin in range(0, length, chunk_size):
        chunk = input_ids[:, begin : begin + chunk_size]  # (1, C)
        positions = torch.arange(start + begin, start + begin + chunk.shape[1], device=device)
        # Only the prompt's last position needs logits (the lm_head is 128k rows wide). Ask for
        # it by index, not with logits_to_keep=1: that slices a (1, 1, hidden) view whose batch
        # stride is C * hidden, and torch.matmul then copies the whole lm_head weight into a
        # batched layout (1.9 s per call for 2B-4T in bf16) instead of running a GEMV (33 ms).
        last = begin + chunk_size >= length
        keep = torch.tensor([chunk.shape[1] - 1] if last else [], dtype=torch.long, device=device)
        with _static_attention(model, cache):
            out = model(
                input_ids=chunk,
                position_ids=positions.unsqueeze(0),  # (1, C)
                **{kv_cache.cache_argument(model): cache},
                use_cache=True,
                logits_to_keep=keep,  # (1,) on the last chunk, (0,) before it
            )
    return out.logits[:, -1].float()


@contextlib.contextmanager
def _static_attention(model: nn.Module, cache):
    """Run the model with :func:`torch_bitnet.kv_cache.attention` inside the block (the int8
    cache needs it; a float cache takes its shortcuts for static caches) if it supports it:
    registered as ``"torch_bitnet_int8"`` (no plain causal mask) when ``cache`` is all int8."""
    config = model.config
    previous = config._attn_implementation
    name = kv_cache.ATTENTION_INT8 if kv_cache.is_int8_cache(cache) else kv_cache.ATTENTION
    if previous == name or kv_cache.unsupported_reason(model) is not None:
        yield
        return
    kv_cache.register_attention()
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _new_static_cache(model: nn.Module, max_seq_len: int, kv_cache_dtype: str | None):
    """The session's cache, allocated now (final addresses before anything is compiled).

    torch_bitnet's layers (:func:`torch_bitnet.kv_cache.new_static_cache`) when the model's
    attention supports them; otherwise transformers' own ``StaticCache`` in the model's dtype
    (``kv_cache_dtype`` must then be None).
    """
    if kv_cache.unsupported_reason(model) is None:
        return kv_cache.new_static_cache(model, max_seq_len, kv_cache_dtype)
    if kv_cache_dtype is not None:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} needs torch_bitnet's attention, which this model cannot use: "
            f"{kv_cache.unsupported_reason(model)}"
        )
    from transformers import StaticCache

    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_seq_len)
    kv_cache.allocate_now(cache, model)
    return cache


def _resolve_kv_cache_dtype(model: nn.Module, kv_cache_dtype: str | None) -> str | None:
    """The cache kind a session gets: the argument, else the model's setting, else the
    environment's default; None for models that cannot use torch_bitnet's attention."""
    if kv_cache_dtype is not None:
        return kv_cache.check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache.unsupported_reason(model) is not None:
        return None
    return kv_cache.get_kv_cache_dtype(model) or kv_cache.default_kv_cache_dtype()


#: inductor options of the compiled decode step (see DecodeSession.__init__)
_COMPILE_OPTIONS = {"emulate_precision_casts": True, "size_asserts": False, "alignment_asserts": False}


def _keep_serializable_guards(entries) -> list[bool]:
    """The guards an ahead-of-time compiled step keeps: ``aot_compile`` serializes them, which
    it cannot do for guards on globals or on object identity (classes, functions, closures:
    :func:`_code_key` covers those of the model)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [
        not (
            entry.is_global
            or entry.guard_type in unsupported
            or any(kind in unsupported for kind in entry.derived_guard_types or ())
        )
        for entry in entries
    ]


def _code_key(model: nn.Module) -> tuple:
    """What decides the code a step of ``model`` runs beyond its tensors and attributes: the
    class and the forward hooks of every module. The ahead-of-time step's guards cannot check
    these (object identity), so the session compares this key instead (under 1 ms for 2B-4T)."""
    return tuple(
        (type(m), tuple(m._forward_pre_hooks.values()), tuple(m._forward_hooks.values())) for m in model.modules()
    )


class DecodeSession:
    """A static KV cache for one model and the decode step that runs on it.

    ``kv_cache_dtype`` (``int8`` | ``bf16`` | ``fp32``) defaults to the model's setting
    (:func:`torch_bitnet.kv_cache.set_kv_cache_dtype`), else ``BITNET_KV_CACHE_DTYPE``, else int8.

    :meth:`step` runs :func:`decode_one_token` compiled with ``torch.compile(fullgraph=True,
    dynamic=False)`` and inductor's ``emulate_precision_casts`` (bf16 intermediates rounded as
    in eager) on the session's cache (or the plain function with ``compile=False``).
    :meth:`warm_up` compiles it, ahead of time (``torch.compile(...).aot_compile``), and runs it
    once on a dummy token so the compilation is timed apart from generation. The session holds
    no reference to the model: pass the same model (or one of the same architecture and dtype)
    to every call.

    Why ahead of time: a function compiled the usual way looks up its compiled graph through
    dynamo's guards on every call, and at the 2B-4T shape those include one tensor check for
    each of the ~700 buffers even with guard evaluation otherwise skipped (dynamo keeps tensor
    guards on buffers, not on parameters): 1.6 ms of a 30 ms token (2 threads). The
    ahead-of-time function is called directly; its guards are checked explicitly, on the first
    step of each decode loop only (see :meth:`step`). Models whose step cannot be compiled
    ahead of time (it needs every guard serializable), and sessions made with
    ``ahead_of_time=False``, get the usual lazily compiled step, with dynamo's guard evaluation
    skipped in the steady state; ``ahead_of_time`` then reads False.

    An ahead-of-time step is saved on disk once compiled, and later sessions of a model of the
    same kind load it instead of compiling (:mod:`torch_bitnet.step_cache`: 18-21 s of
    compilation at the 2B-4T shape become 3-4 s of loading; ``BITNET_STEP_CACHE=0`` turns it
    off); ``step_from_disk`` tells whether the current step was loaded.

    In a decode loop's steady state (``same_as_last=True``) the ahead-of-time step's own
    Python is skipped too: it fetches the ~700 tensors the graph takes (the model's buffers
    through their modules' dictionaries, the cache's tensors, the session's token and
    position; 0.5-1 ms of Python per token on an AVX2 Zen 3) on every call, and they are the
    same objects on every step of a loop. The first step of each loop runs it and records the
    flat tensors it hands to the compiled graph (:meth:`_run_recording`); the next ones call
    the graph with them. The session keeps those tensors (the model's buffers among them)
    until the next loop starts, :meth:`reset` or a recompilation.
    """

    def __init__(
        self,
        model: nn.Module,
        max_seq_len: int,
        *,
        compile: bool = True,
        kv_cache_dtype: str | None = None,
        ahead_of_time: bool = True,
    ):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.compiled = compile
        self.dtype = kv_cache.activation_dtype(model)
        # None: transformers' StaticCache in the model's dtype (models torch_bitnet cannot attend for)
        self.kv_cache_dtype = _resolve_kv_cache_dtype(model, kv_cache_dtype)
        with torch.inference_mode():
            self.cache = _new_static_cache(model, max_seq_len, self.kv_cache_dtype)
            # The step's token (1, 1) and position (1,): the caller's values are copied in, so the
            # compiled step always sees the same tensors (an ahead-of-time step is compiled for
            # one kind of tensor: the caller's could be inference tensors one time and not the next).
            device = _model_device(model)
            self._token = torch.zeros((1, 1), dtype=torch.long, device=device)
            self._position = torch.zeros(1, dtype=torch.long, device=device)
        # emulate_precision_casts: inductor fuses the bf16 elementwise ops around our ops (RoPE,
        # residual adds) and by default rounds only the fused result; eager rounds every
        # intermediate to bf16. With it the compiled step rounds as eager does, so compiled
        # and eager greedy decoding give the same tokens (the default model's first
        # difference was at token 12 without it).
        # size_asserts / alignment_asserts off: the generated wrapper would otherwise check the
        # shape and strides of every input (~700 weights for 2B-4T) and every op output on each
        # token; the guards already checked the inputs, and our ops check what they read.
        # The step: the ahead-of-time compiled function, or (not self.ahead_of_time) the lazily
        # compiled one; None until compiled.
        self._step: Callable | None = None
        self.ahead_of_time = ahead_of_time
        self._code_key: tuple | None = None
        self.compile_seconds = 0.0
        # Whether the step was loaded from a file an earlier session saved (torch_bitnet.step_cache)
        # instead of compiled.
        self.step_from_disk = False
        # (compiled graph, its flat tensor arguments) recorded by _run_recording, or None
        self._graph_call: tuple[Callable, tuple] | None = None

    def reset(self) -> None:
        """Forget every cached position (the next prefill starts at position 0)."""
        self._graph_call = None
        with torch.inference_mode():  # the cache's tensors are inference tensors
            self.cache.reset()

    def _compile(self, model: nn.Module, args: tuple) -> None:
        """Compile the step for ``args`` (model, token, position, cache, cache argument)."""
        self._code_key = _code_key(model)
        self._graph_call = None
        self.step_from_disk = False
        if self.ahead_of_time:
            # A step saved by an earlier session (torch_bitnet.step_cache), if its guards hold.
            # (Loaded here, inside step()'s inference mode, as load_step requires.)
            key = step_cache.step_key(model, self.cache, _COMPILE_OPTIONS) if step_cache.step_cache_dir() else None
            step = step_cache.load_step(key) if key else None
            if step is not None and self._loaded_guards_hold(step, args):
                step.disable_guard_check()
                self._step, self.step_from_disk = step, True
                return
            options = {**_COMPILE_OPTIONS, "guard_filter_fn": _keep_serializable_guards}
            compiler = torch.compile(decode_one_token, fullgraph=True, dynamic=False, options=options)
            try:
                step = compiler.aot_compile((args, {}))
            except Exception as error:  # any failure leaves the lazy path (which raises real errors)
                logger.info("the decode step cannot be compiled ahead of time (%s); compiling it lazily", error)
                self.ahead_of_time = False
            else:
                step.disable_guard_check()  # checked in step() unless the caller vouches for them
                self._step = step
                if key:
                    step_cache.save_step(key, step)
                return
        self._step = torch.compile(decode_one_token, fullgraph=True, dynamic=False, options=_COMPILE_OPTIONS)

    @staticmethod
    def _loaded_guards_hold(step, args: tuple) -> bool:
        try:
            if step.guard_check(*args):
                return True
            logger.info("the saved decode step's guards fail on this model or cache: compiling it again")
        except Exception as error:
            logger.info("the saved decode step's guards cannot be checked (%s): compiling it again", error)
        return False

    def _guards_hold(self, model: nn.Module, args: tuple) -> bool:
        return self._code_key == _code_key(model) and self._step.guard_check(*args)

    def _run_recording(self, args: tuple) -> torch.Tensor:
        """Run the ahead-of-time step on ``args`` and record its call of the compiled graph.

        The step is a function whose code (dynamo's) fetches the graph's inputs, calls the
        compiled graph (a global of that function, named by ``backend_id``) with them as flat
        tensors, and returns its output. That call is intercepted once; it is kept for
        :meth:`step` only if it happened exactly once, took tensors only and its one output is
        what the step returned (a graph with more outputs would hand state back to the step's
        code, which the recorded call skips). What else the step's code does after the call,
        transformers' output-capturing flags, sets the same values on every step: running it
        once per loop suffices. Without the torch internals this relies on, nothing is recorded
        and every step runs the step's own code.
        """
        env = getattr(getattr(self._step, "fn", None), "__globals__", None)
        backend_id = getattr(getattr(self._step, "_artifacts", None), "backend_id", None)
        self._graph_call = None
        if env is None or backend_id not in env:
            return self._step(*args)
        graph = env[backend_id]
        calls = []

        def recording(*flat):
            out = graph(*flat)
            calls.append((flat, out))
            return out

        env[backend_id] = recording
        try:
            result = self._step(*args)
        finally:
            env[backend_id] = graph
        if len(calls) == 1:
            flat, out = calls[0]
            if (
                all(isinstance(t, torch.Tensor) for t in flat)
                and isinstance(out, (tuple, list))
                and len(out) == 1
                and out[0] is result
            ):
                self._graph_call = (graph, flat)
        return result

    def step(
        self, model: nn.Module, token: torch.Tensor, cache_position: torch.Tensor, *, same_as_last: bool = False
    ) -> torch.Tensor:
        """:func:`decode_one_token` on this session's cache: token (1, 1) at cache_position (1,)
        -> float32 (1, vocab) logits; the cache advances by one position.

        ``same_as_last=True`` is the caller's promise that nothing the compiled step depends on
        changed since the previous call (same model object and state, same argument shapes and
        dtypes: the steady state of one decode loop). The step then runs without checking the
        compiled step's guards (the tensors' dtypes, shapes and strides, the model's attributes,
        and :func:`_code_key`); an ahead-of-time step then calls its compiled graph directly
        with the tensors recorded on the loop's first step (see the class docstring). Otherwise
        it checks them first and compiles again if they fail. :func:`generate` passes it from
        the second step of a loop on, so a model changed between calls still recompiles.

        Raises:
            ValueError: a token or position of another dtype or shape.
        """
        if token.shape != (1, 1) or token.dtype != torch.long:
            raise ValueError(f"token must be int64 of shape (1, 1), got {token.dtype} {tuple(token.shape)}")
        if cache_position.shape != (1,) or cache_position.dtype != torch.long:
            raise ValueError(
                f"cache_position must be int64 of shape (1,), got {cache_position.dtype} {tuple(cache_position.shape)}"
            )
        if same_as_last and self._graph_call is not None:
            # The steady state: the recorded graph call (see the class docstring), on the same
            # tensors; the token and position are copied into the session's own.
            graph, flat = self._graph_call
            with torch.inference_mode():
                self._token.copy_(token)
                self._position.copy_(cache_position)
                return graph(*flat)[0]
        args = (model, self._token, self._position, self.cache, kv_cache.cache_argument(model))
        with torch.inference_mode(), _static_attention(model, self.cache):
            self._token.copy_(token)
            self._position.copy_(cache_position)
            if not self.compiled:
                return decode_one_token(*args)
            if self._step is None:
                self._compile(model, args)
            elif not self.ahead_of_time:
                # Skips dynamo's guard evaluation except the tensor checks on buffers (see class).
                # (set_stance takes effect when called, so it is called only when it applies.)
                with (
                    torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
                    if same_as_last
                    else contextlib.nullcontext()
                ):
                    return self._step(*args)
            elif not same_as_last and not self._guards_hold(model, args):
                logger.info("the model or the step's arguments changed: compiling the decode step again")
                self._compile(model, args)
            return self._run_recording(args) if self.ahead_of_time else self._step(*args)

    @property
    def warm(self) -> bool:
        """Whether the step is ready: compiled or loaded (the eager step always is)."""
        return not self.compiled or self._step is not None

    @property
    def seq_length(self) -> int:
        """Positions currently held."""
        return int(self.cache.get_seq_length())

    @torch.inference_mode()
    def warm_up(self, model: nn.Module) -> float:
        """Compile the decode step (once) on a dummy token; returns the seconds it took."""
        if self.warm:
            return 0.0
        logger.info(
            "compiling the decode step for a %d-token cache, or loading it if saved before (once per model and "
            "cache length)",
            self.max_seq_len,
        )
        device = _model_device(model)
        start = time.perf_counter()
        self.reset()
        token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.step(model, token, torch.zeros(1, dtype=torch.long, device=device))
        self.reset()
        self.compile_seconds = time.perf_counter() - start
        logger.info(
            "%s the decode step in %.1f s", "loaded" if self.step_from_disk else "compiled", self.compile_seconds
        )
        return self.compile_seconds


# One session per model, dropped with the model (the session itself does not reference it).
_SESSIONS: weakref.WeakKeyDictionary[nn.Module, DecodeSession] = weakref.WeakKeyDictionary()


def _auto_cache_len(needed: int, limit: int) -> int:
    return min(limit, max(_MIN_CACHE_LEN, 1 << (needed - 1).bit_length()))


def _session_for(
    model: nn.Module, needed: int, max_seq_len: int | None, compile: bool, kv_cache_dtype: str | None
) -> DecodeSession:
    """The model's session if it fits the request, else a new one (which replaces it)."""
    session = _SESSIONS.get(model)
    fits = (
        session is not None
        and session.compiled == compile
        and session.dtype == kv_cache.activation_dtype(model)
        and session.kv_cache_dtype == _resolve_kv_cache_dtype(model, kv_cache_dtype)
        and (session.max_seq_len == max_seq_len if max_seq_len is not None else session.max_seq_len >= needed)
    )
    if not fits:
        if max_seq_len is None:
            limit = getattr(model.config, "max_position_embeddings", None) or needed
            max_seq_len = _auto_cache_len(needed, limit)
        session = DecodeSession(model, max_seq_len, compile=compile, kv_cache_dtype=kv_cache_dtype)
        _SESSIONS[model] = session
    return session


def prepare(
    model: nn.Module, max_seq_len: int, *, compile: bool = True, kv_cache_dtype: str | None = None
) -> DecodeSession:
    """Allocate the model's KV cache and compile its decode step now, instead of in the first
    :func:`generate` call (an interactive chat compiles before the first question). Later
    :func:`generate` calls with the same ``compile`` and ``kv_cache_dtype`` reuse the session
    while it is long enough."""
    session = _session_for(model, max_seq_len, max_seq_len, compile, kv_cache_dtype)
    session.warm_up(model)
    return session


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token from float logits (B, vocab): argmax if ``temperature == 0``.

    Otherwise logits / temperature, then keep the ``top_k`` largest (and any equal to the
    k-th), then the smallest set of tokens whose probabilities add up to ``top_p`` (nucleus),
    then draw one of the kept tokens in proportion to its probability with one uniform number
    from ``generator`` per row (inverse CDF). Returns an int64 tensor (B, 1).

    Cost: a few passes over the vocabulary and a partial sort for the 64 largest (512, then
    4,096 while the nucleus is larger; past that a sort of the logits' values), not a sort of
    the tokens nor a random number per token: ``torch.sort`` and ``torch.multinomial`` took
    21-25 ms per token with top-p at bitnet-b1.58-2B-4T's 128,256 tokens on a 2-core Zen 3,
    half a decode step (``benchmarks/bench_sample.py``).

    Raises:
        ValueError: a row holding a NaN or +inf, or only -inf.
    """
    if temperature == 0.0:
        # The first largest, as argmax: torch.max's reduction finds it ~3x faster at a 128,256-token
        # vocabulary (150 against 250 us per decode token on 2 threads, BENCHMARKS.md).
        return logits.max(dim=-1, keepdim=True).indices
    tokens = [_sample_row(row / temperature, top_k, top_p, generator) for row in logits.float()]
    return torch.tensor(tokens, dtype=torch.long, device=logits.device).unsqueeze(1)


def _sample_row(x: torch.Tensor, top_k: int | None, top_p: float | None, generator: torch.Generator | None) -> int:
    """:func:`sample` of one row x (vocab,) of tempered logits."""
    top = float(x.max())  # NaN if x holds one
    if math.isnan(top) or top == math.inf:
        raise ValueError("cannot sample: the logits hold a NaN or +inf")
    if top == -math.inf:
        raise ValueError("cannot sample: every logit is -inf")
    u = float(torch.rand((), generator=generator, dtype=torch.float64, device=x.device))
    ids, weights = _kept_tokens(x, top, top_k, top_p)
    if ids is None:  # every token, in vocabulary order
        cdf = torch.cumsum(weights, 0)
        return min(int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True)), x.numel() - 1)
    cdf = np.cumsum(weights)
    return int(ids[min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(ids) - 1)])


def _kept_tokens(x: torch.Tensor, top: float, top_k: int | None, top_p: float | None):
    """The tokens :func:`sample` may draw from the row x (vocab,) of tempered logits whose
    maximum is top, and their weights e^(x - top) (their probabilities up to one factor): NumPy
    arrays (ids, float64 weights), in no particular order (the draw does not need one); or
    (None, a float64 tensor of all the weights in vocabulary order) without a filter.

    The selection is NumPy's: ``np.argpartition`` finds the k largest of 128,256 logits in
    ~0.4 ms on a slow core whatever k is, where ``torch.topk`` took 0.5 ms for k = 64 and 2.4
    ms for 4,096; a torch call on the few kept tokens would also cost ~10 us of dispatch
    against NumPy's ~1 us."""
    vocab = x.numel()
    xs = x.detach().cpu().numpy()
    if top_k is not None and top_k < vocab:
        ids = _largest(xs, top_k)
        kth = xs[ids[-1]]
        if np.count_nonzero(xs >= kth) > top_k:  # ties with the k-th stay, as a mask of x < kth keeps them
            ids = _descending(xs, np.flatnonzero(xs >= kth))
        weights = np.exp(xs[ids].astype(np.float64) - top)
        probs = weights / weights.sum()  # renormalised over the top k, as softmax of the masked logits
    elif top_p is not None and top_p < 1.0:
        total = float(torch.exp(x - top).sum())  # softmax's denominator over the whole vocabulary
        k = min(vocab, 64)
        while True:
            ids = _largest(xs, k)
            weights = np.exp(xs[ids].astype(np.float64) - top)
            probs = weights / total
            # The nucleus ends at the first token whose cumulative probability reaches top_p:
            # inside these k when their sum reaches it.
            if k == vocab or np.cumsum(probs)[-1] >= top_p:
                break
            if k * 8 > _PARTITION_MAX:  # a large nucleus: found on all the sorted logits
                ids = _nucleus_of_all(xs, top, total, top_p)
                return ids, np.exp(xs[ids].astype(np.float64) - top)
            k = min(vocab, k * 8)
    else:
        return None, torch.exp(x - top).double()
    if top_p is not None and top_p < 1.0:
        kept = _nucleus_size(probs, top_p)  # ids are the most probable first here
        ids, weights = ids[:kept], weights[:kept]
    return ids, weights


def _nucleus_size(probs: np.ndarray, top_p: float) -> int:
    """How many of probs (the most probable first) the nucleus keeps: a token is dropped when
    the tokens before it already reach top_p; the first always stays."""
    return max(1, int(np.count_nonzero(np.cumsum(probs) - probs < top_p)))


# _kept_tokens grows its candidates 64 -> 512 -> 4096 tokens, then sorts values only
# (_nucleus_of_all): sorting the values of 128,256 float32 logits (np.sort: ~1.3 ms on a slow
# core) costs less than ordering tens of thousands of tokens by value (a stable argsort of
# 56,000: ~8 ms).
_PARTITION_MAX = 4096


def _descending(xs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids ordered by xs[ids], largest first, ties in index order."""
    return ids[np.argsort(-xs[ids], kind="stable")]


def _largest(xs: np.ndarray, k: int) -> np.ndarray:
    """The indices of k largest values of xs (ties at the k-th: any of them), largest first."""
    if k >= len(xs):
        return _descending(xs, np.arange(len(xs)))
    return _descending(xs, np.argpartition(xs, len(xs) - k)[len(xs) - k :])


def _nucleus_of_all(xs: np.ndarray, top: float, total: float, top_p: float) -> np.ndarray:
    """The top_p nucleus of xs in index order: its size n from the sorted values (the tokens
    before which the cumulative probability is below top_p), then the tokens above the n-th
    value and, of those equal to it, the first in index order up to n.

    The values sorted are the 32,768 largest (a partial sort, then a sort of those), then the
    others only if the nucleus is larger: a cumulative sum's prefix is the same whatever
    follows it, and the tokens past a prefix whose sum reaches top_p are not in the nucleus."""
    vocab = len(xs)
    m = min(vocab, 32768)
    part = xs if m == vocab else np.partition(xs, vocab - m)  # the m largest last
    desc = np.sort(part[vocab - m :])[::-1].astype(np.float64)
    probs = np.exp(desc - top) / total
    if m < vocab and probs.cumsum()[-1] < top_p:
        desc = np.concatenate([desc, np.sort(part[: vocab - m])[::-1].astype(np.float64)])
        probs = np.exp(desc - top) / total
    n = _nucleus_size(probs, top_p)
    edge = xs.dtype.type(desc[n - 1])
    above = np.flatnonzero(xs > edge)
    return np.concatenate([above, np.flatnonzero(xs == edge)[: n - len(above)]])


# --------------------------------------------------------------------------------------------
# Text in and out
# --------------------------------------------------------------------------------------------


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """Tokens that end generation: the tokenizer's eos, ``<|eot_id|>`` if the vocabulary has
    it (Llama-3 chat turns end with it) and the model's ``generation_config.eos_token_id``."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in ([config_eos] if isinstance(config_eos, int) else config_eos))
    return ids


def _encode(tokenizer, prompt, chat: bool) -> list[int]:
    if isinstance(prompt, str) and not chat:
        ids = tokenizer(prompt)["input_ids"]
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template; pass a plain string prompt with chat=False")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens (BOS) itself: do not add them twice.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 0:
        raise ValueError("the prompt is empty after tokenization")
    return list(ids)


class _TextStream:
    """Incremental detokenization with stop strings.

    Text is released only when it is final: a token can end in the middle of a multi-byte
    UTF-8 character (the decoded tail is then U+FFFD until the next token completes it), and
    text that might be the beginning of a stop string is held back until it is not. So the
    pieces passed to ``stream`` always add up to :attr:`text`.

    The decoding follows text-generation-inference: decode the ids from ``prefix_offset`` and
    subtract the text of ``ids[prefix_offset:read_offset]``, so a tokenizer's handling of
    leading spaces sees the same context as when decoding everything at once.
    """

    def __init__(self, tokenizer, stop: Sequence[str], stream: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.stream = stream
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded so far, complete characters only
        self.released = 0  # len(self.text) already passed to stream

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> bool:
        """Add one token; returns True if a stop string has appeared (the text ends before it)."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        if len(current) <= len(prefix) or current.endswith("\ufffd"):
            return False  # nothing new yet, or a character still incomplete
        old_length = len(self.text)
        self.text += current[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._check_stop(old_length)

    def _check_stop(self, old_length: int) -> bool:
        # A stop string ending in the new text starts at most len(s) - 1 characters before it.
        for s in self.stop:
            at = self.text.find(s, max(0, old_length - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self._release(len(self.text))
                return True
        self._release(len(self.text) - self._held_back())
        return False

    def _held_back(self) -> int:
        """Length of the longest tail of the unreleased text that begins some stop string."""
        pending = len(self.text) - self.released
        for n in range(min(pending, max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, end: int) -> None:
        if end > self.released:
            if self.stream is not None:
                self.stream(self.text[self.released : end])
            self.released = end

    def finish(self) -> str:
        """Release everything left (including an incomplete character) and return the text."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        rest = self._decode(self.ids[self.prefix_offset :])[len(prefix) :]
        if rest:
            old_length = len(self.text)
            self.text += rest
            self.prefix_offset = self.read_offset = len(self.ids)
            if self._check_stop(old_length):
                return self.text
        self._release(len(self.text))
        return self.text


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def _check_args(max_new_tokens, temperature, top_k, top_p, chunk_size, max_seq_len, stop) -> list[str]:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0.0 or math.isinf(temperature):  # also rejects NaN
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be None or an integer >= 1, got {max_seq_len!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or s == "" for s in stops):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    return stops


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[dict],
    max_new_tokens: int = 128,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    eos: bool = True,
    stream: Callable[[str], None] | None = None,
    chat: bool = False,
    compile: bool = True,
    max_seq_len: int | None = None,
    chunk_size: int | None = None,
    kv_cache_dtype: str | None = None,
) -> GenerationResult:
    """Generate text from a prompt with a static KV cache and a compiled decode step.

    Args:
        model: a transformers causal LM (``BitNetForCausalLM``, patched or not), batch size 1.
        tokenizer: its transformers tokenizer.
        prompt: a string, or a list of ``{"role", "content"}`` messages (always rendered with
            the chat template).
        max_new_tokens: how many tokens to generate at most (0 returns at once).
        temperature: 0 for greedy decoding; otherwise sampling at this temperature.
        top_k, top_p: sampling filters (None = off); see :func:`sample`.
        seed: seeds a private ``torch.Generator``, so sampling is reproducible and leaves the
            global RNG alone; None samples from torch's global RNG.
        stop: strings that end generation; the text is cut before the first one.
        eos: stop at an end-of-sequence token (:func:`eos_token_ids`); False runs to the limit.
        stream: called with each piece of new text as soon as it is final (whole characters,
            never part of a stop string); the pieces add up to ``result.text``.
        chat: render a string prompt as one user message of the chat template, with the
            assistant's generation prompt.
        compile: compile the decode step (the first call per model and cache length compiles:
            ``result.compile_seconds``).
        max_seq_len: KV cache length (prompt + new tokens). Default: the smallest power of two
            >= 256 that fits, capped at ``config.max_position_embeddings``; generation stops
            with ``stop_reason == "max_seq_len"`` when the cache is full.
        chunk_size: prefill chunk length (default :func:`default_chunk_size`).
        kv_cache_dtype: ``int8`` | ``bf16`` | ``fp32``: how the KV cache stores keys and
            values (int8 on torch_bitnet's attention ops, float on SDPA). Default: the model's
            setting (``patch`` / ``from_pretrained``), else ``BITNET_KV_CACHE_DTYPE``, else int8.

    Raises:
        ValueError: bad arguments, an empty prompt, or a prompt longer than the cache.
    """
    stops = _check_args(max_new_tokens, temperature, top_k, top_p, chunk_size, max_seq_len, stop)
    prompt_ids = _encode(tokenizer, prompt, chat)
    n_prompt = len(prompt_ids)
    if max_new_tokens == 0:
        return GenerationResult("", [], n_prompt, 0, 0.0, 0.0, 0.0, "length")

    limit = max_seq_len or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and n_prompt > limit:
        what = "max_seq_len" if max_seq_len else "the model's max_position_embeddings"
        raise ValueError(f"the prompt has {n_prompt} tokens, more than the KV cache holds ({what} = {limit})")
    # Producing N tokens writes the prompt and N - 1 of them to the cache (the last is not fed back).
    session = _session_for(model, n_prompt + max_new_tokens - 1, max_seq_len, compile, kv_cache_dtype)
    compile_seconds = session.warm_up(model)

    device = _model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = eos_token_ids(model, tokenizer) if eos else set()
    text_stream = _TextStream(tokenizer, stops, stream)

    def next_token(logits: torch.Tensor) -> torch.Tensor:  # (1, vocab) float32 -> (1, 1) int64
        return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    # The attention implementation is switched once for the whole run: switching it in every
    # step (transformers' config setters and checks) cost ~0.13 ms per token, 10% of a token
    # of the built-in model on a 2-core Zen 3.
    with _static_attention(model, session.cache):
        session.reset()
        start = time.perf_counter()
        logits = prefill(model, torch.tensor([prompt_ids], device=device), session.cache, chunk_size)
        token = next_token(logits)
        prefill_seconds = time.perf_counter() - start

        new_ids: list[int] = []
        position = torch.tensor([n_prompt], device=device)  # (1,) position of `token`, advanced in place
        decode_seconds = 0.0
        steps = 0
        while True:
            token_id = int(token)
            new_ids.append(token_id)
            if token_id in stop_ids:
                stop_reason = "eos"
                break
            if text_stream.push(token_id):
                stop_reason = "stop"
                break
            if len(new_ids) == max_new_tokens:
                stop_reason = "length"
                break
            if n_prompt + len(new_ids) > session.max_seq_len:
                stop_reason = "max_seq_len"
                break
            # The hot loop: one fixed-shape compiled step per token; sampling stays eager (it needs
            # the Python generator, and it is a few operations on one row of logits).
            step_start = time.perf_counter()
            logits = session.step(model, token, position, same_as_last=steps > 0)
            token = next_token(logits)
            position += 1
            decode_seconds += time.perf_counter() - step_start
            steps += 1

    text = text_stream.finish() if stop_reason != "stop" else text_stream.text
    return GenerationResult(
        text=text,
        token_ids=new_ids,
        prompt_tokens=n_prompt,
        new_tokens=len(new_ids),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        compile_seconds=compile_seconds,
        stop_reason=stop_reason,
        decode_steps=steps,
    )
