"""Rounds of agents (`LLM.run_round`, `Shared` blocks, the KV collector) on a tiny random checkpoint.

Prompts are token-id segments; everything runs in fp32 on the CPU with 4-slot blocks so that
short segments start and end mid-block. The workload is an all-gather: agent i's prompt is its
persona, the other agents' previous outputs as `Shared(...)` blocks, then a task tail.

Specification:
- exactness at full recompute: with recompute_ratio=1.0, "tokendance" and "pic" (master
  "producer", "standalone", "auto" or "agent"; schemes "block", "first", "token") give the greedy tokens of
  reuse="none", token for token, over three rounds;
- a shared block at position 0 of every prompt is a true common prefix: tokendance (ratio 0
  and the default ratio) gives the tokens of reuse="prefix";
- layer 0 is context-free: a master's layer-0 keys, rotated by delta = new position - master
  position, equal the keys computed fresh at the new position (`reference_keys` at check layer
  0 vs `kernels.key_deviation`, ~0 in fp32), for producer and standalone masters; at layer 1
  they differ (context matters there, so the check is not vacuous);
- producer masters: in the second round the output blocks get producer masters only (no
  standalone prefill), and far fewer prefill tokens are computed than with reuse="none"; a
  persistent agent whose next prompt extends its previous prompt and output gets exactly the
  tokens of reuse="none", while computing only the new tokens;
- ref counts: after every round of multi-round runs with persistent and one-shot agents, in
  roomy and tight (preempting) pools, every block's ref count equals the references held by
  the pinned outputs and the kept agent caches; releasing all of them frees every block; a tight
  pool gives the tokens of a roomy one; kept caches never wedge the scheduler, and a round that
  fails (even inside the collector) leaks nothing;
- accounting (round_stats) on a hand-computed example: dense / distinct / shared / private
  bytes, compression and its bound, prefill work computed / reused, masters; blocks of a
  producer master count as shared;
- errors (RequestError): an empty round, Shared(3.5), Shared(output of another LLM), repeated
  persistent agent ids, recompute_ratio 1.5, an unknown reuse mode or scheme; after each the
  engine still runs a valid round and leaks nothing;
- `encode_segments` tokenizes every shared part on its own (also inside chat messages), so a
  shared block is the same ids in every prompt, and its span points at them.
"""
from __future__ import annotations

import pytest
import torch

from nanodance import Shared, kernels
from nanodance.executor import reference_keys
from nanodance.errors import CapacityError, RequestError
from nanodance.segments import encode_segments, is_segment_prompt
from round_workload import folder  # noqa: F401 (a fixture)
from round_workload import (BLOCK, N_AGENTS, PERSONAS, TASK, all_gather_rounds, baseline, check_refs, greedy, make_llm,
                            persistent_rounds, release_all, tokens)
from tiny_checkpoints import random_ids

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --- 1. exactness at full recompute ----------------------------------------------------------

@pytest.mark.parametrize("scheme", ["block", "first", "token"])
@pytest.mark.parametrize("master", ["producer", "standalone", "auto", "agent"])
@pytest.mark.parametrize("reuse", ["tokendance", "pic"])
def test_full_recompute_gives_the_tokens_of_no_reuse(folder, reuse, master, scheme):
    llm = make_llm(folder, reuse=reuse, recompute_ratio=1.0, master=master, recompute_scheme=scheme)
    results = all_gather_rounds(llm)
    assert tokens(results) == baseline(folder)
    # every shared token really was recomputed (reference agents compute theirs as their prompt)
    for r in results[1:]:
        shared = sum(len(o.token_ids) for o in results[0]) * (N_AGENTS - 1)
        readers = N_AGENTS - len(r.stats["reference_agents"])
        assert r.stats["prefill_tokens_recomputed"] >= shared * readers // N_AGENTS
    release_all(llm)


# --- 2. a true common prefix -----------------------------------------------------------------

def common_prefix_prompts():
    common = random_ids(13, seed=300)  # 3 full blocks and one token more
    return [[Shared(common), random_ids(3 + 2 * i, seed=310 + i)] for i in range(N_AGENTS)]


def _prefix_tokens(folder):
    llm = make_llm(folder, reuse="prefix")
    out = llm.run_round(common_prefix_prompts(), greedy(10), use_tqdm=False)
    release_all(llm)
    return [o.token_ids for o in out]


