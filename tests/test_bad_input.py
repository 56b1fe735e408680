"""Bad input, as a new user would give it, across the surface: bindings, ``moert.patch`` /
``moert.load``, every CLI command, importers, predictor and trace files.

Each case must raise one clear error that names the offending value or file and says how to fix
it (API), or exit 2 with one line ``moert CMD: error: ...`` and no traceback (CLI); a failed write
leaves nothing half-written on disk.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import moert
from moert.cli import main as cli_main
from moert.engine import runtime
from moert.models.tiny import random_predictor, save_tiny, tiny_model
from moert.predict.io import save_predictor
from moert.trace import SequenceTrace, TraceFormatError, TraceMeta, TraceWriter, open_trace

# words that say what to do about it (every message must carry one)
FIX = re.compile(
    r"\b(use|pass|must|train|copy|give|load|set|check|put|is not one of|drop|save|run|lower)\b", re.I
)

E, K = 16, 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model, a predictor for it, a moert trace and a MoE-Beyond CSV folder."""
    root = tmp_path_factory.mktemp("bad")
    model = tiny_model("deepseek_v2")
    model_dir = save_tiny(model, root / "model")
    pred = random_predictor(model)
    tensors, extra = pred.state()
    pred_file = save_predictor(root / "pred.safetensors", pred.meta, tensors, extra)
    meta = TraceMeta(model_type="deepseek_v2", layers=(1, 2), num_experts=E, top_k=K)
    g = torch.Generator().manual_seed(0)
    trace_dir = root / "trace"
    with TraceWriter(trace_dir, meta) as w:
        for s in range(3):
            ex = torch.rand(2, 5, E, generator=g).argsort(-1)[..., :K].to(torch.int16)
            w.add(SequenceTrace(s, torch.arange(5), ex, torch.zeros(5, dtype=torch.bool)))
    csv_dir = root / "csv"
    csv_dir.mkdir()
    _write_csv(csv_dir / "prompt_1_data.csv", [[0, 1, 2, 3], [4, 5, 6, 7]])
    return {"root": root, "model": model_dir, "pred": pred_file, "trace": trace_dir, "csv": csv_dir}


def _write_csv(path: Path, rows: list[list[int]], layer: int = 1) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Layer ID", "Batch Number", "Token", "Activated Expert IDs"])
        for t, ids in enumerate(rows):
            w.writerow([layer, 0, f"t{t}", "[" + ", ".join(map(str, ids)) + "]"])


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _shard(d: Path) -> Path:
    return next(d.glob("*.safetensors"))


def _check_error(exc: BaseException, *names: str) -> None:
    msg = str(exc)
    for name in names:
        assert name in msg, f"the error does not name {name!r}: {msg}"
    assert FIX.search(msg), f"the error says nothing about a fix: {msg}"


# -- moert.patch / moert.load --------------------------------------------------------------------

PATCH_CASES = [
    ({"cache_experts": 0}, "cache_experts=0"),
    ({"cache_experts": -1}, "cache_experts=-1"),
    ({"cache_experts": 1.5}, "cache_experts=1.5"),
    ({"cache_experts": "abc"}, "cache_experts='abc'"),
    ({"cache_experts": True}, "cache_experts=True"),
    ({"cache_experts": 2}, "top-k"),  # fewer slots than one layer's top-k (4)
    ({"policy": "nope"}, "policy='nope'"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"copy_streams": 0}, "copy_streams=0"),
    ({"copy_streams": 17}, "copy_streams=17"),
    ({"overprovision": -1}, "-1"),
]


@pytest.mark.parametrize("kwargs, name", PATCH_CASES, ids=[str(c[0]) for c in PATCH_CASES])
def test_patch_rejects(kwargs, name):
    model = tiny_model("deepseek_v2")
    with pytest.raises(ValueError) as info:
        moert.patch(model, **{"device": "cpu", **kwargs})
    _check_error(info.value, name)
    assert moert.handle_of(model) is None, "a failed patch left the model half-patched"


