"""ESFT expert-score importer: a fixture written by the test, malformed lines, conversion."""

from __future__ import annotations

import pytest
import torch

from moert.trace import TraceFormatError, TraceWriter, detect_format, open_trace
from moert.trace.importers.esft import ESFTTrace

E, K, LAYERS = 16, 3, (1, 2, 4)


def make_esft(root, lengths=(4, 1, 6), seed=0):
    """Writes expert_weights_<layer>.txt files; returns experts per sample (L, T, k)."""
    g = torch.Generator().manual_seed(seed)
    samples = [torch.rand(len(LAYERS), T, E, generator=g).argsort(-1)[..., :K] for T in lengths]
    root.mkdir(parents=True, exist_ok=True)
    for li, layer in enumerate(LAYERS):
        with open(root / f"expert_weights_{layer}.txt", "w") as fh:
            for s in samples:
                ids = "\t".join(str(int(x)) for x in s[li].flatten())
                weights = "\t".join(f"{float(w):.4f}" for w in torch.rand(s[li].numel(), generator=g))
                fh.write(ids + "\t\t" + weights + "\n")
    return samples


def test_round_trip_and_convert(tmp_path):
    samples = make_esft(tmp_path / "esft")
    trace = open_trace(tmp_path / "esft", top_k=K, num_experts=E)
    assert isinstance(trace, ESFTTrace)
    assert trace.meta.layers == LAYERS
    assert (trace.meta.num_sequences, trace.meta.num_tokens) == (3, 11)
    seqs = list(trace.sequences())
    for i, (s, want) in enumerate(zip(seqs, samples)):
        assert s.seq_id == i and torch.equal(s.experts, want)
    with TraceWriter(tmp_path / "out", trace.meta) as w:
        for s in seqs:
            w.add(s)
    back = list(open_trace(tmp_path / "out").sequences())
    assert all(torch.equal(a.experts, b.experts) for a, b in zip(seqs, back))


def rewrite_line(path, i, new):
    lines = path.read_text().splitlines(keepends=True)
    lines[i] = new + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda f: rewrite_line(f, 1, "1\t2\t3"), r"line 2: expected expert ids, a double tab"),
        (lambda f: rewrite_line(f, 0, "1\tx\t3\t\t0.1\t0.2\t0.3"), r"line 1: expert ids are not"),
        (
            lambda f: rewrite_line(f, 1, f"1\t2\t{E}\t\t0.1\t0.2\t0.3"),
            rf"line 2: expert id {E} is out of range",
        ),
        (lambda f: rewrite_line(f, 1, "1\t2\t-1\t\t0.1\t0.2\t0.3"), r"line 2: expert id -1 is out of range"),
        (  # past int64 (found by fuzz/fuzz_esft.py: was an OverflowError)
            lambda f: rewrite_line(f, 1, f"1\t2\t{10**30}\t\t0.1\t0.2\t0.3"),
            rf"line 2: expert id {10**30} is out of range",
        ),
        (lambda f: rewrite_line(f, 1, "1\t1\t3\t\t0.1\t0.2\t0.3"), r"line 2: row 0 repeats an expert id"),
        (lambda f: rewrite_line(f, 1, "1\t2\t3\t4\t\t0.1\t0.2\t0.3\t0.4"), r"not a multiple of top_k"),
        (lambda f: rewrite_line(f, 1, "1\t2\t3\t\t0.1\t0.2"), r"3 expert ids but 2 gate weights"),
        (lambda f: rewrite_line(f, 1, "1\t2\t3\t\t0.1\tnan\t0.3"), r"NaN"),
        (lambda f: rewrite_line(f, 1, "1\t2\t3\t4\t5\t6\t\t1\t1\t1\t1\t1\t1"), r"line 2: 2 tokens, but"),
        (
            lambda f: f.write_text("".join(f.read_text().splitlines(keepends=True)[:2])),
            r"line 3: file ends early",
        ),
    ],
)
def test_malformed(tmp_path, edit, match):
    make_esft(tmp_path / "esft")
    f = tmp_path / "esft" / "expert_weights_2.txt"
    edit(f)
    with pytest.raises(TraceFormatError, match=match) as info:
        list(open_trace(tmp_path / "esft", format="esft", top_k=K, num_experts=E).sequences())
    assert "expert_weights_" in str(info.value)


def test_rank_folders_read_rank_by_rank(tmp_path):
    """ESFT's multi-process scorer writes <output_dir>/rank_<r>/expert_weights_<layer>.txt."""
    scores = tmp_path / "scores"
    a = make_esft(scores / "rank_0", lengths=(2, 3), seed=1)
    b = make_esft(scores / "rank_1", lengths=(4,), seed=2)
    (scores / "summary.json").write_text("{}")
    assert detect_format(scores) == "esft"
    trace = open_trace(scores, top_k=K, num_experts=E)
    assert (trace.meta.num_sequences, trace.meta.num_tokens, trace.meta.layers) == (3, 9, LAYERS)
    seqs = list(trace.sequences())
    assert [s.seq_id for s in seqs] == [0, 1, 2]
    assert all(torch.equal(s.experts, want) for s, want in zip(seqs, a + b))


def test_rank_folders_must_hold_the_same_layers(tmp_path):
    make_esft(tmp_path / "rank_0")
    make_esft(tmp_path / "rank_1")
    (tmp_path / "rank_1" / "expert_weights_4.txt").unlink()
    with pytest.raises(TraceFormatError, match=r"rank_1: layers \[1, 2\] differ from \[1, 2, 4\]"):
        open_trace(tmp_path, format="esft", top_k=K, num_experts=E)


def test_flat_files_beside_rank_folders_is_an_error(tmp_path):
    make_esft(tmp_path)
    make_esft(tmp_path / "rank_0")
    with pytest.raises(TraceFormatError, match="both expert_weights_<layer>.txt files and rank_<r>/ folders"):
        open_trace(tmp_path, format="esft", top_k=K, num_experts=E)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00\x81", b"1\t2\t3"])
def test_garbled_or_empty_files(tmp_path, content):
    make_esft(tmp_path)
    (tmp_path / "expert_weights_2.txt").write_bytes(content)
    with pytest.raises(TraceFormatError, match="expert_weights_"):
        list(open_trace(tmp_path, format="esft", top_k=K, num_experts=E).sequences())
