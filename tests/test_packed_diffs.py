"""Packed diffs: a token computed into any free slot of an agent's private block reads back exactly.

Specification:
- kernels: keys packed into slots of blocks framed elsewhere (each key rotated at its slot's
  frame position, read through its view's delta) give the attention output of the same keys in
  blocks framed at their own positions, on the torch path and on the interpreted Triton kernel,
  across block sizes, GQA ratios, dtypes and run lengths down to one token;
- layout: an agent's private text and recomputed tokens share blocks whatever their positions:
  its private K/V takes ceil(private tokens / block_size) blocks, and the round's `stats` say
  so (diff tokens, diff blocks, how full they are, mirror compression per slot and per block);
- the block scheme recomputes chunks of `recompute_chunk` tokens in long shared blocks; short
  ones recompute whole-block chunks, or at least `short_recompute_ratio` of their tokens one by
  one;
- exactness: with `recompute_ratio=1.0` packed layouts give the tokens of `reuse="none"`
  (tests/test_rounds.py checks every scheme and master source).
"""
from __future__ import annotations

import random

import pytest
import torch

from nanodance import LLM, SamplingParams, Shared
from nanodance.attention_metadata import build_metadata
from nanodance.engine_config import EngineConfig
from nanodance.errors import RequestError
from nanodance.kernels.torch_ref import paged_attention_torch, rope_cos_sin, rotate
from nanodance.tools.synthetic import default_inv_freq
from tiny_checkpoints import random_ids, write_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def rotated(k: torch.Tensor, at: list[int], inv_freq: torch.Tensor) -> torch.Tensor:
    cos, sin = rope_cos_sin(torch.tensor(at), inv_freq)
    return rotate(k.float(), cos[:, None], sin[:, None])