@pytest.mark.parametrize("sink", [True, False])
@pytest.mark.parametrize("ratio", [0.0, 0.15])
def test_shared_block_at_position_zero_is_a_common_prefix(folder, ratio, sink):
    llm = make_llm(folder, reuse="tokendance", recompute_ratio=ratio, master_sink=sink)
    out = llm.run_round(common_prefix_prompts(), greedy(10), use_tqdm=False)
    check_refs(llm)
    assert [o.token_ids for o in out] == _prefix_tokens(folder)
    release_all(llm)


# --- 3. layer 0 is context-free --------------------------------------------------------------

def _master_keys_deviation(llm, master, new_prompt, start, layer):
    """Per-token deviation between fresh keys of `new_prompt` (segment at `start`) and the master's."""
    fresh = reference_keys(llm.model, [new_prompt], check_layer=layer, block_size=BLOCK, dtype=llm.dtype,
                           device=llm.device)[0]
    n = len(master.slots(BLOCK))
    src = torch.tensor(master.slots(BLOCK), dtype=torch.int64)
    delta = torch.full((n,), start - master.start, dtype=torch.int32)
    k_cache = llm.kv_cache.layers[layer][0]
    return kernels.key_deviation(fresh[start:start + n], k_cache, src, delta, llm.model.inv_freq)


def test_layer0_keys_of_a_producer_master_are_position_independent(folder):
    llm = make_llm(folder, reuse="tokendance", master="producer")
    r0 = llm.run_round([[PERSONAS[i], TASK] for i in range(2)], greedy(9), use_tqdm=False)
    master = llm.collector.outputs[r0[0].request_id]
    seg = list(master.key[:len(master.slots(BLOCK))])
    assert master.start == len(PERSONAS[0]) + len(TASK)
    for prefix in (PERSONAS[1], PERSONAS[3] + TASK):  # the segment moves forward, mid-block, elsewhere
        prompt = prefix + seg + TASK
        dev0 = _master_keys_deviation(llm, master, prompt, len(prefix), layer=0)
        assert dev0.max().item() < 1e-9, dev0
        dev1 = _master_keys_deviation(llm, master, prompt, len(prefix), layer=1)
        assert dev1.max().item() > 1e-4  # context matters from layer 1 on
    release_all(llm)


def test_layer0_keys_of_a_standalone_master_are_position_independent(folder):
    llm = make_llm(folder, reuse="tokendance", master="standalone", recompute_ratio=0.0)
    seg = random_ids(11, seed=400)
    prompt = PERSONAS[2] + seg + TASK
    start = len(PERSONAS[2])
    spans = encode_segments([PERSONAS[2], Shared(seg), TASK], None).spans
    collector = llm.collector
    collector.adopt_masters(llm.engine.prefill_masters(collector.begin_round([spans])))
    collector.plan_round([prompt], [spans], [None])
    (master,) = collector.round_masters
    assert master.start == 1  # behind the sink token
    dev0 = _master_keys_deviation(llm, master, prompt, start, layer=0)
    assert dev0.max().item() < 1e-9
    assert _master_keys_deviation(llm, master, prompt, start, layer=1).max().item() > 1e-4
    collector.end_round(keep_outputs=set())
    release_all(llm)


# --- 4. producer masters and persistent agents -----------------------------------------------

def test_second_round_uses_producer_masters_and_computes_far_less(folder):
    none = make_llm(folder, reuse="none")
    td = make_llm(folder, reuse="tokendance", master="producer")
    base = all_gather_rounds(none, rounds=2)
    r0, r1 = all_gather_rounds(td, rounds=2)
    c = td.collector.counters
    assert c.producer_masters == N_AGENTS  # one per distinct output block of round 0
    assert c.standalone_masters == 0 and c.master_prefill_tokens == 0
    assert r1.stats["masters"] == N_AGENTS
    computed, computed_none = r1.stats["prefill_tokens_computed"], base[1].stats["prefill_tokens_computed"]
    assert computed < 0.6 * computed_none, (computed, computed_none)
    assert r1.stats["prefill_tokens_reused"] > 0.4 * r1.stats["prompt_tokens"]
    release_all(none)
    release_all(td)


@pytest.mark.parametrize("reuse", ["pic", "tokendance"])
def test_standalone_masters_keep_no_output_pinned_between_rounds(folder, reuse):
    """Only producer masters read a round's output K/V; with standalone masters it is freed at once."""
    standalone = make_llm(folder, reuse=reuse, master="standalone")
    all_gather_rounds(standalone, rounds=2)
    assert standalone.collector.outputs == {} and standalone.pool.num_used == 0
    producer = make_llm(folder, reuse=reuse, master="producer")
    all_gather_rounds(producer, rounds=2)
    assert len(producer.collector.outputs) == N_AGENTS and producer.pool.num_used > 0
    release_all(producer)


