"""``moert train``: train an expert predictor on a routing trace and save it (safetensors + JSON header)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "train_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trace", required=True, help="trace directory (moert format, MoE-Beyond CSV folder, ESFT)"
    )
    p.add_argument("--format", default="auto", help="trace format: auto, moert, moe-beyond-csv, esft")
    p.add_argument(
        "--predictor",
        required=True,
        choices=["preattn", "moe-beyond", "xlayer", "reuse"],
        help="a routing predictor (preattn, moe-beyond, xlayer: prefetch) or the reuse forecast of "
        "policy learned (eviction)",
    )
    p.add_argument("--out", required=True, help="output predictor file (.safetensors)")
    p.add_argument("--arch", default="linear2", choices=["linear2", "mlp_bn"], help="preattn architecture")
    p.add_argument("--loss", default="wbce", choices=["mse", "wbce", "focal", "rank"])
    p.add_argument("--lookahead", type=int, default=0, help="preattn: also predict layers l+1..l+d")
    p.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="hidden size D (preattn 2048, xlayer 128, moe-beyond d_model 512)",
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--batch-size", type=int, default=None, help="token rows per step (moe-beyond: windows; default 32)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without validation gain")
    p.add_argument("--val-split", type=float, default=0.1, help="fraction of sequences for early stopping")
    p.add_argument(
        "--test-split", type=float, default=0.1, help="fraction of sequences held out for `moert eval`"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-sequences", type=int, default=None, help="use only the first N sequences of the trace"
    )
    p.add_argument("--max-steps-per-epoch", type=int, default=0, help="cap steps per epoch (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores given to the process)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("moe-beyond")
    g.add_argument("--enc-layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--ff", type=int, default=2048)
    g.add_argument("--d-token", type=int, default=None, help="token embedding size (default d_model)")
    g.add_argument("--d-layer", type=int, default=128)
    g.add_argument("--max-len", type=int, default=512)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument(
        "--embeddings-from", default=None, metavar="MODEL_DIR",
        help="token embeddings = the rows of this HF checkpoint's embedding matrix (frozen; needs token ids)",
    )  # fmt: skip
    g = p.add_argument_group("xlayer")
    g.add_argument("--no-prev-token", action="store_true", help="xlayer: do not use token t-1's experts")
    g.add_argument(
        "--no-history", action="store_true", help="xlayer: do not use the layer's decayed expert history"
    )
    g.add_argument("--min-count", type=int, default=2, help="xlayer/moe-beyond: vocabulary min token count")
    g = p.add_argument_group("reuse")
    g.add_argument("--stride", type=int, default=8, help="reuse: every N-th training token is an example")
    g.add_argument(
        "--lr-final", type=float, default=1.0,
        help="reuse: cosine decay of the learning rate to this share of --lr over --epochs (1: constant)",
    )  # fmt: skip
    g.add_argument(
        "--features",
        default="recency,gaps,frequency,bias,coact,induction",
        help="reuse: feature groups (ablation): recency, gaps, frequency, bias, coact, induction",
    )
    g.add_argument(
        "--horizons-used", type=int, default=None, help="reuse: look-ahead horizons the eviction uses (1..7)"
    )
    g.add_argument(
        "--ensemble", type=int, default=1,
        help="reuse: train this many models (seeds --seed, --seed + 1, ...; each on its own offset in the "
        "stride) and average their probabilities",
    )  # fmt: skip


def _threads(n: int) -> int:
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def train_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Runs training as the CLI does; returns ``(predictor, validation metrics)`` after saving ``--out``."""
    from moert.predict.data import open_sequences, split_sequences
    from moert.predict.evaluate import default_overprovision, evaluate, select_sequences
    from moert.predict.io import save_predictor
    from moert.predict.train import TrainConfig

    if args.predictor != "preattn" and args.lookahead:
        raise ValueError(f"--lookahead applies to preattn only, not {args.predictor}")
    if args.predictor == "reuse":
        return _train_reuse(args), {}
    meta, seqs = open_sequences(args.trace, args.format, args.max_sequences)
    split = split_sequences([s.seq_id for s in seqs], args.val_split, args.test_split, args.seed)
    train_seqs, val_seqs = select_sequences(seqs, split.train), select_sequences(seqs, split.val)
    if not val_seqs:
        raise ValueError("--val-split 0 leaves no validation sequences for early stopping; use e.g. 0.1")
    default_bs = 32 if args.predictor == "moe-beyond" else (512 if args.predictor == "preattn" else 1024)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size or default_bs,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        threads=_threads(args.threads),
        device=args.device,
        progress=not args.no_progress,
        max_steps_per_epoch=args.max_steps_per_epoch,
    )
    info = {
        "trace": str(Path(args.trace).resolve()),
        "trace_source": meta.source,
        "sequences": len(seqs),
        "tokens": sum(s.num_tokens for s in seqs) if hasattr(seqs[0], "num_tokens") else None,
        "seed": args.seed,
        "split": split.to_json(),
        "fractions": {"val": args.val_split, "test": args.test_split},
        "config": dataclasses.asdict(cfg),
    }
    if args.predictor == "preattn":
        from moert.predict.preattn import train_preattn

        pred, _ = train_preattn(
            meta, train_seqs, val_seqs, arch=args.arch, loss=args.loss, lookahead=args.lookahead,
            dim=args.hidden or 2048, cfg=cfg, train_info=info,
        )  # fmt: skip
    elif args.predictor == "xlayer":
        from moert.predict.xlayer import train_xlayer

        pred, _ = train_xlayer(
            meta, train_seqs, val_seqs, dim=args.hidden or 128, loss=args.loss,
            use_prev_token=not args.no_prev_token, use_history=not args.no_history, min_count=args.min_count, cfg=cfg, train_info=info,
        )  # fmt: skip
    else:
        from moert.predict.moe_beyond import MoEBeyondConfig, train_moe_beyond

        d_model = args.hidden or 512
        net_cfg = MoEBeyondConfig(
            d_model=d_model, d_token=args.d_token or d_model, d_layer=args.d_layer, num_layers=args.enc_layers,
            num_heads=args.heads, ff=args.ff, dropout=args.dropout, max_len=args.max_len,
        )  # fmt: skip
        emb = None
        if args.embeddings_from:
            from moert.predict.moe_beyond import load_embedding_matrix

            emb = load_embedding_matrix(args.embeddings_from)
        pred, _ = train_moe_beyond(
            meta, train_seqs, val_seqs, net_cfg=net_cfg, loss=args.loss, min_count=args.min_count,
            token_embeddings=emb, cfg=cfg, train_info=info,
        )  # fmt: skip
    val_metrics = evaluate(pred, val_seqs, overprovision=default_overprovision(meta.num_experts, meta.top_k))
    pred.meta = dataclasses.replace(pred.meta, metrics={"split": "val", **val_metrics["overall"]})
    tensors, extra = pred.state()
    save_predictor(args.out, pred.meta, tensors, extra)
    return pred, val_metrics


