"""Kernel tests choose, per module, whether Triton interprets (CPU tensors) or compiles the kernels.

Triton reads ``TRITON_INTERPRET`` when a function is decorated, so each fixture sets or clears
the flag and drops the kernel modules before the tests import them, then restores the
environment and drops them again: nothing else in the pytest process sees the flag, and a GPU
test later in the same process gets compiled kernels. Triton itself is imported in its normal
mode first, whatever the order of collection: the kernels call only builtins, which the
interpreter patches, so only they are interpreted.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

_KERNEL_MODULES = ("moert.kernels._predictive_norm_kernel", "moert.kernels._prefetch_plan_kernel")


def _drop_kernel_modules() -> None:
    for name in _KERNEL_MODULES:
        sys.modules.pop(name, None)
        # `from moert.kernels import _x` reads the package attribute, not sys.modules.
        package, _, leaf = name.rpartition(".")
        if hasattr(sys.modules.get(package), leaf):
            delattr(sys.modules[package], leaf)


@contextlib.contextmanager
def _interpreter(on: bool):
    import triton  # noqa: F401

    previous = os.environ.pop("TRITON_INTERPRET", None)
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    _drop_kernel_modules()
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
        _drop_kernel_modules()


@pytest.fixture(scope="module")
def triton_interpret():
    """Run this module's kernels in the Triton interpreter (CPU tensors)."""
    with _interpreter(True):
        yield


@pytest.fixture(scope="module")
def triton_compiled():
    """Compile this module's kernels for GPUs (ahead of time: no device needed)."""
    with _interpreter(False):
        yield