@pytest.mark.parametrize("reuse", ["none", "prefix", "tokendance"])
def test_persistent_agent_continuation_is_exact(folder, reuse):
    follow = random_ids(7, seed=500)
    ref = make_llm(folder, reuse="none")
    p0 = PERSONAS[1] + TASK
    o0 = ref.generate([p0], greedy(9), use_tqdm=False)[0]
    p1 = p0 + o0.token_ids + follow
    o1 = ref.generate([p1], greedy(9), use_tqdm=False)[0]

    llm = make_llm(folder, reuse=reuse)
    a0 = llm.run_round([[p0]], greedy(9), agents=["ann"], use_tqdm=False)
    check_refs(llm)
    assert a0[0].token_ids == o0.token_ids
    assert "ann" in llm.agents
    a1 = llm.run_round([[p1]], greedy(9), agents=["ann"], use_tqdm=False)
    check_refs(llm)
    assert a1[0].token_ids == o1.token_ids
    # only the tokens the agent has not seen are computed (its last sampled token had no K/V)
    assert a1.stats["prefill_tokens_computed"] == len(follow) + 1
    release_all(llm)


# --- 5. ref counts over rounds, persistent agents, preemption --------------------------------

@pytest.mark.parametrize("reuse,kwargs,blocks,preempts", [
    ("none", {}, 48, True), ("prefix", {}, 48, True), ("tokendance", {}, 44, True),
    ("tokendance", dict(master="standalone"), 60, False),
    ("tokendance", dict(recompute_scheme="token", recompute_ratio=0.3), 46, True),  # packed: no copies, less room
    ("pic", dict(recompute_ratio=0.3), 48, True),
])
def test_ref_counts_over_rounds_with_persistent_agents_and_preemption(folder, reuse, kwargs, blocks, preempts):
    roomy = make_llm(folder, reuse=reuse, **kwargs)
    expected = tokens(persistent_rounds(roomy))
    release_all(roomy)

    tight = make_llm(folder, reuse=reuse, kv_cache_blocks=blocks, **kwargs)
    got = persistent_rounds(tight)
    if preempts:
        assert tight.stats()["preemptions"] > 0, "the pool was meant to be tight enough to preempt"
    assert tokens(got) == expected
    release_all(tight)


@pytest.mark.parametrize("reuse", ["none", "tokendance"])
def test_tight_pool_with_kept_caches_degrades_instead_of_dying(folder, reuse):
    llm = make_llm(folder, reuse=reuse, kv_cache_blocks=32)
    try:
        persistent_rounds(llm)  # must complete (or fail with a RequestError / CapacityError) ...
    finally:
        check_refs(llm)  # ... and never leak
        release_all(llm)


def test_kept_cache_survives_a_round_whose_master_cannot_be_prefilled(folder):
    llm = make_llm(folder, reuse="tokendance", kv_cache_blocks=12, master="standalone")
    p0 = random_ids(8, seed=700)
    r0 = llm.run_round([[p0]], greedy(4), agents=["a"], use_tqdm=False)  # keeps 3 blocks
    big = random_ids(47, seed=701)  # 48 tokens with its sink: the whole pool
    try:
        llm.run_round([[p0 + r0[0].token_ids, [5]], [[9], Shared(big)]], greedy(2), agents=["a", None],
                      use_tqdm=False)
    except CapacityError as e:
        assert "kv_cache_blocks" in str(e)  # a clear refusal that names the fix
    finally:
        check_refs(llm)
        release_all(llm)


# --- 6. accounting on a hand-computed example -------------------------------------------------

def hand_example():
    """2 agents, block 4: [private 4] + Shared(common 8) + [tail 4] = 16 tokens = 4 blocks each."""
    common = random_ids(8, seed=600)
    return [[random_ids(4, seed=610 + i), Shared(common), random_ids(4, seed=620 + i)] for i in range(2)]


