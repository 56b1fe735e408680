"""Fuzz target: the native runtime's argument checks, through its Python face (``moert.engine.runtime``):
``ExpertPool``, ``SlabCache`` (real CPU twin and simulated) and ``CopyEngine``, built with random sizes
and driven by random calls with random shapes, dtypes and values; and ``moert._C.ReuseForecaster``
(policy learned's forecast), built with random lists and weight sizes (exact half the time) and called.

DESIGN §4: every entry point validates its arguments; no input from Python may crash the process.
Only ValueError, TypeError and RuntimeError may escape a call; a crash, a hang (libFuzzer -timeout)
or any other exception is a finding. Sizes that would really allocate more than ``_BUDGET`` bytes are
not built (sizes past the pool's documented 2^46-byte cap are: they must be refused before any
allocation). Views taken from slot or pool memory are read again after everything is closed (a view
keeps its memory alive).
"""

from __future__ import annotations

import math
import sys

import atheris
from harness import check, expect, main

with atheris.instrument_imports(include=["moert"]):
    import numpy as np
    import torch

    from moert import _C
    from moert.engine import runtime as rt

_BUDGET = 1 << 28  # bytes a pool or cache may really allocate
_CAP = 1 << 46  # ExpertPool's documented limit
_SIM_ENTRIES = (
    1 << 22
)  # (layer, expert) entries of a simulated cache built here: keeps each input's memory small (N1 is fixed: the cache refuses more than 2^24)
_INTS = (-(2**63), -(2**31) - 1, -(2**31), -2, -1, 0, 1, 2, 3, 5, 8, 15, 16, 17, 255, 256, 4096, 2**31 - 1, 2**31,
         2**32 + 7, 2**62, 2**63 - 1, 2**64)  # fmt: skip
_FLOATS = (0.0, 1e-3, 1e-9, -1.0, math.nan, -0.0)  # slot timeouts: never inf (a documented wait-forever)
_DTYPES = (np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint64, np.float32, np.float64, np.bool_)
_TORCH = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.uint8, torch.bool)
# valid values more often than not, so that calls get past the constructors
_POLICIES = ("lru", "lfu", "priority", "lru", "lfu", "priority", "", "LRU", "belady", "lru\x00")
_DEVICES = ("cpu", "cpu", "cpu", "cpu", "cuda", "sim", "meta", "")


class State:
    def __init__(self) -> None:
        self.pools: list[rt.ExpertPool] = []
        self.caches: list[rt.SlabCache] = []
        self.engines: list[rt.CopyEngine] = []
        self.views: list[torch.Tensor] = []
        self.keep: list[object] = []  # predict_async buffers, alive until their ticket is applied
        self.tickets: list[tuple[rt.CopyEngine, int]] = []
        self.forecasters: list[object] = []


def small(fdp, lo: int = -2, hi: int = 20) -> int:
    return fdp.ConsumeIntInRange(lo, hi)


def any_int(fdp) -> int:
    return fdp.PickValueInList(list(_INTS)) if fdp.ConsumeBool() else small(fdp)


def array(fdp, E: int):
    """A random 0-3 d array (numpy, torch, list, scalar or junk) of ids around [0, E)."""
    shape = tuple(small(fdp, 0, 5) for _ in range(small(fdp, 0, 3)))
    n = int(np.prod(shape)) if shape else 1
    values = [fdp.ConsumeIntInRange(-3, max(E, 0) + 3) for _ in range(n)]
    dtype = fdp.PickValueInList(list(_DTYPES))
    with np.errstate(all="ignore"):
        arr = np.array(values).astype(dtype).reshape(shape)
    form = small(fdp, 0, 6)
    if form == 0:
        return torch.from_numpy(np.ascontiguousarray(arr))
    if form == 1 and arr.ndim >= 1 and arr.shape[0] > 1:
        return torch.from_numpy(np.ascontiguousarray(arr))[::2]  # a non-contiguous view
    if form == 2:
        return arr.tolist()
    if form == 3:
        return fdp.PickValueInList([None, "3", 3.5, b"\x01", {"a": 1}, [[1], [2, 3]], [1, "x"]])
    if form == 4:
        return any_int(fdp)  # ints past int64 included (finding N2, fixed)
    return arr


