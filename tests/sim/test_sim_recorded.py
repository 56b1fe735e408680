"""``predictions:DIR``: a peer's recorded predictions (MoE-Beyond's predicted CSVs) replayed as a
prefetcher, against a prefetcher that returns the same ids straight from the fixture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))
from moe_beyond_fixtures import E, write_folder  # noqa: E402

from moert.cli import main as cli_main  # noqa: E402
from moert.policy.recorded import RecordedPredictions  # noqa: E402
from moert.policy.trace_prefetch import TracePrefetcher  # noqa: E402
from moert.sim import SimConfig, parse_policies, simulate  # noqa: E402
from moert.trace import open_trace  # noqa: E402


class FromFixture(TracePrefetcher):
    """The fixture's own prediction lists (independent of the importer)."""

    name = "fixture"

    def __init__(self, made: dict) -> None:
        self.made = made

    def prefetch(self, layer, ctx):
        return self.made[ctx.seq.seq_id]["predicted"][layer][ctx.t]


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_recorded_predictions_prefetch_what_the_files_record(tmp_path, mode):
    folder = tmp_path / "predicted_csvs"
    made = write_folder(folder, "predicted", {1: 6, 3: 9, 4: 5})
    trace = open_trace(folder, num_experts=E)
    rows = {}
    for name, obj in (("rec", RecordedPredictions(str(folder))), ("ref", FromFixture(made))):
        config = SimConfig(
            capacities=(0.25, 0.5),
            policies=tuple(parse_policies([f"lru+{name}"], prefetchers=[name])),
            mode=mode,
        )
        rows[name] = simulate(open_trace(folder, num_experts=E), config, prefetchers={name: obj})["results"]
    keys = ("hits", "accesses", "prefetches", "prefetch_hits", "prefetch_wasted", "demand_misses")
    for a, b in zip(rows["rec"], rows["ref"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        assert a["prefetches"] > 0
    assert trace.meta.num_sequences == 3


def test_simulate_cli_with_predictions(tmp_path, capsys):
    folder = tmp_path / "predicted_csvs"
    write_folder(folder, "predicted", {2: 7})
    out = tmp_path / "r.json"
    rc = cli_main(
        ["simulate", str(folder), "--capacity", "0.5", "--policy", "lru", "--prefetch", f"predictions:{folder}",
         "--num-experts", str(E), "--json", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["policy"] == f"lru+predictions:{folder}" and row["prefetches"] > 0
    assert np.isfinite(row["predicted_tok_s"])


def test_predictions_of_other_prompts_are_refused(tmp_path, capsys):
    folder, other = tmp_path / "predicted_csvs", tmp_path / "other"
    write_folder(folder, "predicted", {2: 7})
    write_folder(other, "predicted", {2: 5})  # prompt 2 again, but another prompt's length
    rc = cli_main(
        ["simulate", str(folder), "--capacity", "0.5", "--policy", "lru", "--prefetch", f"predictions:{other}",
         "--num-experts", str(E), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "prompt_2" in err, err
