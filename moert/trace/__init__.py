"""Routing traces: types, the moert format, capture from a live model and importers of peers' formats.

- :mod:`moert.trace.types`: :class:`TraceMeta`, :class:`SequenceTrace`, :class:`Trace`,
  :func:`open_trace` (every format), :func:`capture`;
- :mod:`moert.trace.store`: the moert format (safetensors shards + a JSON manifest), :class:`TraceWriter`;
- :mod:`moert.trace.record`: capture from a live model while it generates;
- :mod:`moert.trace.importers`: MoE-Beyond CSV, ESFT expert-score files.
"""

from __future__ import annotations

from typing import Any

from moert.trace.types import (
    FORMATS,
    MANIFEST,
    InMemoryTrace,
    SequenceTrace,
    Trace,
    TraceFormatError,
    TraceMeta,
    capture,
    check_expert_ids,
    detect_format,
    open_trace,
)

__all__ = [
    "FORMATS",
    "InMemoryTrace",
    "MANIFEST",
    "MoertTrace",
    "SequenceTrace",
    "Trace",
    "TraceFormatError",
    "TraceMeta",
    "TraceWriter",
    "capture",
    "check_expert_ids",
    "detect_format",
    "open_trace",
]


def __getattr__(name: str) -> Any:
    # The moert format (moert.trace.store) builds on the types; its classes are re-exported lazily
    # so that either module can be imported first.
    if name in ("TraceWriter", "MoertTrace"):
        from moert.trace import store

        return getattr(store, name)
    raise AttributeError(f"module 'moert.trace' has no attribute {name!r}")
