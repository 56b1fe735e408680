"""Recorded predictions (MoE-Beyond's ``Predicted Expert IDs``): values, alignment with a trace, errors."""

from __future__ import annotations

import csv

import pytest
import torch
from moe_beyond_fixtures import E, K, routing, set_cell, write_folder, write_prompt

from moert.trace import InMemoryTrace, TraceFormatError, open_trace
from moert.trace.importers import recorded_predictions


def _padded(rows: list[list[list[int]]], width: int) -> torch.Tensor:
    return torch.tensor([[r + [-1] * (width - len(r)) for r in layer] for layer in rows])


def test_values_and_order_as_recorded(tmp_path):
    made = write_folder(tmp_path, "predicted", {3: 4, 1: 2})
    got = recorded_predictions(tmp_path, num_experts=E)
    assert sorted(got) == [1, 3]
    for n, want in made.items():
        assert got[n].dtype == torch.int64 and got[n].shape == (3, want["experts"].shape[1], K)
        assert torch.equal(got[n], _padded(want["predicted"], K))


def test_aligned_with_the_trace(tmp_path):
    write_folder(tmp_path, "predicted", {3: 4, 1: 2, 8: 5})
    trace = open_trace(tmp_path, num_experts=E)
    got = recorded_predictions(tmp_path, trace)
    assert list(got) == [s.seq_id for s in trace.sequences()]
    for s in trace.sequences():
        assert got[s.seq_id].shape[:2] == s.experts.shape[:2]
    # a trace of fewer sequences gets exactly its own ids
    first = next(iter(trace.sequences()))
    small = InMemoryTrace(trace.meta, [first], path="first")
    assert list(recorded_predictions(tmp_path, small)) == [first.seq_id]


def test_width_is_the_longest_list_in_the_folder(tmp_path):
    experts = routing(2)
    wide = [[[0, 1, 2, 3, 4, 5], [1]], [[2], []], [[3], [4]]]
    narrow = [[[0], [1]], [[2], [3]], [[4], [5]]]
    write_prompt(tmp_path / "prompt_1_data_predicted.csv", experts, kind="predicted", predicted=wide)
    write_prompt(tmp_path / "prompt_2_data_predicted.csv", experts, kind="predicted", predicted=narrow)
    got = recorded_predictions(tmp_path, open_trace(tmp_path, num_experts=E))
    assert got[1].shape == got[2].shape == (3, 2, 6)
    assert got[1][1, 1].tolist() == [-1] * 6
    assert got[2][0, 0].tolist() == [0, -1, -1, -1, -1, -1]


def test_a_folder_without_predictions(tmp_path):
    write_folder(tmp_path, "formatted", {1: 3})
    with pytest.raises(TraceFormatError) as info:
        recorded_predictions(tmp_path, num_experts=E)
    msg = str(info.value)
    assert "prompt_1_data_formatted.csv: line 1: no 'Predicted Expert IDs' column" in msg
    assert "predicted_csvs" in msg


def test_predicted_files_without_the_column(tmp_path):
    write_folder(tmp_path, "predicted", {1: 3})
    f = tmp_path / "prompt_1_data_predicted.csv"
    rows = list(csv.reader(f.read_text().splitlines()))
    with open(f, "w", newline="") as fh:
        csv.writer(fh).writerows(r[:-1] for r in rows)  # the routing stays a trace
    assert open_trace(tmp_path, num_experts=E).meta.num_sequences == 1
    with pytest.raises(
        TraceFormatError, match="prompt_1_data_predicted.csv: line 1: no 'Predicted Expert IDs'"
    ):
        recorded_predictions(tmp_path, num_experts=E)


def test_other_prompts_under_the_same_numbers(tmp_path):
    """MoE-Beyond's formatted_csvs and predicted_csvs share numbers, not prompts: a clear error."""
    write_folder(tmp_path / "formatted_csvs", "formatted", {1: 5, 2: 3})
    write_folder(tmp_path / "predicted_csvs", "predicted", {1: 4, 2: 3})
    trace = open_trace(tmp_path / "formatted_csvs", num_experts=E)
    with pytest.raises(TraceFormatError) as info:
        recorded_predictions(tmp_path / "predicted_csvs", trace)
    msg = str(info.value)
    assert "prompt_1_data_predicted.csv: prompt 1 has predictions for 4 tokens" in msg
    assert "has 5" in msg and "recorded on another prompt" in msg
    assert "moert eval --predictions" in msg


def test_same_length_but_another_routing(tmp_path):
    write_folder(tmp_path / "formatted_csvs", "formatted", {1: 3}, seed=0)
    write_folder(tmp_path / "predicted_csvs", "predicted", {1: 3}, seed=5)
    trace = open_trace(tmp_path / "formatted_csvs", num_experts=E)
    with pytest.raises(TraceFormatError, match=r"prompt_1_data_predicted.csv: layer 1 token #0 routes to"):
        recorded_predictions(tmp_path / "predicted_csvs", trace)


def test_prompts_missing_from_the_predictions(tmp_path):
    write_folder(tmp_path / "trace", "predicted", {1: 3, 2: 3, 9: 2})
    write_folder(tmp_path / "preds", "predicted", {1: 3, 2: 3})
    trace = open_trace(tmp_path / "trace", num_experts=E)
    with pytest.raises(TraceFormatError) as info:
        recorded_predictions(tmp_path / "preds", trace)
    msg = str(info.value)
    assert "no recorded predictions for 1 of the sequences" in msg and "prompt 9" in msg
    assert "holds prompts 1..2" in msg


def test_layers_must_match(tmp_path):
    write_folder(tmp_path, "predicted", {1: 3})
    trace = open_trace(tmp_path, num_experts=E)
    trace = InMemoryTrace(trace.meta, list(trace.sequences()))
    f = tmp_path / "prompt_1_data_predicted.csv"
    rows = f.read_text().splitlines()
    f.write_text("\n".join(r.replace("5,", "6,", 1) if r.startswith("5,") else r for r in rows) + "\n")
    with pytest.raises(TraceFormatError, match=r"layer ids \[1, 2, 6\] differ from the trace's \[1, 2, 5\]"):
        recorded_predictions(tmp_path, trace)


@pytest.mark.parametrize(
    "cell, match",
    [
        (f"[0, {E + 3}]", rf"expert id {E + 3} is out of range"),
        ("[2, 2]", r"repeat an id"),
        ("", r"Predicted Expert IDs is missing"),
        ("nan", r"Predicted Expert IDs is missing"),
    ],
)
def test_bad_prediction_cells_name_file_and_line(tmp_path, cell, match):
    write_folder(tmp_path, "predicted", {1: 3, 2: 2})
    f = tmp_path / "prompt_2_data_predicted.csv"
    set_cell(f, 4, 3, cell)
    with pytest.raises(TraceFormatError, match=f"prompt_2_data_predicted.csv: line 4: .*{match}"):
        recorded_predictions(tmp_path, num_experts=E)


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02", b"Layer ID,Token\n1,0\n", b'Layer ID,Token,"'])
def test_garbled_or_empty_files(tmp_path, content):
    write_folder(tmp_path, "predicted", {1: 3})
    (tmp_path / "prompt_2_data_predicted.csv").write_bytes(content)
    with pytest.raises(TraceFormatError, match="prompt_2_data_predicted.csv"):
        recorded_predictions(tmp_path, num_experts=E)
