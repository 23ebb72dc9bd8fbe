"""Smoke test of bench/tp.py: on a tiny checkpoint, TP=1 and TP=2 (gloo) rows are printed with the
same greedy tokens, the CPU note says the numbers are no speed claim, and the JSON is written
(the throughput numbers themselves are not checked; they are noise at this size)."""
from __future__ import annotations

import json

import pytest

from repo_scripts import load_script
from tiny_checkpoints import write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def test_tp_bench_smoke(tmp_path, capsys):
    folder, _ = write_tiny_checkpoint(tmp_path / "llama", kind="llama", seed=7)
    bench = load_script("bench/tp.py")
    out = tmp_path / "tp.json"
    argv = ["--model", str(folder), "--tp", "1,2", "--device", "cpu", "--dtype", "float32", "--batch", "2",
            "--prompt-tokens", "8", "--max-tokens", "3", "--repeats", "1", "--kv-cache-blocks", "32", "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.split()[:2] in (["1", "cpu"], ["2", "cpu"])]
    assert [(r[0], r[2], r[-1]) for r in rows] == [("1", "-", "1.00"), ("2", "gloo", "1.00")]
    assert "not a speed claim" in printed and "reproduce: python bench/tp.py" in printed
    result = json.loads(out.read_text())
    assert [r["tp"] for r in result["rows"]] == [1, 2]
    assert all(r["agree"] == 1.0 and r["decode_tokens_per_s"] > 0 for r in result["rows"])