def test_accounting_without_reuse(folder):
    llm = make_llm(folder, reuse="none")
    st = llm.run_round(hand_example(), greedy(3), use_tqdm=False).stats
    bb = llm.block_bytes
    assert bb == 2 * 3 * BLOCK * 2 * 16 * 4  # K and V, 3 layers, 4 slots, 2 kv heads, dim 16, fp32
    assert st["agents"] == 2 and st["prompt_tokens"] == 32
    assert st["dense_kv_bytes"] == 8 * bb
    assert st["distinct_kv_bytes"] == 8 * bb
    assert st["shared_kv_bytes"] == 0
    assert st["private_kv_bytes_mean"] == st["private_kv_bytes_max"] == 4 * bb
    assert st["compression"] == 1.0
    assert st["compression_bound"] == 8 / 6  # 2 private blocks each + the common block's 2, once
    assert st["prefill_tokens_computed"] == 32 and st["prefill_tokens_reused"] == 0
    assert st["prefill_tokens_recomputed"] == 0 and st["masters"] == 0 and st["diff_blocks"] == 0
    assert st["prefill_token_layers"] == 32 * 3
    release_all(llm)


@pytest.mark.parametrize("sink", [False, True])
def test_accounting_tokendance_pure_reuse(folder, sink):
    llm = make_llm(folder, reuse="tokendance", recompute_ratio=0.0, master_sink=sink, master="standalone")
    st = llm.run_round(hand_example(), greedy(3), use_tqdm=False).stats
    bb = llm.block_bytes
    master_blocks = 3 if sink else 2  # 8 tokens behind a sink slot straddle 3 blocks
    assert st["dense_kv_bytes"] == 8 * bb
    assert st["distinct_kv_bytes"] == (4 + master_blocks) * bb  # 2 private blocks per agent + the master's
    assert st["shared_kv_bytes"] == master_blocks * bb
    assert st["private_kv_bytes_mean"] == st["private_kv_bytes_max"] == 2 * bb
    assert st["compression"] == 8 / (4 + master_blocks)
    assert st["compression_bound"] == 8 / 6
    # master prefill (with its sink) + each agent's 8 private tokens; the 8 shared ones reused
    assert st["prefill_tokens_computed"] == 8 + sink + 2 * 8
    assert st["prefill_tokens_reused"] == 2 * 8
    assert st["prefill_tokens_recomputed"] == 0 and st["masters"] == 1 and st["diff_blocks"] == 0
    assert st["prefill_token_layers"] == st["prefill_tokens_computed"] * 3  # ratio 0: nothing scored
    release_all(llm)


def test_accounting_tokendance_first_block_recomputed(folder):
    """scheme "first", ratio 0.5: the first 4 shared tokens (one block) of each agent are a diff block."""
    llm = make_llm(folder, reuse="tokendance", recompute_ratio=0.5, recompute_scheme="first", master_sink=False,
                   master="standalone")
    st = llm.run_round(hand_example(), greedy(3), use_tqdm=False).stats
    bb = llm.block_bytes
    # per agent: private, diff, tail blocks (3) + the master's 2nd block (viewed); master: 2 blocks
    assert st["distinct_kv_bytes"] == (2 * 3 + 2) * bb
    assert st["shared_kv_bytes"] == 2 * bb
    assert st["private_kv_bytes_mean"] == 3 * bb
    assert st["compression"] == 8 / 8
    assert st["prefill_tokens_computed"] == 8 + 2 * 12
    assert st["prefill_tokens_reused"] == 2 * 4
    assert st["prefill_tokens_recomputed"] == 2 * 4
    assert st["diff_blocks"] == 2 and st["masters"] == 1
    release_all(llm)


def test_accounting_tokendance_agent_master(folder):
    """Agent 0 is the reference: its prompt but the last token is prefilled exactly (4 blocks, the
    common block's 2 among them: the master), its last token takes a block of its own; agent 1
    views the master and computes its 8 private tokens (2 blocks)."""
    llm = make_llm(folder, reuse="tokendance", recompute_ratio=0.0, master="agent")
    st = llm.run_round(hand_example(), greedy(3), use_tqdm=False).stats
    bb = llm.block_bytes
    assert st["reference_agents"] == [0] and st["masters"] == 1
    assert st["distinct_kv_bytes"] == (5 + 2) * bb
    assert st["shared_kv_bytes"] == 2 * bb
    assert st["prefill_tokens_computed"] == 15 + 1 + 8
    assert st["prefill_tokens_reused"] == 15 + 8  # the reference's carrier, agent 1's views
    assert st["prefill_tokens_recomputed"] == 0 and st["diff_blocks"] == 0
    release_all(llm)


