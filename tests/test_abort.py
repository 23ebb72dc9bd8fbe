"""Abort and cancellation (issue 6): `LLM.abort(request_id)` at any point, including mid-round.

`generate` and `run_round` are synchronous, so a request is aborted from the `on_step` hook
(called after every engine step with a snapshot of the call's requests) or from another thread;
the abort takes effect at the next step boundary.

Specification (tiny random checkpoint, fp32, greedy, 4-slot blocks):
- a request aborted when it has k tokens finishes with finish_reason "abort" and exactly the
  first k tokens of its un-aborted run; every other request of the call gets the tokens of a run
  without the abort; at every step every block's ref count equals the references held
  (`check_invariants`), and after the call no block is held;
- a request can be aborted while it waits (never admitted), in the middle of a chunked prefill,
  after it was preempted by a tight pool, and before a round's layouts run (while the collector
  prefills masters): it finishes "abort" with the tokens it had;
- mid-round under tokendance and pic: the other agents' outputs equal the round without the
  abort; the aborted agent pins no output and, when persistent, keeps no cache; its output can
  still be `Shared` in the next round (prefilled as a standalone master); releasing everything
  empties the pool;
- `abort` called from another thread is honoured at the next step; it returns False for an
  unknown or finished request and outside a call;
- an exception raised by `on_step` aborts the whole call and propagates; nothing leaks and the
  engine stays usable; a call started from `on_step` is refused with a RequestError.
"""
from __future__ import annotations

import threading

import pytest

from nanodance import LLM, SamplingParams, Shared
from nanodance.errors import RequestError
from round_workload import folder  # noqa: F401 (a fixture: the rounds' tiny Llama)
from round_workload import check_refs, make_llm
from tiny_checkpoints import random_ids as ids



def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


PROMPTS = [ids(n, seed=20 + n) for n in (5, 11, 17, 8)]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def release_all(llm: LLM) -> None:
    for agent in llm.agents.ids():
        llm.release_agent(agent)
    llm.release_round_outputs()
    assert llm.pool.num_used == 0, f"{llm.pool.num_used} blocks leaked"
    llm.check_invariants()


class AbortAt:
    """on_step hook: aborts request `index` of the call once it has `tokens` tokens; checks the pool every step."""

    def __init__(self, llm: LLM, index: int | None, tokens: int = 0):
        self.llm, self.index, self.tokens = llm, index, tokens
        self.steps = 0
        self.aborted = False

    def __call__(self, outputs) -> None:
        self.steps += 1
        self.llm.check_invariants()
        if self.index is None or self.aborted:
            return
        out = outputs[self.index]
        if out.finish_reason is None and len(out.token_ids) >= self.tokens:
            assert self.llm.abort(out.request_id)
            self.aborted = True


# --- generate -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reuse", ["none", "prefix"])
@pytest.mark.parametrize("index, at", [(0, 1), (1, 3), (3, 6)])
def test_an_aborted_request_keeps_its_tokens_and_the_others_are_undisturbed(folder, reuse, index, at):
    reference = make_llm(folder, reuse=reuse).generate(PROMPTS, greedy(8), use_tqdm=False)
    llm = make_llm(folder, reuse=reuse)
    hook = AbortAt(llm, index, at)
    outs = llm.generate(PROMPTS, greedy(8), use_tqdm=False, on_step=hook)
    assert outs[index].finish_reason == "abort" and outs[index].token_ids == reference[index].token_ids[:at]
    for i, (out, ref) in enumerate(zip(outs, reference)):
        if i != index:
            assert out.finish_reason == "length" and out.token_ids == ref.token_ids
    assert llm.stats()["requests_aborted"] == 1
    release_all(llm)


def test_a_waiting_request_is_aborted_before_it_runs(folder):
    llm = make_llm(folder, max_num_seqs=1)  # one request at a time: the last one waits
    reference = make_llm(folder).generate(PROMPTS[:3], greedy(4), use_tqdm=False)
    outs = llm.generate(PROMPTS[:3], greedy(4), use_tqdm=False, on_step=AbortAt(llm, 2, 0))
    assert outs[2].finish_reason == "abort" and outs[2].token_ids == []
    assert [o.token_ids for o in outs[:2]] == [r.token_ids for r in reference[:2]]
    release_all(llm)


