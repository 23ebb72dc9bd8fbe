"""Automatic shared spans (auto_shared.py): the engine finds its own recent outputs in new prompts.

Specification:
- the index finds a pasted output as one span whose source is that output, and where in it the
  span starts; a run shorter than `min_tokens` stays private; explicitly shared ranges are not
  searched; the longest candidate wins; the oldest outputs are forgotten past `capacity`;
- on real text (the default model's tokenizer), an output pasted inside quotes, after a colon,
  or on a new line is still found, all but the token or two where BPE merges it with its
  neighbours;
- through the LLM (tiny checkpoint, token-id prompts): a `generate` whose prompts carry earlier
  outputs becomes a round without any `Shared` marking, with the round's accounting; at
  recompute_ratio 1.0 its tokens are those of reuse="none"; pasted parts of outputs get
  producer masters cut from the pinned output; `auto_shared=False` turns it off;
- `n` samples of one prompt: n consecutive outputs, the copies read the first's prompt blocks
  from the prefix cache; seeded samples differ from one another and repeat across runs.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from nanodance import LLM, SamplingParams, Shared
from nanodance.auto_shared import OutputIndex
from nanodance.errors import RequestError
from fixtures_default_model import default_model_dir, default_tokenizer  # noqa: F401
from round_workload import folder  # noqa: F401 (a fixture: the rounds' tiny Llama)
from round_workload import make_llm as round_llm
from tiny_checkpoints import random_ids



def output(request_id: int, ids: list[int], stopped: bool = False):
    """A stand-in RequestOutput: what the index reads of one."""
    return SimpleNamespace(request_id=request_id, token_ids=list(ids), stopped_by_token=stopped, finish_reason="stop")


# --- the index ----------------------------------------------------------------------------------

def test_a_pasted_output_is_found_as_one_span_pointing_at_its_source():
    answer = random_ids(30, seed=1)
    index = OutputIndex(k=4)
    index.add(output(7, answer + [2], stopped=True))  # the final stop token is not part of the block
    prompt = random_ids(9, seed=2) + answer + random_ids(5, seed=3)
    [span] = index.find_spans(prompt, min_tokens=8)
    assert (span.start, span.end, span.source.request_id, span.source_offset) == (9, 39, 7, 0)
    assert list(span.key) == answer


def test_part_of_an_output_is_found_with_its_offset_and_short_runs_stay_private():
    answer = random_ids(30, seed=1)
    index = OutputIndex(k=4)
    index.add(output(7, answer))
    prompt = [250] + answer[5:20] + [251] + answer[:6] + [252]  # 15 tokens, then only 6
    [span] = index.find_spans(prompt, min_tokens=8)
    assert (span.start, span.length, span.source_offset) == (1, 15, 5)
    assert index.find_spans(prompt, min_tokens=16) == []


def test_explicitly_shared_ranges_are_not_searched():
    answer = random_ids(30, seed=1)
    index = OutputIndex(k=4)
    index.add(output(7, answer))
    prompt = answer + [250] + answer
    spans = index.find_spans(prompt, min_tokens=8, taken=[(0, 30)])
    assert [(s.start, s.end) for s in spans] == [(31, 61)]


def test_the_longest_candidate_wins_and_old_outputs_are_forgotten():
    common = random_ids(10, seed=4)
    short, long = output(1, common + random_ids(5, seed=5)), output(2, common + random_ids(20, seed=6))
    index = OutputIndex(k=4, capacity=2)
    index.add(long)
    index.add(short)  # more recent, but it matches less of the prompt
    [span] = index.find_spans(list(long.token_ids), min_tokens=8)
    assert span.source.request_id == 2 and span.length == 30
    index.add(output(3, random_ids(12, seed=7)))  # capacity 2: output 2, the oldest, is forgotten
    assert len(index) == 2
    assert [s.source.request_id for s in index.find_spans(list(long.token_ids), min_tokens=8)] == [1]


@pytest.mark.parametrize("template", ['Alice said: "{}" Do you agree?', "Answers so far:\n{}\nYour turn.",
                                      "Bob wrote `{}`, then stopped."])
def test_pasted_text_is_found_but_for_the_tokens_bpe_merges_with_its_neighbours(default_tokenizer, template):
    tok = default_tokenizer
    answer = "The committee agreed to fund the new library, and construction starts next spring."
    ids = tok.encode(answer)
    index = OutputIndex(k=4)
    index.add(output(1, ids))
    prompt = tok.encode(template.format(answer))
    spans = index.find_spans(prompt, min_tokens=8)
    assert len(spans) == 1
    assert spans[0].length >= len(ids) - 2, (spans[0].length, len(ids))


# --- through the LLM ----------------------------------------------------------------------------

def make_llm(folder, **kwargs) -> LLM:
    """The rounds' engine options (round_workload.py), under tokendance unless told otherwise."""
    return round_llm(folder, **{"reuse": "tokendance", **kwargs})


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