def test_accounting_pic_copies_every_shared_block(folder):
    llm = make_llm(folder, reuse="pic", recompute_ratio=0.0, master_sink=False, master="standalone")
    st = llm.run_round(hand_example(), greedy(3), use_tqdm=False).stats
    bb = llm.block_bytes
    assert st["distinct_kv_bytes"] == (2 * 4 + 2) * bb  # dense private copies + the master
    assert st["shared_kv_bytes"] == 2 * bb
    assert st["private_kv_bytes_mean"] == 4 * bb
    assert st["compression"] == 8 / 10
    assert st["diff_blocks"] == 2 * 2  # each agent's two copied blocks
    assert st["prefill_tokens_reused"] == 2 * 8
    release_all(llm)


@pytest.mark.parametrize("reuse", ["none", "prefix", "tokendance"])
def test_the_bound_counts_a_common_system_prompt_once(folder, reuse):
    """3 agents: [system 8 (the same)] + [private 4] + Shared(common 8) + [tail 4] = 24 tokens each.
    Ideal: the system prompt's 2 blocks once, 2 private blocks per agent, the shared 2 once."""
    system, common = random_ids(8, seed=630), random_ids(8, seed=631)
    prompts = [[system, random_ids(4, seed=640 + i), Shared(common), random_ids(4, seed=650 + i)] for i in range(3)]
    llm = make_llm(folder, reuse=reuse, recompute_ratio=0.0, master_sink=False)
    st = llm.run_round(prompts, greedy(2), use_tqdm=False).stats
    bb = llm.block_bytes
    assert st["dense_kv_bytes"] == 18 * bb
    assert st["compression_bound"] == 18 / (2 + 3 * 2 + 2)
    assert st["compression"] <= st["compression_bound"]
    if reuse == "prefix":  # the system prompt's blocks, computed once in the same step, shared by all
        assert st["distinct_kv_bytes"] == (2 + 3 * 4) * bb
    release_all(llm)


def test_accounting_counts_producer_master_blocks_as_shared(folder):
    llm = make_llm(folder, reuse="tokendance", recompute_ratio=0.0, master="producer")
    p = [random_ids(8, seed=710), random_ids(8, seed=711)]
    r0 = llm.run_round([[p[0]], [p[1]]], greedy(9), use_tqdm=False)  # outputs start at position 8: aligned
    tail = [7, 7, 7, 7]
    st = llm.run_round([[p[0], Shared(r0[1]), tail], [p[1], Shared(r0[0]), tail]], greedy(3), use_tqdm=False).stats
    bb = llm.block_bytes
    # per agent: 21 tokens; [0, 8) private (2 blocks), the output's 8 tokens with K/V viewed from its
    # producer (2 blocks), its last token + tail computed (2 blocks)
    assert st["masters"] == 2
    assert st["dense_kv_bytes"] == 12 * bb and st["distinct_kv_bytes"] == 12 * bb
    ok = st["shared_kv_bytes"] == 4 * bb and st["private_kv_bytes_mean"] == 4 * bb
    release_all(llm)
    assert ok, (st["shared_kv_bytes"] / bb, st["private_kv_bytes_mean"] / bb)


# --- 7. errors ---------------------------------------------------------------------------------

def test_bad_rounds_raise_and_leave_the_engine_usable(folder):
    llm = make_llm(folder, reuse="tokendance")
    other = make_llm(folder, reuse="tokendance")
    r0 = llm.run_round([[PERSONAS[0], TASK], [PERSONAS[1], TASK]], greedy(5), agents=["x", "y"], use_tqdm=False)
    foreign = other.run_round([[PERSONAS[2], TASK]], greedy(5), use_tqdm=False)
    bad_rounds = [
        dict(prompts=[]),
        dict(prompts=[[PERSONAS[0], Shared(foreign[0]), TASK]]),
        dict(prompts=[[PERSONAS[0], TASK], [PERSONAS[1], TASK]], agents=["x", "x"]),
        dict(prompts=[[PERSONAS[0], TASK]], agents=["x", "y"]),
        dict(prompts=[[PERSONAS[0], r0[1], TASK]]),  # an output must be wrapped in Shared
        dict(prompts=[[PERSONAS[0], Shared([5, 999]), TASK]]),  # outside the vocabulary
        dict(prompts=[[PERSONAS[0], TASK], [PERSONAS[1], 3.5]]),
    ]
    for bad in bad_rounds:
        used = llm.pool.num_used
        with pytest.raises(RequestError):
            llm.run_round(bad.pop("prompts"), greedy(5), use_tqdm=False, **bad)
        assert llm.pool.num_used == used
        check_refs(llm)
    for value in (3.5, [], "", None, [1.5, 2]):
        with pytest.raises(RequestError):
            Shared(value)
    # still a working engine: the kept agents and pinned outputs are intact and reusable
    r1 = llm.run_round([[PERSONAS[0] + TASK + r0[0].token_ids, Shared(r0[1]), TASK],
                        [PERSONAS[1] + TASK + r0[1].token_ids, Shared(r0[0]), TASK]],
                       greedy(5), agents=["x", "y"], use_tqdm=False)
    assert all(o.finish_reason == "length" for o in r1)
    check_refs(llm)
    release_all(llm)
    release_all(other)