def test_a_request_is_aborted_in_the_middle_of_a_chunked_prefill(folder):
    llm = make_llm(folder, max_num_batched_tokens=4)
    long_prompt = ids(30, seed=5)
    seen = []

    def hook(outputs):
        llm.check_invariants()
        seen.append(llm.pool.num_used)
        if len(seen) == 3:  # 12 of its 30 prompt tokens are computed
            assert outputs[0].finish_reason is None and outputs[0].token_ids == []
            llm.abort(outputs[0].request_id)

    outs = llm.generate([long_prompt, PROMPTS[0]], greedy(4), use_tqdm=False, on_step=hook)
    assert outs[0].finish_reason == "abort" and outs[0].token_ids == []
    assert outs[1].token_ids == make_llm(folder).generate([PROMPTS[0]], greedy(4), use_tqdm=False)[0].token_ids
    release_all(llm)


def test_a_preempted_request_can_be_aborted(folder):
    reference = make_llm(folder).generate(PROMPTS, greedy(12), use_tqdm=False)
    llm = make_llm(folder, kv_cache_blocks=14)
    preempted = []

    def hook(outputs):
        llm.check_invariants()
        waiting = [s for s in llm.scheduler.waiting if s.num_preemptions]
        if waiting and not preempted:
            preempted.append(waiting[0].seq_id)
            assert llm.abort(waiting[0].seq_id)

    outs = llm.generate(PROMPTS, greedy(12), use_tqdm=False, on_step=hook)
    assert preempted, "the pool was meant to be tight enough to preempt"
    (victim,) = [o for o in outs if o.request_id == preempted[0]]
    i = outs.index(victim)
    assert victim.finish_reason == "abort" and victim.num_preemptions >= 1
    assert victim.token_ids == reference[i].token_ids[:len(victim.token_ids)]
    for j, (out, ref) in enumerate(zip(outs, reference)):
        if j != i:
            assert out.token_ids == ref.token_ids
    release_all(llm)


def test_abort_from_another_thread_is_honoured_at_the_next_step(folder):
    llm = make_llm(folder)
    asked, recorded = threading.Event(), threading.Event()
    rid = []

    def hook(outputs):
        if not asked.is_set() and len(outputs[1].token_ids) == 2:
            rid.append(outputs[1].request_id)
            asked.set()
            assert recorded.wait(10)

    def canceller():
        asked.wait(10)
        llm.abort(rid[0])
        recorded.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    outs = llm.generate(PROMPTS[:2], greedy(8), use_tqdm=False, on_step=hook)
    thread.join()
    assert outs[1].finish_reason == "abort" and len(outs[1].token_ids) == 2
    assert outs[0].finish_reason == "length"
    release_all(llm)


def test_abort_of_an_unknown_or_finished_request_returns_false(folder):
    llm = make_llm(folder)
    results = []

    def hook(outputs):
        for out in outputs:
            if out.finish_reason is not None:
                results.append(llm.abort(out.request_id))
        results.append(llm.abort(10**6))

    outs = llm.generate([PROMPTS[0], PROMPTS[1]], [greedy(2), greedy(6)], use_tqdm=False, on_step=hook)
    assert results and not any(results)
    assert [o.finish_reason for o in outs] == ["length", "length"]
    assert not llm.abort(outs[0].request_id)  # outside a call
    release_all(llm)


