"""The tiny all-gather workload that the round tests share (test_rounds, test_agent_masters,
test_auto_shared): a 3-layer Llama checkpoint, 4 agents, and the helpers that run and check
rounds of it.

Prompts are token-id segments; everything runs in fp32 on the CPU with 4-slot blocks, so short
segments start and end mid-block. Agent i's round-0 prompt is its persona and a task; in round
r it is its persona, the other agents' round r-1 outputs as `Shared(...)` blocks (rotated, so
every block moves), then the task.

    from round_workload import folder, make_llm, all_gather_rounds, check_refs, ...  # noqa: F401
"""
from __future__ import annotations

import pytest

from nanodance import LLM, SamplingParams, Shared
from tiny_checkpoints import random_ids, write_tiny_checkpoint

BLOCK = 4
N_AGENTS = 4
PERSONAS = [random_ids(6 + 5 * i, seed=100 + i) for i in range(N_AGENTS)]
TASK = random_ids(5, seed=200)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Llama with llama3 RoPE scaling, GQA, 3 layers (so layer 1 is a real check layer)."""
    path, _ = write_tiny_checkpoint(tmp_path_factory.mktemp("llama3"), kind="llama3", seed=1, num_hidden_layers=3)
    return path


def make_llm(folder, **kwargs) -> LLM:
    options = dict(dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=256, reuse="none")
    options.update(kwargs)
    return LLM(folder, **options)


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def holders(llm: LLM) -> list[list[int]]:
    """Every reference that may outlive a round: pinned outputs (producer masters), kept agent caches."""
    pinned = [[v.block for v in m.views] for m in llm.collector.outputs.values()] if llm.collector else []
    kept = [[v.block for v in views] for views in llm.agents.holders()]
    return pinned + kept


def check_refs(llm: LLM) -> None:
    """Between rounds the only holders are pinned outputs and kept caches (masters and carriers are gone)."""
    llm.pool.check_invariants(holders=holders(llm))
    llm.check_invariants()


def release_all(llm: LLM) -> None:
    """Forget every persistent agent and pinned output: then no block may stay referenced."""
    for agent in llm.agents.ids():
        llm.release_agent(agent)
    if llm.collector is not None:
        llm.collector.release_outputs(forget_kept=True)
    assert llm.pool.num_used == 0, f"{llm.pool.num_used} blocks still referenced after releasing everything"
    llm.pool.check_invariants(holders=[])


def all_gather_rounds(llm: LLM, rounds: int = 3, agents=None, max_tokens: int = 8):
    """Round 0: persona + task; round r: persona + Shared(others' round r-1 outputs, rotated) + task."""
    results, prev = [], None
    for r in range(rounds):
        prompts = []
        for i in range(N_AGENTS):
            if prev is None:
                prompts.append([PERSONAS[i], TASK])
            else:
                others = [(i + r + j) % N_AGENTS for j in range(N_AGENTS)]
                prompts.append([PERSONAS[i]] + [Shared(prev[j]) for j in others if j != i] + [TASK])
        prev = llm.run_round(prompts, greedy(max_tokens), agents=agents, use_tqdm=False)
        check_refs(llm)
        results.append(prev)
    return results


def persistent_rounds(llm: LLM, rounds: int = 3):
    """Agents 0 and 2 persist (their next prompt extends prompt + output); 1 and 3 are one-shot."""
    agents = ["a0", None, "a2", None]
    history = [PERSONAS[i] + TASK for i in range(N_AGENTS)]
    prompts = [[h] for h in history]
    outs = []
    for _ in range(rounds):
        out = llm.run_round(prompts, greedy(6), agents=agents, use_tqdm=False)
        check_refs(llm)
        assert all(o.finish_reason == "length" for o in out), [o.error for o in out]
        outs.append(out)
        new = []
        for i in range(N_AGENTS):
            others = [Shared(out[j]) for j in range(N_AGENTS) if j != i]
            if agents[i] is not None:
                history[i] = history[i] + out[i].token_ids
                new.append([history[i]] + others + [TASK])
            else:
                new.append([PERSONAS[i]] + others + [TASK])
        prompts = new
    return outs


def tokens(results) -> list[list[int]]:
    return [o.token_ids for r in results for o in r]


_BASELINE: dict = {}


def baseline(folder) -> list[list[int]]:
    """The greedy tokens of reuse="none" over three all-gather rounds (computed once per checkpoint)."""
    if folder not in _BASELINE:
        llm = make_llm(folder, reuse="none")
        _BASELINE[folder] = tokens(all_gather_rounds(llm))
        release_all(llm)
    return _BASELINE[folder]