def _train_reuse(args: argparse.Namespace) -> Any:
    """``--predictor reuse``: the eviction forecast of policy ``learned`` (moert.predict.reuse_train)."""
    import numpy as np

    from moert.predict.data import open_sequences, split_sequences
    from moert.predict.evaluate import select_sequences
    from moert.predict.reuse import HORIZONS, save_reuse
    from moert.predict.reuse_train import ReuseTrainConfig, build_data, train_ensemble

    meta, seqs = open_sequences(args.trace, args.format, args.max_sequences)
    split = split_sequences([s.seq_id for s in seqs], args.val_split, args.test_split, args.seed)
    parts = {name: select_sequences(seqs, getattr(split, name)) for name in ("train", "val")}
    if not parts["val"]:
        raise ValueError("--val-split 0 leaves no validation sequences for early stopping; use e.g. 0.1")
    used = args.horizons_used
    if used is not None and not 1 <= used <= len(HORIZONS):
        raise ValueError(f"--horizons-used {used} must be in 1..{len(HORIZONS)} (horizons {HORIZONS})")
    if args.stride < 1:
        raise ValueError(f"--stride {args.stride} must be >= 1")
    if args.ensemble < 1:
        raise ValueError(f"--ensemble {args.ensemble} must be >= 1 (the models averaged)")
    if not 0 < args.lr_final <= 1:
        raise ValueError(f"--lr-final {args.lr_final} must be in (0, 1] (a share of --lr; 1: constant)")
    cfg = ReuseTrainConfig(
        hidden=args.hidden or 64, epochs=args.epochs, patience=args.patience, batch_size=args.batch_size or 256,
        lr=args.lr, lr_final=args.lr_final, stride=args.stride, seed=args.seed, threads=_threads(args.threads),
        groups=tuple(g.strip() for g in args.features.split(",") if g.strip()),
    )  # fmt: skip
    E = meta.num_experts

    def stream(part: list) -> np.ndarray:
        return np.concatenate([s.experts.numpy().astype(np.int64) for s in part], axis=1)  # [L, N, k]

    val = build_data(stream(parts["val"]), E, stride=4)
    info = {
        "trace": str(Path(args.trace).resolve()), "trace_source": meta.source, "sequences": len(seqs),
        "seed": args.seed, "split": split.to_json(), "fractions": {"val": args.val_split, "test": args.test_split},
        "examples": {"val": len(val)},
    }  # fmt: skip
    log = None if args.no_progress else (lambda row: print(row, flush=True))
    model = train_ensemble(stream(parts["train"]), val, meta.num_layers, E, cfg, args.ensemble, info, log)
    if used is not None:
        model.horizons_used = used
    save_reuse(args.out, model, model_type=meta.model_type, layers=tuple(meta.layers), top_k=meta.top_k)
    return model


def run(args: argparse.Namespace) -> int:
    from moert.predict.metrics import format_table

    pred, val_metrics = train_from_args(args)
    if args.predictor == "reuse":
        print(f"reuse forecast: best validation loss {pred.info['best_val_loss']:.4f}; saved {args.out}")
        return 0
    print(format_table(val_metrics, title=f"{pred.meta.kind} on the validation split", per_layer=False))
    print(f"saved {args.out}")
    return 0