PERSONAS = [random_ids(5 + 3 * i, seed=10 + i) for i in range(3)]


def debate(llm: LLM, **round2_options):
    """Round 1: each agent answers; round 2: each prompt pastes the others' answers as plain ids."""
    first = llm.generate([p + [9, 9] for p in PERSONAS], greedy(), use_tqdm=False)
    second = [PERSONAS[i] + [5] + [t for j, o in enumerate(first) if j != i for t in o.token_ids + [6]] + [7]
              for i in range(3)]
    return first, llm.generate(second, greedy(), use_tqdm=False)


def test_generate_with_pasted_outputs_becomes_a_round_without_any_marking(folder):
    llm = make_llm(folder)
    _, outs = debate(llm)
    stats = outs.stats  # a round's accounting: generate found the spans itself
    assert stats["shared_tokens"] == 3 * 2 * 12
    assert stats["prefill_tokens_reused"] > 0
    assert llm.stats()["auto_shared_spans"] == 6 and llm.stats()["auto_shared_tokens"] == 72
    llm.release_round_outputs()
    llm.check_invariants()
    assert llm.pool.num_used == 0


def test_found_spans_are_exact_at_full_recompute(folder):
    _, expected = debate(make_llm(folder, reuse="none"))
    for master in ("standalone", "producer", "agent"):
        llm = make_llm(folder, recompute_ratio=1.0, master=master)
        _, got = debate(llm)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected], master
        assert got.stats["shared_tokens"] > 0


def test_a_pasted_part_of_a_pinned_output_reads_its_producer_kv(folder):
    llm = make_llm(folder, master="producer")
    first = llm.run_round([[p + [9]] for p in PERSONAS], greedy(), use_tqdm=False)  # round outputs stay pinned
    part = first[0].token_ids[3:11]  # 8 tokens from the middle of agent 0's answer
    before = llm.collector.counters.producer_masters
    outs = llm.generate([PERSONAS[1] + [5] + part + [7]], greedy(4), use_tqdm=False)
    assert llm.collector.counters.producer_masters == before + 1
    assert llm.collector.counters.standalone_masters == 0
    assert outs.stats["prefill_tokens_reused"] >= len(part) - 2  # the part, but what is recomputed
    llm.release_round_outputs()
    llm.check_invariants()
    assert llm.pool.num_used == 0


def test_auto_shared_can_be_turned_off(folder):
    llm = make_llm(folder, auto_shared=False)
    _, outs = debate(llm)
    assert not hasattr(outs, "stats") and llm.stats()["auto_shared_spans"] == 0
    with pytest.raises(RequestError, match="auto_shared"):
        make_llm(folder, auto_shared="yes")


# --- n samples ----------------------------------------------------------------------------------

def test_n_samples_are_consecutive_outputs_that_read_the_first_ones_prompt_blocks(folder):
    llm = make_llm(folder, reuse="prefix")
    prompt = random_ids(22, seed=30)
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=5, n=3, ignore_eos=True)
    outs = llm.generate([prompt, [3, 4, 5]], [params, SamplingParams(max_tokens=2)], use_tqdm=False)
    assert len(outs) == 4 and all(o.prompt_token_ids == prompt for o in outs[:3])
    assert [o.num_cached_tokens for o in outs[:3]] == [0, 20, 20]  # the 5 full blocks of 4
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3  # seeds 5, 6, 7: three different samples
    again = llm.generate([prompt], params, use_tqdm=False)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs[:3]]
    llm.check_invariants()


def test_n_is_validated_and_cannot_multiply_a_persistent_agent(folder):
    with pytest.raises(RequestError, match="n must be"):
        SamplingParams(n=0)
    llm = make_llm(folder)
    with pytest.raises(RequestError, match="persistent agent"):
        llm.run_round([[[3, 4, 5]]], SamplingParams(n=2), agents=["alice"], use_tqdm=False)
    assert llm.engine.call is None and llm.pool.num_used == 0


# --- persistent agents --------------------------------------------------------------------------

def test_a_persistent_agent_whose_kept_cache_covers_a_shared_span_stays_exact(folder):
    """Spans inside the kept cache are served by it; the spans after it keep their own recompute
    choice (a span skipped there once shifted every later span's choice onto the wrong span)."""
    x, y, persona = random_ids(4, seed=40), random_ids(12, seed=41), random_ids(6, seed=42)

    def two_rounds(llm):
        first = llm.run_round([[persona, Shared(x), [9]]], greedy(6), agents=["a"], use_tqdm=False)
        again = [persona, Shared(x), [9] + first[0].token_ids, Shared(y), [8, 7]]  # repeats round 1's tokens
        return llm.run_round([again], greedy(6), agents=["a"], use_tqdm=False)

    expected = two_rounds(make_llm(folder, reuse="none"))
    llm = make_llm(folder, recompute_ratio=1.0, master="standalone")
    got = two_rounds(llm)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert llm.stats()["auto_shared_spans"] == 0  # its own output sits in its kept cache: not searched
