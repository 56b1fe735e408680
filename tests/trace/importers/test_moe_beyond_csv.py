"""MoE-Beyond CSV importer: every published layout (fixtures written here), folder kinds, malformed files,
the real traces."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch
from moe_beyond_fixtures import (
    BASE_HEADER,
    LAYERS,
    E,
    K,
    routing,
    set_cell,
    write_folder,
    write_prompt,
)

from moert.cli import main as cli_main
from moert.cli import trace as trace_cli
from moert.trace import TraceFormatError, detect_format, open_trace
from moert.trace.importers.moe_beyond_csv import HEADERS, parse_csv, read_csv


def make_csv(path, T=5, *, header=HEADERS[0], extra=(), seed=0):
    """Writes a valid CSV with ``header`` plus ``extra`` columns; returns (tokens, experts (L, T, k))."""
    experts = routing(T, seed)
    tokens = [f'Ġtok,{t}"q' for t in range(T)]  # commas and quotes exercise CSV quoting
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(header) + list(extra))
        for li, layer in enumerate(LAYERS):
            for t in range(T):
                ids = "[" + ", ".join(str(int(x)) for x in experts[li, t]) + "]"
                row = [layer] + ([0] if "Batch Number" in header else []) + [tokens[t], ids]
                fill = {"Predicted Expert IDs": "[1, 2]", "Token Embedding Vector": "[0.5, -1.25, 3e-4]"}
                w.writerow(row + [fill[c] for c in extra])
    return tokens, experts


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("Predicted Expert IDs",),
        ("Token Embedding Vector",),
        ("Predicted Expert IDs", "Token Embedding Vector"),
    ],
)
def test_parse_round_trip(tmp_path, header, extra):
    f = tmp_path / "prompt_3_data.csv"
    tokens, experts = make_csv(f, header=header, extra=extra)
    layers, got_tokens, got = parse_csv(f, num_experts=E)
    assert layers == LAYERS and got_tokens == tokens
    assert torch.equal(got, experts)
    predicted = read_csv(f, num_experts=E).predicted
    assert (predicted is not None) == ("Predicted Expert IDs" in extra)


@pytest.mark.parametrize("kind", ["plain", "formatted", "predicted"])
def test_each_published_layout_reads_as_a_trace(tmp_path, kind):
    made = write_folder(tmp_path / kind, kind, {10: 4, 2: 3, 7: 6})
    trace = open_trace(tmp_path / kind, num_experts=E)
    assert detect_format(tmp_path / kind) == "moe-beyond-csv"
    assert trace.kind == kind and trace.has_predictions == (kind == "predicted")
    assert (trace.meta.num_sequences, trace.meta.num_tokens, trace.meta.top_k) == (3, 13, K)
    assert trace.meta.layers == LAYERS and kind in trace.meta.source
    seqs = list(trace.sequences())
    assert [s.seq_id for s in seqs] == [2, 7, 10]
    for s in seqs:
        want = made[s.seq_id]
        # the predicted layout lists each row's ids sorted: compare as sets
        assert torch.equal(s.experts.sort(-1).values, want["experts"].sort(-1).values)
        assert s.positions.tolist() == list(range(s.num_tokens))
        # the predicted layout's Token column is the position: no token strings
        assert s.tokens == (None if kind == "predicted" else want["tokens"])


@pytest.mark.parametrize("kind", ["plain", "formatted", "predicted"])
def test_one_file_of_each_layout(tmp_path, kind):
    write_folder(tmp_path, kind, {4: 3})
    (f,) = tmp_path.glob("*.csv")
    seqs = list(open_trace(f, num_experts=E).sequences())
    assert [s.seq_id for s in seqs] == [4] and seqs[0].num_tokens == 3


def test_mixed_folder_lists_the_files_of_each_kind(tmp_path):
    write_folder(tmp_path, "plain", {1: 2, 2: 2})
    write_folder(tmp_path, "predicted", {1: 3})
    with pytest.raises(TraceFormatError) as info:
        open_trace(tmp_path, num_experts=E)
    msg = str(info.value)
    assert "mixes MoE-Beyond file kinds" in msg
    assert "2 plain" in msg and "prompt_1_data.csv, prompt_2_data.csv" in msg
    assert "1 predicted" in msg and "prompt_1_data_predicted.csv" in msg
    assert "one folder must hold one kind" in msg and "pass that folder" in msg


@pytest.mark.parametrize("start", ["", "test_datasets"])
def test_repository_root_names_the_folders_to_pass(tmp_path, start):
    write_folder(tmp_path / "test_datasets" / "formatted_csvs", "formatted", {1: 5, 2: 4})
    write_folder(tmp_path / "test_datasets" / "predicted_csvs", "predicted", {1: 3})
    write_folder(tmp_path / "expert_activation_scripts" / "training_data_eamc", "plain", {5: 2})
    root = tmp_path / start
    assert detect_format(root) == "moe-beyond-csv"
    with pytest.raises(TraceFormatError) as info:
        open_trace(root, num_experts=E)
    msg = str(info.value)
    assert "holds no MoE-Beyond CSVs itself" in msg and "Pass one of them" in msg
    assert "formatted_csvs/ (2 formatted: routing)" in msg
    assert "predicted_csvs/ (1 predicted: routing + recorded predictions)" in msg
    assert ("training_data_eamc/ (1 plain: routing)" in msg) == (start == "")
    assert "different prompts" in msg


def test_folder_without_moe_beyond_files(tmp_path):
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(TraceFormatError, match=r"no MoE-Beyond CSV files .*found notes\.csv"):
        open_trace(tmp_path, format="moe-beyond-csv")
    with pytest.raises(FileNotFoundError):
        open_trace(tmp_path / "missing", format="moe-beyond-csv")


def corrupt(path, line: int, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = new + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda f: corrupt(f, 1, "Layer,Token,Experts"), r"line 1: header"),
        (lambda f: corrupt(f, 1, ",".join(BASE_HEADER) + ",Extra"), r"line 1: header"),
        (lambda f: corrupt(f, 3, '1,0,x,"[1, 2, 3"'), r"line 3: Activated Expert IDs .* not a list"),
        (lambda f: corrupt(f, 3, '1,0,x,"[1, 2, a, 4]"'), r"line 3: Activated Expert IDs .* not integers"),
        (lambda f: corrupt(f, 4, f'1,0,x,"[1, 2, 3, {E}]"'), rf"line 4: .*expert id {E} is out of range"),
        (lambda f: corrupt(f, 4, '1,0,x,"[1, 2, -3, 4]"'), r"line 4: .*expert id -3 is out of range"),
        (lambda f: corrupt(f, 5, '1,0,x,"[1, 2, 2, 4]"'), r"line 5: .*expert ids \[1, 2, 2, 4\] repeat"),
        (lambda f: corrupt(f, 5, '1,0,x,"[1, 2, 4]"'), r"line 5: 3 expert ids, expected top-k = 4"),
        (lambda f: corrupt(f, 3, "1,0,x,"), r"line 3: Activated Expert IDs is missing"),
        (lambda f: corrupt(f, 3, "1,0,x,nan"), r"line 3: Activated Expert IDs is missing"),
        (lambda f: corrupt(f, 3, '1,0,x,"[]"'), r"line 3: Activated Expert IDs: the expert id list is empty"),
        (lambda f: corrupt(f, 9, '2,0,other,"[1, 2, 3, 4]"'), r"line 9: layer 2 token #2 is 'other'"),
        (lambda f: corrupt(f, 3, 'one,0,x,"[1, 2, 3, 4]"'), r"line 3: Layer ID 'one' is not an integer"),
        (lambda f: corrupt(f, 3, '1,1,x,"[1, 2, 3, 4]"'), r"line 3: Batch Number '1' is not 0"),
        (lambda f: corrupt(f, 3, "1,0,x"), r"line 3: expected 4 fields"),
        (lambda f: corrupt(f, 3, '1,0,"x,"[1, 2, 3, 4]"'), r"line \d+: "),
        (lambda f: f.write_text("".join(f.read_text().splitlines(keepends=True)[:-2])), r"truncated"),
        (lambda f: f.write_text(f.read_text().splitlines(keepends=True)[0]), r"no data rows"),
        (lambda f: f.write_text(""), r"line 1: empty file"),
        (lambda f: f.write_bytes(b"\xff\xfe\x00garbage\x81"), r"not UTF-8 text"),
        (lambda f: f.write_text("Layer ID,Batch Number\x00,Token"), r"NUL bytes"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, edit, match):
    f = tmp_path / "prompt_1_data.csv"
    make_csv(f)
    edit(f)
    with pytest.raises(TraceFormatError, match=match) as info:
        parse_csv(f, num_experts=E)
    assert str(f) in str(info.value)


@pytest.mark.parametrize(
    "cell, match",
    [
        (
            f"[1, 2, {E}]",
            rf"line 2: Predicted Expert IDs: expert id {E} is out of range \[0, {E}\); pass --num-experts",
        ),
        ("[1, 3, 3]", r"line 2: Predicted Expert IDs: expert ids \[1, 3, 3\] repeat an id"),
        ("", r"line 2: Predicted Expert IDs is missing"),
        ("NaN", r"line 2: Predicted Expert IDs is missing"),
        ("[1, x]", r"line 2: Predicted Expert IDs .* are not integers"),
        ("1, 2", r"line 2: Predicted Expert IDs .* is not a list"),
    ],
)
def test_malformed_predictions(tmp_path, cell, match):
    write_folder(tmp_path, "predicted", {1: 3})
    f = tmp_path / "prompt_1_data_predicted.csv"
    set_cell(f, 2, 3, cell)
    with pytest.raises(TraceFormatError, match=match) as info:
        read_csv(f, num_experts=E)
    assert str(f) in str(info.value)


def test_predictions_may_hold_more_or_fewer_than_k_ids(tmp_path):
    experts = routing(2)
    preds = [
        [
            [0],
            [],
        ],
        [[1, 2, 3, 4, 5, 6], [7]],
        [[8, 9], [10, 11, 12]],
    ]  # per layer, per token
    f = tmp_path / "prompt_1_data_predicted.csv"
    write_prompt(f, experts, kind="predicted", predicted=preds)
    got = read_csv(f, num_experts=E)
    assert got.predicted.shape == (3, 2, 6)  # the longest list
    assert got.predicted[0, 0].tolist() == [0, -1, -1, -1, -1, -1]
    assert got.predicted[0, 1].tolist() == [-1] * 6  # "[]": an empty prediction
    assert got.predicted[1, 0].tolist() == [1, 2, 3, 4, 5, 6]


def test_regrouped_layers_are_rejected(tmp_path):
    f = tmp_path / "prompt_1_data.csv"
    make_csv(f, T=2)
    rows = f.read_text().splitlines(keepends=True)
    # layer 1, layer 2, layer 1 again
    f.write_text("".join(rows[:5] + rows[1:3]))
    with pytest.raises(TraceFormatError, match="layer 1 appears again"):
        parse_csv(f, num_experts=E)


def test_real_shared_traces(shared_traces):
    names = ["prompt_1_data.csv", "prompt_2_data.csv", "prompt_500_data.csv"]
    for name in names:
        layers, tokens, experts = parse_csv(shared_traces / name, num_experts=64)
        assert layers == tuple(range(1, 27))
        assert experts.shape == (26, len(tokens), 6)
        assert tokens[0] == "<｜begin▁of▁sentence｜>"


def _convert_args(src, out):
    parser = argparse.ArgumentParser()
    trace_cli.add_arguments(parser)
    return parser.parse_args(["convert", str(src), "--out", str(out), "--num-experts", str(E)])


@pytest.mark.parametrize("kind", ["formatted", "predicted"])
def test_convert_each_layout(tmp_path, kind, capsys):
    made = write_folder(tmp_path / "csv", kind, {3: 4, 1: 2})
    assert trace_cli.run(_convert_args(tmp_path / "csv", tmp_path / "moert")) == 0
    out = capsys.readouterr().out
    assert ("moert eval --predictions" in out) == (kind == "predicted")
    converted = {s.seq_id: s for s in open_trace(tmp_path / "moert").sequences()}
    assert sorted(converted) == [1, 3]
    for n, want in made.items():
        assert torch.equal(converted[n].experts.sort(-1).values, want["experts"].sort(-1).values)


def test_convert_cli_reports_malformed_input(tmp_path, capsys):
    src = tmp_path / "csv"
    src.mkdir()
    make_csv(src / "prompt_1_data.csv")
    make_csv(src / "prompt_2_data.csv")
    corrupt(src / "prompt_2_data.csv", 4, '1,0,x,"[1, 2, 3, 99]"')
    assert trace_cli.run(_convert_args(src, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "prompt_2_data.csv: line 4: Activated Expert IDs: expert id 99 is out of range" in err


@pytest.mark.parametrize("kind", ["formatted", "predicted"])
def test_simulate_replays_the_published_layouts(tmp_path, kind, capsys):
    write_folder(tmp_path / kind, kind, {1: 6, 2: 5})
    argv = ["simulate", str(tmp_path / kind), "--num-experts", str(E), "--capacity", "0.5", "--policy", "lru"]
    assert cli_main([*argv, "--no-progress"]) == 0
    assert "lru" in capsys.readouterr().out


def test_simulate_on_a_mixed_folder_is_one_line(tmp_path, capsys):
    write_folder(tmp_path, "formatted", {1: 3})
    write_folder(tmp_path, "predicted", {1: 3})
    assert cli_main(["simulate", str(tmp_path), "--num-experts", str(E), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moert simulate: error:") and "\n" not in err
    assert "prompt_1_data_formatted.csv" in err and "prompt_1_data_predicted.csv" in err
