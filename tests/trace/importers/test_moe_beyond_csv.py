"""MoE-Beyond CSV importer: round trip through fixtures made here, malformed files, the real traces."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from moert.cli import trace as trace_cli
from moert.trace import TraceFormatError, open_trace
from moert.trace.importers.moe_beyond_csv import HEADERS, parse_csv

E, K = 16, 4
LAYERS = (1, 2, 5)


def make_csv(path, T=5, *, header=HEADERS[0], predicted=False, seed=0):
    """Writes a valid CSV; returns (tokens, experts (L, T, k))."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(len(LAYERS), T, E, generator=g).argsort(-1)[..., :K]
    tokens = [f'Ġtok,{t}"q' for t in range(T)]  # commas and quotes exercise CSV quoting
    cols = list(header) + (["Predicted Expert IDs"] if predicted else [])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for li, layer in enumerate(LAYERS):
            for t in range(T):
                ids = "[" + ", ".join(str(int(x)) for x in experts[li, t]) + "]"
                row = [layer] + ([0] if "Batch Number" in header else []) + [tokens[t], ids]
                w.writerow(row + (["[1, 2]"] if predicted else []))
    return tokens, experts


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("predicted", [False, True])
def test_parse_round_trip(tmp_path, header, predicted):
    f = tmp_path / "prompt_3_data.csv"
    tokens, experts = make_csv(f, header=header, predicted=predicted)
    layers, got_tokens, got = parse_csv(f, num_experts=E)
    assert layers == LAYERS and got_tokens == tokens
    assert torch.equal(got, experts)


def test_directory_trace_and_convert(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    made = {n: make_csv(src / f"prompt_{n}_data.csv", T=3 + n, seed=n) for n in (10, 2, 7)}
    trace = open_trace(src, num_experts=E)
    assert trace.meta.num_sequences == 3 and trace.meta.num_tokens == sum(3 + n for n in made)
    assert (trace.meta.top_k, trace.meta.layers) == (K, LAYERS)
    seqs = list(trace.sequences())
    assert [s.seq_id for s in seqs] == [2, 7, 10]

    parser = argparse.ArgumentParser()
    trace_cli.add_arguments(parser)
    out = tmp_path / "moert"
    args = parser.parse_args(["convert", str(src), "--out", str(out), "--num-experts", str(E)])
    assert trace_cli.run(args) == 0
    converted = list(open_trace(out).sequences())
    assert open_trace(out).meta == trace.meta
    for s, c in zip(seqs, converted):
        tokens, experts = made[s.seq_id]
        assert c.seq_id == s.seq_id and c.tokens == tokens
        assert torch.equal(c.experts, experts)
        assert bool(c.is_prefill.all())


def corrupt(path, line: int, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = new + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda f: corrupt(f, 1, "Layer,Token,Experts"), r"line 1: header"),
        (lambda f: corrupt(f, 3, '1,0,x,"[1, 2, 3"'), r"line 3: expert ids .* not a list"),
        (lambda f: corrupt(f, 3, '1,0,x,"[1, 2, a, 4]"'), r"line 3: expert ids .* not integers"),
        (lambda f: corrupt(f, 4, f'1,0,x,"[1, 2, 3, {E}]"'), rf"line 4: expert id {E} is out of range"),
        (lambda f: corrupt(f, 4, '1,0,x,"[1, 2, -3, 4]"'), r"line 4: expert id -3 is out of range"),
        (lambda f: corrupt(f, 5, '1,0,x,"[1, 2, 2, 4]"'), r"line 5: expert ids \[1, 2, 2, 4\] repeat"),
        (lambda f: corrupt(f, 5, '1,0,x,"[1, 2, 4]"'), r"line 5: 3 expert ids, expected top-k = 4"),
        (lambda f: corrupt(f, 9, '2,0,other,"[1, 2, 3, 4]"'), r"line 9: layer 2 token #2 is 'other'"),
        (lambda f: corrupt(f, 3, 'one,0,x,"[1, 2, 3, 4]"'), r"line 3: Layer ID 'one' is not an integer"),
        (lambda f: corrupt(f, 3, "1,0,x"), r"line 3: expected 4 fields, got 3"),
        (lambda f: f.write_text("".join(f.read_text().splitlines(keepends=True)[:-2])), r"truncated"),
        (lambda f: f.write_text(f.read_text().splitlines(keepends=True)[0]), r"no data rows"),
        (lambda f: f.write_text(""), r"line 1: empty file"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, edit, match):
    f = tmp_path / "prompt_1_data.csv"
    make_csv(f)
    edit(f)
    with pytest.raises(TraceFormatError, match=match) as info:
        parse_csv(f, num_experts=E)
    assert str(f) in str(info.value)


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


def test_convert_cli_reports_malformed_input(tmp_path, capsys):
    src = tmp_path / "csv"
    src.mkdir()
    make_csv(src / "prompt_1_data.csv")
    make_csv(src / "prompt_2_data.csv")
    corrupt(src / "prompt_2_data.csv", 4, '1,0,x,"[1, 2, 3, 99]"')
    parser = argparse.ArgumentParser()
    trace_cli.add_arguments(parser)
    args = parser.parse_args(["convert", str(src), "--out", str(tmp_path / "out"), "--num-experts", str(E)])
    assert trace_cli.run(args) == 2
    err = capsys.readouterr().err
    assert "prompt_2_data.csv: line 4: expert id 99 is out of range" in err
