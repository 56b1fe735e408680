"""The host tier of ``moert.load(path, host_budget=...)``: experts read from the checkpoint's own files.

``host_budget`` (bytes, a string such as ``"16GiB"``, or a fraction of all routed experts) sets how
many expert slabs the pinned host pool holds (:func:`pool_capacity`). Every expert's bytes are
located once, here, from the safetensors headers: per part (gate, up or gate_up, down) a
``(file, offset, length, slab offset)`` row handed to the native pool (:func:`attach_sources`),
whose copy-engine threads ``pread`` them into a host slab when the expert is not resident (no
Python on that path). Expert bytes are read as they are in the file: a file dtype other than the
runtime dtype is refused (:func:`expert_parts` names both).

``read_ahead=k`` (k >= 1) starts SSD -> pool reads before the device copy is issued: every expert
that a plan or prefetch queues for a device copy, and every expert predicted for the first k + 1
rows of a plan (the layer and the k after it, for a predictor's plans) that is not on the device,
is read into the pool at once by the pool's reader threads (``csrc/include/moert/copy_engine.h``,
"Read-ahead"); a later copy of it waits on that read rather than reading again.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "HostTier",
    "host_tier",
    "pool_capacity",
    "parse_bytes",
    "read_header",
    "expert_parts",
    "attach_sources",
    "filesystem_of",
    "check_read_ahead",
    "POOL_POLICIES",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def parse_bytes(text: str) -> int:
    """``"16GiB"``, ``"512 MB"``, ``"1.5GB"``, ``"4096"`` -> bytes.

    Raises:
        ValueError: not a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"host_budget={text!r} is not a size; use bytes (an int), a string such as '16GiB' or '512MB' "
            "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), or a fraction of all experts in (0, 1]"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def pool_capacity(budget: Any, *, total: int, stride: int, top_k: int) -> int:
    """Host slabs for ``host_budget=budget``: a float in (0, 1] is a fraction of the ``total`` routed
    experts (rounded up), an int or a size string is bytes (``stride`` bytes per slab, rounded down).
    Capped at ``total``.

    Raises:
        ValueError: negative, zero, NaN, a fraction above 1, a bad string, or fewer slabs than one
            layer's ``top_k`` (the minimum, in slabs and bytes, is named).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise ValueError(f"host_budget={budget!r} must be bytes (int), a size string ('16GiB') or a fraction")
    if isinstance(budget, float):
        if not (math.isfinite(budget) and 0.0 < budget <= 1.0):
            raise ValueError(
                f"host_budget={budget!r} is not a fraction in (0, 1] of all routed experts; use e.g. 0.5, "
                "or bytes / a size string such as '16GiB'"
            )
        slabs = math.ceil(budget * total - 1e-9)
        what = f"{budget:g} of {total} experts"
    else:
        nbytes = parse_bytes(budget) if isinstance(budget, str) else budget
        if nbytes <= 0:
            raise ValueError(f"host_budget={budget!r} must be positive bytes (e.g. '16GiB')")
        slabs = nbytes // stride
        what = f"{nbytes} bytes / {stride}-byte slabs"
    if slabs < top_k:
        raise ValueError(
            f"host_budget={budget!r} gives {slabs} host slabs ({what}), fewer than one layer's top-k ({top_k}); "
            f"use at least {top_k * stride} bytes ({top_k} slabs) or a fraction >= {top_k / total:.4f}"
        )
    return min(slabs, total)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of a safetensors file (``header[key]``: dtype, shape, data_offsets).

    Raises:
        ValueError: not a safetensors file (too short, a bad header length or JSON), naming the file.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            size = os.fstat(f.fileno()).st_size
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit the {size}-byte file")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ValueError(
            f"checkpoint file {path} has no readable safetensors header ({exc}); it is truncated or corrupt: "
            "copy or download it again"
        ) from None
    return 8 + n, header


def expert_parts(
    files: list[Path], index: Any, moe_ids: list[int], num_experts: int, layout: Any
) -> tuple[list[Path], dict[tuple[int, int], np.ndarray]]:
    """Where each routed expert's bytes are: ``(files, {(ordinal, e): int64 (n, 4)})``, rows of
    ``(file id, file offset, length, slab offset)``; file ids index ``files``.

    Raises:
        ValueError: a tensor whose dtype is not the runtime dtype (``layout.dtype``), or whose shape is
            not the one the model expects.
    """
    headers = {f: read_header(f) for f in files}
    fid = {f: i for i, f in enumerate(files)}
    inter, hid, isz = layout.intermediate, layout.hidden, layout.itemsize
    per = {
        "gate": ((inter, hid), 0),
        "up": ((inter, hid), inter * hid * isz),
        "gate_up": ((2 * inter, hid), 0),
    }
    per["down"] = ((hid, inter), layout.down_offset)
    out: dict[tuple[int, int], np.ndarray] = {}

    def locate(key: str, shape: tuple[int, ...], expert: int | None) -> tuple[int, int, int]:
        f = index.where[key]
        start, header = headers[f]
        meta = header[key]
        want = shape if expert is None else (num_experts, *shape)
        if _DTYPES.get(meta["dtype"]) != layout.dtype:
            raise ValueError(
                f"{f}: {key} is {meta['dtype']} but the model runs in {str(layout.dtype).replace('torch.', '')}; "
                "host_budget= reads expert bytes as they are in the files (no conversion): pass "
                f"dtype={str(_DTYPES.get(meta['dtype'], meta['dtype'])).replace('torch.', '')!r} to moert.load, "
                "or drop host_budget to convert while loading"
            )
        if tuple(meta["shape"]) != want:
            raise ValueError(f"{f}: {key} has shape {tuple(meta['shape'])}, the model expects {want}")
        begin, end = meta["data_offsets"]
        length = (end - begin) if expert is None else (end - begin) // num_experts
        offset = start + begin + (0 if expert is None else expert * length)
        return fid[f], offset, length

    for ordinal, layer in enumerate(moe_ids):
        fused = index.experts.get((layer, None), {})
        for e in range(num_experts):
            parts = index.experts.get((layer, e))
            if parts and "down" in parts:
                rows = [(*locate(k, per[p][0], None), per[p][1]) for p, k in sorted(parts.items())]
            else:
                rows = [(*locate(fused[p], per[p][0], e), per[p][1]) for p in ("gate_up", "down")]
            out[(ordinal, e)] = np.asarray(rows, dtype=np.int64)
    return files, out


def attach_sources(pool: Any, files: list[Path], parts: dict[tuple[int, int], np.ndarray]) -> None:
    """Registers the files (their size, mtime and inode as now) and every expert's parts with the pool."""
    ids = [pool.add_file(str(f)) for f in files]
    assert ids == list(range(len(files)))
    for (ordinal, e), rows in parts.items():
        pool.set_source(ordinal, e, rows)


