"""The native call counter of ``bench/bench_overhead.py``: every call into ``moert._C`` made while
active, counted by wrappers and witnessed by ``sys.setprofile``, and its self-check on a known sequence
of native calls."""

from __future__ import annotations

import sys
import types
from collections import Counter
from typing import Any

import numpy as np

from moert.engine import runtime


class NativeCallCounter:
    """Counts every call into ``moert._C`` made while active (a context manager); ``counts`` maps
    ``"Owner.name"`` (``"Owner.name (get)"`` for a property read, ``"name"`` for a module function) to
    the number of calls.

    Why not a profiler alone: a pybind11 method is a ``builtin_function_or_method`` whose
    ``__self__`` is pybind11's function record (not the moert object) and whose ``__qualname__``
    names that record's type, so the callable does not tell its owner class; and property getters
    and constructors are called from C (the ``property`` descriptor, ``type.__call__``), so they raise
    no ``sys.setprofile`` ``c_call`` event at all. So, while active, every native attribute of
    ``moert._C``'s classes (methods, static methods, ``__init__``, property getters and setters) and
    its module functions are swapped for counting wrappers that name the owner, and restored on exit.
    As an independent witness, ``sys.setprofile`` counts ``c_call`` events of the original native
    functions (the wrappers call them from Python, so it sees those calls too); ``check()`` raises
    when the two disagree, e.g. when a caller held a bound method from before the swap. Counts the
    calling thread (the profiler) and every thread (the wrappers); moert's decode path calls
    ``moert._C`` from the main thread only.
    """

    def __init__(self) -> None:
        from moert import _C

        self._mod = _C
        self.counts: Counter[str] = Counter()
        self.profiled: Counter[str] = Counter()
        self._names: dict[int, str] = {}  # id(original native function) -> counted name
        self._saved: list[tuple[Any, str, Any]] = []  # (owner, attribute, original)
        self._previous_profile: Any = None

    def _counting(self, fn: Any, name: str) -> Any:
        self._names[id(fn)] = name
        counts = self.counts

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        counted.__name__ = getattr(fn, "__name__", name)
        return counted

    def _swap(self, owner: Any, attr: str, new: Any) -> None:
        self._saved.append((owner, attr, getattr(owner, "__dict__", {})[attr]))
        setattr(owner, attr, new)

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            name = self._names.get(id(arg))
            if name is not None:
                self.profiled[name] += 1

    def __enter__(self) -> NativeCallCounter:
        for attr, obj in list(vars(self._mod).items()):
            if isinstance(obj, types.BuiltinFunctionType) and obj.__module__ == self._mod.__name__:
                self._swap(self._mod, attr, self._counting(obj, attr))
            elif isinstance(obj, type):
                for name, member in list(vars(obj).items()):
                    owned = f"{obj.__name__}.{name}"
                    if isinstance(member, property):
                        get = member.fget and self._counting(member.fget, owned + " (get)")
                        put = member.fset and self._counting(member.fset, owned + " (set)")
                        self._swap(obj, name, property(get, put, None, member.__doc__))
                    elif isinstance(member, staticmethod):
                        self._swap(obj, name, staticmethod(self._counting(member.__func__, owned)))
                    elif isinstance(getattr(member, "__func__", None), types.BuiltinFunctionType):
                        self._swap(obj, name, self._counting(member.__func__, owned))  # instancemethod
        self._previous_profile = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(self._previous_profile)
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def check(self) -> None:
        """Raises RuntimeError when the wrappers and the profiler counted different calls."""
        if self.counts != self.profiled:
            diff = {k: (self.counts[k], self.profiled[k]) for k in set(self.counts) | set(self.profiled)}
            bad = {k: v for k, v in diff.items() if v[0] != v[1]}
            raise RuntimeError(
                f"native call counter: wrappers and profiler disagree (wrapped, profiled): {bad}"
            )


def self_check() -> dict[str, int]:
    """Counts a known sequence of native calls and asserts the counter saw exactly those, so the
    decode figures cannot silently be 0 or miss a kind of call. Returns the counts."""
    from moert import _C

    with NativeCallCounter() as counter:
        pool = runtime.ExpertPool(1, 4, 4096, pin=False)  # ExpertPool.__init__
        cache = runtime.SlabCache(pool, 2, policy="lru", device="cpu", min_slots=1)  # SlabCache.__init__
        engine = runtime.CopyEngine(cache, num_streams=1)  # CopyEngine.__init__
        ids = np.array([1], dtype=np.int64)
        engine._c.acquire(0, ids, 0)
        engine._c.release(0, ids, 0)
        cache._c.stats()
        _ = cache._c.device  # a property read
        _C.cuda_compiled()  # a module function
    try:
        expected = Counter(
            {
                "ExpertPool.__init__": 1,
                "SlabCache.__init__": 1,
                "CopyEngine.__init__": 1,
                "CopyEngine.acquire": 1,
                "CopyEngine.release": 1,
                "SlabCache.stats": 1,
                "SlabCache.device (get)": 1,
                "cuda_compiled": 1,
            }
        )
        if counter.counts != expected:
            raise RuntimeError(
                f"native call counter self-check: expected {dict(expected)}, counted {dict(counter.counts)}"
            )
        counter.check()
    finally:
        engine.close()
        cache.close()
        pool.close()
    return dict(counter.counts)
