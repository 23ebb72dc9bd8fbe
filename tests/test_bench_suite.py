"""The All-Gather workload generator (bench/workloads.py) and a dry-run smoke of bench/suite.py.

The generator is specified by its properties: the same seed gives the same prompts, an agent
never gathers its own output (unless asked), fan-out k gives k sources from the right set, the
three block orders, history modes, active fractions and output lengths, and every preset's
prompts (with outputs at their longest) fit in the default model's 8K context. The smoke test
runs `suite.main` in dry-run on a tiny debate (every section: configs, ratio sweep, agents
sweep, concurrency search) and checks what it reports.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from fixtures_default_model import default_model_dir, default_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.workloads import (PRESETS, SyntheticOutput, Workload, WorkloadConfig, preset,  # noqa: E402
                             prompt_lengths, synthetic_round_outputs)
from nanodance import Shared  # noqa: E402


def _run_rounds(wl: Workload) -> list:
    """Every round's RoundPrompts, with synthetic outputs standing in for the engine's."""
    outputs, rounds = {}, []
    for r in range(wl.cfg.rounds):
        rp = wl.round_prompts(r, outputs)
        rounds.append(rp)
        outputs.update(synthetic_round_outputs(wl, r))
    return rounds


def _render(rounds) -> list:
    """A comparable form of the prompts: text, ids, and Shared blocks by their content."""
    def seg(s):
        if isinstance(s, Shared):
            v = s.value
            return ("shared", v if isinstance(v, str) else tuple(v.token_ids))
        return ("private", s if isinstance(s, str) else tuple(s))
    return [(rp.agents, [[seg(s) for s in p] for p in rp.prompts], rp.max_tokens) for rp in rounds]


def _gathered(prompt) -> list:
    return [s.value for s in prompt if isinstance(s, Shared) and isinstance(s.value, SyntheticOutput)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_same_seed_same_prompts_other_seed_other_prompts(name):
    a = _render(_run_rounds(Workload(preset(name, agents=6, seed=3))))
    b = _render(_run_rounds(Workload(preset(name, agents=6, seed=3))))
    c = _render(_run_rounds(Workload(preset(name, agents=6, seed=4))))
    assert a == b
    assert a != c


def test_an_agent_keeps_its_persona_whatever_the_number_of_agents():
    small, large = Workload(preset("generative-agents", agents=4)), Workload(preset("generative-agents", agents=9))
    assert small.personas == large.personas[:4]
    assert [small.output_tokens(1, i) for i in range(4)] == [large.output_tokens(1, i) for i in range(4)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_own_output_is_excluded_and_every_source_is_a_shared_output_of_the_previous_round(name):
    wl = Workload(preset(name, agents=7, rounds=3))
    outputs = {}
    for r in range(3):
        rp = wl.round_prompts(r, outputs)
        for agent, prompt, sources in zip(rp.agents, rp.prompts, rp.sources):
            assert agent not in sources
            gathered = _gathered(prompt)
            assert [g.request_id for g in gathered] == sources  # synthetic outputs carry the producer's index
            assert all(outputs[(r - 1, j)] is g for j, g in zip(sources, gathered))
        assert r > 0 or all(s == [] for s in rp.sources)
        outputs.update(synthetic_round_outputs(wl, r))


def test_own_output_kept_when_asked():
    wl = Workload(preset("debate", agents=4, exclude_own=False))
    assert all(i in wl.sources(1, i) for i in range(4))


def test_fanout_all_and_k_neighbours():
    n = 9
    everyone = Workload(preset("debate", agents=n))
    assert all(everyone.sources(1, i) == [j for j in range(n) if j != i] for i in range(n))
    ring = Workload(preset("stress", agents=n, fanout=3, order="fixed"))
    for i in range(n):
        assert ring.sources(1, i) == sorted((i + d) % n for d in (1, 2, 3))
    friends = Workload(preset("agent-society", agents=n, active_fraction=1.0))  # k drawn in 2..5, random graph
    sizes = [len(friends.sources(1, i)) for i in range(n)]
    assert all(2 <= k <= 5 for k in sizes) and len(set(sizes)) > 1
    assert friends.fanout_sets == Workload(preset("agent-society", agents=n, active_fraction=1.0)).fanout_sets
    assert all(friends.sources(1, i) == friends.sources(2, i) for i in range(n))  # a fixed graph


def test_block_orders():
    n = 6
    base = dict(agents=n, fanout=None)
    fixed = Workload(preset("generative-agents", order="fixed", **base))
    rotate = Workload(preset("generative-agents", order="rotate", **base))
    shuffle = Workload(preset("generative-agents", order="shuffle", **base))
    for i in range(n):
        assert fixed.sources(1, i) == sorted(fixed.sources(1, i))
        assert rotate.sources(1, i) == [(i + d) % n for d in range(1, n)]
        assert sorted(shuffle.sources(1, i)) == fixed.sources(1, i)
    assert any(shuffle.sources(1, i) != fixed.sources(1, i) for i in range(n))
    assert any(shuffle.sources(1, i) != shuffle.sources(2, i) for i in range(n))  # reshuffled every round


def test_history_append_grows_with_own_outputs_and_resample_redraws():
    wl = Workload(preset("generative-agents", agents=3, rounds=3))
    rounds = _run_rounds(wl)
    own = [[s for s in rp.prompts[0] if isinstance(s, list)] for rp in rounds]
    assert [len(x) for x in own] == [0, 1, 2]  # the agent's own past outputs, as private token ids
    stress = Workload(preset("stress", agents=3, rounds=2))
    assert stress.history(0, 0, {}) != stress.history(1, 0, {})


def test_active_fraction_and_output_lengths():
    wl = Workload(preset("agent-society", agents=20, active_fraction=0.5, rounds=3))
    outputs = {}
    for r in range(3):
        rp = wl.round_prompts(r, outputs)
        assert len(rp.agents) == 10
        lo, hi = wl.cfg.output_tokens
        assert all(lo <= m <= hi for m in rp.max_tokens)
        if r:
            previous = set(wl.active(r - 1))
            assert all(set(s) <= previous for s in rp.sources)
        outputs.update(synthetic_round_outputs(wl, r))
    assert wl.active(1) != wl.active(2)


def test_tools_and_broadcast_are_shared_text_blocks():
    wl = Workload(preset("agent-society", agents=5, active_fraction=1.0))
    rp = wl.round_prompts(0, {})
    texts = [[s.value for s in p if isinstance(s, Shared) and isinstance(s.value, str)] for p in rp.prompts]
    assert all(len(t) == wl.cfg.tools_per_agent + 1 for t in texts)  # tools + the broadcast
    assert len({t[-1] for t in texts}) == 1  # one broadcast for everyone
    assert wl._broadcast(0) != wl._broadcast(1)  # per_round


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="order"):
        preset("debate", order="sideways")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("chess")
    with pytest.raises(ValueError, match="output_tokens"):
        Workload(WorkloadConfig(output_tokens=(5, 2)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_prompt_fits_the_context(name, default_tokenizer):  # noqa: F811
    from bench.workloads import PRESET_AGENT_RANGES
    wl = Workload(preset(name, agents=PRESET_AGENT_RANGES[name][1]))
    rows = prompt_lengths(wl, default_tokenizer, longest=True)
    assert max(total for *_, total in rows) <= wl.cfg.context
    if name == "stress":  # 512-token histories and 24 long outputs: a big prompt, still inside 8K
        assert max(n for _, _, n, _ in rows) > 6000


def test_sizes_are_close_to_token_counts(default_tokenizer):  # noqa: F811
    wl = Workload(preset("stress", agents=2))
    history = wl.history(0, 0, {})[0]
    assert abs(len(default_tokenizer.encode(history)) - 512) < 80
    assert abs(len(default_tokenizer.encode(wl.prefix)) - wl.cfg.prefix_tokens) < 30


def test_suite_dry_run_smoke(default_model_dir, tmp_path, capsys):  # noqa: F811
    from bench import suite
    t0 = time.perf_counter()
    argv = ["--preset", "debate", "--agents", "4", "--rounds", "2", "--output-tokens", "64", "--dry-run",
            "--ratios", "0", "--agents-sweep", "2,4", "--budgets", "80,160", "--max-agents", "12", "--out",
            str(tmp_path)]
    assert suite.main(argv) == 0
    assert time.perf_counter() - t0 < 60
    printed = capsys.readouterr().out
    assert printed.count("DRY RUN") >= 2 and "total " not in printed  # loud, and no wall times
    assert "prefill s" not in printed.split("5. goals")[0] and "round s" not in printed
    assert "command: python bench/suite.py --preset debate" in printed
    result = json.loads((tmp_path / "debate-dry.json").read_text())
    main = result["main"]
    assert list(main) == ["none", "prefix", "pic", "tokendance"]
    assert all(r["prefill_seconds"] is None and "kl" not in r for r in main.values())  # no times, no fidelity
    none, prefix, pic, td = main.values()
    assert none["compression"] == 1.0 and none["preemptions"] == 0
    assert td["distinct_kv_bytes"] < prefix["distinct_kv_bytes"] < none["distinct_kv_bytes"]
    assert pic["mirror_slots"] == 1.0 and td["mirror_slots"] > 1.0  # pic holds every shared token privately
    assert pic["mirror"] <= 1.0 < td["mirror"]  # per block: pic's copies may straddle one block more
    assert td["compression"] <= td["compression_bound"] + 1e-9
    assert td["prefill_tokens_computed"] < prefix["prefill_tokens_computed"]
    assert set(result["ratio_sweep"]) == {"td block 0", "pic block 0"}
    assert set(result["agents_sweep"]["tokendance"]) == {"2", "4"}
    conc = result["concurrency"]
    for label in main:
        served = [conc[label][b]["served"] for b in ("80", "160")]
        assert 1 <= served[0] <= served[1] <= 12  # a bigger pool serves at least as many agents
    assert conc["tokendance"]["160"]["served"] > conc["prefix"]["160"]["served"]
