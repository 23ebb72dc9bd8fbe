"""The engine (`LLM.generate`) on tiny random checkpoints: scheduling must never change a token.

Prompts are token-id lists (the tiny checkpoints have no tokenizer); everything runs in fp32 on
the CPU with small blocks (4 slots) so that short prompts cross many block edges.

Specification:
- greedy decoding gives exactly the tokens of `transformers` greedy `generate` on the same
  checkpoint (llama3 RoPE with GQA, and Qwen2 with q/k/v biases), several ragged prompts in one
  batch (`ignore_eos` on our side, no eos on theirs);
- a ragged batch gives exactly the tokens of its prompts run one by one, each with its own
  sampling params;
- chunked prefill (a token budget of 8 per step: 30-60 token prompts take several steps, mixed
  with other sequences' decodes) gives the tokens of an unlimited budget; no step exceeds the
  budget or `max_num_seqs`;
- preemption (a pool too small for the whole batch) gives the tokens of a roomy pool, with
  reuse "none" and "prefix", and is reported by `stats()["preemptions"]` and the outputs'
  `num_preemptions`; so do all the knobs at once (odd block sizes, cramped pool, tiny budget);
- prefix caching: a prompt sharing a prefix with an earlier one reports the full blocks of the
  shared prefix as `num_cached_tokens` and gives the tokens of reuse="none"; at least one prompt
  token is always computed, even when the whole prompt is cached blocks; blocks holding
  generated tokens are reused by a follow-up prompt; evicted blocks are simply recomputed;
- nothing leaks: after every `generate` no block is referenced and the pool's invariants hold;
  between steps, every block's ref count is exactly the number of views queued sequences hold;
  a step that raises aborts the call's requests and frees their blocks, the engine stays usable;
- capacity: a prompt longer than `max_model_len`, or than the whole pool, fails alone with
  finish_reason "error" and a message naming the cause, while the other prompts of the call
  complete with their tokens alone; a generation reaching `max_model_len` (or the pool's
  capacity) ends with "length";
- the Triton kernels (under the interpreter, TRITON_INTERPRET=1) give the greedy tokens of the
  PyTorch ones, end to end;
- seeded sampling (temperature 1, top-p 0.9, top-k 20) gives the same tokens whatever the
  batch companions and the scheduling, every drawn token lies inside the top-k / top-p set of
  the reference logits, and different seeds give different samples.
"""
from __future__ import annotations

import pytest
import torch

from nanodance import LLM, RequestError, SamplingParams, Shared
from tiny_checkpoints import write_tiny_checkpoint

BLOCK = 4  # slots per block in most tests: short prompts span many blocks
VOCAB = 256
EOS = 2  # the tiny checkpoints' eos_token_id


