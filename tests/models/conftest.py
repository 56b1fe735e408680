"""Session-scoped tiny reference models, one per routing variant, built on first use."""

from __future__ import annotations

import pytest

from moert.testing import Reference


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
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core CI box spinning
    OpenMP workers slow them down by an order of magnitude."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
