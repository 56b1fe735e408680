"""The fake CUDA driver as fixtures: ``fake_cuda`` points moert at it (``MOERT_LIBCUDA``) with two
fake devices for the test's duration; a test parametrized with ``device="fake-cuda"`` gets it
without asking (its cache is then ``cuda:0``, the real CUDA backend on the fake driver)."""

from __future__ import annotations

import pytest
from fake_cuda import loaded

from moert.engine.runtime import SimTiming


@pytest.fixture(scope="session")
def fake_cuda_library():
    try:
        return loaded()
    except Exception as exc:  # noqa: BLE001 - a missing compiler is a setup problem, said plainly
        pytest.fail(f"could not build the fake CUDA driver (tests/fake_cuda/fake_cuda.cc): {exc}")


@pytest.fixture
def fake_cuda(fake_cuda_library, monkeypatch):
    """The fake driver, loaded by moert for this test: 2 devices, CUDA 13.0, default timing."""
    from moert import _C

    if not _C.cuda_compiled():
        pytest.skip("moert._C was built with MOERT_CUDA=OFF (make sanitize does): no CUDA backend to test")
    monkeypatch.setenv("MOERT_LIBCUDA", str(fake_cuda_library.path))
    monkeypatch.setenv("FAKE_CUDA_DEVICES", "2")
    monkeypatch.delenv("FAKE_CUDA_DRIVER_VERSION", raising=False)
    monkeypatch.delenv("FAKE_CUDA_INIT_ERROR", raising=False)
    fake_cuda_library.set_timing(SimTiming())
    yield fake_cuda_library
    fake_cuda_library.lib.fakecu_synchronize_all()


@pytest.fixture(autouse=True)
def _fake_cuda_for_device_param(request):
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("device") == "fake-cuda":
        yield request.getfixturevalue("fake_cuda")
    else:
        yield None
