"""Smoke test of bench/soak.py: a few seconds of random rounds, modes and pool sizes, no leak.

The soak's own checks (invariants after every step and round, every provoked error caught with
the expected class, an empty pool after every session) decide its exit code; here it must be 0,
and the summary must report rounds run, errors caught, zero leaked blocks and zero violations.
"""
from __future__ import annotations

import re

import torch

from repo_scripts import load_script


def test_soak_runs_rounds_provokes_errors_and_leaks_nothing(capsys):
    threads = torch.get_num_threads()
    assert load_script("bench/soak.py").main(["--minutes", "0.1", "--seed", "5", "--progress-seconds", "2"]) == 0
    assert torch.get_num_threads() == threads  # the soak restores what it changed
    out = capsys.readouterr().out
    assert "soak summary" in out and re.search(r"\[\s+\d+ s\] rounds \d+", out)  # progress lines
    assert int(re.search(r"rounds run: (\d+)", out).group(1)) > 0
    assert int(re.search(r"errors provoked and caught: (\d+)", out).group(1)) > 0
    assert "blocks leaked: 0" in out and "invariant violations: 0" in out and "unexpected errors: 0" in out
