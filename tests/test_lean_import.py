"""Importing moert initialises no CUDA, opens no network connection and pulls in no heavy extras."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_touches_no_cuda_and_no_network():
    code = textwrap.dedent(
        """
        import socket, sys
        def refuse(*a, **k):
            raise AssertionError("network access during import")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import moert
        import moert.engine.runtime
        import moert.kernels
        import torch
        assert not torch.cuda.is_initialized(), "importing moert initialised CUDA"
        heavy = [m for m in ("transformers", "triton", "matplotlib") if m in sys.modules]
        assert not heavy, f"importing moert imported {heavy}"
        print("lean")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lean"
