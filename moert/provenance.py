"""What every recorded result carries beside it: commit, versions, date and device."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

__all__ = ["git_commit", "modified_files", "device_name", "versions", "utc_now"]

_REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short hash of the checkout's HEAD, ``+dirty`` when tracked files differ; ``unknown`` outside git.

    ``MOERT_COMMIT`` overrides it: a lent GPU machine receives the working tree with the git metadata
    of the session's first commit, so ``bench/gpu_session.sh`` is run as ``MOERT_COMMIT=<sha> bash
    bench/gpu_session.sh ...`` with the commit the tree really is (see ``moert.envs``)."""
    given = os.environ.get("MOERT_COMMIT", "").strip()
    if given:
        return f"{given} (MOERT_COMMIT)"
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=_REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def modified_files() -> list[str]:
    """Tracked files that differ from HEAD (what ``+dirty`` stands for); ``["unknown"]`` outside git."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ["unknown"]
    return [line[3:] for line in out.splitlines()]


def device_name(device: str = "cpu") -> str:
    """The GPU's name for ``cuda``; the CPU model and core count otherwise."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions(*modules: str) -> dict[str, str]:
    """python, moert and the named modules' versions (imported modules only are asked)."""
    from moert import __version__

    out = {"python": platform.python_version(), "moert": __version__}
    for name in modules:
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except ImportError:
                continue
        out[name] = getattr(mod, "__version__", "unknown")
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