def layouts(seed: int, length: int, block_size: int, heads: int, dim: int, dtype: torch.dtype):
    """The same keys/values at positions [0, length), (aligned views, packed views) over two caches."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    inv = default_inv_freq(dim)
    k_raw = torch.randn(length, heads, dim, generator=gen)
    v = torch.randn(length, heads, dim, generator=gen)
    blocks = length // block_size + length + 2
    caches = [[torch.zeros(blocks, block_size, heads, dim, dtype=dtype) for _ in range(2)] for _ in range(2)]

    aligned = []
    for b, start in enumerate(range(0, length, block_size)):
        end = min(length, start + block_size)
        caches[0][0][b + 1, :end - start] = rotated(k_raw[start:end], list(range(start, end)), inv).to(dtype)
        caches[0][1][b + 1, :end - start] = v[start:end].to(dtype)
        aligned.append((b + 1, 0, end - start, start, 0))

    packed, block, frame0, next_slot, pos = [], 0, 0, block_size, 0
    while pos < length:
        run_end = min(length, pos + rng.randint(1, 4))
        while pos < run_end:
            if next_slot == block_size:  # a fresh block, framed far from the run, like a reused slot
                block, frame0, next_slot = block + 1, rng.randint(-200, 900), 0
            n = min(block_size - next_slot, run_end - pos)
            frames = [frame0 + next_slot + j for j in range(n)]
            caches[1][0][block, next_slot:next_slot + n] = rotated(k_raw[pos:pos + n], frames, inv).to(dtype)
            caches[1][1][block, next_slot:next_slot + n] = v[pos:pos + n].to(dtype)
            packed.append((block, next_slot, next_slot + n, pos, pos - (frame0 + next_slot)))
            next_slot, pos = next_slot + n, pos + n
    return caches, aligned, packed, inv


@pytest.mark.parametrize("block_size,group,dtype", [(4, 1, torch.float32), (16, 3, torch.float32),
                                                    (8, 2, torch.bfloat16)])
def test_packed_slots_attend_like_slots_framed_at_their_positions(block_size, group, dtype):
    heads, dim, length = 2, 32, 29
    caches, aligned, packed, inv = layouts(7, length, block_size, heads, dim, dtype)
    q_pos = [[length - 1], [3, 11, 20, length - 1]]  # a decode and an extend over the same keys
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(map(len, q_pos)), heads * group, dim, generator=gen).to(dtype)
    scale = dim ** -0.5
    out = {}
    for name, views, cache in (("aligned", aligned, caches[0]), ("packed", packed, caches[1])):
        meta = build_metadata([views, views], q_pos, block_size)
        out[name] = paged_attention_torch(q, cache[0], cache[1], meta, inv, scale)
    tol = 2e-5 if dtype == torch.float32 else 3e-2  # bf16: keys rounded after different rotations
    torch.testing.assert_close(out["packed"].float(), out["aligned"].float(), atol=tol, rtol=tol)

    from nanodance.kernels.triton_attention import paged_attention_triton
    meta = build_metadata([packed, packed], q_pos, block_size)
    triton_out = paged_attention_triton(q, caches[1][0], caches[1][1], meta, inv, scale)
    torch.testing.assert_close(triton_out.float(), out["aligned"].float(), atol=tol, rtol=tol)


# --- the engine's layout ---------------------------------------------------------------------

BLOCK = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _ = write_tiny_checkpoint(tmp_path_factory.mktemp("packed"), kind="llama3", seed=3, num_hidden_layers=3)
    return path


def test_private_runs_between_shared_blocks_share_one_block(folder):
    """[private 2] Shared(8) [tail 2]: the tail packs beside the head, one private block per agent
    (the frame rule alone would open a second one at the tail's position)."""
    llm = LLM(folder, dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=64, recompute_ratio=0.0,
              master="standalone", master_sink=False)
    common = Shared(random_ids(8, seed=1))
    prompts = [[random_ids(2, seed=10 + i), common, random_ids(2, seed=20 + i)] for i in range(3)]
    st = llm.run_round(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False).stats
    assert st["private_kv_bytes_max"] == 1 * llm.block_bytes
    assert st["distinct_kv_bytes"] == (3 * 1 + 2) * llm.block_bytes  # three agents' one block + the master's two
    assert st["diff_tokens"] == 0 and st["diff_blocks"] == 0
    llm.check_invariants()


def test_recomputed_tokens_take_one_slot_each_and_the_stats_say_so(folder):
    """The `token` scheme at ratio 0.25 over 8 shared tokens recomputes 2 of them per agent: two
    slots of the agent's private block, not two copied master blocks."""
    llm = LLM(folder, dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=64, recompute_ratio=0.25,
              recompute_scheme="token", master="standalone", master_sink=False)
    common = Shared(random_ids(8, seed=2))
    prompts = [[random_ids(1, seed=30 + i), common, random_ids(1, seed=40 + i)] for i in range(2)]
    st = llm.run_round(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False).stats
    # per agent: 1 private + 2 recomputed + 1 tail = 4 tokens = one block; the master's 2 blocks
    assert st["distinct_kv_bytes"] == (2 * 1 + 2) * llm.block_bytes
    assert st["prefill_tokens_recomputed"] == 2 * 2
    assert st["shared_tokens"] == 2 * 8 and st["diff_tokens"] == 2 * 2 and st["diff_blocks"] == 2
    assert st["diff_block_fill"] == 2 / BLOCK
    assert st["mirror_compression_slots"] == 8 / 2 and st["mirror_compression_blocks"] == 2 / 1
    llm.check_invariants()


@pytest.mark.parametrize("chunk,long_from,recomputed", [(None, 8, BLOCK), (2, 8, 2), (1, 8, 1), (1, 11, BLOCK)])
def test_the_block_scheme_recomputes_chunks_of_recompute_chunk_tokens_in_long_blocks(folder, chunk, long_from,
                                                                                     recomputed):
    """At a small ratio the block scheme recomputes the first chunk of each shared block: a KV
    block's worth by default, `recompute_chunk` tokens when set and the block is long (at least
    `auto_standalone_tokens`; packing needs no whole block). A shorter block keeps a whole block."""
    llm = LLM(folder, dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=64, recompute_ratio=0.05,
              recompute_chunk=chunk, auto_standalone_tokens=long_from, short_recompute_ratio=None, master="standalone",
              master_sink=False)
    common = Shared(random_ids(10, seed=4))
    prompts = [[random_ids(2, seed=80 + i), common, random_ids(1, seed=90 + i)] for i in range(3)]
    st = llm.run_round(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False).stats
    assert st["prefill_tokens_recomputed"] == 3 * recomputed
    assert st["diff_tokens"] == 3 * recomputed
    llm.check_invariants()


def test_recompute_ratio_and_chunk_follow_the_shared_block_length():
    """Long blocks: recompute_ratio in recompute_chunk-token chunks. Short blocks: whole-block
    chunks, or at least short_recompute_ratio token by token. Ratios 0 and 1 apply to all alike."""
    cfg = EngineConfig(recompute_ratio=0.01, recompute_chunk=2, short_recompute_ratio=None)
    assert cfg.recompute_for(64) == (0.01, 2) and cfg.recompute_for(300) == (0.01, 2)
    assert cfg.recompute_for(63) == (0.01, 16) and cfg.recompute_for(5) == (0.01, 16)
    short = cfg.with_options(short_recompute_ratio=0.3)
    assert short.recompute_for(20) == (0.3, 1) and short.recompute_for(64) == (0.01, 2)
    assert short.with_options(recompute_ratio=0.5).recompute_for(20) == (0.5, 1)  # a floor, not a cap
    assert short.with_options(recompute_ratio=0.0).recompute_for(20) == (0.0, 16)  # pure reuse stays pure
    assert short.with_options(recompute_ratio=1.0).recompute_for(20) == (1.0, 16)  # exact stays exact
    assert EngineConfig(recompute_chunk=None).recompute_for(100)[1] == 16


def test_short_blocks_recompute_their_most_deviating_tokens_one_by_one(folder):
    """short_recompute_ratio=0.3 on a 10-token shared block: ceil(3) tokens, the first and the two
    that deviate most, each in a packed slot."""
    llm = LLM(folder, dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=64, recompute_ratio=0.05,
              short_recompute_ratio=0.3, master="standalone", master_sink=False)
    common = Shared(random_ids(10, seed=4))
    prompts = [[random_ids(2, seed=80 + i), common, random_ids(1, seed=90 + i)] for i in range(3)]
    st = llm.run_round(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False).stats
    assert st["prefill_tokens_recomputed"] == st["diff_tokens"] == 3 * 3
    llm.check_invariants()


def test_recompute_chunk_must_be_a_positive_int(folder):
    for bad in (0, -4, 2.5, True):
        with pytest.raises(RequestError, match="recompute_chunk must be a positive int"):
            LLM(folder, dtype="float32", device="cpu", recompute_chunk=bad)


def first_logits(folder, block_size: int, prompts) -> torch.Tensor:
    """Each agent's first-token logits, recorded by a sampler (the engine's sampling seam)."""
    rows = {}

    def record(logits, seqs):
        for row, seq in zip(logits, seqs):
            rows.setdefault(seq.seq_id, row.clone())
        return logits.argmax(-1).tolist()

    llm = LLM(folder, dtype="float32", device="cpu", block_size=block_size, kv_cache_blocks=256,
              recompute_ratio=0.25, recompute_scheme="token", master="standalone", master_sink=False,
              sampler=record)
    outs = llm.run_round(prompts, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    return torch.stack([rows[o.request_id] for o in outs])


def test_the_block_size_does_not_change_what_attention_computes(folder):
    """Packing puts the same tokens at different slots and frames for each block size (deltas of
    0 to 13 here); the reused K/V, the recomputed tokens and thus the logits are the same."""
    common = Shared(random_ids(9, seed=3))
    prompts = [[random_ids(3, seed=50 + i), common, random_ids(2, seed=60 + i), common, random_ids(3, seed=70 + i)]
               for i in range(2)]
    reference = first_logits(folder, 16, prompts)
    for block_size in (2, 4, 5):
        torch.testing.assert_close(first_logits(folder, block_size, prompts), reference, atol=1e-4, rtol=1e-4)


def test_auto_masters_are_standalone_for_long_blocks_and_producers_for_short_ones(folder):
    llm = LLM(folder, dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=128, recompute_ratio=0.0,
              master="auto", auto_standalone_tokens=6)
    long_, short = (SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (8, 3))
    r0 = llm.run_round([[random_ids(5, seed=80)], [random_ids(5, seed=81)]], [long_, short], use_tqdm=False)
    llm.run_round([[random_ids(3, seed=82), Shared(r0[0]), Shared(r0[1]), random_ids(2, seed=83)]],
                  SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    counters = llm.collector.counters
    assert (counters.standalone_masters, counters.producer_masters) == (1, 1)  # the 8-token one, the 3-token one
    llm.release_round_outputs()
    llm.check_invariants()
    assert llm.pool.num_used == 0