def some_ids(fdp, E: int):
    """Half the time a valid list of distinct ids in [0, E) (so calls get past the checks), else anything."""
    if E > 0 and fdp.ConsumeBool():
        return sorted({fdp.ConsumeIntInRange(0, E - 1) for _ in range(fdp.ConsumeIntInRange(1, 4))})
    return array(fdp, E)


def read_view(view: torch.Tensor) -> None:
    if view.numel() * view.element_size() <= 1 << 20:
        view.float().sum() if view.dtype != torch.bool else view.any()


def real_bytes(L: int, E: int, slab: int) -> int | None:
    """Bytes a pool of these sizes would allocate, or None when the sizes are invalid anyway."""
    if L <= 0 or E <= 0 or slab <= 0 or slab % 16:
        return None
    return L * E * ((slab + 255) // 256 * 256)


def make_pool(fdp, st: State) -> None:
    L, E, slab = (
        any_int(fdp),
        any_int(fdp),
        fdp.PickValueInList([16, 32, 48, 256, 4096, 8, 0, -16, 2**40, 2**62]),
    )
    size = real_bytes(L, E, slab)
    if size is not None and _BUDGET < size <= _CAP:
        return
    pool = rt.ExpertPool(L, E, slab, pin=fdp.PickValueInList([False, False, True]))
    st.pools.append(pool)


def make_cache(fdp, st: State) -> None:
    policy = fdp.PickValueInList(list(_POLICIES))
    min_slots = small(fdp, -1, 4) if fdp.ConsumeBool() else any_int(fdp)
    if st.pools and fdp.ConsumeBool():
        pool = fdp.PickValueInList(st.pools)
        slots = small(fdp, -1, 12) if fdp.ConsumeBool() else any_int(fdp)
        if slots > 0 and slots * pool.stride > _BUDGET:
            return
        st.caches.append(rt.SlabCache(pool, slots, policy=policy, device=fdp.PickValueInList(list(_DEVICES)),
                                      min_slots=min_slots))  # fmt: skip
    else:
        L, E, S = any_int(fdp), any_int(fdp), any_int(fdp)
        if L > 0 and E > 0 and L * E > _SIM_ENTRIES:
            return  # a large table is legal up to 2^24 entries but slow to build for every input
        st.caches.append(
            rt.SlabCache.simulated(L, E, S, policy=policy, slab_bytes=any_int(fdp), min_slots=min_slots)
        )


def make_engine(fdp, st: State) -> None:
    if not st.caches:
        return
    cache = fdp.PickValueInList(st.caches)
    streams = fdp.PickValueInList([1, 2, 3, 0, -1, 16, 17, 2**31])
    st.engines.append(rt.CopyEngine(cache, streams, slot_timeout_s=fdp.PickValueInList(list(_FLOATS))))


def pool_call(fdp, st: State) -> None:
    if not st.pools:
        return
    pool = fdp.PickValueInList(st.pools)
    L, E = pool.num_layers, pool.num_experts
    layer, expert = small(fdp, -1, L), small(fdp, -1, E)
    op = small(fdp, 0, 5)
    if op == 0:
        pool.address(layer, expert)
    elif op == 1:
        dtype = fdp.PickValueInList(list(_TORCH))
        src = torch.zeros(small(fdp, 0, 300), dtype=dtype)
        pool.fill(layer, expert, src if fdp.ConsumeBool() else src[::2], offset=any_int(fdp))
    elif op == 2:
        v = pool.view(
            layer, expert, fdp.PickValueInList(list(_TORCH)), (small(fdp, -1, 64),), offset=small(fdp, -2, 64)
        )
        read_view(v)
        st.views.append(v)
    elif op == 3:
        v = pool.layer_view(layer, fdp.PickValueInList(list(_TORCH)), (small(fdp, -1, 8), small(fdp, 0, 4)),
                            offset=small(fdp, -2, 64))  # fmt: skip
        read_view(v)
        st.views.append(v)
    elif op == 4:
        pool.close()
    else:
        repr(pool)


def cache_call(fdp, st: State) -> None:
    if not st.caches:
        return
    cache = fdp.PickValueInList(st.caches)
    L, E = cache.num_layers, cache.num_experts
    layer = small(fdp, 0, max(L - 1, 0)) if fdp.ConsumeBool() else any_int(fdp)
    op = small(fdp, 0, 10)
    if op == 0:
        cache.lookup(layer, small(fdp, -1, E))
    elif op == 1:
        r = cache.resident(layer, fdp.ConsumeBool())
        check(tuple(r.shape) == (E,), f"resident shape {tuple(r.shape)} for E={E}")
    elif op == 2:
        scores = fdp.PickValueInList([0.5, math.nan, [1.0, 2.0], torch.zeros(3), np.ones(2), -math.inf])
        cache.set_priority(layer, array(fdp, E), scores)
    elif op == 3:
        v = cache.slot_view(small(fdp, -1, 8), fdp.PickValueInList(list(_TORCH)), (small(fdp, -1, 64),),
                            offset=small(fdp, -2, 64))  # fmt: skip
        read_view(v)
        st.views.append(v)
    elif op == 4:
        cache.stats()
        cache.reset_stats()
    elif op == 5:
        cache.sim_prefetch(layer, some_ids(fdp, E))
    elif op == 6:
        cache.sim_access(layer, some_ids(fdp, E))
    elif op == 7:
        N = small(fdp, 0, 6)
        kw = {}
        if fdp.ConsumeBool():
            kw["prefetch"] = array(fdp, E)
        if fdp.ConsumeBool():
            kw["prefetch_layers"] = array(fdp, L)
        if fdp.ConsumeBool():
            kw["priorities"] = np.zeros(
                (N, small(fdp, 0, 3)), dtype=fdp.PickValueInList([np.float32, np.float64])
            )
        experts = array(fdp, E) if fdp.ConsumeBool() else np.full((N, 2), small(fdp, -1, E))
        out = cache.replay(array(fdp, L) if fdp.ConsumeBool() else np.zeros(N, dtype=np.int64), experts, **kw)
        check("hits_per_step" in out, "replay result has no hits_per_step")
    elif op == 8:
        cache.close()
    else:
        repr(cache)


def engine_call(fdp, st: State) -> None:
    if not st.engines:
        return
    eng = fdp.PickValueInList(st.engines)
    cache = eng.cache
    L, E = cache.num_layers, cache.num_experts
    layer = small(fdp, 0, max(L - 1, 0)) if fdp.ConsumeBool() else small(fdp, -1, L)
    stream = fdp.PickValueInList([None, None, 0, 1, 2**40, -1])
    op = small(fdp, 0, 11)
    if op == 0:
        eng.acquire(layer, some_ids(fdp, E), stream)
    elif op == 1:
        eng.acquire_deferred(layer, some_ids(fdp, E), stream)
    elif op == 2:
        eng.wait_ready(layer, some_ids(fdp, E), stream)
    elif op == 3:
        eng.release(layer, some_ids(fdp, E), stream)
    elif op == 4:
        eng.prefetch(layer, some_ids(fdp, E))
    elif op == 5:
        n = small(fdp, 0, 3)
        layers = [small(fdp, -1, L) for _ in range(n)]
        ids = (
            array(fdp, E)
            if fdp.ConsumeBool()
            else np.full((n, small(fdp, 0, 4)), small(fdp, -2, E), np.int32)
        )
        scores = None if fdp.ConsumeBool() else np.zeros((n, E if fdp.ConsumeBool() else small(fdp, 0, 4)))
        clear = [small(fdp, -1, L) for _ in range(small(fdp, 0, 2))]
        eng.predict(layers, ids, scores, clear, fdp.PickValueInList([0.0, -1.0, math.nan, math.inf]))
    elif op == 6:
        n = small(fdp, 0, 3)
        layers = [small(fdp, -1, L) for _ in range(n)]
        width = small(fdp, 0, 4)
        ids = torch.full(
            (n if fdp.ConsumeBool() else small(fdp, 0, 3), width), small(fdp, -2, E), dtype=torch.int32
        )
        scores = None if fdp.ConsumeBool() else torch.zeros(n, E)
        st.keep.append((ids, scores))
        ticket = eng.predict_async(layers, ids, scores, [], fdp.PickValueInList([0.0, math.nan]),
                                   stream=fdp.PickValueInList([None, 0]))  # fmt: skip
        st.tickets.append((eng, ticket))
        eng.wait_predictions(ticket)
    elif op == 7:
        eng.synchronize()
    elif op == 8:
        eng.stats(fdp.ConsumeBool())
    elif op == 9:
        eng.close()
    else:
        eng.wait_predictions(any_int(fdp) if fdp.ConsumeBool() else eng.predictions_done())


def _ascending(fdp, n: int, lo: int, hi: int) -> list[int]:
    return sorted({fdp.ConsumeIntInRange(lo, hi) for _ in range(n)})


def make_forecaster(fdp, st: State) -> None:
    """Lists that are valid half the time; weights of the exact sizes half the time (else off by one)."""
    L, E, K, D = small(fdp, -1, 4), small(fdp, -1, 70), small(fdp, -1, 3), small(fdp, 0, 4)
    edges = _ascending(fdp, small(fdp, 0, 4), 0, 70)
    decays = [fdp.ConsumeProbability() for _ in range(small(fdp, 0, 3))]
    match = sorted((fdp.ConsumeProbability() for _ in range(small(fdp, 0, 3))), reverse=fdp.ConsumeBool())
    ahead = _ascending(fdp, small(fdp, 0, 4), -1, 40)
    horizons = [1, 2, 4, 8, 16, 32, 64][: small(fdp, 0, 7)]
    window = (
        small(fdp, -1, 40) if fdp.ConsumeBool() else fdp.PickValueInList([4096, 2**20, 2**20 + 1, 2**31, -5])
    )
    F = len(edges) + 2 + 5 + len(decays) + len(match) * (len(ahead) + 1)
    H, k, le = len(horizons), max(K, 0), max(L, 0) * max(E, 0)
    sizes = {"w1": k * (F + 2) * D, "c1": k * D, "w2": k * D * H, "c2": k * H, "bias": k * le * H,
             "coact_self": k * le * max(E, 0), "coact_prev": k * le * max(E, 0), "s_self": k * H, "s_prev": k * H}  # fmt: skip
    if fdp.ConsumeBool():
        name = fdp.PickValueInList(sorted(sizes))
        sizes[name] = max(sizes[name] + fdp.PickValueInList([-1, 1]), 0)
    if sum(sizes.values()) > 1 << 22:
        return
    weights = {n: np.full(v, 0.1) for n, v in sizes.items()}
    st.forecasters.append(_C.ReuseForecaster(
        layers=L, experts=E, age_edges=edges, decays=decays, window=window, induction_layers=small(fdp, -1, 7),
        bigram=fdp.ConsumeBool(), match=match, ahead=ahead, horizons=horizons, horizons_used=small(fdp, -1, 8),
        density_from=small(fdp, -1, 8), quantum=256.0, floor_log2=-64.0, members=K, **weights,
    ))  # fmt: skip


def forecaster_call(fdp, st: State) -> None:
    if not st.forecasters:
        return make_forecaster(fdp, st)
    f = fdp.PickValueInList(st.forecasters)
    op = small(fdp, 0, 3)
    if op == 0:
        f.call(any_int(fdp), array(fdp, 2), small(fdp, -1, 2))
    elif op == 1:
        f.sequence(array(fdp, 2), small(fdp, -1, 2))
    elif op == 2:
        f.features(any_int(fdp))
    else:
        f.clock(any_int(fdp))


OPS = (make_pool, make_cache, make_engine, pool_call, cache_call, engine_call, engine_call, cache_call,
       make_forecaster, forecaster_call, forecaster_call)  # fmt: skip


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    st = State()
    for _ in range(fdp.ConsumeIntInRange(1, 24)):
        op = fdp.PickValueInList(list(OPS))
        expect(lambda op=op: op(fdp, st))
    for eng, ticket in st.tickets:
        expect(lambda eng=eng, ticket=ticket: eng.wait_predictions(ticket))
    for obj in (*st.engines, *st.caches, *st.pools):
        expect(obj.close)
    for v in st.views:  # memory outlives close while a view refers to it
        read_view(v)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
