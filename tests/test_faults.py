"""Fault injection: a shard that vanishes mid-load, a full disk while writing traces or predictors,
pool/cache/engine open-close cycles (no leak): the error reaches the caller with context, nothing is
left half-registered or half-written, and the next call works."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch

import moert
from moert.api import load as load_mod
from moert.api.handle import _HANDLES
from moert.engine import runtime
from moert.models.tiny import random_predictor, save_tiny, tiny_model
from moert.predict import io as predict_io
from moert.trace import SequenceTrace, TraceMeta, TraceWriter
from moert.trace import store as trace_store


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tiny_model("deepseek_v2"), tmp_path_factory.mktemp("faults") / "m")


def test_a_shard_that_vanishes_mid_load(model_dir, tmp_path, monkeypatch):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    real_open = load_mod._open_shard
    seen = []

    def vanish_then_open(path):
        if seen:  # the index was read; the file goes before the weights are
            path.unlink(missing_ok=True)
        seen.append(path)
        return real_open(path)

    monkeypatch.setattr(load_mod, "_open_shard", vanish_then_open)
    handles = len(_HANDLES)
    with pytest.raises(FileNotFoundError, match="vanished while loading"):
        moert.load(d, cache_experts=0.5, device="cpu", progress=False)
    assert len(_HANDLES) == handles, "a failed load left a patch handle registered"
    monkeypatch.undo()
    model = moert.load(model_dir, cache_experts=0.5, device="cpu", progress=False)  # the next call works
    moert.handle_of(model).undo()


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _seq(i: int) -> SequenceTrace:
    ex = torch.arange(8, dtype=torch.int16).view(1, 2, 4).expand(2, 2, 4).clone()
    return SequenceTrace(i, torch.arange(2), ex, torch.zeros(2, dtype=torch.bool))


def test_a_full_disk_while_writing_a_trace_leaves_nothing(tmp_path, monkeypatch):
    meta = TraceMeta(model_type="deepseek_v2", layers=(1, 2), num_experts=16, top_k=4)
    out = tmp_path / "trace"
    calls = []
    from safetensors.torch import save_file as real_save

    def save_then_fail(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:  # the first shard is written, the second finds the disk full
            with open(path, "wb") as fh:
                fh.write(b"partial")
            _full_disk()
        real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr("safetensors.torch.save_file", save_then_fail)
    full = pytest.raises(OSError, match="trace shard .*shard_00001.safetensors failed .*free disk space")
    with full, TraceWriter(out, meta, shard_tokens=2) as w:
        for i in range(3):
            w.add(_seq(i))
    assert not out.exists(), f"a failed trace left {sorted(p.name for p in out.iterdir())}"
    monkeypatch.undo()
    with TraceWriter(out, meta, shard_tokens=2) as w:  # the next call works
        w.add(_seq(0))
    assert (out / trace_store.MANIFEST).is_file()


def test_a_full_disk_while_writing_a_predictor_leaves_nothing(tmp_path, monkeypatch):
    pred = random_predictor(tiny_model("deepseek_v2"))
    tensors, extra = pred.state()
    out = tmp_path / "pred.safetensors"

    def partial_then_fail(tensors, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        _full_disk()

    monkeypatch.setattr("safetensors.torch.save_file", partial_then_fail)
    with pytest.raises(OSError, match="predictor .*pred.safetensors failed .*free disk space"):
        predict_io.save_predictor(out, pred.meta, tensors, extra)
    assert list(tmp_path.iterdir()) == [], "a failed save left a file behind"
    monkeypatch.undo()
    predict_io.save_predictor(out, pred.meta, tensors, extra)
    assert predict_io.load_predictor(out).meta == pred.meta


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4


def test_open_close_cycles_do_not_leak():
    """1,000 pool/cache/engine lifecycles with a copy each: resident memory stays flat."""

    def cycle() -> None:
        pool = runtime.ExpertPool(2, 8, 1 << 16)
        cache = runtime.SlabCache(pool, 4, min_slots=2)
        engine = runtime.CopyEngine(cache, 2)
        engine.acquire(0, [1, 2])
        engine.release(0, [1, 2])
        engine.close()
        cache.close()
        pool.close()

    for _ in range(100):  # warm up allocator pools
        cycle()
    before = _rss_kib()
    for _ in range(1000):
        cycle()
    grown = _rss_kib() - before
    # each cycle maps 1 MiB of pool and 256 KiB of slots: a leak of either would add >= 1.2 GiB
    assert grown < 16 * 1024, f"resident memory grew by {grown} KiB over 1,000 open/close cycles"
