"""Triton kernels, installed as ``moert.kernels``. Importing this package does not import Triton."""
