"""Smoke test of bench/rounds.py: a 3-agent debate round with 40-token answers (so every shared
answer fills a whole block) runs every mode, prints the table and writes the JSON. Timings are
not checked (noise at this size); the accounting and the exact modes are."""
from __future__ import annotations

import json

import pytest

from fixtures_default_model import default_model_dir  # noqa: F401
from repo_scripts import load_script


def test_rounds_smoke(default_model_dir, tmp_path, capsys):  # noqa: F811
    bench = load_script("bench/rounds.py")
    out = tmp_path / "rounds.json"
    assert bench.main(["--agents", "3", "--answer-tokens", "40", "--round1-tokens", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reproduce: python bench/rounds.py --agents 3" in printed
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["none", "prefix", "pic r=0.15 block", "pic r=0.15 block standalone",
                          "tokendance r=0.15 block producer", "tokendance r=0.15 block auto",
                          "tokendance r=0.15 block standalone", "tokendance r=0.15 block agent"]
    none, prefix, pic, pic_standalone, td, td_auto, td_standalone, td_agent = rows.values()
    # Agent masters: the reference agents are exact, and the non-reference means leave them out.
    refs = td_agent["stats"]["reference_agents"]
    assert refs and td_agent["reference_agents"] == refs
    for a in refs:
        assert td_agent["first_tokens"][a] == none["first_tokens"][a] and abs(td_agent["kl_per_agent"][a]) < 1e-5
    others = [a for a in range(3) if a not in refs]
    assert td["kl_nonref"] == pytest.approx(sum(td["kl_per_agent"][a] for a in others) / len(others))
    # 40-token answers are below auto's 64-token threshold: auto is the producer config exactly.
    assert td_auto["round1_ids"] == td["round1_ids"] and td_auto["stats"]["distinct_kv_bytes"] == \
        td["stats"]["distinct_kv_bytes"]
    assert all(r["round0_identical"] for r in rows.values())  # fidelity is measured on identical inputs
    # none is the reference; prefix mode is exact, so it agrees with none completely.
    for exact_mode in (none, prefix):
        assert exact_mode["agree"] == 1.0 and exact_mode["exact"] == 1.0 and abs(exact_mode["kl"]) < 1e-6
    # Every mode prefills the same prompts; reuse only lowers what is computed.
    assert td["stats"]["prompt_tokens"] == none["stats"]["prompt_tokens"]
    assert none["stats"]["prefill_tokens_computed"] == none["stats"]["prompt_tokens"]
    assert td["stats"]["prefill_tokens_computed"] < prefix["stats"]["prefill_tokens_computed"]
    assert td["stats"]["prefill_tokens_recomputed"] > 0 and pic["stats"]["prefill_tokens_recomputed"] > 0
    # pic copies every shared answer into each agent's blocks; tokendance views one master. (Against
    # prefix, these answers are too short to win: the recomputed first block of each is most of
    # it. The README's 128-token run is where that comparison is made.)
    assert td["stats"]["distinct_kv_bytes"] < pic["stats"]["distinct_kv_bytes"]
    assert td["stats"]["compression"] <= td["stats"]["compression_bound"]


def test_rounds_sweep_smoke(default_model_dir, tmp_path, capsys):  # noqa: F811
    """`--sweep-only` at a tiny size: every variant on shared engines, fidelity on identical inputs."""
    bench = load_script("bench/rounds.py")
    out = tmp_path / "sweep.json"
    assert bench.main(["--agents", "2", "--answer-tokens", "16", "--sweep-only", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trade-off (sorted by KL)" in printed
    rows = json.loads(out.read_text())["rows"]
    sweep = [r for r in rows if r["engine"] != "fresh"]
    assert len(sweep) == len(bench.sweep_configs())
    assert all(r["round0_identical"] for r in rows)
    for r in sweep:
        if r["params"]["master"] == "agent":
            # Two agents, each holding the other's answer: no block is carried by two agents, so
            # there is no reference (it would serve nobody) and the answers keep the "auto" rule.
            assert r["stats"]["reference_agents"] == []
        elif r["params"]["recompute_ratio"] == 0.3 and r["params"]["reuse"] == "tokendance":
            assert r["stats"]["prefill_tokens_recomputed"] > 0
        if r["params"]["reuse"] == "pic":
            assert r["stats"]["compression"] <= 1.0  # pic copies every shared token


def test_rounds_recompute_chunk_is_named_and_reproducible(default_model_dir, tmp_path, capsys):  # noqa: F811
    bench = load_script("bench/rounds.py")
    out = tmp_path / "chunk.json"
    assert bench.main(["--agents", "2", "--answer-tokens", "16", "--main", "none,tokendance:agent", "--main-ratio",
                       "0.02", "--recompute-chunk", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--main-ratio 0.02 --recompute-chunk 4" in printed  # the reproduce line
    rows = [r["config"] for r in json.loads(out.read_text())["rows"]]
    assert rows == ["none", "tokendance r=0.02 block chunk 4 agent"]
