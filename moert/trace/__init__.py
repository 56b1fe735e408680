"""Routing traces: types, the moert format, capture from a live model and importers of peers' formats.

- :mod:`moert.trace.types`: :class:`TraceMeta`, :class:`SequenceTrace`, :class:`Trace`;
- :mod:`moert.trace.open`: :func:`open_trace` (every format), :func:`detect_format`, :func:`capture`;
- :mod:`moert.trace.store`: the moert format (safetensors shards + a JSON manifest), :class:`TraceWriter`;
- :mod:`moert.trace.record`: capture from a live model while it generates;
- :mod:`moert.trace.importers`: MoE-Beyond CSV, ESFT expert-score files.
"""

from __future__ import annotations

from moert.trace.open import FORMATS, capture, detect_format, open_trace
from moert.trace.store import MoertTrace, TraceWriter
from moert.trace.types import (
    MANIFEST,
    InMemoryTrace,
    SequenceTrace,
    Trace,
    TraceFormatError,
    TraceMeta,
    check_expert_ids,
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
