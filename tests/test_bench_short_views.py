"""Smoke test of bench/short_views.py: both layouts read the same keys, the scattered one through
many more views, and the script prints the ratio and the verdict (timings are not checked)."""
from __future__ import annotations

import random

from repo_scripts import load_script


def test_short_views_smoke(capsys):
    bench = load_script("bench/short_views.py")
    rng = random.Random(0)
    aligned = bench.merge_runs(bench.agent_views(rng, 256, 0.15, scattered=False, first_block=20))
    scattered = bench.merge_runs(bench.agent_views(rng, 256, 0.15, scattered=True, first_block=20))
    for views in (aligned, scattered):
        assert sum(hi - lo for _, lo, hi, _, _ in views) == 256  # every key once
        assert [v[3] for v in views] == sorted(v[3] for v in views)
    assert len(scattered) > 3 * len(aligned)
    assert bench.main(["--agents", "2", "--context", "256", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    assert "scattered 1-token patches" in printed and "goal <= 1.3x:" in printed