def filesystem_of(path: str | Path, mounts: str = "/proc/mounts") -> dict[str, Any]:
    """``{"mount", "fstype", "read_only", "network"}`` of the filesystem holding ``path`` (from
    ``mounts``; fields None where it cannot be read). ``read_only``: mounted ro, or ``path`` not
    writable by this process."""
    target = os.path.realpath(path) if mounts == "/proc/mounts" else str(path)
    best: tuple[str, str, str] | None = None
    try:
        with open(mounts) as f:
            for line in f:
                dev, mount, fstype, opts = line.split()[:4]
                mount = mount.replace("\\040", " ")
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and (
                    best is None or len(mount) > len(best[0])
                ):
                    best = (mount, fstype, opts)
    except OSError:
        pass
    if best is None:
        return {"mount": None, "fstype": None, "read_only": not os.access(target, os.W_OK), "network": None}
    mount, fstype, opts = best
    network = fstype in {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "sshfs",
        "fuse.sshfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
    }
    read_only = "ro" in opts.split(",") or (os.path.exists(target) and not os.access(target, os.W_OK))
    return {"mount": mount, "fstype": fstype, "read_only": read_only, "network": network}


class HostTier:
    """What ``moert.load`` needs to build and fill a pool over the checkpoint files.

    Attributes:
        capacity: host slabs (``total`` when the budget covers every expert: an untiered pool).
        total: routed experts over all MoE layers.
        policy, read_mode: the pool's eviction and file reads.
        files, parts: :func:`expert_parts`'s.
        read_ahead: layers of predictions read ahead into the pool (0: off; see the module).
    """

    def __init__(
        self,
        capacity: int,
        total: int,
        policy: str,
        read_mode: str,
        files: list[Path],
        parts: dict,
        read_ahead: int = 0,
    ) -> None:
        self.capacity, self.total, self.policy, self.read_mode = capacity, total, policy, read_mode
        self.files, self.parts, self.read_ahead = files, parts, read_ahead
        self.pool: Any = None

    def attach(self, handle: Any) -> None:
        """After loading: ``handle.load_report["host_tier"]`` (:meth:`report`), and the copy engine's
        read-ahead set to ``read_ahead`` layers (0: off)."""
        handle.load_report["host_tier"] = self.report(handle.pool_bytes)
        handle.offloader.engine.read_ahead = self.read_ahead

    def make_pool(self, backend: str, num_layers: int, num_experts: int, slab_bytes: int, device: str) -> Any:
        """``moert.engine.backends.make_pool``'s signature: the (tiered) runtime pool."""
        from moert.engine.pool import ExpertPool

        self.pool = ExpertPool(
            num_layers,
            num_experts,
            slab_bytes,
            pin=device.startswith("cuda"),
            capacity=self.capacity,
            policy=self.policy,
            read_mode=self.read_mode,
        )
        return self.pool

    def filler(self, bar: Any) -> Any:
        """``install``'s ``fill(pool)``: registers the sources, then reads the first ``capacity``
        experts (layer by layer) into the pool in C++; nothing else is read now."""

        def fill(pool: Any) -> None:
            attach_sources(pool, self.files, self.parts)
            for n, (ordinal, e) in enumerate(sorted(self.parts)):
                if n < self.capacity:
                    pool.load(ordinal, e)
                bar.update(1)
            pool.reset_stats()

        return fill

    def report(self, pool_bytes: int) -> dict[str, Any]:
        """The ``load_report["host_tier"]`` entry."""
        fs = filesystem_of(self.files[0])
        return {
            "capacity": self.capacity,
            "all_experts": self.total,
            "tiered": self.capacity < self.total,
            "pool_bytes": pool_bytes,
            "policy": self.policy,
            "read_mode": self.read_mode,
            "read_ahead": self.read_ahead,
            "filesystem": fs,
        }


