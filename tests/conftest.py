"""Shared fixtures of the torch_bitnet test suite.

* ``isa``: runs a test once per SIMD path (scalar, avx2, avx512, amx) that this CPU supports, with
  the kernels switched to that path for the whole test. The kernels of every path must
  agree bit for bit with ``torch_bitnet.reference``, so each property test is repeated on
  each path rather than only on the fastest one the CPU picks at import.
* Hypothesis profiles: ``ci`` (the default) keeps the whole suite at a few minutes on two
  cores; ``thorough`` runs many more examples (``HYPOTHESIS_PROFILE=thorough pytest ...``).
* Saved decode steps (:mod:`torch_bitnet.step_cache`) go to a directory of this test run
  (``BITNET_STEP_CACHE_DIR``, removed at the end, inherited by the subprocesses tests start), so
  a run neither reads steps an earlier one saved nor leaves any behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings

import torch_bitnet

# The ``isa`` fixture is function scoped and Hypothesis runs all examples of a test inside
# one fixture instance. That is what we want here (the fixture only selects a kernel path
# and holds no per-example state), so the health check warning about it is suppressed.
_COMMON = dict(
    deadline=None,  # kernels + reference on 2 cores vary a lot in time; never fail on timing
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,  # a failure prints the @reproduce_failure blob
)
# derandomize: the same examples on every run, so a CI failure reproduces locally.
settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_STEP_CACHE_DIR = tempfile.mkdtemp(prefix="torch_bitnet_steps_")
os.environ["BITNET_STEP_CACHE_DIR"] = _STEP_CACHE_DIR


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_STEP_CACHE_DIR, ignore_errors=True)


def _forced_isa(name: str):
    if name not in torch_bitnet.available_isas():
        pytest.skip(f"this CPU cannot run the {name} path")
    with torch_bitnet.use_isa(name):
        yield name


# avx512vbmi differs from avx512 only in its 5-trit weight kernels: tests of everything else use
# `isa`, tests of 5-trit weights `isa5`. amx (avx512vbmi with the AMX prefill products) is in both.
@pytest.fixture(params=["scalar", "avx2", "avx512", "amx"])
def isa(request):
    """Run the test with the kernels forced onto one SIMD path (skipped if the CPU lacks it)."""
    yield from _forced_isa(request.param)


@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512vbmi", "amx"])
def isa5(request):
    """As ``isa``, over every path including avx512vbmi (the 5-trit weight kernels)."""
    yield from _forced_isa(request.param)
