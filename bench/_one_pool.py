"""One filled host pool across a benchmark's configurations (``bench_decode.py``, ``bench_prefill.py``).

``moert.patch`` copies every routed expert into the host pool (at DeepSeek-V2-Lite size ~29 GB of
device -> host copies into page-locked memory) and ``undo`` copies them all back; a benchmark that
patched and undid per configuration paid both per configuration. :func:`sweep` patches once, reaches
every other configuration with ``PatchHandle.reconfigure`` (a new slab cache, copy engine and policy
over the same pool; counters start at zero) and undoes once, and records what each step cost so the
saving is measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import moert

__all__ = ["sweep"]


def sweep(
    model: Any,
    device: str,
    configs: list[tuple[str, dict[str, Any]]],
    rounds: int,
    measure: Callable[[str, Any], None],
    unpatched: Callable[[], None],
    sync: Callable[[], None],
    deadline: float | None = None,
) -> dict[str, Any]:
    """Runs ``unpatched()`` ceil(rounds/2) times before the patch and floor(rounds/2) times after the
    undo (so drift over the run hits it as it hits the configs), and in between, for each round,
    ``measure(name, handle)`` for every ``(name, patch kwargs)`` of ``configs`` in order: the model is
    patched once with the first and switched to each next one by ``handle.reconfigure`` with a whole
    ``moert.OffloadConfig`` (nothing carried over from the previous one).

    ``deadline`` (a ``time.perf_counter()`` value): a round after the first starts only when the
    last round's duration still fits before it, and in the first round a config after the first
    starts only before it (the rest are ``skipped``), so a run under a hard time limit (the GPU
    session's steps) ends with fewer rows instead of being killed with nothing written.

    Returns:
        ``rounds_run``, ``skipped`` (config names never measured) and set-up seconds: ``patch_s`` (pool fill + first cache), ``undo_s`` (experts copied back),
        ``reconfigure_s`` (one per switch), ``pool_bytes`` and ``saved_ratio``: what a patch + undo
        per configuration costs over what a reconfigure costs (medians; None without a switch).
    """
    if not configs:
        raise ValueError("sweep needs at least one patched configuration")
    for _ in range((rounds + 1) // 2):
        unpatched()
    sync()
    t0 = time.perf_counter()
    handle = moert.patch(model, device=device, **configs[0][1])
    sync()
    patch_s = time.perf_counter() - t0
    pool_bytes = handle.pool_bytes
    switches: list[float] = []
    rounds_run, round_s, skipped = 0, 0.0, []
    try:
        for r in range(rounds):
            t_round = time.perf_counter()
            if skipped or (r and deadline is not None and t_round + round_s > deadline):
                break
            for i, (name, kwargs) in enumerate(configs):
                if not r and i and deadline is not None and time.perf_counter() > deadline:
                    skipped = [n for n, _ in configs[i:]]
                    break
                if r or i:
                    sync()
                    t0 = time.perf_counter()
                    handle.reconfigure(moert.OffloadConfig(device=device, **kwargs))
                    sync()
                    switches.append(time.perf_counter() - t0)
                measure(name, handle)
            round_s = time.perf_counter() - t_round
            rounds_run += 1
    finally:
        sync()
        t0 = time.perf_counter()
        handle.undo()
        sync()
        undo_s = time.perf_counter() - t0
    for _ in range(rounds_run // 2):
        unpatched()
    med = statistics.median(switches) if switches else None
    return {
        "rounds_run": rounds_run,
        "skipped": skipped,
        "patch_s": patch_s,
        "undo_s": undo_s,
        "reconfigure_s": switches,
        "reconfigure_s_median": med,
        "pool_bytes": pool_bytes,
        "saved_ratio": (patch_s + undo_s) / med if med else None,
    }


def setup_line(setup: dict[str, Any]) -> str:
    """The Markdown sentence of a run's set-up times (``sweep``'s record)."""
    med = setup["reconfigure_s_median"]
    text = (
        f"Set-up: one patch ({setup['pool_bytes'] / 1e9:.2f} GB pool filled) {setup['patch_s']:.2f} s, "
        f"one undo {setup['undo_s']:.2f} s"
    )
    if "resident_after_undo_match" in setup:
        text = (
            f"{text} (all-resident tokens after it equal those before: {setup['resident_after_undo_match']})"
        )
    if setup.get("skipped"):
        text += f" ({len(setup['skipped'])} configurations skipped at the run budget: {', '.join(setup['skipped'])})"
    if med is None:
        return text + "; no configuration switch."
    return text + (
        f"; each of the {len(setup['reconfigure_s'])} switches to the next configuration (`reconfigure`, "
        f"same pool) {med * 1e3:.0f} ms median: patch + undo per configuration would cost "
        f"{setup['saved_ratio']:.1f}x that."
    )
