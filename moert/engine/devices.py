"""Devices of the native runtime and the device model: the extension's loader (:func:`native_module`),
:func:`backends`, device names (:func:`parse_device`, :func:`tensor_device`) and the ``"sim"``
device model (:class:`SimTiming`, :class:`SimDevice`).

Importing it touches no CUDA: the CUDA driver (``libcuda.so.1``, or ``$MOERT_LIBCUDA``) is first loaded
and asked for devices by :func:`backends`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    from moert import _C
except ImportError as _err:  # the extension is built by `make build`; fail at use, not import
    _C = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

__all__ = ["DEVICES", "SimDevice", "SimTiming", "backends", "native_module", "parse_device", "tensor_device"]

#: device kinds; "cuda" also as "cuda:N"
DEVICES = ("cpu", "sim", "cuda")


def native_module() -> Any:
    """The extension ``moert._C``; RuntimeError saying how to build it when it is missing."""
    if _C is None:
        raise RuntimeError(
            f"moert._C is not built ({_IMPORT_ERROR}); run `make build` "
            "(or `pip install --no-build-isolation -e .`)"
        )
    return _C


def backends() -> dict[str, dict[str, Any]]:
    """Which backends were compiled and which can run here.

    Returns:
        ``{"cpu": {"compiled", "can_run", "reason"}, "cuda": {"compiled", "can_run", "reason",
        "device_count", "device_name", "driver_version", "driver_library"}}``; ``reason`` says why a
        backend cannot run (e.g. ``"no CUDA device: the CUDA driver is too old: ..."``);
        ``driver_version`` is cuDriverGetVersion's (13000 for CUDA 13.0; 0 when no driver loaded).
    """
    c = native_module()
    compiled = bool(c.cuda_compiled())
    probe = c.cuda_probe()
    can_run = compiled and probe["device_count"] > 0
    return {
        "cpu": {"compiled": True, "can_run": True, "reason": ""},
        "sim": {"compiled": True, "can_run": True, "reason": ""},
        "cuda": {
            "compiled": compiled,
            "can_run": can_run,
            "reason": "" if can_run else probe["message"],
            "device_count": int(probe["device_count"]),
            "device_name": probe["message"] if can_run else "",
            "driver_version": int(probe.get("driver_version", 0)),
            "driver_library": str(probe.get("library", "")),
        },
    }


def parse_device(device: str | torch.device) -> tuple[str, int]:
    """``(kind, index)`` of a cache device: ``"cpu"`` -> ("cpu", -1), ``"sim"`` -> ("sim", 0),
    ``"cuda:N"`` -> ("cuda", N), ``"cuda"`` -> ("cuda", torch's current device; 0 when CUDA cannot
    run, so that the native layer reports why).

    Raises:
        ValueError: any other name.
    """
    text = str(device)
    kind, _, index = text.partition(":")
    if kind in ("cpu", "sim") and not index:
        return kind, -1 if kind == "cpu" else 0
    if kind == "cuda" and (not index or index.isdigit()):
        if index:
            return "cuda", int(index)
        return "cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0
    raise ValueError(f"unknown device {device!r}; use one of cpu, sim, cuda, cuda:N")


def tensor_device(device: str) -> torch.device:
    """Where the tensors computed with a cache on ``device`` live: ``cuda:N`` for CUDA, else the
    host (``"sim"`` models the device's protocol, while torch computes on the calling thread: the
    model's stream handle 0)."""
    kind, index = parse_device(device)
    return torch.device("cuda", index) if kind == "cuda" else torch.device("cpu")


@dataclass(frozen=True)
class SimTiming:
    """The device model's timing (``device="sim"``; csrc/include/moert/backend_sim.h).

    Attributes:
        bandwidth_gbs: each copy stream's bandwidth, 1e9 bytes/s.
        latency_us: latency of each copy.
        jitter_us: each operation on a stream starts up to this much later (uniform, seeded):
            randomises the interleavings of streams.
        seed: seed of the jitter (each stream draws from its own generator).
    """

    bandwidth_gbs: float = 25.0
    latency_us: float = 10.0
    jitter_us: float = 0.0
    seed: int = 0

    @classmethod
    def from_env(cls) -> SimTiming:
        """``MOERT_SIM_BANDWIDTH_GBS``, ``MOERT_SIM_LATENCY_US``, ``MOERT_SIM_JITTER_US``, ``MOERT_SIM_SEED``."""
        from moert import envs

        return cls(**envs.sim_timing())

    def copy_seconds(self, nbytes: int) -> float:
        """Modelled time of one copy of ``nbytes`` (without jitter)."""
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbs * 1e9)


