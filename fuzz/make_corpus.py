"""Writes the committed seed corpora (``fuzz/corpus/<target>/``): small valid inputs made here, from
seeded random routing (never peers' data), one or a few per layout, plus a few malformed ones.

Run from the repository root: ``python fuzz/make_corpus.py`` (deterministic; rewrites the folders).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
from harness import REPO, SEP  # puts the checkout on sys.path for the moert imports below

CORPUS = REPO / "fuzz" / "corpus"


def _ids(rng: random.Random, E: int, k: int) -> list[int]:
    return rng.sample(range(E), k)


def _cell(ids: list[int]) -> str:
    return '"[' + ", ".join(str(i) for i in ids) + ']"'


def moe_beyond_csv(
    rng: random.Random, layout: str, L: int, T: int, k: int, E: int, width: int | None = None
) -> bytes:
    rows = []
    if layout == "predicted":
        rows.append("Layer ID,Token,Activated Expert IDs,Predicted Expert IDs")
        for layer in range(1, L + 1):
            for t in range(T):
                pred = sorted(_ids(rng, E, width if width is not None else k))
                rows.append(f"{layer},{t},{_cell(sorted(_ids(rng, E, k)))},{_cell(pred)}")
    else:
        rows.append("Layer ID,Batch Number,Token,Activated Expert IDs")
        tokens = ["<bos>", "Hello", '"a,b"', "Ġworld", "?"][:T]
        for layer in range(1, L + 1):
            for tok in tokens:
                rows.append(f"{layer},0,{tok},{_cell(_ids(rng, E, k))}")
    return ("\n".join(rows) + "\n").encode()


def esft_line(rng: random.Random, T: int, k: int, E: int) -> str:
    ids = [i for _ in range(T) for i in _ids(rng, E, k)]
    weights = [f"{rng.random():.4f}" for _ in ids]
    return "\t".join(map(str, ids)) + "\t\t" + "\t".join(weights)


def write(target: str, seeds: dict[str, bytes]) -> None:
    out = CORPUS / target
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, data in seeds.items():
        (out / name).write_bytes(data)


def csv_seeds(rng: random.Random) -> dict[str, bytes]:
    # byte 0: kind (0 plain, 1 formatted, 2 predicted, 3 other name) | E=64 (4) | mixed kinds (8)
    seeds = {}
    for kind, layout in ((0, "plain"), (1, "formatted"), (2, "predicted")):
        a = moe_beyond_csv(rng, layout, 2, 3, 2, 16)
        b = moe_beyond_csv(rng, layout, 2, 2, 2, 16)
        seeds[f"{layout}_one"] = bytes([kind]) + a
        seeds[f"{layout}_two"] = bytes([kind]) + a + SEP + b
    seeds["predicted_e64_k6"] = bytes([2 | 4]) + moe_beyond_csv(rng, "predicted", 3, 4, 6, 64)
    seeds["predicted_wide"] = bytes([2]) + moe_beyond_csv(rng, "predicted", 2, 3, 2, 16, width=4)
    seeds["predicted_empty_list"] = (
        bytes([2]) + b'Layer ID,Token,Activated Expert IDs,Predicted Expert IDs\n1,0,"[1, 2]","[]"\n'
    )
    seeds["embedding_column"] = bytes([0]) + (
        b'Layer ID,Batch Number,Token,Activated Expert IDs,Token Embedding Vector\n1,0,a,"[3, 4]","[0.5, -1.0]"\n'
    )
    seeds["mixed"] = (
        bytes([8])
        + moe_beyond_csv(rng, "plain", 1, 2, 2, 16)
        + SEP
        + moe_beyond_csv(rng, "formatted", 1, 2, 2, 16)
    )
    seeds["truncated"] = bytes([1]) + moe_beyond_csv(rng, "formatted", 2, 3, 2, 16)[:-30]
    return seeds


def esft_seeds(rng: random.Random) -> dict[str, bytes]:
    # byte 0: k-1 (3 bits) | E=64 (8) | rank folders (16)
    seeds = {}
    for name, (k, E, ranks, lengths) in {
        "k2_e16": (2, 16, 0, (3, 1)),
        "k6_e64": (6, 64, 0, (2, 4, 1)),
        "ranks": (2, 16, 1, (2,)),
    }.items():
        files = []
        for _layer in range(4 if ranks else 3):
            files.append("\n".join(esft_line(rng, T, k, E) for T in lengths).encode() + b"\n")
        seeds[name] = bytes([(k - 1) | (8 if E == 64 else 0) | (16 if ranks else 0)]) + SEP.join(files)
    # regression: an id past int64 (was an OverflowError)
    seeds["regress_huge_id"] = bytes([1]) + f"1\t{10**30}\t\t0.5\t0.5\n".encode()
    return seeds


def trace_store_seeds(rng: random.Random) -> dict[str, bytes]:
    from moert.trace import SequenceTrace, TraceWriter

    seeds = {}
    options = {
        "plain": {},
        "tokens_scores_hidden": {"tokens": True, "scores": True, "hidden": True},
        "token_ids_two_shards": {"token_ids": True, "shards": True},
    }
    for name, opt in options.items():
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        L, E, k, H = 2, 8, 2, 4
        with tempfile.TemporaryDirectory() as tmp:
            w = TraceWriter(
                tmp,
                model_type="fuzz",
                layers=(1, 2),
                num_experts=E,
                top_k=k,
                hidden_size=H if opt.get("hidden") else None,
                has_scores=bool(opt.get("scores")),
                has_hidden=bool(opt.get("hidden")),
                shard_tokens=3 if opt.get("shards") else 1 << 16,
            )
            for s, T in enumerate((3, 2)):
                w.add(
                    SequenceTrace(
                        seq_id=s,
                        positions=torch.arange(T),
                        experts=torch.rand(L, T, E, generator=g).argsort(-1)[..., :k],
                        is_prefill=torch.tensor([True] * (T - 1) + [False]),
                        token_ids=torch.arange(T) if opt.get("token_ids") else None,
                        tokens=[f"t{j}é" for j in range(T)] if opt.get("tokens") else None,
                        scores=torch.rand(L, T, E, generator=g) if opt.get("scores") else None,
                        hidden=torch.rand(L, T, H, generator=g).half() if opt.get("hidden") else None,
                    )
                )
            w.close()
            parts = [(Path(tmp) / "manifest.json").read_bytes()]
            parts += [p.read_bytes() for p in sorted(Path(tmp).glob("shard_*.safetensors"))]
        seeds[name] = SEP.join(parts)
    seeds["bad_json"] = b'{"format": "moert-trace", "version": 1, "layers": [1,' + SEP
    return seeds


def predictor_seeds(rng: random.Random) -> dict[str, bytes]:
    from moert.predict.baselines import FrequencyPredictor, PrevTokenPredictor
    from moert.predict.io import save_predictor
    from moert.predict.preattn import train_preattn
    from moert.predict.train import TrainConfig
    from moert.predict.xlayer import train_xlayer
    from moert.trace import SequenceTrace, TraceMeta

    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    L, E, k, H, T = 2, 8, 2, 8, 6
    meta = TraceMeta(model_type="fuzz", layers=(1, 2), num_experts=E, top_k=k, hidden_size=H, has_hidden=True)
    seqs = [
        SequenceTrace(
            seq_id=s,
            positions=torch.arange(T),
            experts=torch.rand(L, T, E, generator=g).argsort(-1)[..., :k],
            is_prefill=torch.ones(T, dtype=torch.bool),
            token_ids=torch.randint(0, 20, (T,), generator=g),
            hidden=torch.randn(L, T, H, generator=g).half(),
        )
        for s in range(4)
    ]
    quick = TrainConfig(epochs=1, batch_size=8, progress=False, threads=1)
    preds = {
        "frequency": FrequencyPredictor.fit(meta, seqs),
        "prev_token": PrevTokenPredictor.for_trace(meta),
        "preattn_linear2": train_preattn(meta, seqs[:3], seqs[3:], dim=8, lookahead=1, cfg=quick)[0],
        "xlayer": train_xlayer(meta, seqs[:3], seqs[3:], dim=8, cfg=quick)[0],
    }
    seeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pred in preds.items():
            path = save_predictor(Path(tmp) / f"{name}.safetensors", pred.meta, *pred.state())
            seeds[name] = path.read_bytes()
        # regression: tensors that do not fit the header (was a ValueError naming no file)
        wrong = preds["frequency"].meta
        path = save_predictor(Path(tmp) / "wrong.safetensors", wrong, {"counts": torch.zeros(2, E + 1)})
        seeds["regress_counts_shape"] = path.read_bytes()
    header = json.dumps({"moert_predictor": '{"format": "moert-predictor"}'}).encode()
    seeds["no_tensors"] = len(header).to_bytes(8, "little") + header
    # header mode (fuzz_predictor_io.py): "H" + the moert_predictor header text + SEP + the file
    from safetensors import safe_open

    for name in list(seeds):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "p.safetensors"
            path.write_bytes(seeds[name])
            try:
                with safe_open(str(path), framework="pt") as f:
                    text = (f.metadata() or {}).get("moert_predictor")
            except Exception:
                text = None
        if text is not None:
            seeds[f"header_{name}"] = b"H" + text.encode() + SEP + seeds[name]
    return seeds


def native_seeds(rng: random.Random) -> dict[str, bytes]:
    # FuzzedDataProvider bytes: any bytes drive some sequence of calls
    return {
        f"random_{i}": bytes(rng.randrange(256) for _ in range(n)) for i, n in enumerate((16, 64, 256, 1024))
    }


def main() -> None:
    rng = random.Random(0)
    write("moe_beyond_csv", csv_seeds(rng))
    write("esft", esft_seeds(rng))
    write("trace_store", trace_store_seeds(rng))
    write("predictor_io", predictor_seeds(rng))
    write("native", native_seeds(rng))
    for d in sorted(CORPUS.iterdir()):
        files = list(d.iterdir())
        print(f"{d.relative_to(REPO)}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