@pytest.mark.parametrize("kwargs", [
    dict(reuse="tokendance", recompute_ratio=1.5), dict(reuse="pic", recompute_ratio=-0.1),
    dict(reuse="everything"), dict(reuse="tokendance", recompute_scheme="random"),
    dict(reuse="tokendance", master="oracle"), dict(reuse="tokendance", selection="global"),
    dict(reuse="tokendance", check_layer=3),
])
def test_bad_engine_options_raise(folder, kwargs):
    with pytest.raises(RequestError):
        make_llm(folder, **kwargs)


# --- 8. encode_segments ---------------------------------------------------------------------------

class FakeTokenizer:
    """One id per character (ord % 200 + 3), and a chat template with role markers."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 200 + 3 for c in text]

    def render_chat(self, messages) -> str:
        return "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"


def test_encode_segments_tokenizes_shared_parts_on_their_own():
    tok = FakeTokenizer()
    block = "shared words"
    enc = encode_segments(["I am A. ", Shared(block), " Go."], tok)
    assert enc.token_ids == tok.encode("I am A. ") + tok.encode(block) + tok.encode(" Go.")
    (span,) = enc.spans
    assert (span.start, span.end) == (8, 8 + len(block)) and span.key == tuple(tok.encode(block))
    assert enc.token_ids[span.start:span.end] == list(span.key) and span.source is None


def test_encode_segments_chat_messages_with_shared_parts():
    tok = FakeTokenizer()
    a, b = "answer of A", "answer of B"
    prompts = [[{"role": "system", "content": "persona one"},
                {"role": "user", "content": ["Others said: ", Shared(a), " and ", Shared(b), ". You?"]}],
               [{"role": "system", "content": "persona two, longer"},
                {"role": "user", "content": ["Before: ", Shared(b), " then ", Shared(a)]}]]
    encs = [encode_segments(p, tok, i) for i, p in enumerate(prompts)]
    for enc, order in zip(encs, [(a, b), (b, a)]):
        assert [s.key for s in enc.spans] == [tuple(tok.encode(x)) for x in order]
        for s in enc.spans:
            assert enc.token_ids[s.start:s.end] == list(s.key)
    # the rendered text is kept whole around the shared parts
    first = encs[0]
    rendered = tok.render_chat([{"role": "system", "content": "persona one"},
                                {"role": "user", "content": f"Others said: {a} and {b}. You?"}])
    assert first.token_ids == tok.encode(rendered)
    assert encs[0].spans[0].start != encs[1].spans[1].start  # same block, different positions


def test_a_shared_part_in_any_chat_message_makes_a_segment_prompt():
    plain_list_content = {"role": "system", "content": ["persona ", "text"]}
    with_shared = {"role": "user", "content": ["Others said: ", Shared("x")]}
    assert is_segment_prompt([plain_list_content, with_shared])  # found past the first list content
    assert is_segment_prompt([with_shared, plain_list_content])
    assert not is_segment_prompt([plain_list_content, {"role": "user", "content": "no shared"}])
    assert not is_segment_prompt(["text", [1, 2]]) and is_segment_prompt(["text", Shared([1, 2])])


def test_encode_segments_rejects_bad_prompts():
    tok = FakeTokenizer()
    for bad in ([], [Shared("x"), 3], [{"role": "user", "content": ["a", 5]}]):
        with pytest.raises(RequestError):
            encode_segments(bad, tok)
    with pytest.raises(RequestError):
        encode_segments(["text", Shared("x")], None)  # text needs a tokenizer
    enc = encode_segments([[5, 6], Shared([7, 8, 9]), [10]], None)
    assert enc.token_ids == [5, 6, 7, 8, 9, 10] and enc.spans[0].key == (7, 8, 9)
