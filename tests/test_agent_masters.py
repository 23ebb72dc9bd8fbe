"""Agent masters (`master="agent"`, the paper's Master) on a tiny random checkpoint.

Some agents of a round are reference agents: their prompts are prefilled exactly, and the
shared blocks in them become the masters every other agent reads in place. Everything runs in
fp32 on the CPU with 4-slot blocks (shared blocks start and end mid-block).

Specification:
- the pick (`pick_references`) is a greedy set cover over the shared tokens: the first pick
  holds the most, a later one only what it adds, while that is at least `reference_min_new` of
  its own shared tokens; a round of independent groups gets a reference in each group;
- with recompute_ratio=1.0, "agent" masters give the tokens of reuse="none" over three rounds,
  through `run_round` and through `generate` of a segment prompt;
- at every ratio the reference agents' outputs equal reuse="none"'s exactly (they read no
  master: their own carrier covers every prompt position but the last), and the round's stats
  name them; the others read the masters cut from a reference's prompt;
- the recompute choice is scored in a non-reference agent's context (in the reference's own it
  would be zero), and the cost of that scoring is counted in token-layers;
- a segment no reference holds falls back to the "auto" rule (a standalone prefill or the
  producer's output), and the round is still exact at ratio 1.0; pinned outputs that became no
  master are unpinned before the agents run;
- ref counts hold after every round with persistent reference agents, one-shot agents and a
  tight pool that preempts; the tight pool gives the roomy pool's tokens; releasing everything
  frees every block; an abort of a reference agent before it runs leaks nothing.
"""
from __future__ import annotations

import pytest

from nanodance import Shared
from nanodance.collector import pick_references
from nanodance.segments import SharedSpan
from round_workload import folder  # noqa: F401 (a fixture)
from round_workload import (N_AGENTS, PERSONAS, TASK, all_gather_rounds, baseline, check_refs, greedy, make_llm,
                            persistent_rounds, release_all, tokens)
from tiny_checkpoints import random_ids

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def span(start: int, key: tuple) -> SharedSpan:
    return SharedSpan(start, start + len(key), key)


# --- 1. the pick ------------------------------------------------------------------------------

def test_the_pick_is_a_greedy_cover_of_the_shared_tokens():
    a, b, c = (1,) * 8, (2,) * 8, (3,) * 4
    # Agent i holds every block but its own (a debate round); agent 2 holds the most tokens.
    spans = [[span(5, b), span(13, c)], [span(5, a), span(13, c)], [span(5, a), span(13, b)]]
    lengths = [30, 30, 30]
    assert pick_references(spans, lengths, min_new=0.0) == [2, 0]  # 16 tokens, then c (4 new)
    assert pick_references(spans, lengths, min_new=0.5) == [2]  # c is 4 of agent 0's 12: too little
    # A span that ends the prompt's last position but one is held; one starting at the last is not.
    assert pick_references([[span(28, (4, 4))], [span(3, (4, 4))]], [30, 30], 0.5) == [0]
    assert pick_references([[span(29, (4,))], [span(3, (4,))]], [30, 30], 0.5) == [1]
    # A segment only one agent carries makes no reference: its master would serve nobody else.
    assert pick_references([[span(3, (4, 4))], [span(3, (5, 5))]], [30, 30], 0.5) == []


def test_independent_groups_get_a_reference_each():
    g1, g2 = [(1,) * 8, (2,) * 8], [(5,) * 8, (6,) * 8]
    spans = [[span(3, g1[0]), span(11, g1[1])], [span(4, g1[0]), span(12, g1[1])],
             [span(3, g2[0]), span(11, g2[1])], [span(5, g2[1]), span(13, g2[0])]]
    picks = pick_references(spans, [30] * 4, 0.5)
    assert sorted(picks) == [0, 2]


# --- 2. exactness -----------------------------------------------------------------------------

def test_full_recompute_with_agent_masters_gives_the_tokens_of_no_reuse(folder):
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=1.0)
    results = all_gather_rounds(llm)
    assert tokens(results) == baseline(folder)
    assert all(r.stats["reference_agents"] for r in results[1:])  # agent masters were in play
    assert llm.stats()["collector_agent_masters"] > 0
    release_all(llm)


def test_generate_of_a_segment_prompt_with_agent_masters_is_exact_at_full_recompute(folder):
    shared = random_ids(13, seed=300)
    prompts = [[PERSONAS[i], Shared(shared), TASK] for i in range(3)]
    want = make_llm(folder, reuse="none").generate(prompts, greedy(), use_tqdm=False)
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=1.0)
    got = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got.stats["reference_agents"] == [0]
    release_all(llm)


