"""The fake CUDA driver (tests/fake_cuda/fake_cuda.cc): built here with the system compiler, loaded
by moert through ``MOERT_LIBCUDA`` and by the tests through ctypes (the same library, so one state).

:class:`FakeDevice` has the interface of :class:`moert.engine.runtime.SimDevice` that the protocol
tests use (streams, events, modelled kernels checksumming device memory), so the same tests drive
the real CUDA backend (``device="cuda:N"``) on it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from moert.engine.runtime import SimTiming

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "fake_cuda" / "fake_cuda.cc"

__all__ = ["FakeCuda", "FakeDevice", "build", "loaded"]


def build() -> Path:
    """The fake driver's shared library, compiled once per source version into build/fake_cuda/."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = ROOT / "build" / "fake_cuda" / f"libfakecuda-{digest}.so"
    if out.exists():
        return out
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++/g++) to build the fake CUDA driver; set CXX")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, "-std=c++17", "-O1", "-g", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.replace(out)  # atomic: parallel test workers never load a half-written library
    return out


@functools.cache
def loaded() -> FakeCuda:
    """The fake driver, built and loaded once per process."""
    return FakeCuda(build())


class FakeCuda:
    """The loaded fake driver: timing, counters and devices."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = self.lib = ctypes.CDLL(str(path))
        p, i64, u64, f64, sz = (
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_uint64,
            ctypes.c_double,
            ctypes.c_size_t,
        )
        lib.fakecu_set_timing.argtypes = [f64, f64, f64, u64]
        lib.fakecu_copy_seconds.argtypes, lib.fakecu_copy_seconds.restype = [sz], f64
        lib.fakecu_checksum.argtypes, lib.fakecu_checksum.restype = [p, sz], u64
        lib.fakecu_stream.argtypes = [ctypes.c_int, ctypes.POINTER(p)]
        lib.fakecu_event.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.POINTER(p)]
        lib.fakecu_primary_context.argtypes, lib.fakecu_primary_context.restype = [ctypes.c_int], p
        lib.fakecu_enqueue_read.argtypes = [p, p, sz, f64, ctypes.POINTER(i64)]
        lib.fakecu_read_result.argtypes = [
            i64,
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(f64),
            ctypes.POINTER(u64),
        ]
        lib.fakecu_enqueue_sleep.argtypes = [p, f64]
        lib.fakecu_enqueue_copy.argtypes = [p, p, p, sz]
        lib.fakecu_stats.argtypes = [ctypes.POINTER(i64)]
        lib.fakecu_synchronize_default.argtypes = [ctypes.c_int]
        lib.fakecu_pointer_device.argtypes = [p]
        lib.cuEventRecord.argtypes = [p, p]
        lib.cuStreamWaitEvent.argtypes = [p, p, ctypes.c_uint]
        lib.cuStreamDestroy_v2.argtypes = [p]
        lib.cuStreamSynchronize.argtypes = [p]
        lib.cuEventQuery.argtypes = [p]
        lib.cuEventSynchronize.argtypes = [p]
        lib.cuEventDestroy_v2.argtypes = [p]
        lib.cuEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), p, p]
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(p)]
        lib.cuCtxSetCurrent.argtypes = [p]

    def call(self, name: str, *args: Any) -> None:
        """A fake driver call; AssertionError naming the call and its CUresult when it fails."""
        err = getattr(self.lib, name)(*args)
        assert err == 0, f"{name} failed with CUresult {err}"

    def set_timing(self, timing: SimTiming) -> None:
        """Copy bandwidth, latency and per-operation jitter (seeded), as the device model's."""
        self.lib.fakecu_set_timing(timing.bandwidth_gbs, timing.latency_us, timing.jitter_us, timing.seed)

    def stats(self) -> dict[str, int]:
        """copies, memsets, allocations and registered ranges alive, streams alive, ctx_errors."""
        out = (ctypes.c_int64 * 6)()
        self.lib.fakecu_stats(out)
        return dict(zip(("copies", "memsets", "allocs", "registered", "streams", "ctx_errors"), out))

    def current_context(self) -> int | None:
        """This thread's current context (None: none)."""
        ctx = ctypes.c_void_p()
        self.call("cuCtxGetCurrent", ctypes.byref(ctx))
        return ctx.value

    def set_current_context(self, ctx: int | None) -> None:
        self.call("cuCtxSetCurrent", ctx)

    def primary_context(self, device: int) -> int:
        return self.lib.fakecu_primary_context(device)

    def device(self, index: int) -> FakeDevice:
        return FakeDevice(self, index)


