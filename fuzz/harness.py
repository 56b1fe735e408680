"""What every fuzz target shares: the exceptions an input may raise, scratch files, the entry point.

A target's ``TestOneInput(data)`` feeds the bytes to one parser (or to the native bindings) through
:func:`expect`. An exception outside ``ALLOWED`` escapes to atheris, which stops and writes the input
as a crash artifact: that is a finding. So is an error that does not name the file it is about
(``names=``), a raw ``UnicodeDecodeError`` (a ValueError that names no file), and a broken invariant
(:class:`Finding`). A native crash kills the process: libFuzzer reports the deadly signal.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the fuzz scripts run from a checkout, with or without `pip install -e .`
    sys.path.insert(0, str(REPO))

# TraceFormatError is a ValueError; FileNotFoundError is not in the list: targets always write their files.
ALLOWED: tuple[type[BaseException], ...] = (ValueError, TypeError, RuntimeError)
SEP = b"\n#--8<--\n"  # splits one input into several files


class Finding(AssertionError):
    """An input broke a documented contract (a wrong result, an unnamed error, a bad invariant)."""


def expect(fn: Callable[[], object], names: str | None = None) -> object:
    """Runs ``fn``; allowed exceptions are swallowed (returning None), anything else escapes.

    Args:
        fn: the call under test.
        names: a string every error message must contain (the scratch folder: errors name the file).
    """
    try:
        return fn()
    except UnicodeDecodeError as exc:
        raise Finding(f"a raw UnicodeDecodeError escaped (names no file): {exc}") from exc
    except ALLOWED as exc:
        if names is not None and names not in str(exc):
            raise Finding(f"{type(exc).__name__} does not name the file ({names}): {exc}") from exc
        return None


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Finding(what)


def read_sequences(trace) -> list:
    """Every sequence of ``trace``, each validated against its meta, whose counts must match them."""
    meta = trace.meta
    seqs = list(trace.sequences())
    for s in seqs:
        s.validate(meta, where="fuzz")
    check(len(seqs) == meta.num_sequences, f"meta says {meta.num_sequences} sequences, read {len(seqs)}")
    check(sum(s.num_tokens for s in seqs) == meta.num_tokens, "meta num_tokens differs from the sequences")
    return seqs


_SCRATCH: Path | None = None


def scratch() -> Path:
    """An empty folder for this input (the same path each time, emptied; in RAM when /dev/shm exists)."""
    global _SCRATCH
    if _SCRATCH is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        _SCRATCH = Path(tempfile.mkdtemp(prefix="moert-fuzz-", dir=base))
    for p in _SCRATCH.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return _SCRATCH


def split(data: bytes, most: int) -> list[bytes]:
    """The input's parts (at most ``most``; the last keeps any further separators)."""
    return data.split(SEP, most - 1)


def main(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