#: the host pool's eviction policies (native; see the README for why not the Python Policy contract)
POOL_POLICIES = ("lru", "lfu", "fifo")


def check_read_ahead(read_ahead: Any) -> int:
    """``read_ahead`` as an int in 0..64.

    Raises:
        ValueError: not an int (bools refused) or out of range, naming the value.
    """
    if isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or not 0 <= read_ahead <= 64:
        raise ValueError(
            f"read_ahead={read_ahead!r} must be an int in 0..64: the layers of predictions read ahead "
            "into the host pool (0: off; 1 reads the predicted experts of the next layer)"
        )
    return read_ahead


def host_tier(
    budget: Any,
    policy: str,
    read_mode: str,
    files: list[Path],
    index: Any,
    moe_ids: list[int],
    adapter: Any,
    layout: Any,
    cfg: Any,
    read_ahead: Any = 0,
) -> HostTier | None:
    """Checks ``host_budget`` and its options against the model and config, locates every expert
    (None without a budget).

    Raises:
        ValueError: a bad budget (:func:`pool_capacity`), policy, read mode or ``read_ahead``; a
            backend other than ``"runtime"``; ``cpu_experts`` (host compute needs every expert
            resident); a file dtype that differs from the runtime dtype; ``read_ahead`` without a
            budget.
    """
    if budget is None:
        if read_ahead != 0:
            raise ValueError(
                f"read_ahead={read_ahead!r} needs host_budget= (it reads experts from the files into a "
                "host pool smaller than all experts); pass host_budget, or drop read_ahead"
            )
        return None
    if policy not in POOL_POLICIES:
        raise ValueError(
            f"pool_policy={policy!r} is not one of {', '.join(POOL_POLICIES)} (the host tier's eviction)"
        )
    read_ahead = check_read_ahead(read_ahead)
    if read_mode not in ("pread", "mmap"):
        raise ValueError(f"read_mode={read_mode!r} is not one of pread, mmap")
    if cfg.backend != "runtime":
        raise ValueError(
            f"host_budget= needs backend='runtime' (the native pool); backend={cfg.backend!r} has none"
        )
    if cfg.cpu_experts:
        raise ValueError(
            "host_budget= with cpu_experts=True is not supported: host compute reads experts in place "
            "from a pool that holds them all; drop one of the two"
        )
    total = len(moe_ids) * adapter.num_experts
    stride = -(-layout.slab_bytes // 256) * 256
    capacity = pool_capacity(budget, total=total, stride=stride, top_k=adapter.top_k)
    files, parts = expert_parts(files, index, moe_ids, adapter.num_experts, layout)
    return HostTier(capacity, total, policy, read_mode, files, parts, read_ahead)