class FakeEvent:
    """A fake driver event (SimDevice.event's interface)."""

    def __init__(self, fake: FakeCuda, index: int, timing: bool) -> None:
        self._f = fake
        self.handle = ctypes.c_void_p()
        fake.call("fakecu_event", index, 0x1 | (0 if timing else 0x2), ctypes.byref(self.handle))

    def record(self, stream: int) -> None:
        self._f.call("cuEventRecord", self.handle, stream)

    def wait(self, stream: int) -> None:
        self._f.call("cuStreamWaitEvent", stream, self.handle, 0)

    def query(self) -> bool:
        return self._f.lib.cuEventQuery(self.handle) == 0

    def synchronize(self) -> None:
        self._f.call("cuEventSynchronize", self.handle)

    def seconds_since(self, start: FakeEvent) -> float:
        ms = ctypes.c_float()
        self._f.call("cuEventElapsedTime", ctypes.byref(ms), start.handle, self.handle)
        return ms.value * 1e-3


class FakeDevice:
    """Device ``index`` of the fake driver with SimDevice's interface (streams are CUstream ints)."""

    def __init__(self, fake: FakeCuda, index: int) -> None:
        self._f, self.index = fake, index
        self._streams: list[int] = []

    def copy_seconds(self, nbytes: int) -> float:
        return self._f.lib.fakecu_copy_seconds(int(nbytes))

    def create_stream(self) -> int:
        s = ctypes.c_void_p()
        self._f.call("fakecu_stream", self.index, ctypes.byref(s))
        self._streams.append(s.value)
        return s.value

    def destroy_stream(self, stream: int) -> None:
        self._f.call("cuStreamDestroy_v2", stream)
        self._streams.remove(stream)

    def synchronize(self, stream: int | None = None) -> None:
        if stream is None:
            self._f.lib.fakecu_synchronize_all()
        else:
            self._f.call("cuStreamSynchronize", stream)

    def event(self, timing: bool = False) -> FakeEvent:
        return FakeEvent(self._f, self.index, timing)

    def enqueue_read(self, stream: int, address: int, nbytes: int, seconds: float = 0.0) -> int:
        ticket = ctypes.c_int64()
        self._f.call("fakecu_enqueue_read", stream, address, nbytes, float(seconds), ctypes.byref(ticket))
        return ticket.value

    def read_result(self, ticket: int) -> dict[str, Any]:
        done, times, sums = ctypes.c_int(), (ctypes.c_double * 2)(), (ctypes.c_uint64 * 2)()
        self._f.call("fakecu_read_result", ticket, ctypes.byref(done), times, sums)
        return {
            "done": bool(done.value),
            "start_s": times[0],
            "end_s": times[1],
            "checksum_start": sums[0],
            "checksum_end": sums[1],
        }

    def enqueue_sleep(self, stream: int, seconds: float) -> None:
        self._f.call("fakecu_enqueue_sleep", stream, float(seconds))

    def enqueue_copy(self, stream: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        nbytes = dst.numel() * dst.element_size()
        assert src.numel() * src.element_size() == nbytes
        self._f.call("fakecu_enqueue_copy", stream, dst.data_ptr(), src.data_ptr(), nbytes)

    def close(self) -> None:
        for s in list(self._streams):
            self.destroy_stream(s)