def test_an_exception_in_on_step_aborts_the_call_and_leaks_nothing(folder):
    llm = make_llm(folder, reuse="tokendance")
    r0 = llm.run_round([[p] for p in PROMPTS], greedy(4), agents=["a", "b", None, None], use_tqdm=False)
    kept = llm.pool.num_used

    def boom(outputs):
        llm.check_invariants()
        if any(o.token_ids for o in outputs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.run_round([[PROMPTS[0], Shared(r0[1])], [PROMPTS[1], Shared(r0[0])]], greedy(4), use_tqdm=False,
                      on_step=boom)
    llm.check_invariants()
    # The kept caches and the r0 outputs this round reads as masters stay for a retry; r0's
    # other outputs were unpinned once the masters were in; nothing else is referenced.
    assert set(llm.collector.outputs) == {r0[0].request_id, r0[1].request_id}
    check_refs(llm)
    assert llm.pool.num_used < kept

    nested = []

    def reenter(outputs):
        try:
            llm.generate([PROMPTS[0]], greedy(2), use_tqdm=False)
        except RequestError as e:
            nested.append(str(e))

    outs = llm.generate([PROMPTS[2]], greedy(3), use_tqdm=False, on_step=reenter)
    assert outs[0].finish_reason == "length" and nested and "one call at a time" in nested[0]
    release_all(llm)


# --- rounds -------------------------------------------------------------------------------------

def round_prompts(prev):
    n = len(PROMPTS)
    return [[PROMPTS[i]] + [Shared(prev[(i + j) % n]) for j in (1, 2)] + [[7, 8, 9]] for i in range(n)]


@pytest.mark.parametrize("reuse", ["tokendance", "pic"])
def test_an_agent_aborted_mid_round_does_not_disturb_the_others(folder, reuse):
    agents = ["a", "b", "c", None]

    def two_rounds(llm, hook):
        r0 = llm.run_round([[p] for p in PROMPTS], greedy(6), agents=agents, use_tqdm=False)
        r1 = llm.run_round(round_prompts(r0), greedy(6), agents=agents, use_tqdm=False, on_step=hook)
        return r0, r1

    # Producer masters (master="auto" at these lengths): the aborted output must not be pinned.
    reference = make_llm(folder, reuse=reuse, master="auto")
    _, expected = two_rounds(reference, None)
    release_all(reference)

    llm = make_llm(folder, reuse=reuse, master="auto")
    hook = AbortAt(llm, 1, 2)
    r0, r1 = two_rounds(llm, hook)
    assert r1[1].finish_reason == "abort" and r1[1].token_ids == expected[1].token_ids[:2]
    for i in (0, 2, 3):
        assert r1[i].token_ids == expected[i].token_ids
    assert r1[1].request_id not in llm.collector.outputs  # no pinned output
    assert "b" not in llm.agents and {"a", "c"} <= set(llm.agents.ids())  # no kept cache for b
    llm.check_invariants()
    # The aborted output still works as a shared block (a standalone master now).
    standalone = llm.collector.counters.standalone_masters
    r2 = llm.run_round([[PROMPTS[0], Shared(r1[1]), Shared(r1[2])]], greedy(3), use_tqdm=False)
    assert r2[0].finish_reason == "length"
    assert llm.collector.counters.standalone_masters == standalone + 1
    release_all(llm)


def test_an_agent_aborted_while_the_collector_runs_never_starts(folder):
    llm = make_llm(folder, reuse="tokendance", master="standalone")
    r0 = llm.run_round([[p] for p in PROMPTS[:2]], greedy(4), agents=["a", "b"], use_tqdm=False)
    run_masters = llm.engine.prefill_masters
    target = []

    def abort_then_run(id_lists):
        assert llm.abort(target[0])
        return run_masters(id_lists)

    llm.engine.prefill_masters = abort_then_run
    prompts = [[PROMPTS[0] + r0[0].token_ids, Shared(PROMPTS[2])], [PROMPTS[1] + r0[1].token_ids, Shared(PROMPTS[2])]]
    on_first_step = []

    def hook(outputs):
        on_first_step.append([o.finish_reason for o in outputs])

    original_make = llm.engine.make_sequence

    def remember(*args, **kwargs):
        seq = original_make(*args, **kwargs)
        if not target:
            target.append(seq.seq_id)
        return seq

    llm.engine.make_sequence = remember
    r1 = llm.run_round(prompts, greedy(4), agents=["a", "b"], use_tqdm=False, on_step=hook)
    assert r1[0].finish_reason == "abort" and r1[0].token_ids == []
    assert on_first_step[0][0] == "abort"  # it never ran a step
    assert r1[1].finish_reason == "length"
    assert "a" in llm.agents  # never laid out: its previous cache is still its own
    llm.check_invariants()
    release_all(llm)