def greedy(max_tokens: int = 8) -> SamplingParams:
    """Greedy, and blind to eos so lengths are fixed and transformers is comparable."""
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def random_prompts(lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


# --- fixtures and helpers --------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """Llama with llama3 RoPE scaling and GQA (4 query heads, 2 KV heads): (folder, hf_model)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("llama3"), kind="llama3", seed=1)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qwen2"), kind="qwen2", seed=2)


def make_llm(folder, **kwargs) -> LLM:
    options = dict(dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=256,
                   max_num_batched_tokens=2048, max_num_seqs=64, reuse="none")
    options.update(kwargs)
    return LLM(folder, **options)


def assert_no_leak(llm: LLM) -> None:
    assert llm.pool.num_used == 0, f"{llm.pool.num_used} blocks still referenced after every request finished"
    assert llm.stats()["blocks_used"] == 0
    llm.pool.check_invariants(holders=[])


def run(llm: LLM, prompts, params):
    """`generate`, then check that nothing leaked (every test goes through here)."""
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_no_leak(llm)
    return outs


def tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers greedy generate with no eos at all (our side sets ignore_eos)."""
    ids = torch.tensor([prompt])
    config = hf_model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None
    try:
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        config.eos_token_id = saved
    ref = out[0, len(prompt):].tolist()
    assert len(ref) == max_new_tokens, "transformers stopped early: eos was not disabled"
    return ref


class StepWatch:
    """Wraps the scheduler of `llm`: checks the pool between steps and records every step.

    Before and after each `schedule()`, every block's ref count must equal the number of views
    onto it held by the queued (running or waiting) sequences. `steps[i]` lists the chunks of
    step i as (seq_id, number of positions, is_decode).
    """

    def __init__(self, llm: LLM, monkeypatch):
        self.llm = llm
        self.steps: list[list[tuple[int, int, bool]]] = []
        scheduler = llm.scheduler
        original = scheduler.schedule

        def schedule():
            self.check()
            chunks = original()
            self.check()
            self.steps.append([(c.seq.seq_id, len(c.positions),
                                bool(c.seq.output_token_ids) and c.positions == [c.seq.num_tokens - 1])
                               for c in chunks])
            return chunks

        monkeypatch.setattr(scheduler, "schedule", schedule)

    def check(self) -> None:
        sc = self.llm.scheduler
        self.llm.pool.check_invariants(holders=[[v.block for v in s.views] for s in [*sc.running, *sc.waiting]])


# --- 1. transformers agreement ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_greedy_equals_transformers_generate(kind, request):
    folder, hf = request.getfixturevalue(kind)
    prompts = random_prompts([1, 6, 13, 29], seed=10)  # one token, a partial block, several blocks
    llm = make_llm(folder)
    outs = run(llm, prompts, greedy(10))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 10), f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length" and out.prompt_token_ids == prompt
        assert out.num_prompt_tokens == len(prompt) and out.num_cached_tokens == 0 and out.num_preemptions == 0


def test_eos_stops_unless_ignored(llama3):
    """The checkpoint's eos (2) ends a greedy generation, included as the last token."""
    folder, _ = llama3
    llm = make_llm(folder)
    prompts = random_prompts([5, 9, 14, 3, 7, 11, 4, 8], seed=11)
    blind = run(llm, prompts, greedy(24))
    hit = [(p, o.token_ids.index(EOS)) for p, o in zip(prompts, blind) if EOS in o.token_ids]
    if not hit:
        pytest.skip("no greedy continuation of these prompts produces eos")
    prompt, at = hit[0]
    out = run(llm, [prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    assert out.finish_reason == "stop" and out.stopped_by_token
    assert out.token_ids == blind[prompts.index(prompt)].token_ids[:at + 1]


# --- 2. ragged batch = one by one ------------------------------------------------------------

def test_ragged_batch_equals_one_by_one(llama3):
    folder, _ = llama3
    llm = make_llm(folder)
    prompts = random_prompts([1, 4, 7, 13, 30], seed=20)  # 4: exactly one block
    params = [greedy(n) for n in (3, 9, 5, 1, 7)]  # finishing at different steps
    batched = run(llm, prompts, params)
    alone = [run(llm, [p], sp)[0] for p, sp in zip(prompts, params)]
    assert tokens(batched) == tokens(alone)
    assert [len(o.token_ids) for o in batched] == [3, 9, 5, 1, 7]
    assert [o.request_id for o in batched] == sorted(o.request_id for o in batched)  # submission order


# --- 3. chunked prefill ----------------------------------------------------------------------

def test_chunked_prefill_equals_unchunked(llama3, monkeypatch):
    folder, _ = llama3
    prompts = random_prompts([30, 5, 45, 2, 60], seed=30)
    reference = tokens(run(make_llm(folder), prompts, greedy(6)))

    llm = make_llm(folder, max_num_batched_tokens=8, max_num_seqs=3)
    watch = StepWatch(llm, monkeypatch)
    assert tokens(run(llm, prompts, greedy(6))) == reference

    assert all(sum(n for _, n, _ in step) <= 8 for step in watch.steps), "a step exceeded the token budget"
    assert all(len(step) <= 3 for step in watch.steps), "a step ran more than max_num_seqs sequences"
    prefill_steps: dict[int, int] = {}
    for step in watch.steps:
        for seq_id, _, decode in step:
            prefill_steps[seq_id] = prefill_steps.get(seq_id, 0) + (not decode)
    assert max(prefill_steps.values()) >= 8, "the 60-token prompt should need 8 prefill chunks"
    mixed = [step for step in watch.steps if any(d for *_, d in step) and not all(d for *_, d in step)]
    assert mixed, "no step mixed a prefill chunk with a decode"


# --- 4. preemption ---------------------------------------------------------------------------

@pytest.mark.parametrize("reuse", ["none", "prefix"])
def test_preemption_gives_the_tokens_of_a_roomy_pool(llama3, reuse, monkeypatch):
    folder, _ = llama3
    prompts = random_prompts([10, 12, 14, 9, 11], seed=40)  # each ends at 6-7 blocks; 12 exist
    reference = tokens(run(make_llm(folder, reuse=reuse), prompts, greedy(12)))

    llm = make_llm(folder, kv_cache_blocks=12, reuse=reuse)
    StepWatch(llm, monkeypatch)  # invariants hold across every preemption
    outs = run(llm, prompts, greedy(12))
    assert tokens(outs) == reference
    assert llm.stats()["preemptions"] > 0
    assert any(o.num_preemptions > 0 for o in outs)
    assert sum(o.num_preemptions for o in outs) == llm.stats()["preemptions"]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in outs)


@pytest.mark.parametrize("block_size, blocks, budget, max_seqs", [(3, 14, 3, 2), (1, 40, 5, 4), (16, 4, 7, 3)])
def test_every_scheduling_knob_at_once(llama3, block_size, blocks, budget, max_seqs, monkeypatch):
    """Odd block sizes, a cramped pool, a tiny budget, few slots and shared prefixes together."""
    folder, _ = llama3
    base = random_prompts([20], seed=41)[0]
    prompts = [base, base[:9] + [5, 6], *random_prompts([1, 17], seed=42), base[:14], base]
    params = [greedy(n) for n in (6, 3, 8, 5, 4, 6)]
    reference = tokens(run(make_llm(folder), prompts, params))
    llm = make_llm(folder, block_size=block_size, kv_cache_blocks=blocks, max_num_batched_tokens=budget,
                   max_num_seqs=max_seqs, reuse="prefix")
    watch = StepWatch(llm, monkeypatch)
    assert tokens(run(llm, prompts, params)) == reference
    assert all(sum(n for _, n, _ in step) <= budget and len(step) <= max_seqs for step in watch.steps)
    assert tokens(run(llm, prompts, params)) == reference  # again, now with a warm prefix cache


def test_an_error_mid_run_frees_every_block(llama3, monkeypatch):
    """If a step raises, the call raises, every unfinished request is aborted, nothing is held."""
    folder, _ = llama3
    prompts = random_prompts([9, 13, 6], seed=43)
    reference = tokens(run(make_llm(folder), prompts, greedy(5)))
    llm = make_llm(folder, reuse="prefix", max_num_batched_tokens=4)
    real_run, steps = llm.runner.run, []

    def failing_run(chunks):
        steps.append(1)
        if len(steps) == 5:
            raise RuntimeError("device lost")
        return real_run(chunks)

    monkeypatch.setattr(llm.runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate(prompts, greedy(5), use_tqdm=False)
    assert not llm.scheduler.running and not llm.scheduler.waiting
    assert_no_leak(llm)
    monkeypatch.setattr(llm.runner, "run", real_run)
    assert tokens(run(llm, prompts, greedy(5))) == reference  # the engine is still usable


# --- 5. prefix caching -----------------------------------------------------------------------

def test_shared_prefix_is_served_from_cache(llama3):
    folder, _ = llama3
    prefix = random_prompts([22], seed=50)[0]  # 5 full blocks of 4, then 2 tokens
    a, b, c = ([*prefix, *tail] for tail in ([7, 8, 9], [10, 11, 12, 13, 14, 15], [16]))
    reference = tokens(run(make_llm(folder, reuse="none"), [a, b, c], greedy(8)))

    llm = make_llm(folder, reuse="prefix")
    first = run(llm, [a], greedy(8))[0]
    assert first.num_cached_tokens == 0
    reused_before = llm.stats()["prefill_tokens_reused"]
    outs = run(llm, [b, c], greedy(8))
    assert [o.num_cached_tokens for o in outs] == [20, 20]  # the full blocks of the shared prefix
    assert llm.stats()["prefill_tokens_reused"] - reused_before == 40
    assert tokens([first, *outs]) == reference
    assert llm.stats()["blocks_cached"] > 0 and llm.stats()["prefix_cache_hits"] >= 10


def test_prompts_of_one_step_share_their_common_prefix(llama3):
    """Blocks are published when the step that writes them is scheduled: the first prompt of a
    batch computes the common prefix, the others admitted in that same step reuse it."""
    folder, _ = llama3
    prefix = random_prompts([22], seed=55)[0]  # 5 full blocks of 4, then 2 tokens
    prompts = [[*prefix, *tail] for tail in ([7, 8, 9], [10, 11, 12, 13], [16], [17, 18])]
    reference = tokens(run(make_llm(folder, reuse="none"), prompts, greedy(6)))

    llm = make_llm(folder, reuse="prefix")
    outs = run(llm, prompts, greedy(6))
    assert llm.stats()["steps"] == 6  # all four prefilled together in the first step
    assert [o.num_cached_tokens for o in outs] == [0, 20, 20, 20]
    assert tokens(outs) == reference
    llm.check_invariants()


def test_a_step_that_never_ran_leaves_nothing_in_the_prefix_index(llama3):
    folder, _ = llama3
    prompts = random_prompts([13, 9], seed=56)
    reference = tokens(run(make_llm(folder, reuse="none"), prompts, greedy(4)))
    llm = make_llm(folder, reuse="prefix")
    real_run = llm.runner.run

    def broken(chunks):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the forward pass

    llm.runner.run = broken
    with pytest.raises(KeyboardInterrupt):
        run(llm, prompts, greedy(4))
    assert llm.stats()["blocks_cached"] == 0 and llm.pool.num_used == 0  # published, then taken back
    llm.check_invariants()
    llm.runner.run = real_run
    assert tokens(run(llm, prompts, greedy(4))) == reference


@pytest.mark.parametrize("length", [16, 17, 15])
def test_a_fully_cached_prompt_still_computes_its_last_token(llama3, length):
    """A second run of the same prompt reuses every full block but the one holding its last token."""
    folder, _ = llama3
    prompt = random_prompts([length], seed=51)[0]
    llm = make_llm(folder, reuse="prefix")
    first, second = run(llm, [prompt], greedy(5))[0], run(llm, [prompt], greedy(5))[0]
    assert second.num_cached_tokens == (length - 1) // BLOCK * BLOCK < length
    assert second.token_ids == first.token_ids


def test_a_prompt_inside_a_cached_prompt_computes_at_least_one_token(llama3):
    folder, _ = llama3
    long = random_prompts([24], seed=52)[0]
    short = long[:16]  # exactly 4 cached full blocks
    reference = tokens(run(make_llm(folder), [short], greedy(6)))
    llm = make_llm(folder, reuse="prefix")
    run(llm, [long], greedy(2))
    out = run(llm, [short], greedy(6))[0]
    assert out.num_cached_tokens == 12
    assert [out.token_ids] == reference


def test_blocks_of_generated_tokens_are_reused_by_a_follow_up(llama3):
    """A conversation's next turn (prompt + answer + more) hits the blocks the answer filled."""
    folder, _ = llama3
    prompt = random_prompts([9], seed=53)[0]
    llm = make_llm(folder, reuse="prefix")
    answer = run(llm, [prompt], greedy(10))[0].token_ids
    follow_up = [*prompt, *answer, 40, 41, 42]  # 22 tokens: KV exists for the first 18 (9 + 10 - 1)
    out = run(llm, [follow_up], greedy(6))[0]
    assert out.num_cached_tokens == 16
    assert out.token_ids == run(make_llm(folder), [follow_up], greedy(6))[0].token_ids


def test_evicted_prefix_blocks_are_recomputed(llama3):
    folder, _ = llama3
    prompt, filler = random_prompts([21, 60], seed=54)
    reference = tokens(run(make_llm(folder), [prompt], greedy(6)))

    llm = make_llm(folder, reuse="prefix", kv_cache_blocks=16)  # 64 slots
    assert tokens(run(llm, [prompt], greedy(6))) == reference
    assert llm.stats()["blocks_cached"] >= 5
    run(llm, [filler], greedy(4))  # 64 tokens: needs every block, so the cached ones are evicted
    assert llm.pool.counters.evictions >= 5
    again = run(llm, [prompt], greedy(6))[0]
    assert again.num_cached_tokens == 0
    assert [again.token_ids] == reference
    # and it is cached once more
    assert run(llm, [prompt], greedy(6))[0].num_cached_tokens == 20


def test_reset_prefix_cache_forgets_unused_blocks(llama3):
    folder, _ = llama3
    prompt = random_prompts([13], seed=55)[0]
    llm = make_llm(folder, reuse="prefix")
    first = run(llm, [prompt], greedy(4))[0]
    llm.reset_prefix_cache()
    assert llm.stats()["blocks_cached"] == 0
    again = run(llm, [prompt], greedy(4))[0]
    assert again.num_cached_tokens == 0 and again.token_ids == first.token_ids


def test_reuse_none_shares_nothing(llama3):
    folder, _ = llama3
    prompt = random_prompts([20], seed=56)[0]
    llm = make_llm(folder, reuse="none")
    outs = [run(llm, [prompt], greedy(4))[0] for _ in range(2)]
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    stats = llm.stats()
    assert stats["prefill_tokens_reused"] == 0 and stats["blocks_cached"] == 0 and stats["prefix_cache_hits"] == 0


# --- 7. capacity -----------------------------------------------------------------------------

def test_prompt_longer_than_max_model_len_fails_alone(llama3):
    folder, _ = llama3
    llm = make_llm(folder, max_model_len=20)
    fine_a, too_long, fine_b = random_prompts([5, 21, 8], seed=70)
    outs = run(llm, [fine_a, too_long, fine_b], greedy(6))
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert "max_model_len" in outs[1].error and "21" in outs[1].error
    alone = [run(llm, [p], greedy(6))[0] for p in (fine_a, fine_b)]
    assert tokens([outs[0], outs[2]]) == tokens(alone)
    assert all(o.finish_reason == "length" and o.error is None for o in (outs[0], outs[2]))


def test_prompt_longer_than_the_pool_fails_alone(llama3):
    folder, _ = llama3
    llm = make_llm(folder, kv_cache_blocks=8)  # 32 slots; max_model_len stays 512
    fine_a, too_big, fine_b = random_prompts([6, 33, 3], seed=71)
    outs = run(llm, [fine_a, too_big, fine_b], greedy(5))
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert "KV pool" in outs[1].error and "kv_cache_blocks" in outs[1].error
    alone = [run(llm, [p], greedy(5))[0] for p in (fine_a, fine_b)]
    assert tokens([outs[0], outs[2]]) == tokens(alone)
    assert llm.stats()["requests_finished"] >= 2


def test_generation_reaching_max_model_len_ends_with_length(llama3):
    folder, _ = llama3
    prompt = random_prompts([15], seed=72)[0]
    unlimited = run(make_llm(folder), [prompt], greedy(20))[0]
    llm = make_llm(folder, max_model_len=20)
    out = run(llm, [prompt], greedy(20))[0]
    assert out.finish_reason == "length"
    assert len(prompt) + len(out.token_ids) == 20
    assert out.token_ids == unlimited.token_ids[:5]


def test_generation_filling_the_whole_pool_ends_with_length(llama3):
    folder, _ = llama3
    prompt = random_prompts([10], seed=73)[0]
    unlimited = run(make_llm(folder), [prompt], greedy(30))[0]
    llm = make_llm(folder, kv_cache_blocks=6)  # 24 slots
    out = run(llm, [prompt], greedy(30))[0]
    assert out.finish_reason == "length"
    # it runs until the pool is full (the last token needs no KV), not stopping early or hanging
    assert len(prompt) + len(out.token_ids) in (24, 25)
    assert out.token_ids == unlimited.token_ids[:len(out.token_ids)]


# --- 8. Triton kernels end to end (interpreted on the CPU) -----------------------------------

def test_triton_backend_gives_the_tokens_of_torch(llama3, monkeypatch):
    pytest.importorskip("triton")
    import nanodance.kernels.triton_attention as triton_attention
    folder, _ = llama3  # 2 layers
    prompts = random_prompts([5, 19], seed=80)  # the second crosses a block edge (16)
    params = greedy(3)
    monkeypatch.setenv("NANODANCE_BACKEND", "torch")
    reference = tokens(run(make_llm(folder, block_size=16, kv_cache_blocks=8), prompts, params))

    calls = []
    kernel = triton_attention.paged_attention_triton
    monkeypatch.setattr(triton_attention, "paged_attention_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setenv("NANODANCE_BACKEND", "triton")
    assert tokens(run(make_llm(folder, block_size=16, kv_cache_blocks=8), prompts, params)) == reference
    assert len(calls) == 2 * 3, "one Triton attention call per layer and step (prefill + 2 decodes)"


# --- 9. seeded sampling ----------------------------------------------------------------------

HOT = dict(temperature=1.0, top_p=0.9, top_k=20, max_tokens=10)


def test_seeded_sampling_ignores_batch_companions_and_scheduling(llama3):
    folder, _ = llama3
    prompt, other_a, other_b = random_prompts([11, 25, 3], seed=90)
    hot = SamplingParams(**HOT, seed=1234)
    alone = run(make_llm(folder), [prompt], hot)[0].token_ids

    llm = make_llm(folder, reuse="prefix")
    batch = run(llm, [other_a, prompt, other_b],
                [SamplingParams(**HOT, seed=5), hot, SamplingParams(**HOT)])  # the last one unseeded
    assert batch[1].token_ids == alone
    # chunked prefill, a tiny pool (preemption) and a prefix-cache hit change nothing either
    cramped = make_llm(folder, reuse="prefix", kv_cache_blocks=12, max_num_batched_tokens=5)
    outs = run(cramped, [other_a, prompt, other_b, prompt], [greedy(10), hot, SamplingParams(**HOT, seed=9), hot])
    assert outs[1].token_ids == outs[3].token_ids == alone
    assert cramped.stats()["preemptions"] > 0 and outs[3].num_cached_tokens > 0

    different = {tuple(run(llm, [prompt], SamplingParams(**HOT, seed=s))[0].token_ids) for s in range(4)}
    assert len(different) > 1, "different seeds should give different samples"


def test_sampled_tokens_lie_in_the_top_k_top_p_set(llama3):
    folder, hf = llama3
    prompt = random_prompts([7], seed=91)[0]
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=24, seed=42, ignore_eos=True)
    out = run(make_llm(folder), [prompt], p)[0]
    seq = [*prompt, *out.token_ids]
    with torch.no_grad():
        logits = hf(torch.tensor([seq[:-1]])).logits[0, len(prompt) - 1:].float()
    for step, (row, token) in enumerate(zip(logits, out.token_ids)):
        order = torch.argsort(row, descending=True)
        rank = int((order == token).nonzero())
        assert rank < 20, f"token {step} has rank {rank}: outside top-k 20"
        probs = torch.softmax(row[order[:20]], dim=-1)
        mass_before = float(probs[:rank].sum())
        assert mass_before < 0.9 + 1e-4, f"token {step} lies outside the top-p 0.9 nucleus ({mass_before:.4f})"


def test_per_prompt_sampling_params_are_respected(llama3):
    folder, _ = llama3
    prompts = random_prompts([6, 6, 12, 3], seed=92)
    prompts[1] = list(prompts[0])  # same prompt, different params
    params = [greedy(4), SamplingParams(**{**HOT, "max_tokens": 7}, seed=3), greedy(2),
              SamplingParams(**{**HOT, "max_tokens": 5}, seed=4, ignore_eos=True)]
    llm = make_llm(folder)
    outs = run(llm, prompts, params)
    assert len(outs[0].token_ids) == 4 and len(outs[2].token_ids) == 2 and len(outs[3].token_ids) == 5
    assert 1 <= len(outs[1].token_ids) <= 7
    assert tokens(outs) == [run(llm, [pr], sp)[0].token_ids for pr, sp in zip(prompts, params)]
    top1 = SamplingParams(temperature=1.0, top_k=1, max_tokens=4, seed=8, ignore_eos=True)
    assert run(llm, [prompts[0]], top1)[0].token_ids == outs[0].token_ids  # top-k 1 is greedy


def test_unseeded_sampling_follows_the_engine_seed(llama3):
    folder, _ = llama3
    prompt = random_prompts([8], seed=93)[0]
    hot = SamplingParams(**HOT)
    a, b = (run(make_llm(folder, seed=77), [prompt], hot)[0].token_ids for _ in range(2))
    assert a == b



# --- log-probabilities ------------------------------------------------------------------------

def test_logprobs_report_each_sampled_token_and_the_top_k(llama3):
    """`SamplingParams(logprobs=k)`: per generated token, its log-probability under the model's
    logits and the k likeliest tokens, most likely first; none are reported unless asked."""
    folder, _ = llama3
    seen = []

    def recording_sampler(logits, seqs):
        seen.append(logits.clone())
        return logits.argmax(-1).tolist()

    llm = make_llm(folder, sampler=recording_sampler)
    prompt = list(range(3, 12))
    asked, plain = run(llm, [prompt, prompt], [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                             logprobs=3), greedy(4)])
    assert plain.logprobs is None and asked.token_ids == plain.token_ids
    assert [e.token_id for e in asked.logprobs] == asked.token_ids
    for step, entry in enumerate(asked.logprobs):
        expected = torch.log_softmax(seen[step][0].float(), dim=-1)  # row 0: the request that asked
        assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-6)
        assert [t for t, _ in entry.top] == torch.topk(expected, 3).indices.tolist()
        assert entry.top[0] == (entry.token_id, pytest.approx(entry.logprob))  # greedy: the likeliest
        assert all(a[1] >= b[1] for a, b in zip(entry.top, entry.top[1:]))


@pytest.mark.parametrize("bad", [-1, 21, 2.5, True])
def test_logprobs_outside_0_to_20_are_refused(bad):
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams(logprobs=bad)


# --- streaming --------------------------------------------------------------------------------

def test_a_stream_grows_each_output_and_ends_with_what_generate_returns(llama3):
    folder, _ = llama3
    llm = make_llm(folder)
    prompts = [list(range(3, 12)), list(range(40, 45))]
    params = [greedy(5), greedy(3)]
    expected = run(llm, prompts, params)
    snapshots = list(llm.generate_stream(prompts, params))
    assert len(snapshots) >= 5  # a snapshot per engine step
    final = snapshots[-1]
    assert [o.token_ids for o in final] == [o.token_ids for o in expected]
    assert [o.finish_reason for o in final] == ["length", "length"]
    for before, after in zip(snapshots, snapshots[1:]):
        for a, b in zip(before, after):
            assert b.token_ids[:len(a.token_ids)] == a.token_ids  # outputs only grow
    assert all(o.finish_reason is None for o in snapshots[0])
    assert_no_leak(llm)


def test_closing_a_stream_early_aborts_what_is_unfinished_and_frees_it(llama3):
    folder, _ = llama3
    llm = make_llm(folder)
    stream = llm.generate_stream([list(range(3, 12))], greedy(20))
    first = next(stream)
    assert first[0].finish_reason is None
    with pytest.raises(RequestError, match="one call at a time"):
        llm.generate([[1, 2, 3]], greedy(2), use_tqdm=False)  # the stream holds the engine
    stream.close()
    assert llm.pool.num_used == 0 and llm.stats()["requests_aborted"] == 1
    assert run(llm, [[1, 2, 3]], greedy(2))[0].finish_reason == "length"  # usable again


def test_a_stream_of_a_round_ends_with_what_run_round_returns(llama3):
    llm = make_llm(llama3[0])
    prompts = [[[1, 2], Shared(list(range(20, 36))), [5]], [[7], Shared(list(range(20, 36))), [8, 9]]]
    expected = llm.run_round(prompts, greedy(4), use_tqdm=False)
    llm.release_round_outputs()
    snapshots = list(llm.generate_stream(prompts, greedy(4)))
    assert [o.token_ids for o in snapshots[-1]] == [o.token_ids for o in expected]
    assert all(o.finish_reason is None for o in snapshots[0])
    llm.release_round_outputs()
    assert_no_leak(llm)


def test_closing_a_round_stream_early_aborts_it_and_frees_its_blocks(llama3):
    llm = make_llm(llama3[0])
    stream = llm.generate_stream([[[1, 2], Shared(list(range(20, 36)))], [[7], Shared(list(range(20, 36)))]],
                                 greedy(20))
    assert next(stream)[0].finish_reason is None
    stream.close()
    assert llm.engine.call is None and llm.stats()["requests_aborted"] == 2
    llm.check_invariants()
    llm.release_round_outputs()
    assert llm.pool.num_used == 0