@pytest.mark.parametrize("ratio,scheme", [(0.0, "block"), (0.15, "block"), (0.3, "token"), (0.5, "first")])
def test_reference_agents_equal_no_reuse_at_every_ratio(folder, ratio, scheme):
    """Each round's prompts (which depend on the earlier rounds' approximate outputs) are also
    run through reuse="none": the reference agents' outputs must equal its, token for token."""
    none = make_llm(folder, reuse="none")
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=ratio, recompute_scheme=scheme)
    for r, result in enumerate(all_gather_rounds(llm)[1:], start=1):
        want = none.generate([o.prompt_token_ids for o in result], greedy(), use_tqdm=False)
        refs = result.stats["reference_agents"]
        assert refs, "every all-gather round has a reference agent"
        for i in refs:
            assert result[i].token_ids == want[i].token_ids, f"round {r}: reference agent {i} differs from none"
    release_all(llm)


def test_pure_reuse_of_agent_masters_is_not_exact_for_the_others(folder):
    """The reference test above can fail: the non-reference agents read approximate masters."""
    none = make_llm(folder, reuse="none")
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=0.0)
    result = all_gather_rounds(llm, rounds=2)[1]
    want = none.generate([o.prompt_token_ids for o in result], greedy(), use_tqdm=False)
    others = [i for i in range(N_AGENTS) if i not in result.stats["reference_agents"]]
    assert any(result[i].token_ids != want[i].token_ids for i in others)
    assert result.stats["prefill_tokens_reused"] > 0
    release_all(llm)


def test_the_others_read_masters_cut_from_the_reference_prompt(folder):
    shared = [random_ids(10, seed=310), random_ids(9, seed=311)]
    prompts = [[PERSONAS[i], Shared(shared[0]), [7, 8], Shared(shared[1]), TASK] for i in range(3)]
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=0.0)
    out = llm.run_round(prompts, greedy(2), use_tqdm=False)
    stats, counters = out.stats, llm.stats()
    assert stats["reference_agents"] == [0]
    assert counters["collector_agent_masters"] == 2 and counters["collector_standalone_masters"] == 0
    assert counters["collector_reference_agents"] == 1
    assert counters["collector_reference_prefill_tokens"] == len(out[0].prompt_token_ids) - 1
    assert stats["masters"] == 2
    # Agents 1 and 2 reuse both blocks but their last token ... (1 recomputed: the ratio is 0).
    per_other = sum(len(s) for s in shared)
    assert stats["prefill_tokens_reused"] >= 2 * per_other + len(out[0].prompt_token_ids) - 1
    release_all(llm)


def test_selection_is_scored_outside_the_reference_context_and_counted(folder):
    shared = random_ids(16, seed=320)
    prompts = [[PERSONAS[i], Shared(shared), TASK] for i in range(3)]
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=0.5, recompute_scheme="token")
    out = llm.run_round(prompts, greedy(1), use_tqdm=False)
    counters = llm.stats()
    assert out.stats["reference_agents"] == [0]
    # One segment, scored once, in agent 1's context (the first non-reference agent carrying it).
    assert counters["collector_scored_segments"] == 1
    assert counters["collector_reference_tokens"] == len(out[1].prompt_token_ids)
    assert out.stats["prefill_token_layers"] == (out.stats["prefill_tokens_computed"] * 3
                                                 + counters["collector_reference_token_layers"])
    release_all(llm)


# --- 3. fallback ------------------------------------------------------------------------------

def test_a_segment_no_reference_holds_falls_back_and_stays_exact(folder):
    """Agent 0's own block is in nobody else's prompt: it makes no reference (agent 1, holding
    both blocks the others share, is the one) and gets a standalone master."""
    common, own, other = random_ids(12, seed=330), random_ids(10, seed=331), random_ids(9, seed=332)
    prompts = [[PERSONAS[0], Shared(common), [3], Shared(own), TASK],
               [PERSONAS[1], Shared(common), [4], Shared(other), TASK],
               [PERSONAS[2], Shared(other), [5], Shared(common), TASK]]
    want = make_llm(folder, reuse="none").run_round(prompts, greedy(), use_tqdm=False)
    for ratio in (1.0, 0.15):
        llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=ratio, reference_min_new=1.0)
        got = llm.run_round(prompts, greedy(), use_tqdm=False)
        assert got.stats["reference_agents"] == [1]
        assert llm.stats()["collector_standalone_masters"] == 1  # `own`: only agent 0 carries it
        assert llm.stats()["collector_agent_masters"] == 2  # `common` and `other`, cut from agent 1
        assert got[1].token_ids == want[1].token_ids
        if ratio == 1.0:
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
        check_refs(llm)
        release_all(llm)


