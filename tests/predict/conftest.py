"""Fixtures for tests/predict: synthetic traces with planted structure (see predict_synth.py)."""

from __future__ import annotations

import pytest
from predict_synth import make_trace, write_trace


@pytest.fixture(scope="session")
def synth():
    return make_trace()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory, synth):
    return write_trace(tmp_path_factory.mktemp("trace") / "synth", *synth)
