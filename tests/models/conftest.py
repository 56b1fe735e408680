"""Session-scoped tiny reference models, one per routing variant, built on first use."""

from __future__ import annotations

import pytest

from moert.models.tiny import Reference, single_thread


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    cache: dict[str, Reference] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(name: str) -> Reference:
        if name not in cache:
            cache[name] = Reference(name, root)
        return cache[name]

    return get


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    with single_thread():
        yield
