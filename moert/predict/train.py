"""The training loop shared by every learned predictor: seeded, early-stopped, with progress bars.

Each predictor module supplies three callables: ``batches(generator)`` yielding training batches,
``loss(batch)`` returning a scalar, and ``validate()`` returning a score (higher is better,
recall@k on the validation sequences). The loop keeps the best weights and restores them.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TrainConfig", "pick_device", "seed_everything", "fit"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings common to every learned predictor.

    Attributes:
        epochs: maximum passes over the training split.
        batch_size: samples per step (token rows; (sequence, layer) windows for moe-beyond).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        patience: epochs without validation improvement before stopping.
        seed: seeds Python, torch and the batch order.
        threads: ``torch.set_num_threads`` (0 = leave torch's default).
        device: ``"auto"`` (CUDA when it can run), ``"cpu"`` or ``"cuda"``.
        progress: show tqdm progress bars.
        max_steps_per_epoch: cap on steps per epoch (0 = no cap); for quick CPU runs.
        max_seconds: wall-clock cap on training (0 = none): the epoch running when it passes stops
            early, is validated and counts (``history["stopped"] = "time"``).
        schedule: learning rate over the planned ``epochs``: ``"constant"`` or ``"cosine"`` (decays
            to 0 at the last planned step), after ``warmup_steps`` of linear warm-up.
    """

    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    progress: bool = True
    max_steps_per_epoch: int = 0
    max_seconds: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError(
                f"epochs={self.epochs}, batch_size={self.batch_size}, patience={self.patience} must all be >= 1"
            )
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not one of auto, cpu, cuda")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r} is not one of constant, cosine")
        if self.max_seconds < 0 or self.warmup_steps < 0:
            raise ValueError(f"max_seconds={self.max_seconds}, warmup_steps={self.warmup_steps} must be >= 0")


def pick_device(name: str) -> torch.device:
    """``auto`` → CUDA when it can run, else CPU; ``cuda`` without a device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device can run; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python and torch; returns a CPU generator for batch order."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit(
    net: torch.nn.Module,
    batches: Callable[[torch.Generator], Iterable[Any]],
    loss: Callable[[Any], torch.Tensor],
    validate: Callable[[], float],
    cfg: TrainConfig,
    *,
    desc: str = "train",
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Trains ``net`` in place; returns the history (per-epoch train loss, validation score, time).

    ``on_epoch(epoch, history)`` runs after each epoch's validation, with ``net`` holding that
    epoch's weights (checkpointing, progress logs). ``history["epoch_seconds"]`` is the cumulative
    wall-clock time at the end of each epoch (validation included), ``history["lr"]`` the last
    learning rate of each epoch.

    Raises:
        ValueError: when the loss becomes NaN or inf (lower --lr).
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    gen = seed_everything(cfg.seed)
    params = [p for p in net.parameters() if p.requires_grad]  # frozen ones (model embeddings) stay
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_score, best_state, best_epoch, bad = -math.inf, copy.deepcopy(net.state_dict()), 0, 0
    history: dict[str, Any] = {
        "train_loss": [],
        "val_score": [],
        "epochs_run": 0,
        "epoch_seconds": [],
        "lr": [],
    }
    t0 = time.perf_counter()
    tqdm = _tqdm(cfg.progress)
    step_total, sched = 0, None
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        items = batches(gen)
        if sched is None:
            sched = _schedule(opt, cfg, items)
        bar = tqdm(items, desc=f"{desc} epoch {epoch}/{cfg.epochs}", leave=False, disable=not cfg.progress)
        total, steps = _epoch(bar, loss, opt, sched, cfg, epoch, t0, history)
        step_total += steps
        net.eval()
        with torch.no_grad():
            score = float(validate())
        _record_epoch(history, epoch, total / max(steps, 1), score, time.perf_counter() - t0, opt, step_total)
        if cfg.progress:
            print(
                f"{desc} epoch {epoch}: train loss {history['train_loss'][-1]:.4f}, validation score {score:.4f}"
            )
        if on_epoch is not None:
            on_epoch(epoch, history)
        if score > best_score:
            best_score, best_state, best_epoch, bad = score, copy.deepcopy(net.state_dict()), epoch, 0
        else:
            bad += 1
        if bad >= cfg.patience or history.get("stopped"):
            break
    net.load_state_dict(best_state)
    net.eval()
    history.update(best_epoch=best_epoch, best_val_score=best_score, seconds=time.perf_counter() - t0)
    return history


def _epoch(
    bar: Any,
    loss: Callable[[Any], torch.Tensor],
    opt: Any,
    sched: Any,
    cfg: TrainConfig,
    epoch: int,
    t0: float,
    history: dict[str, Any],
) -> tuple[float, int]:
    """One epoch of ``fit``'s optimisation: (summed loss, steps); stops early at the step or time caps."""
    total, steps = 0.0, 0
    for batch in bar:
        value = loss(batch)
        if not torch.isfinite(value):
            raise ValueError(f"training loss became {float(value)} at epoch {epoch} step {steps}; lower --lr")
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        total += float(value.detach())
        steps += 1
        if steps % 20 == 0:
            bar.set_postfix(loss=f"{total / steps:.4f}")
        if cfg.max_steps_per_epoch and steps >= cfg.max_steps_per_epoch:
            break
        if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
            history["stopped"] = "time"
            break
    return total, steps


def _record_epoch(
    history: dict[str, Any], epoch: int, train_loss: float, score: float, seconds: float, opt: Any, steps: int
) -> None:
    """Appends one epoch to ``fit``'s history (see its doc)."""
    history["train_loss"].append(train_loss)
    history["val_score"].append(score)
    history["epochs_run"] = epoch
    history["epoch_seconds"].append(seconds)
    history["lr"].append(opt.param_groups[0]["lr"])
    history["steps"] = steps


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, first_epoch: Iterable[Any]):
    """LambdaLR: linear warm-up over ``cfg.warmup_steps``, then constant or cosine to 0 at the last
    planned step (``epochs`` x the first epoch's steps, capped by ``max_steps_per_epoch``)."""
    total = 0
    if cfg.schedule == "cosine":
        if not hasattr(first_epoch, "__len__"):
            raise ValueError("schedule='cosine' needs batches(generator) to return a sized list")
        per = len(first_epoch)  # type: ignore[arg-type]
        total = cfg.epochs * (min(per, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else per)
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _tqdm(enabled: bool):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm
    return lambda it, **_: _Quiet(it)


class _Quiet:
    def __init__(self, it: Iterable[Any]):
        self._it = it

    def __iter__(self):
        return iter(self._it)

    def set_postfix(self, **_: Any) -> None:
        pass
