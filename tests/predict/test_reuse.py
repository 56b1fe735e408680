"""The ``reuse`` forecast (``moert.predict.reuse``): online features against a slow reference, labels
against Belady's next use, the file format and its errors, and training on a pattern where recency is
wrong (a cycle one expert longer than the cache: LRU never hits) beating LRU in the simulator."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from moert.policy.belady import next_use
from moert.predict.reuse import (
    AGE_EDGES,
    DECAYS,
    ReuseModel,
    ReuseState,
    load_reuse,
    next_use_distance,
    save_reuse,
)
from moert.predict.reuse_induction import (
    INDUCTION_AHEAD,
    INDUCTION_BIGRAM,
    INDUCTION_LAYERS,
    INDUCTION_MATCH,
    INDUCTION_WINDOW,
    num_induction_features,
)
from moert.predict.reuse_train import ReuseTrainConfig, build_data, feature_mask, train_reuse


def random_experts(L: int, N: int, E: int, k: int, seed: int) -> np.ndarray:
    """(L, N, k) distinct ids per call, a few hot experts (so gaps repeat)."""
    g = np.random.default_rng(seed)
    p = np.ones(E)
    p[:3] = 8.0
    p /= p.sum()
    return np.stack([[g.choice(E, k, replace=False, p=p) for _ in range(N)] for _ in range(L)])


def reference_features(history: list[set[int]], e: int) -> list[float]:
    """The features of expert e after the calls ``history`` of one layer, from the definition."""
    c = len(history) - 1
    uses = [i for i, s in enumerate(history) if e in s]
    age = c - uses[-1] if uses else -1
    gaps = [b - a for a, b in zip(uses[:-1], uses[1:])]
    g1 = gaps[-1] if gaps else -1
    g2 = gaps[-2] if len(gaps) > 1 else -1
    if age < 0:
        bucket = len(AGE_EDGES) + 1
    else:
        bucket = next((i for i, edge in enumerate(AGE_EDGES) if age <= edge), len(AGE_EDGES))
    onehot = [1.0 if i == bucket else 0.0 for i in range(len(AGE_EDGES) + 2)]
    lg = lambda x: float(np.log2(1 + x)) if x >= 0 else 0.0  # noqa: E731
    rel = (lg(age) - lg(g1)) / 8 if (g1 >= 0 and age >= 0) else 0.0
    gapf = [lg(g1) / 8, float(g1 < 0), lg(g2) / 8, float(g2 < 0), rel]
    emas = []
    for d in DECAYS:
        u = 0.0
        for s in history:
            u = d * u + (1 - d) * (e in s)
        emas.append(u)
    return onehot + gapf + emas


def reference_induction(history: list[list[set[int]]], layer: int, e: int) -> list[float]:
    """The induction columns of expert e at the layer's token t (its last call), from the definition
    (moert.predict.reuse_induction), given every layer's calls so far (layers below: up to t)."""
    here = history[layer]
    t = len(here) - 1
    below = range(layer, max(layer - INDUCTION_LAYERS, -1), -1)

    def tagged(s: int) -> set:  # token s's experts, and with the bigram token s - 1's, apart
        back = (0, 1) if INDUCTION_BIGRAM else (0,)
        return {(j, b, x) for j in below for b in back if s - b >= 0 for x in history[j][s - b]}

    out = []
    for share in INDUCTION_MATCH:
        matches = [
            s for s in range(max(0, t - INDUCTION_WINDOW + 1 + INDUCTION_BIGRAM), t)
            if tagged(t) and len(tagged(t) & tagged(s)) >= share * len(tagged(t))
        ]  # fmt: skip
        for n in INDUCTION_AHEAD:
            ok = [s for s in matches if s + n <= t]
            followed = sum(any(e in here[s + j] for j in range(1, n + 1)) for s in ok)
            out.append(followed / (1 + len(ok)))
        out.append(float(np.log2(1 + len(matches))) / 8)
    return out