def _damage_shard(kind: str):
    def damage(d: Path) -> str:
        f = _shard(d)
        data = f.read_bytes()
        if kind == "truncated":
            f.write_bytes(data[: len(data) // 2])
        elif kind == "empty":
            f.write_bytes(b"")
        else:  # a header length that points past the end, then garbage
            f.write_bytes(b"\xff\xff\x00\x00\x00\x00\x00\x00{not json")
        return f.name

    return damage


def _damage_config(d: Path) -> str:
    (d / "config.json").write_text("{")
    return "config.json"


def _other_model(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    return "llama"


def _no_weights(d: Path) -> str:
    _shard(d).unlink()
    return "safetensors"


LOAD_CASES = {
    "truncated shard": (_damage_shard("truncated"), ValueError),
    "empty shard": (_damage_shard("empty"), ValueError),
    "garbled shard header": (_damage_shard("garbled"), ValueError),
    "garbled config.json": (_damage_config, ValueError),
    "header for another model": (_other_model, ValueError),
    "no weights": (_no_weights, FileNotFoundError),
}


@pytest.mark.parametrize("case", LOAD_CASES)
def test_load_rejects(files, tmp_path, case):
    damage, exc_type = LOAD_CASES[case]
    d = _copy(files["model"], tmp_path / "m")
    name = damage(d)
    with pytest.raises(exc_type) as info:
        moert.load(d, cache_experts=0.5, device="cpu", progress=False)
    _check_error(info.value, name)


def test_load_of_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        moert.load(tmp_path / "nowhere", device="cpu", progress=False)
    _check_error(info.value, "nowhere")


@pytest.mark.parametrize("case", ["truncated", "empty", "another model"])
def test_predictor_files_are_checked(files, tmp_path, case):
    if case == "another model":
        path, name, model = files["pred"], "model_type", tiny_model("qwen3_moe")
    else:
        data = files["pred"].read_bytes()
        path = tmp_path / "p.safetensors"
        path.write_bytes(data[: len(data) // 2] if case == "truncated" else b"")
        name, model = "p.safetensors", tiny_model("deepseek_v2")
    with pytest.raises(ValueError) as info:
        moert.patch(model, device="cpu", predictor=str(path), policy="score")
    _check_error(info.value, name)
    assert moert.handle_of(model) is None


def test_predictor_with_nan_weights_is_refused_on_save(files, tmp_path):
    pred = random_predictor(tiny_model("deepseek_v2"))
    tensors, extra = pred.state()
    tensors["w1"][0, 0, 0] = float("nan")
    out = tmp_path / "nan.safetensors"
    with pytest.raises(ValueError) as info:
        save_predictor(out, pred.meta, tensors, extra)
    _check_error(info.value, "NaN", "nan.safetensors")
    assert not out.exists(), "a refused predictor was written anyway"


# -- bindings ------------------------------------------------------------------------------------

BINDING_CASES = {
    "pool of 0 layers": (lambda pool: runtime.ExpertPool(0, 4, 64), "num_layers"),
    "slab not a multiple of 16": (lambda pool: runtime.ExpertPool(1, 4, 7), "slab_bytes=7"),
    "cache of 0 slots": (lambda pool: runtime.SlabCache(pool, 0), "0 slots"),
    "cache of 1.5 slots": (lambda pool: runtime.SlabCache(pool, 1.5), "num_slots=1.5"),
    "cache of 'abc' slots": (lambda pool: runtime.SlabCache(pool, "abc"), "num_slots='abc'"),
    "engine of 2.0 lanes": (
        lambda pool: runtime.CopyEngine(runtime.SlabCache(pool, 4), 2.0),
        "num_streams=2.0",
    ),
    "unknown cache policy": (lambda pool: runtime.SlabCache(pool, 4, policy="mru"), "mru"),
    "unknown device": (lambda pool: runtime.SlabCache(pool, 4, device="tpu"), "tpu"),
    "engine of 0 lanes": (lambda pool: runtime.CopyEngine(runtime.SlabCache(pool, 4), 0), "num_streams=0"),
    "expert id >= E": (lambda pool: _engine(pool).acquire(0, [4]), "expert 4"),
    "negative expert id": (lambda pool: _engine(pool).acquire(0, [-1]), "expert -1"),
    "layer >= L": (lambda pool: _engine(pool).acquire(2, [0]), "layer 2"),
    "float expert ids": (lambda pool: _engine(pool).acquire(0, [0.5]), "float"),
    "a cache table of 2**40 entries": (
        lambda pool: runtime.SlabCache.simulated(2**20, 2**20, 4),
        "1099511627776",
    ),
    "expert id past int64": (
        lambda pool: runtime.SlabCache.simulated(2, 4, 4).set_priority(0, 2**64, 0.5),
        str(2**64),
    ),
    "expert id 2**63 in a list": (
        lambda pool: runtime.SlabCache.simulated(2, 4, 4).sim_access(0, [2**63]),
        str(2**63),
    ),
    "replay: a priority row of the wrong width": (
        lambda pool: runtime.SlabCache.simulated(2, 4, 4).replay([0], [[1]], after_scores=[[0.5, 0.5]]),
        "after_scores must be (N, E) = (1, 4)",
    ),
    "replay: a priority row that is not finite": (
        lambda pool: runtime.SlabCache.simulated(2, 4, 4).replay(
            [0], [[1]], after_scores=[[0, float("nan"), 0, 0]]
        ),
        "after_scores[0, 1] is not finite",
    ),
    "replay: a prefetch after the call with expert >= E": (
        lambda pool: runtime.SlabCache.simulated(2, 4, 4).replay([0], [[1]], after_prefetch=[[4]]),
        "after_prefetch[0, 0]=4",
    ),
    "replay: a step larger than the cache without waves": (
        lambda pool: runtime.SlabCache.simulated(1, 8, 2).replay([0], [[0, 1, 2]]),
        "asks for 3 distinct experts",
    ),
}


def _engine(pool):
    return runtime.CopyEngine(runtime.SlabCache(pool, 4, min_slots=2), 1)


@pytest.mark.parametrize("case", BINDING_CASES)
def test_bindings_reject(case):
    call, name = BINDING_CASES[case]
    pool = runtime.ExpertPool(2, 4, 64)
    with pytest.raises(ValueError) as info:
        call(pool)
    assert name in str(info.value), f"the error does not name {name!r}: {info.value}"


# -- traces and importers ------------------------------------------------------------------------


def _csv_case(kind: str):
    def make(d: Path) -> str:
        f = d / "prompt_1_data.csv"
        if kind == "empty":
            f.write_text("")
        elif kind == "garbled":
            f.write_text('Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,"t0,[1, 2\n')
        elif kind == "expert >= E":
            _write_csv(f, [[0, 1, 2, 16], [4, 5, 6, 7]])
        else:  # a routing row that repeats an expert
            _write_csv(f, [[0, 1, 1, 3], [4, 5, 6, 7]])
        return f.name

    return make


@pytest.mark.parametrize("kind", ["empty", "garbled", "expert >= E", "duplicated ids"])
def test_csv_importer_rejects(files, tmp_path, kind):
    d = _copy(files["csv"], tmp_path / "csv")
    name = _csv_case(kind)(d)
    with pytest.raises(TraceFormatError) as info:
        list(open_trace(d, num_experts=E).sequences())
    assert name in str(info.value), f"the error does not name {name}: {info.value}"


def _damage_trace(kind: str):
    def damage(d: Path) -> str:
        if kind == "garbled manifest":
            (d / "manifest.json").write_text("{")
            return "manifest.json"
        shard = next(p for p in d.iterdir() if p.suffix == ".safetensors")
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2] if kind == "truncated shard" else b"")
        return shard.name

    return damage


@pytest.mark.parametrize("kind", ["garbled manifest", "truncated shard", "empty shard"])
def test_trace_files_are_checked(files, tmp_path, kind):
    d = _copy(files["trace"], tmp_path / "t")
    name = _damage_trace(kind)(d)
    with pytest.raises((TraceFormatError, ValueError)) as info:
        list(open_trace(d).sequences())
    assert name in str(info.value), f"the error does not name {name}: {info.value}"


# -- the command line ----------------------------------------------------------------------------


def _cli_case(name: str, files: dict) -> tuple[list[str], str]:
    trace, pred, model = str(files["trace"]), str(files["pred"]), str(files["model"])
    return {
        "simulate: capacity abc": (["simulate", trace, "--capacity", "abc"], "abc"),
        "simulate: capacity 0": (["simulate", trace, "--capacity", "0"], "0"),
        "simulate: unknown policy": (["simulate", trace, "--policy", "nope"], "nope"),
        "simulate: missing trace": (["simulate", str(files["root"] / "none")], "none"),
        "simulate: unknown prefetcher": (["simulate", trace, "--prefetch", "psychic"], "psychic"),
        "simulate: layer-ms 0.2,x": (["simulate", trace, "--layer-ms", "0.2,x"], "--layer-ms 0.2,0.5,1,2"),
        "simulate: bandwidth 25,0": (["simulate", trace, "--bandwidth", "25,0"], "'0' in --bandwidth 25,0"),
        "train: missing trace": (
            ["train", "--trace", str(files["root"] / "none"), "--predictor", "preattn", "--out", "x"],
            "none",
        ),
        "eval: predictor for another trace": (
            ["eval", "--trace", trace, "--predictor", pred],
            "does not match",
        ),
        "eval: missing predictor": (
            ["eval", "--trace", trace, "--predictor", str(files["root"] / "p.safetensors")],
            "p.safetensors",
        ),
        "demo: cache 0": (["demo", "--model", model, "--cache", "0", "--json"], "0"),
        "demo: missing model": (["demo", "--model", str(files["root"] / "none"), "--json"], "none"),
        "demo: host budget lots": (["demo", "--model", model, "--host-budget", "lots", "--json"], "lots"),
        "info: missing model": (["info", "--model", str(files["root"] / "none")], "none"),
        "trace convert: garbled csv": (
            ["trace", "convert", str(files["root"] / "garbled"), "--out", str(files["root"] / "converted")],
            "prompt_1_data.csv",
        ),
        "trace info: missing trace": (["trace", "info", str(files["root"] / "none")], "none"),
    }[name]


CLI_CASES = [
    "simulate: capacity abc",
    "simulate: capacity 0",
    "simulate: unknown policy",
    "simulate: missing trace",
    "simulate: unknown prefetcher",
    "simulate: layer-ms 0.2,x",
    "simulate: bandwidth 25,0",
    "train: missing trace",
    "eval: predictor for another trace",
    "eval: missing predictor",
    "demo: cache 0",
    "demo: missing model",
    "demo: host budget lots",
    "info: missing model",
    "trace convert: garbled csv",
    "trace info: missing trace",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_reports_one_line(files, case, capsys):
    garbled = files["root"] / "garbled"
    if not garbled.exists():
        _copy(files["csv"], garbled)
        _csv_case("garbled")(garbled)
    argv, name = _cli_case(case, files)
    with pytest.raises(SystemExit) if argv[-1] in ("abc", "0.2,x", "25,0") else _no_exit():
        rc = cli_main(argv)
        assert rc == 2, f"exit status {rc}"
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("usage:")]
    assert lines and name in lines[-1], f"stderr does not name {name!r}: {err}"
    assert not (files["root"] / "converted").exists(), "a failed conversion left a partial trace behind"


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
