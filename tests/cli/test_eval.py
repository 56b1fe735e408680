"""``moert eval --predictions``: recorded predictions (MoE-Beyond's predicted folder) judged by moert's
metrics, against hand-counted numbers; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from moe_beyond_fixtures import LAYERS, E, K, write_folder, write_prompt

from moert.cli import main


def _counted(made: dict[int, dict]) -> dict[str, float]:
    """exact, top-1 and recall@K counted by hand over every (prompt, layer, token)."""
    exact = top1 = inter = n = 0
    for want in made.values():
        for li in range(len(LAYERS)):
            for t, pred in enumerate(want["predicted"][li]):
                true = set(want["experts"][li, t].tolist())
                exact += set(pred) == true
                top1 += bool(pred) and pred[0] in true
                inter += len(set(pred) & true)
                n += 1
    return {"exact": exact / n, "top1": top1 / n, f"recall@{K}": inter / (n * K), "tokens": n}


def test_recorded_predictions_against_their_own_routing(tmp_path, capsys):
    made = write_folder(tmp_path / "predicted_csvs", "predicted", {1: 5, 2: 7, 4: 3})
    js = tmp_path / "out" / "m.json"
    argv = ["eval", "--predictions", str(tmp_path / "predicted_csvs"), "--num-experts", str(E)]
    assert main([*argv, "--json", str(js), "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "(recorded) on 3 all sequences" in out and "sorted by expert id" in out
    res = json.loads(js.read_text())
    want = _counted(made)
    for key, value in want.items():
        assert res["overall"][key] == pytest.approx(value), key
    assert res["width"] == K and res["overprovision"] == [] and res["sorted_ids"] is True
    assert res["sequence_ids"] == [1, 2, 4] and [r["layer"] for r in res["per_layer"]] == list(LAYERS)


def test_an_explicit_trace_of_the_same_prompts(tmp_path):
    made = write_folder(tmp_path / "p", "predicted", {1: 4, 2: 3})
    js = tmp_path / "m.json"
    argv = ["eval", "--predictions", str(tmp_path / "p"), "--trace", str(tmp_path / "p"), "--json", str(js)]
    assert main([*argv, "--num-experts", str(E), "--max-sequences", "1"]) == 0
    res = json.loads(js.read_text())
    assert res["sequence_ids"] == [1]
    assert res["overall"]["exact"] == pytest.approx(_counted({1: made[1]})["exact"])


def test_overprovision_when_the_recording_is_wide_enough(tmp_path):
    made = write_folder(tmp_path / "p", "predicted", {1: 4})
    # widen every row by two ids: top-(k+2) is recorded
    wide = [
        [row + [e for e in range(E) if e not in row][:2] for row in layer] for layer in made[1]["predicted"]
    ]
    write_prompt(
        tmp_path / "p" / "prompt_1_data_predicted.csv", made[1]["experts"], kind="predicted", predicted=wide
    )
    js = tmp_path / "m.json"
    assert (
        main(["eval", "--predictions", str(tmp_path / "p"), "--num-experts", str(E), "--json", str(js)]) == 0
    )
    res = json.loads(js.read_text())
    assert res["width"] == K + 2 and res["overprovision"] == [2]
    hit = sum(
        set(made[1]["experts"][li, t].tolist()) <= set(wide[li][t])
        for li in range(len(LAYERS))
        for t in range(4)
    ) / (len(LAYERS) * 4)
    assert res["overall"][f"overprov_hit@{K}+2"] == pytest.approx(hit)
    assert res["sorted_ids"] is False


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moert", *argv], capture_output=True, text=True)


def test_bad_input_is_one_line(tmp_path):
    write_folder(tmp_path / "formatted_csvs", "formatted", {1: 5})
    write_folder(tmp_path / "predicted_csvs", "predicted", {1: 4})
    cases = [
        (
            ["--predictions", str(tmp_path / "predicted_csvs"), "--trace", str(tmp_path / "formatted_csvs")],
            "prompt_1_data_predicted.csv: prompt 1 has predictions for 4 tokens",
        ),
        (["--predictions", str(tmp_path / "formatted_csvs")], "no 'Predicted Expert IDs' column"),
        (["--predictions", str(tmp_path)], "holds no MoE-Beyond CSVs itself"),
        (["--predictions", str(tmp_path / "predicted_csvs"), "--split", "test"], "--split test"),
        (["--predictions", str(tmp_path / "predicted_csvs"), "--overprovision", "2"], "over-provision m=[2]"),
        (["--predictor", "prev-token"], "--predictor needs --trace"),
    ]
    for argv, message in cases:
        out = run_cli("eval", *argv, "--num-experts", str(E))
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moert eval: error:") and message in lines[0], lines


def test_the_real_traces_are_not_predictions(shared_traces, capsys):
    assert main(["eval", "--predictions", str(shared_traces / "prompt_1_data.csv")]) == 2
    assert "no 'Predicted Expert IDs' column" in capsys.readouterr().err


def test_recorded_predictions_need_a_predictor_or_predictions(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--trace", "x"])
    assert "one of the arguments --predictor --predictions is required" in capsys.readouterr().err