class SimDevice:
    """The device model behind a ``device="sim"`` cache: its streams, events, clock and modelled
    kernels, to drive the CUDA protocol from tests and benchmarks (``SlabCache.sim_device()``).

    Stream handles are ints; 0 is the calling thread (records complete at once, waits block).
    Times are modelled device seconds (``now()``). Holds the cache alive.
    """

    def __init__(self, native: Any) -> None:
        self._c = native

    @property
    def timing(self) -> SimTiming:
        return SimTiming(**self._c.config)

    def now(self) -> float:
        """The device clock, seconds since the device was made."""
        return self._c.now()

    def copy_seconds(self, nbytes: int) -> float:
        """Modelled time of one copy of ``nbytes`` (without jitter)."""
        return self._c.copy_seconds(int(nbytes))

    def create_stream(self) -> int:
        """A new stream (its own FIFO and thread); e.g. the modelled compute stream."""
        return self._c.create_stream()

    def destroy_stream(self, stream: int) -> None:
        """Runs what is queued on ``stream``, then ends it."""
        self._c.destroy_stream(int(stream))

    def synchronize(self, stream: int | None = None) -> None:
        """Blocks until ``stream`` (None: every stream) has run everything queued on it."""
        self._c.synchronize(None if stream is None else int(stream))

    def event(self, timing: bool = False) -> Any:
        """A new event: ``record(stream)``, ``wait(stream)``, ``query()``, ``synchronize()``,
        ``seconds_since(start)`` (timing events only: modelled seconds between two records)."""
        return self._c.create_event(bool(timing))

    def enqueue_read(self, stream: int, address: int, nbytes: int, seconds: float = 0.0) -> int:
        """A modelled kernel on ``stream`` that reads ``nbytes`` of slot memory at ``address`` for
        ``seconds``, checksumming them when it starts and when it ends; returns a ticket for
        ``read_result``. ValueError when the range is not inside the cache's slots."""
        return self._c.enqueue_read(int(stream), int(address), int(nbytes), float(seconds))

    def read_result(self, ticket: int) -> dict[str, Any]:
        """``done``, ``start_s``, ``end_s`` (device time), ``checksum_start``, ``checksum_end``."""
        return self._c.read_result(int(ticket))

    def enqueue_sleep(self, stream: int, seconds: float) -> None:
        """A modelled kernel that only holds ``stream`` for ``seconds``."""
        self._c.enqueue_sleep(int(stream), float(seconds))

    def enqueue_copy(self, stream: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A modelled copy (e.g. device-to-host of predicted ids) of ``src``'s bytes into ``dst``,
        taking the modelled copy time; both contiguous host tensors of the same size that stay
        alive until the stream has run it."""
        for name, t in (("dst", dst), ("src", src)):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"enqueue_copy: {name} must be a contiguous host tensor, got {t.device}")
        nbytes = dst.numel() * dst.element_size()
        if src.numel() * src.element_size() != nbytes:
            raise ValueError(f"enqueue_copy: dst has {nbytes} bytes, src {src.numel() * src.element_size()}")
        self._c.enqueue_copy(int(stream), dst.data_ptr(), src.data_ptr(), nbytes)

    @staticmethod
    def checksum(data: torch.Tensor) -> int:
        """The checksum ``enqueue_read`` takes, of a contiguous host tensor's bytes."""
        if data.device.type != "cpu" or not data.is_contiguous():
            raise ValueError(f"checksum: need a contiguous host tensor, got {data.device}")
        return native_module().SimDevice.checksum(data.data_ptr(), data.numel() * data.element_size())
