"""moert: an MoE expert-offloading runtime.

Importing moert touches no CUDA and no network (tests/test_lean_import.py proves it).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
