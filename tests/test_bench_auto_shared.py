"""Smoke test of bench/auto_shared.py: the pasted answers are found and the table is printed
(timings are not checked)."""
from __future__ import annotations

from repo_scripts import load_script
from fixtures_default_model import default_model_dir  # noqa: F401


def test_auto_shared_bench_smoke(capsys, default_model_dir):
    assert load_script("bench/auto_shared.py").main(["--agents", "2", "--answer-tokens", "24", "--filler", "5",
                                                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[3]) >= 2 and int(cells[4]) > 30  # each prompt holds the other's answer, found
    assert "goal: matching at most a few percent of prefill:" in out
