"""The native reuse forecast (``moert._C.ReuseForecaster``, policy ``learned``'s) against the numpy
definition (``ReuseState`` and ``ReuseModel.log2_density`` / ``log2_distance``, which the training uses):
the same features and the same values, call by call and for whole sequences; its argument errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moert.policy.learned import Learned
from moert.predict.reuse import QUANTUM, ReuseModel, ReuseState, ensemble, load_reuse, save_reuse
from moert.trace import SequenceTrace


def _routing(T: int, L: int, E: int, k: int, seed: int) -> np.ndarray:
    """(T, L, E) bool: k experts per call, with repeats (tokens 40-59 route as 10-29) so the induction
    columns see matches, and a narrow phase (a few hot experts) so recency and gaps vary."""
    g = np.random.default_rng(seed)
    hot = np.zeros((T, L, E), dtype=bool)
    for t in range(T):
        for layer in range(L):
            pool = E if t % 4 else min(E, 2 * k)
            hot[t, layer, g.choice(pool, k, replace=False)] = True
    hot[40:60] = hot[10:30]
    return hot


def _reference(model: ReuseModel, hot: np.ndarray, value: str) -> np.ndarray:
    """(T, L, E) the numpy definition, call by call."""
    T, L, E = hot.shape
    state = ReuseState(L, E)
    out = np.empty((T, L, E))
    for t in range(T):
        for layer in range(L):
            state.update(layer, hot[t, layer])
            args = (
                layer,
                state.features(layer)[None],
                hot[t, layer][None],
                state.previous_layer_used(layer)[None],
            )
            out[t, layer] = (model.log2_density if value == "density" else model.log2_distance)(*args)[0]
    return out


@pytest.mark.parametrize("value", ["density", "distance"])
@pytest.mark.parametrize(
    "window,experts,horizons_used,members",
    [(None, 16, 7, 1), (16, 70, 7, 1), (8, 9, 3, 1), (None, 64, 1, 1), (16, 16, 7, 3)],
)
def test_native_values_are_the_definition(monkeypatch, value, window, experts, horizons_used, members):
    """Over windows that wrap (8, 16) or not, more than one 64-bit word of experts (70), fewer
    horizons, an ensemble of 3: the native values equal the numpy definition's (both rounded to 1/256;
    the arithmetic is the same, so they agree exactly here, and never by more than one step)."""
    import moert.predict.reuse_induction as ri

    if window is not None:
        monkeypatch.setattr(ri, "INDUCTION_WINDOW", window)
    L, T, k = 3, 80, 4
    model = ensemble([ReuseModel.random(L, experts, seed=7 + m, hidden=16) for m in range(members)])
    model.horizons_used = horizons_used
    hot = _routing(T, L, experts, k, seed=3)
    want = _reference(model, hot, value)
    native = model.forecaster()
    got = np.stack([[native.call(layer, hot[t, layer], 0 if value == "density" else 1) for layer in range(L)]
                    for t in range(T)])  # fmt: skip
    assert np.abs(got - want).max() <= 1 / QUANTUM
    assert np.mean(got == want) > 0.999, np.mean(got == want)
    assert np.array_equal(model.forecaster().sequence(hot, 0 if value == "density" else 1), got)
    assert len(np.unique(got)) > 50  # the values vary (not a constant that would pass anything)


@pytest.mark.parametrize("rank", ["density", "next"])
def test_learned_rows_are_the_definition(rank):
    """Policy learned's rows (its fast path, two sequences: the state carries over) are the numpy
    definition's values as priorities: the density itself, or ``-(t mod W + 2 ** g + l / L)``."""
    L, E, k = 3, 16, 3
    model = ReuseModel.random(L, E, seed=2, hidden=16)
    hot = _routing(70, L, E, k, seed=5)
    policy = Learned(model, rank=rank)
    policy.bind(L, E, k)
    rows = []
    for lo, hi in ((0, 30), (30, 70)):
        ids = np.stack([np.flatnonzero(hot[t, layer]) for t in range(lo, hi) for layer in range(L)])
        experts = torch.from_numpy(ids.reshape(hi - lo, L, k).transpose(1, 0, 2).copy())
        seq = SequenceTrace(lo, torch.arange(hi - lo), experts, torch.ones(hi - lo, dtype=torch.bool))
        rows.append(policy.sequence_plan(seq).before.scores[:, :, 0])
    got = np.concatenate(rows)  # [T, L, E]
    values = _reference(model, hot, "density" if rank == "density" else "distance")
    if rank == "density":
        want = values.astype(np.float32)
    else:
        T = hot.shape[0]
        clocks = np.repeat(np.arange(T), L)
        want = policy._priorities(np.tile(np.arange(L), T), clocks, values.reshape(T * L, E)).reshape(T, L, E)
    assert np.array_equal(got, want)
    # the runtime's way, call by call, gives the same rows
    again = Learned(model, rank=rank)
    again.bind(L, E, k)
    step = np.stack([[again.priorities(layer, hot[t, layer]) for layer in range(L)] for t in range(70)])
    assert np.array_equal(step, got)


