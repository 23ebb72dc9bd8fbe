"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before any `@triton.jit` decorator runs, so it is set here,
before the test modules import nanodance.kernels (DESIGN.md §3.7).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