def test_a_short_block_no_reference_holds_falls_back_to_its_producer(folder):
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=0.0, reference_min_new=1.0)
    r0 = llm.run_round([[PERSONAS[i], TASK] for i in range(3)], greedy(6), use_tqdm=False)
    # Agent 0 holds outputs 1 and 2, agents 1 and 2 hold output 0 and one more: agent 0 is the
    # only reference, output 0 (6 tokens, below auto_standalone_tokens) is its producer's KV.
    prompts = [[PERSONAS[0], Shared(r0[1]), Shared(r0[2]), TASK],
               [PERSONAS[1], Shared(r0[0]), Shared(r0[2]), TASK],
               [PERSONAS[2], Shared(r0[1]), Shared(r0[0]), TASK]]
    before = llm.stats()
    got = llm.run_round(prompts, greedy(), use_tqdm=False)
    after = llm.stats()
    assert got.stats["reference_agents"] == [0]
    assert after["collector_producer_masters"] - before["collector_producer_masters"] == 1
    assert after["collector_standalone_masters"] == before["collector_standalone_masters"]
    check_refs(llm)
    release_all(llm)


def test_outputs_that_are_no_master_are_unpinned_before_the_agents_run(folder):
    """Outputs 1 and 2 are cut from the reference's prompt: their pinned producer KV would only
    sit in the pool beside the masters read. Output 0 is read as a producer master: it stays."""
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=0.0, reference_min_new=1.0)
    r0 = llm.run_round([[PERSONAS[i], TASK] for i in range(3)], greedy(6), use_tqdm=False)
    prompts = [[PERSONAS[0], Shared(r0[1]), Shared(r0[2]), TASK],
               [PERSONAS[1], Shared(r0[0]), Shared(r0[2]), TASK],
               [PERSONAS[2], Shared(r0[1]), Shared(r0[0]), TASK]]
    pinned_while_running = []
    llm.run_round(prompts, greedy(), use_tqdm=False,
                  on_step=lambda outputs: pinned_while_running.append(set(llm.collector.outputs)))
    assert pinned_while_running[0] == {r0[0].request_id}
    assert llm.stats()["collector_outputs_released_unused"] == 2
    check_refs(llm)
    release_all(llm)


# --- 4. ref counts ----------------------------------------------------------------------------

def test_ref_counts_with_persistent_reference_agents_and_preemption(folder):
    roomy = make_llm(folder, reuse="tokendance", master="agent")
    expected = persistent_rounds(roomy)
    # The persistent agent 0 is a reference from round 1 on: its carrier starts from its kept cache.
    assert all(out.stats["reference_agents"] for out in expected[1:])
    release_all(roomy)

    tight = make_llm(folder, reuse="tokendance", master="agent", kv_cache_blocks=44)
    got = persistent_rounds(tight)
    assert tight.stats()["preemptions"] > 0, "the pool was meant to be tight enough to preempt"
    assert tokens(got) == tokens(expected)
    release_all(tight)


def test_persistent_reference_agent_is_exact_and_computes_only_its_new_tokens(folder):
    none = make_llm(folder, reuse="none")
    want = persistent_rounds(none, rounds=2)
    llm = make_llm(folder, reuse="tokendance", master="agent")
    got = persistent_rounds(llm, rounds=2)
    refs = got[1].stats["reference_agents"]
    assert refs == [0]
    assert got[1][0].token_ids == want[1][0].token_ids
    # Its carrier reused its kept cache (prompt + output of round 0) instead of recomputing it.
    kept = len(got[0][0].prompt_token_ids) + len(got[0][0].token_ids) - 1
    carrier = len(got[1][0].prompt_token_ids) - 1
    assert llm.stats()["collector_reference_prefill_tokens"] == carrier
    assert got[1].stats["prefill_tokens_computed"] < sum(len(o.prompt_token_ids) for o in got[1]) - kept
    release_all(none)
    release_all(llm)


def test_aborting_a_reference_agent_leaks_nothing(folder):
    shared = random_ids(12, seed=340)
    prompts = [[PERSONAS[i], Shared(shared), TASK] for i in range(3)]
    llm = make_llm(folder, reuse="tokendance", master="agent", recompute_ratio=0.0)
    aborted = []

    def on_step(outputs):
        llm.check_invariants()  # mid-round: masters and carriers are holders too
        if not aborted:
            aborted.append(llm.abort(outputs[0].request_id))

    out = llm.run_round(prompts, greedy(3), use_tqdm=False, on_step=on_step)
    assert aborted == [True] and out[0].finish_reason == "abort"
    assert [o.finish_reason for o in out[1:]] == ["length", "length"]
    check_refs(llm)
    release_all(llm)
