"""Tensor parallelism gives what one device gives (CPU, gloo, 2 ranks, tiny random checkpoints, fp32).

Specification, for a tiny Llama (GQA 4/2 heads, llama3 RoPE, untied embeddings: each rank holds
one KV head) and a tiny Qwen2 (q/k/v biases, one KV head: replicated on both ranks; tied
embeddings; a vocabulary of 255 rows: the ranks' parts are 128 and 127) and a tiny Qwen3 (per-head
q/k RMSNorm, head_dim 32 so that heads x head_dim != hidden size):
- every logit rank 0 samples from at `tensor_parallel_size=2` equals the one-device logit
  within fp32 tolerance (1e-4), at every prefill and decode step;
- greedy `generate` gives the same tokens;
- a `run_round` under `tokendance` gives the same tokens over two rounds (standalone masters
  of shared token blocks in the first, producer masters of the first round's outputs in the
  second) at recompute_ratio 1.0 and at the default ratio (whose recompute choice scores key
  deviations on each rank's heads and sums them), a persistent agent's kept cache included; so
  does `pic` (dense re-rotated copies);
- the collector's key deviations (each rank scores its own KV heads, the sums are added, a
  replicated head counted once) equal one device's within fp32 tolerance;
- rank 0 holds only its shard: half the query heads, its KV heads, half the MLP, its rows of the
  vocabulary; its KV cache holds its KV heads only;
- `shutdown()` ends every worker cleanly (exit status 0).
"""
from __future__ import annotations

import pytest
import torch

from nanodance import LLM, SamplingParams, Shared
from nanodance.executor import DeviationQuery
from nanodance.runner import default_sampler
from tiny_checkpoints import random_ids, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ATOL = 1e-4
BLOCK = 4
KINDS = {
    "llama3": dict(num_hidden_layers=3),
    "qwen2": dict(num_key_value_heads=1, vocab_size=255, tie_word_embeddings=True),
    "qwen3": dict(),
}


class RecordingSampler:
    """The default sampler, keeping a copy of every logits batch it is given."""

    def __init__(self):
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits, seqs):
        self.logits.append(logits.clone())
        return default_sampler(logits, seqs)


class Pair:
    """The same checkpoint on one device and over two ranks, each with its recording sampler."""

    def __init__(self, folder, vocab_size: int):
        self.vocab_size = vocab_size
        self.rec1, self.rec2 = RecordingSampler(), RecordingSampler()
        options = dict(dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=256)
        self.one = LLM(folder, sampler=self.rec1, **options)
        self.two = LLM(folder, sampler=self.rec2, tensor_parallel_size=2, **options)

    def both(self):
        return (self.one, self.two)

    def ids(self, n: int, seed: int) -> list[int]:
        return random_ids(n, seed, self.vocab_size)


@pytest.fixture(scope="module", params=sorted(KINDS))
def pair(request, tmp_path_factory):
    kind = request.param
    folder, hf = write_tiny_checkpoint(tmp_path_factory.mktemp(kind), kind=kind, seed=3, **KINDS[kind])
    p = Pair(folder, hf.config.vocab_size)
    yield p
    workers = p.two._tp.processes
    p.two.shutdown()
    assert [w.exitcode for w in workers] == [0]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_logits_match_one_device(pair):
    prompts = [pair.ids(n, seed) for seed, n in enumerate((5, 17, 30))]
    for llm, rec in ((pair.one, pair.rec1), (pair.two, pair.rec2)):
        rec.logits.clear()
        llm.generate(prompts, greedy(4), use_tqdm=False)
    assert len(pair.rec2.logits) == len(pair.rec1.logits) == 4
    for a, b in zip(pair.rec1.logits, pair.rec2.logits):
        assert b.shape == (3, pair.vocab_size)
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


def test_generate_gives_the_same_tokens(pair):
    prompts = [pair.ids(n, 10 + seed) for seed, n in enumerate((3, 9, 21, 40))]
    one, two = ([o.token_ids for o in llm.generate(prompts, greedy(12), use_tqdm=False)] for llm in pair.both())
    assert two == one


def rounds(llm: LLM, pair: Pair) -> list[list[int]]:
    """Two rounds of three agents: a shared token block, then each other's outputs, shared.

    Agent 0 is persistent: its second prompt extends its first prompt and output, so its kept
    cache serves that part."""
    personas = [pair.ids(5 + 4 * i, 100 + i) for i in range(3)]
    common, task = pair.ids(19, 200), pair.ids(4, 201)
    agents = ["keeper", None, None]
    first = llm.run_round([[personas[i], Shared(common), task] for i in range(3)], greedy(6), agents=agents,
                          use_tqdm=False)
    kept = personas[0] + common + task + list(first[0].token_ids)
    heads = [kept, personas[1], personas[2]]
    second = llm.run_round([[heads[i], *[Shared(first[j]) for j in range(3) if j != i], task] for i in range(3)],
                           greedy(6), agents=agents, use_tqdm=False)
    llm.release_round_outputs()
    llm.release_agent("keeper")
    return [o.token_ids for o in (*first, *second)]


@pytest.mark.parametrize("reuse,ratio", [("tokendance", 1.0), ("tokendance", 0.15), ("pic", 0.15)])
def test_rounds_give_the_same_tokens(pair, reuse, ratio):
    for llm in pair.both():
        llm.reconfigure(reuse=reuse, recompute_ratio=ratio)
    scored = [llm.stats()["collector_scored_segments"] for llm in pair.both()]
    assert rounds(pair.two, pair) == rounds(pair.one, pair)
    for llm, before in zip(pair.both(), scored):
        llm.check_invariants()
        assert llm.stats()["blocks_used"] == 0
        # The default ratio scores deviations (the DEVIATIONS step); full recompute needs none.
        assert (llm.stats()["collector_scored_segments"] > before) == (ratio < 1)


def test_key_deviations_match_one_device(pair):
    prompt = pair.ids(12, 300)
    for llm in pair.both():  # the same history: the same K/V at the same slots in both
        llm.generate([prompt], greedy(2), use_tqdm=False)
    query = DeviationQuery(prompt=0, start=2, src_slots=tuple(range(8)), delta=tuple(range(-3, 5)))
    one, two = (llm.engine.executor.key_deviations([prompt], 1, BLOCK, [query])[0] for llm in pair.both())
    assert one.shape == (8,) and bool((one > 0).all())
    torch.testing.assert_close(two, one, atol=1e-4, rtol=1e-5)


def test_rank0_holds_only_its_shard(pair):
    one, two = pair.one.model, pair.two.model
    cfg = one.config
    kv_heads = max(1, cfg.num_kv_heads // 2)  # one replicated head when there are fewer heads than ranks
    for name, p in one.named_parameters():
        q = dict(two.named_parameters())[name]
        if "qkv_proj" in name:  # this rank's query heads, then its K and V heads
            assert q.shape[0] == (cfg.num_heads // 2 + 2 * kv_heads) * cfg.head_dim
        elif name.endswith("norm.weight"):
            assert q.shape == p.shape  # replicated
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert q.shape == (p.shape[0], p.shape[1] // 2)  # row-parallel: half the columns
        else:
            assert q.shape[1:] == p.shape[1:] and q.shape[0] == (p.shape[0] + 1) // 2, name  # column / vocab rows
    assert pair.two.kv_cache.layers[0][0].shape[2] == kv_heads
    assert pair.one.kv_cache.layers[0][0].shape[2] == cfg.num_kv_heads
