"""Kernel tests run Triton's interpreter on CPU: ``TRITON_INTERPRET=1`` for their duration only.

Triton reads the flag when a function is decorated, so the fixture sets it and drops any kernel
module imported without it before the tests import them, then restores the environment and
drops the interpreted modules again: nothing else in the pytest process sees either, and a GPU
test later in the same process gets compiled kernels.
"""

from __future__ import annotations

import os
import sys

import pytest

_KERNEL_MODULES = ("moert.kernels._predictive_norm_kernel",)


def _drop_kernel_modules() -> None:
    for name in _KERNEL_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def triton_interpret():
    """Run this module's kernels in the Triton interpreter (CPU tensors)."""
    # Triton itself is imported in its normal mode first, whatever the order of collection: the
    # kernels call only builtins, which the interpreter patches, so only they are interpreted.
    import triton  # noqa: F401

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _drop_kernel_modules()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
        _drop_kernel_modules()
