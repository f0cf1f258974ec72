"""Which SIMD code path the kernels run.

At import the fastest path the CPU supports is chosen (``amx`` needs what ``avx512vbmi`` needs
plus AMX-TILE, AMX-INT8 and the operating system's permission to use the tiles, which Linux
grants on request; ``avx512vbmi`` needs AVX-512 F/BW/VL/VNNI and VBMI, ``avx512`` the same
without VBMI, ``avx2`` needs AVX2 and FMA; ``scalar`` is portable C++ and always present).
``avx512vbmi`` is ``avx512`` plus the kernels that stream 5-trit weights (``packing.py``) in
decode and unpack 3-trit weights for prefill (``avx512`` decodes 3-trit weights too); the
paths without them multiply such weights by unpacking them to the 2-bit format first, which is
correct but slower than keeping the model in the 2-bit format. ``amx`` is ``avx512vbmi`` with the ternary products of 12 tokens or more
(prefill), and the int8 table's of 16 or more, on AMX tiles: 16 x 16 x 64 int8 multiply-adds
per instruction.
The environment variable ``TORCH_BITNET_ISA=scalar|avx2|avx512|avx512vbmi|amx`` forces one path at
import; :func:`set_isa` / :func:`use_isa` switch at run time (tests use them to run every
path on one machine). Asking for a path the CPU lacks raises ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import ops  # noqa: F401  (loads the extension)

__all__ = ["ISAS", "ENV_VAR", "available_isas", "get_isa", "set_isa", "use_isa"]

#: every path the extension knows, slowest first
ISAS = ("scalar", "avx2", "avx512", "avx512vbmi", "amx")
#: environment variable that forces a path at import
ENV_VAR = "TORCH_BITNET_ISA"


def available_isas() -> list[str]:
    """The paths this CPU (and this build) can run, slowest first."""
    return list(torch.ops.bitnet.supported_isas())


def get_isa() -> str:
    """The path the kernels use now."""
    return torch.ops.bitnet.get_isa()


def set_isa(name: str) -> None:
    """Make every kernel use path ``name`` (one of :data:`ISAS`) from now on.

    Raises:
        ValueError: ``name`` is not a known path.
        RuntimeError: this CPU cannot run that path.
    """
    if name not in ISAS:
        raise ValueError(f"torch_bitnet: unknown ISA {name!r}; choose one of {', '.join(ISAS)}")
    torch.ops.bitnet.set_isa(name)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Context manager: run the kernels on path ``name`` inside the block, then restore."""
    previous = get_isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(previous)


def _apply_env() -> None:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if not forced:
        return
    if forced not in ISAS:
        raise ValueError(f"torch_bitnet: {ENV_VAR}={forced!r} is not one of {', '.join(ISAS)}")
    try:
        set_isa(forced)
    except RuntimeError as err:
        raise RuntimeError(f"torch_bitnet: {ENV_VAR}={forced} was requested but {err}") from err


_apply_env()