@pytest.mark.parametrize(
    "window,layers,bigram", [(None, None, None), (6, 2, None), (12, 1, None), (6, 2, False), (40, 3, False)]
)
def test_online_features_equal_the_definition(monkeypatch, window, layers, bigram):
    """Per call and for all layers at once (build_data's way), and the native state's per call, over a
    window that wraps (6, 12) or not, comparing 1 to all 3 layers, with the previous token matched too
    or not."""
    import moert.predict.reuse_induction as ri

    for name, value in (
        ("INDUCTION_WINDOW", window),
        ("INDUCTION_LAYERS", layers),
        ("INDUCTION_BIGRAM", bigram),
    ):
        if value is not None:
            monkeypatch.setattr(ri, name, value)
            monkeypatch.setattr(sys.modules[__name__], name, value)
    L, N, E, k = 3, 40, 8, 2
    experts = random_experts(L, N, E, k, seed=1)
    experts[:, 20:30] = experts[:, 5:15]  # a repeat: the induction columns see matches
    state, batch = ReuseState(L, E), ReuseState(L, E)
    native = ReuseModel.random(L, E).forecaster()  # the native state (policy learned's), same constants
    history: list[list[set[int]]] = [[] for _ in range(L)]
    for t in range(N):
        hot = np.zeros((L, E), dtype=bool)
        for layer in range(L):
            used = np.zeros(E, dtype=bool)
            used[experts[layer, t]] = True
            hot[layer] = used
            state.update(layer, used)
            history[layer].append(set(experts[layer, t].tolist()))
            got = state.features(layer)
            want = np.array(
                [
                    reference_features(history[layer], e) + reference_induction(history, layer, e)
                    for e in range(E)
                ]
            )
            np.testing.assert_allclose(got, want, atol=1e-12, err_msg=f"t={t} layer={layer}")
            native.call(layer, used, 0)
            np.testing.assert_allclose(
                native.features(layer), want, atol=1e-12, err_msg=f"native t={t} layer={layer}"
            )
            prev = state.previous_layer_used(layer)
            assert prev.sum() == (0 if layer == 0 else k)
        batch.update(slice(None), hot)
        np.testing.assert_array_equal(
            batch.features(slice(None)), np.stack([state.features(x) for x in range(L)])
        )
    assert state.features(1)[:, -num_induction_features() :].max() > 0.5  # the repeat was seen


def test_training_examples_are_the_online_features():
    """build_data (all layers per token) gives what the per-call state gives, and Belady's labels."""
    L, N, E, k = 3, 30, 8, 2
    experts = random_experts(L, N, E, k, seed=2)
    data = build_data(experts, E, stride=3, offset=1)
    state = ReuseState(L, E)
    rows = 0
    nxt = next_use(experts.transpose(1, 0, 2))  # [N, L, k] absolute token of the next use
    for t in range(N):
        for layer in range(L):
            used = np.zeros(E, dtype=bool)
            used[experts[layer, t]] = True
            state.update(layer, used)
            if t % 3 == 1:
                np.testing.assert_allclose(data.x[rows].numpy(), state.features(layer), rtol=1e-6, atol=1e-6)
                assert data.layer[rows] == layer
                assert torch.equal(data.used[rows], torch.from_numpy(used))
                assert torch.equal(data.prev[rows], torch.from_numpy(state.previous_layer_used(layer)))
                for j, e in enumerate(experts[layer, t]):  # the used experts: Belady's next use
                    want = 0 if nxt[t, layer, j] < 0 else nxt[t, layer, j] - t
                    assert int(data.dist[rows, e]) == want
                rows += 1
    assert rows == len(data)


def test_next_use_distance_matches_belady():
    experts = random_experts(2, 50, 6, 2, seed=3)
    dist = next_use_distance(experts, 6)  # [N, L, E]
    nxt = next_use(experts.transpose(1, 0, 2))
    for t in range(50):
        for layer in range(2):
            for j, e in enumerate(experts[layer, t]):
                assert dist[t, layer, e] == (0 if nxt[t, layer, j] < 0 else nxt[t, layer, j] - t)


def test_file_round_trip(tmp_path):
    model = ReuseModel.random(3, 8, seed=4)
    path = save_reuse(tmp_path / "r.safetensors", model, model_type="test", layers=(1, 2, 3), top_k=2)
    back, meta = load_reuse(path)
    assert meta.kind == "reuse" and meta.layers == (1, 2, 3)
    for name in ReuseModel.TENSORS:
        np.testing.assert_array_equal(getattr(back, name), getattr(model, name))
    x = np.random.default_rng(0).random((8, model.w1.shape[0] - 2))  # the co-activations come on top
    used = np.arange(8) < 2
    a = back.log2_distance(1, x[None], used[None], ~used[None])
    assert np.array_equal(a, model.log2_distance(1, x[None], used[None], ~used[None]))


