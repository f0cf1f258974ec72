"""The two error tests each op test module runs over its own ``ERROR_CASES`` table.

A table row is ``(id, call, exception type, message regex)``; ``call`` invokes an op with one
bad argument. Every case runs eagerly (the C++ checks) and under ``FakeTensorMode`` (the fake
kernels, which repeat every check, so compiled code fails like eager code).
"""

from __future__ import annotations

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode


def error_tests(cases):
    """``(test_errors_eager, test_errors_fake_kernels)`` parametrized over ``cases``."""
    over_cases = pytest.mark.parametrize("call,exc,match", [c[1:] for c in cases], ids=[c[0] for c in cases])

    @over_cases
    def test_errors_eager(call, exc, match):
        with pytest.raises(exc, match=match):
            call()

    @over_cases
    def test_errors_fake_kernels(call, exc, match):
        with FakeTensorMode(), pytest.raises(exc, match=match):
            call()

    return test_errors_eager, test_errors_fake_kernels
