"""The Triton kernels compile for an H100 (sm_90) exactly as the launchers would launch them.

The CPU tests run the kernels in the interpreter, which accepts programs the GPU compiler
rejects; this test compiles the real launch configurations (no GPU needed: the triton wheel
bundles ptxas) in a subprocess without TRITON_INTERPRET, and checks the hot kernels do not spill
registers. Skipped where the wheel has no NVIDIA backend.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _have_nvidia_backend() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _have_nvidia_backend(), reason="triton without its NVIDIA backend/ptxas")
def test_kernels_compile_for_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "nanodance.tools.compile_check", "--arch", "90", "--quick"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("sm_90")]
    # decode and prefill on the page and the token-packed path, store_kv, key_deviation, rotate_copy
    assert len(lines) == 7, r.stdout
    for line in lines:
        assert line.endswith("spill    0 B"), line