def test_a_reuse_file_is_not_a_routing_predictor_and_vice_versa(tmp_path):
    from moert.predict.baselines import FrequencyPredictor
    from moert.predict.io import load_predictor, save_predictor
    from moert.trace import SequenceTrace, TraceMeta

    reuse = save_reuse(
        tmp_path / "r.safetensors", ReuseModel.random(2, 8), model_type="t", layers=(1, 2), top_k=2
    )
    with pytest.raises(ValueError, match="is a reuse \\(eviction\\) model.*--evictor"):
        load_predictor(reuse)
    meta = TraceMeta("t", (1, 2), 8, 2)
    seq = SequenceTrace(
        0, torch.arange(4), torch.zeros(2, 4, 2, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    )
    freq = FrequencyPredictor.fit(meta, [seq])
    tensors, extra = freq.state()
    path = save_predictor(tmp_path / "f.safetensors", freq.meta, tensors, extra)
    with pytest.raises(ValueError, match="is a 'frequency' routing predictor, not a reuse"):
        load_reuse(path)
    with pytest.raises(ValueError, match="not found"):
        load_reuse(tmp_path / "missing.safetensors")


def test_a_file_of_other_induction_features_is_refused(tmp_path, monkeypatch):
    import moert.predict.reuse_induction as ri

    path = save_reuse(
        tmp_path / "r.safetensors", ReuseModel.random(2, 8), model_type="t", layers=(1, 2), top_k=2
    )
    monkeypatch.setattr(ri, "INDUCTION_WINDOW", 64)
    with pytest.raises(ValueError, match="made with other induction features.*train it again"):
        load_reuse(path)


def test_feature_groups_are_checked():
    assert feature_mask(("recency",)).sum() == len(AGE_EDGES) + 2
    with pytest.raises(ValueError, match=r"\['age'\] are not among"):
        feature_mask(("age",))


def periodic_experts(L: int, N: int, period: int, noise: float, seed: int) -> np.ndarray:
    """(L, N, 1): each layer cycles through experts 0..period-1, with a few random calls in between."""
    g = np.random.default_rng(seed)
    ex = np.tile(np.arange(N) % period, (L, 1))
    flip = g.random((L, N)) < noise
    ex[flip] = g.integers(period, 2 * period, flip.sum())
    return ex[..., None]


def test_learned_beats_lru_where_recency_is_wrong(tmp_path):
    """A cycle of 5 experts through 4 slots: LRU evicts exactly the expert needed next (no hits);
    the trained forecast learns that the least recent is the soonest and keeps the others."""
    from moert.policy.predictor import SequenceListTrace
    from moert.sim import PolicySpec, SimConfig, simulate
    from moert.trace import SequenceTrace, TraceMeta

    L, E, period = 2, 10, 5
    train = build_data(periodic_experts(L, 1500, period, 0.05, seed=0), E, stride=1)
    val = build_data(periodic_experts(L, 300, period, 0.05, seed=1), E, stride=1)
    cfg = ReuseTrainConfig(hidden=16, epochs=6, patience=2, batch_size=64, lr=1e-2, seed=0)
    model = train_reuse(train, val, L, E, cfg)
    assert model.info["curve"][-1]["val_loss"] < model.info["curve"][0]["val_loss"]
    test = periodic_experts(L, 400, period, 0.05, seed=2)
    meta = TraceMeta("test", (1, 2), E, 1)
    seq = SequenceTrace(0, torch.arange(400), torch.from_numpy(test), torch.ones(400, dtype=torch.bool))
    trace = SequenceListTrace(meta, [seq])
    hit = {}
    for name in ("lru", "learned", "belady"):
        cfg_sim = SimConfig(capacities=(0.4,), policies=(PolicySpec(name),), evictor=model)
        hit[name] = simulate(trace, cfg_sim)["results"][0]["hit_rate"]
    assert hit["lru"] < 0.1 and hit["belady"] > 0.6, hit
    assert hit["learned"] > hit["lru"] + 0.4, hit


def test_cli_train_reuse_then_simulate_learned(tmp_path, capsys):
    """`moert train --predictor reuse` then `moert simulate --policy learned --evictor`; a routing
    predictor given as --evictor and a reuse file given as a prefetcher are one clear line each."""
    import subprocess
    import sys

    from moert.cli import main
    from moert.trace import SequenceTrace
    from moert.trace.store import TraceWriter

    trace = tmp_path / "trace"
    with TraceWriter(trace, model_type="test", layers=range(2), num_experts=10, top_k=1) as w:
        for i in range(10):
            ex = torch.from_numpy(periodic_experts(2, 60, 5, 0.05, seed=i))
            w.add(SequenceTrace(i, torch.arange(60), ex, torch.ones(60, dtype=torch.bool)))
    out = tmp_path / "r.safetensors"
    argv = ["train", "--trace", str(trace), "--predictor", "reuse", "--out", str(out), "--epochs", "3"]
    assert (
        main(
            [
                *argv,
                "--stride",
                "1",
                "--threads",
                "1",
                "--no-progress",
                "--lr-final",
                "0.1",
                "--patience",
                "9",
                "--ensemble",
                "2",
            ]
        )
        == 0
    )
    assert "saved" in capsys.readouterr().out and load_reuse(out)[1].kind == "reuse"
    back = load_reuse(out)[0]  # an ensemble of two seeds, each on its own offset in the stride
    assert len(back.members) == 1 and [m["seed"] for m in back.info["members"]] == [0, 1]
    assert not np.array_equal(back.w1, back.members[0].w1)
    curve = load_reuse(out)[1].train["curve"]  # the cosine decay: lr at epoch 1, lr / 10 at the last
    assert [round(c["lr"] / 1e-3, 6) for c in curve[1:]] == [1.0, 0.55, 0.1], curve
    js = tmp_path / "sim.json"
    argv = ["simulate", str(trace), "--policy", "lru,learned", "--evictor", str(out), "--capacity", "0.4"]
    assert main([*argv, "--no-progress", "--json", str(js)]) == 0
    capsys.readouterr()
    for bad, want in (
        (["--policy", "learned", "--evictor", str(js)], "not a readable safetensors file"),
        (["--policy", "learned"], "policy 'learned' has no model: give a reuse model: --evictor"),
        (["--policy", f"lru+{out}"], "is a reuse (eviction) model, not a routing predictor"),
        (
            ["train", "--predictor", "reuse", "--out", str(out), "--lr-final", "0"],
            "--lr-final 0.0 must be in (0, 1]",
        ),
        (
            ["train", "--predictor", "reuse", "--out", str(out), "--ensemble", "0"],
            "--ensemble 0 must be >= 1",
        ),
    ):
        cmd = [sys.executable, "-m", "moert", "simulate", str(trace), "--no-progress", *bad]
        if bad[0] == "train":
            cmd = [sys.executable, "-m", "moert", "train", "--trace", str(trace), "--no-progress", *bad[1:]]
        got = subprocess.run(cmd, capture_output=True, text=True)
        assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
        assert want in got.stderr, got.stderr


def test_priorities_order_as_belady_when_the_forecast_is_exact():
    """With g = log2(d) exact, the pushed priorities order (layer, expert) entries as Belady's step of
    the next use, (t + d) * L + l, across layers pushed this token or the one before (one global cache)."""
    from moert.policy.learned import Learned

    L, E = 6, 4
    policy = Learned(ReuseModel.random(L, E))
    policy.bind(L, E, 1)
    g = np.random.default_rng(0)
    n = 400
    layers = g.integers(0, L, n)
    now = 100
    clocks = np.where(layers < 3, now, now - 1)  # layers 0-2 ran in this token, 3-5 in the previous one
    d = g.integers(1, 60, n)
    prio = policy._priorities(layers, clocks, np.log2(d)[:, None].astype(np.float64))[:, 0]
    step = (clocks + d) * L + layers
    order = np.lexsort((-prio,))  # highest priority (kept longest) first
    assert np.all(np.diff(step[order]) >= 0), "priorities do not follow the next-use steps"


def test_focus_weighs_the_recent_experts():
    """focus = E weighs every expert by 1 (the plain loss); focus = 1 weighs the others by focus_weight."""
    from moert.predict.reuse_train import _loss, _Net, _targets

    L, E = 2, 8
    data = build_data(random_experts(L, 20, E, 2, seed=5), E)
    net = _Net(L, E, data.x.shape[-1], 4, ("recency", "gaps", "frequency", "bias", "coact"))
    idx = torch.arange(len(data))
    plain = _loss(net, data, idx)
    assert torch.allclose(_loss(net, data, idx, focus=E, focus_weight=0.1), plain)
    with torch.no_grad():
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            net(data.x, data.layer, data.used, data.prev), _targets(data.dist), reduction="none"
        )  # [M, E, H]
        w = torch.where(data.rank < 1, 1.0, 0.1).unsqueeze(-1).expand_as(bce)
        want = (bce * w).sum() / w.sum()
    assert torch.allclose(_loss(net, data, idx, focus=1, focus_weight=0.1), want)
    assert not torch.allclose(want, plain)
    assert (data.rank[data.used].max() < 2) and (data.rank.min() == 0)  # used now: ranks 0..k-1


