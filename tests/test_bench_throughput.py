"""Smoke test of bench/throughput.py: a 2-token run at batch 1 prints a table with both engines
and writes the JSON (the numbers themselves are not checked; they are noise at this size)."""
from __future__ import annotations

import json

import pytest

from fixtures_default_model import default_model_dir  # noqa: F401
from repo_scripts import load_script


def test_throughput_smoke(default_model_dir, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("transformers")
    bench = load_script("bench/throughput.py")
    out = tmp_path / "throughput.json"
    assert bench.main(["--max-tokens", "2", "--batch-sizes", "1", "--repeats", "1", "--out", str(out)]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    engines = {row[1] for row in table if len(row) == 7 and row[0] == "1"}
    assert engines == {"nanodance", "transformers"}
    assert any(line[:1] == ["reproduce:"] for line in table)
    result = json.loads(out.read_text())
    assert {r["engine"] for r in result["rows"]} == {"nanodance", "transformers"}
    assert all(r["tokens"] == 2 for r in result["rows"])
    assert all(r["agree"] == 1.0 for r in result["rows"])  # greedy, same ids, same dtype