def test_native_errors_name_the_value():
    model = ReuseModel.random(2, 8, seed=1)
    native = model.forecaster()
    with pytest.raises(ValueError, match=r"layer=2 not in 0\.\.1"):
        native.call(2, np.zeros(8, dtype=bool), 0)
    with pytest.raises(ValueError, match=r"used must be \(8,\), got 7 values"):
        native.call(0, np.zeros(7, dtype=bool), 0)
    with pytest.raises(ValueError, match="value=2 must be 0 \\(density\\) or 1 \\(distance\\)"):
        native.call(0, np.zeros(8, dtype=bool), 2)
    with pytest.raises(ValueError, match=r"used must be \(T, 2, 8\)"):
        native.sequence(np.zeros((3, 2, 9), dtype=bool), 0)
    with pytest.raises(ValueError, match="layer 1 has had no call"):
        native.features(1)
    from moert import _C

    kwargs = {name: getattr(model, name) for name in ReuseModel.TENSORS}
    base = dict(layers=2, experts=8, age_edges=[0, 1], decays=[0.5], window=16, induction_layers=1,
                bigram=True, match=[0.5], ahead=[1], horizons=[1, 2, 4, 8, 16, 32, 64], horizons_used=7,
                density_from=1, quantum=256.0, floor_log2=-64.0, **kwargs)  # fmt: skip
    for change, message in (
        ({"window": 1 << 40}, "window=1099511627776 must be in 2..2\\^20"),
        ({"experts": 1 << 20}, "must be <= 65536"),
        ({"layers": 60000, "window": 1 << 20}, "too large for the induction rings"),
        ({"members": 0}, "members=0 must be in 1..64"),
        ({"match": [0.5, 0.7]}, "match must descend"),
        ({"ahead": [2, 1]}, "ahead must be ascending"),
    ):
        with pytest.raises(ValueError, match=message):
            _C.ReuseForecaster(**{**base, **change})
    other = ReuseModel.random(2, 8, seed=1, hidden=4)
    other.w1 = other.w1[:-1]  # one feature short: a model of other features
    with pytest.raises(ValueError, match="w1 has .* values, want members x \\(F \\+ 2\\) x D"):
        other.forecaster()


def test_an_ensemble_is_the_mean_of_its_members_and_round_trips(tmp_path):
    """An ensemble's probabilities are the mean of its members'; saved and loaded, it forecasts the same
    (numpy and native); members of other shapes are refused with the fix."""
    L, E = 2, 8
    members = [ReuseModel.random(L, E, seed=s, hidden=4) for s in range(3)]
    both = ensemble(members)
    g = np.random.default_rng(0)
    x = g.standard_normal((5, E, members[0].w1.shape[0] - 2))
    used, prev = g.random((5, E)) < 0.3, g.random((5, E)) < 0.3
    layers = np.array([0, 1, 1, 0, 1])
    want = np.mean([1 / (1 + np.exp(-m.logits(layers, x, used, prev))) for m in members], axis=0)
    np.testing.assert_allclose(both.probabilities(layers, x, used, prev), want, rtol=1e-14)
    path = save_reuse(tmp_path / "e.safetensors", both, model_type="test", layers=(0, 1), top_k=2)
    back = load_reuse(path)[0]
    assert len(back.members) == 2
    assert np.array_equal(back.log2_density(layers, x, used, prev), both.log2_density(layers, x, used, prev))
    hot = _routing(70, L, E, 2, seed=1)
    assert np.array_equal(back.forecaster().sequence(hot, 0), both.forecaster().sequence(hot, 0))
    assert not np.array_equal(both.forecaster().sequence(hot, 0), members[0].forecaster().sequence(hot, 0))
    with pytest.raises(ValueError, match="member 1 does not match member 0 .* same --hidden"):
        ensemble([members[0], ReuseModel.random(L, E, hidden=5)])