def test_features_of_several_layers_need_one_token():
    """The batched features compare every layer at one token (how update of a whole token leaves them)."""
    from moert.predict.reuse_induction import InductionState

    state = InductionState(3, 8)
    with pytest.raises(ValueError, match="need them at one token, got tokens \\[3 4\\]"):
        state.features(slice(None), np.array([3, 4, 4]))
    assert state.features(slice(0, 0), np.zeros(0, dtype=np.int64)).shape == (0, 8, num_induction_features())


def _density_by_definition(p: np.ndarray, lo: int) -> np.ndarray:
    """Hit density from the survival function: P(d > j) = 1 - p_h for n_h <= j < 2 n_h (P(d > 0) = 1),
    E[min(d, n)] = sum_{j < n} P(d > j), summed term by term; the best over horizons h >= lo."""
    from moert.predict.reuse import HORIZONS

    H = p.shape[-1]
    best = np.zeros(p.shape[:-1])
    for h in range(lo, H):
        n = HORIZONS[h]
        expected = np.ones(p.shape[:-1])  # j = 0
        for j in range(1, n):
            below = max(i for i in range(H) if HORIZONS[i] <= j)
            expected += 1.0 - p[..., below]
        best = np.maximum(best, p[..., h] / expected)
    return best


@pytest.mark.parametrize("used_horizons", [7, 4, 1])
def test_log2_density_is_the_definition(used_horizons):
    """``ReuseModel.log2_density``: log2 of LHD's hit density from the model's probabilities, against a
    term-by-term sum of the survival function; horizon 1 (index 0) is left out (``DENSITY_FROM``) unless it
    is the only one."""
    from moert.predict.reuse import DENSITY_FROM, QUANTUM

    L, E = 3, 8
    model = ReuseModel.random(L, E, seed=2)
    model.horizons_used = used_horizons
    g = np.random.default_rng(4)
    N = 12
    layers = g.integers(0, L, N)
    x = g.standard_normal((N, E, model.w1.shape[0] - 2))
    used, prev = g.random((N, E)) < 0.3, g.random((N, E)) < 0.3
    p = 1.0 / (1.0 + np.exp(-model.logits(layers, x, used, prev)[..., :used_horizons]))
    want = np.log2(_density_by_definition(p, min(DENSITY_FROM, used_horizons - 1)))
    got = model.log2_density(layers, x, used, prev)
    assert got.shape == (N, E)
    assert np.abs(got - want).max() <= 0.5 / QUANTUM + 1e-12
    assert np.array_equal(got, np.round(got * QUANTUM) / QUANTUM)  # on the grid: batching cannot change it


def test_learned_takes_a_rank():
    """``learned`` ranks by hit density unless given ``:next``; anything else is one clear error."""
    from moert.policy.learned import Learned

    model = ReuseModel.random(2, 4)
    assert Learned.from_spec(None, role="evict", evictor=model).rank == "density"
    assert Learned.from_spec("next", role="evict", evictor=model).rank == "next"
    with pytest.raises(
        ValueError, match=r"got rank='soon'\): use learned:density \(the default\) or learned:next"
    ):
        Learned.from_spec("soon", role="evict", evictor=model)
