"""The moert trace format: round trip, streaming over shards, validation of corrupt files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moert.trace import (
    MANIFEST,
    SequenceTrace,
    TraceFormatError,
    TraceMeta,
    TraceWriter,
    detect_format,
    open_trace,
)

E, K, LAYERS, H = 12, 3, (1, 3, 4), 16


def random_sequence(
    seq_id: int,
    T: int,
    *,
    ids: bool = True,
    strings: bool = False,
    scores: bool = False,
    hidden: bool = False,
) -> SequenceTrace:
    g = torch.Generator().manual_seed(seq_id)
    experts = torch.rand(len(LAYERS), T, E, generator=g).argsort(-1)[..., :K]  # [L, T, k] distinct ids
    return SequenceTrace(
        seq_id=seq_id,
        positions=torch.arange(T),
        experts=experts,
        is_prefill=torch.arange(T) < T // 2,
        token_ids=torch.randint(0, 1000, (T,), generator=g) if ids else None,
        tokens=[f"tok{seq_id}_{t}é\n," for t in range(T)] if strings else None,
        scores=torch.randn(len(LAYERS), T, E, generator=g) if scores else None,
        hidden=torch.randn(len(LAYERS), T, H, generator=g).half() if hidden else None,
    )


def write(tmp_path, seqs, shard_tokens=10, **kw):
    out = tmp_path / "trace"
    with TraceWriter(
        out,
        model_type="qwen3_moe",
        layers=LAYERS,
        num_experts=E,
        top_k=K,
        source="test",
        shard_tokens=shard_tokens,
        **kw,
    ) as w:
        for s in seqs:
            w.add(s)
    return out, w.meta


def assert_same(a: SequenceTrace, b: SequenceTrace) -> None:
    assert a.seq_id == b.seq_id
    for name in ("positions", "experts", "is_prefill", "token_ids", "scores", "hidden"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype or name == "experts", (name, x.dtype, y.dtype)
            assert torch.equal(x.to(y.dtype), y), (
                f"{name}: worst mismatch {(x.double() - y.double()).abs().max()}"
            )
    assert a.tokens == b.tokens


@pytest.mark.parametrize(
    "flags",
    [
        dict(ids=True),
        dict(ids=False, strings=True),
        dict(ids=True, scores=True, hidden=True),
        dict(ids=False, strings=False, scores=True),
    ],
)
def test_round_trip_over_several_shards(tmp_path, flags):
    seqs = [random_sequence(i, T, **flags) for i, T in enumerate([7, 1, 13, 4, 9])]
    out, meta = write(
        tmp_path,
        seqs,
        has_scores=flags.get("scores", False),
        has_hidden=flags.get("hidden", False),
        hidden_size=H,
        shard_tokens=5,
    )
    assert len(list(out.glob("shard_*.safetensors"))) >= 3
    trace = open_trace(out)
    assert trace.meta == meta
    assert (trace.meta.num_tokens, trace.meta.num_sequences) == (34, 5)
    assert trace.meta.layers == LAYERS
    got = list(trace.sequences())
    assert len(got) == len(seqs)
    for a, b in zip(seqs, got):
        assert_same(a, b)
        assert b.experts.dtype == torch.int64


def test_writer_rejects_bad_sequences(tmp_path):
    w = TraceWriter(tmp_path / "t", model_type="x", layers=LAYERS, num_experts=E, top_k=K)
    good = random_sequence(0, 5)
    bad_shape = random_sequence(1, 5)
    bad_shape.experts = bad_shape.experts[:, :, :2]
    with pytest.raises(TraceFormatError, match="experts.*shape"):
        w.add(bad_shape)
    bad_id = random_sequence(2, 5)
    bad_id.experts[1, 2, 0] = E
    with pytest.raises(TraceFormatError, match=f"expert id {E} is out of range"):
        w.add(bad_id)
    dup = random_sequence(3, 5)
    dup.experts[0, 1, 1] = dup.experts[0, 1, 0]
    with pytest.raises(TraceFormatError, match="repeats an expert id"):
        w.add(dup)
    w.add(good)
    with pytest.raises(ValueError, match="token_ids"):
        w.add(random_sequence(4, 5, ids=False))
    w.close()
    with pytest.raises(FileExistsError, match="overwrite"):
        TraceWriter(tmp_path / "t", model_type="x", layers=LAYERS, num_experts=E, top_k=K)


def test_validation_names_file_and_field(tmp_path):
    out, _ = write(tmp_path, [random_sequence(i, 6) for i in range(3)])
    manifest = json.loads((out / MANIFEST).read_text())
    shard = out / manifest["shards"][0]["file"]

    tensors = load_file(str(shard))
    tensors["experts"][0, 0, 0] = E + 5
    save_file(tensors, str(shard))
    with pytest.raises(TraceFormatError, match=rf"{shard.name}: field 'experts': expert id {E + 5}"):
        list(open_trace(out).sequences())

    del tensors["positions"]
    save_file(tensors, str(shard))
    with pytest.raises(TraceFormatError, match=rf"{shard.name}: field 'positions' is missing"):
        list(open_trace(out).sequences())

    shard.write_bytes(b"garbage")
    with pytest.raises(TraceFormatError, match="not a readable safetensors"):
        list(open_trace(out).sequences())

    shard.unlink()
    with pytest.raises(TraceFormatError, match="missing"):
        list(open_trace(out).sequences())

    bad = dict(manifest, top_k="3")
    (out / MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(TraceFormatError, match=r"manifest.json: field 'top_k'"):
        open_trace(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(TraceFormatError, match="not valid JSON"):
        open_trace(out)


def test_count_mismatch_is_an_error(tmp_path):
    out, _ = write(tmp_path, [random_sequence(i, 6) for i in range(2)], shard_tokens=100)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["num_tokens"] += 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TraceFormatError, match="num_tokens"):
        list(open_trace(out).sequences())


def test_detect_format(tmp_path):
    out, _ = write(tmp_path, [random_sequence(0, 3)])
    assert detect_format(out) == "moert"
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "prompt_1_data.csv").write_text("x")
    assert detect_format(tmp_path / "csv") == "moe-beyond-csv"
    (tmp_path / "esft").mkdir()
    (tmp_path / "esft" / "expert_weights_1.txt").write_text("x")
    assert detect_format(tmp_path / "esft") == "esft"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot tell the trace format"):
        detect_format(tmp_path / "empty")


def test_meta_checks():
    with pytest.raises(ValueError, match="top_k"):
        TraceMeta(model_type="x", layers=(0,), num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="repeated"):
        TraceMeta(model_type="x", layers=(0, 0), num_experts=4, top_k=2)
