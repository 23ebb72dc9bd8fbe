"""The token-packed attention path (many short views, issue 13 item 2) against the torch twin,
under TRITON_INTERPRET=1 (set in conftest), and the heuristic that chooses it.

Short-view batches are what packed diffs make: each sequence reads its keys through views of
1-4 tokens packed densely into diff blocks, each view with its own rope delta. Caches hold NaN
in every slot outside the views and outputs are NaN-filled before each run (as in
test_kernels.py), so a read outside a view, a key-map padding column that leaks, or an
unwritten output element fails.
"""
from __future__ import annotations

import random

import pytest
import torch

from nanodance.attention_metadata import build_metadata
from nanodance.kernels.torch_ref import paged_attention_torch
from nanodance.kernels.triton_attention import (PAD_KEY_POS, build_key_map, plan_attention, prefers_packed,
                                                step_key_map)
from nanodance.tools.synthetic import SlotPacker, default_inv_freq, fill_cache, short_views
from test_kernels import DECODE, MIXED, TOL, Case, assert_matches, build_case, run_triton


def build_short_case(seed: int, dtype: torch.dtype, block_size: int, head_dim: int, group: int,
                     num_kv_heads: int, seqs: list, *, max_len: int = 4, start: int = 0,
                     shuffle_views: bool = False) -> Case:
    """seqs: (kv_len, queries) per sequence, as in test_kernels.build_case; kv_len 0 = no views.
    Every view is 1..max_len tokens packed into diff blocks, with its own delta (0 sometimes);
    `shuffle_views` lists them out of position order (the key map then is too)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    packer = SlotPacker(block_size, first_block=1)  # block 0 stays unused (NaN)
    views, q_pos = [], []
    for kv_len, queries in seqs:
        views.append(short_views(rng, kv_len, packer, start=start, max_len=max_len))
        if shuffle_views:
            rng.shuffle(views[-1])
        end = start + max(kv_len, 1)
        q_pos.append(list(range(end - queries, end)) if isinstance(queries, int) else queries)
    k_cache = fill_cache(packer.num_blocks, block_size, num_kv_heads, head_dim, views, dtype, generator=gen)
    v_cache = fill_cache(packer.num_blocks, block_size, num_kv_heads, head_dim, views, dtype, generator=gen)
    meta = build_metadata(views, q_pos, block_size)
    q = torch.randn(meta.q_pos.numel(), group * num_kv_heads, head_dim, generator=gen).to(dtype)
    return Case(q, k_cache, v_cache, meta, views, q_pos, default_inv_freq(head_dim), head_dim ** -0.5)


def twin(c: Case) -> torch.Tensor:
    return paged_attention_torch(c.q, c.k_cache, c.v_cache, c.meta, c.inv_freq, c.scale)


# A prefill (29 tokens), a decode over 40 keys, an extend of 6 queries, a one-token sequence.
SHORT_MIXED = [(29, 29), (40, 1), (23, 6), (1, 1)]
SHORT_DECODE = [(45, 1), (3, 1), (70, 1)]

PACKED_CASES = [
    # dtype, block_size, head_dim, group, num_kv_heads, seqs, extra
    (torch.float32, 16, 64, 1, 2, SHORT_MIXED, {}),
    (torch.bfloat16, 8, 64, 3, 1, SHORT_MIXED, {}),
    (torch.bfloat16, 16, 128, 4, 2, SHORT_DECODE, {}),
    (torch.float32, 8, 32, 4, 1, SHORT_DECODE, {"max_len": 1}),  # every view one token
    (torch.float16, 16, 64, 3, 1, SHORT_MIXED, {"max_len": 1}),
    (torch.bfloat16, 8, 64, 1, 2, SHORT_DECODE, {"num_splits": 3}),  # split-K over key columns
    (torch.float32, 16, 64, 4, 1, [(90, 1), (20, 1)], {"num_splits": 4}),
    # Views out of position order, queries at scattered positions (recomputed tokens between
    # reused ones): the prefill's causal skip must scan, not search, the key map.
    (torch.float32, 8, 64, 4, 1, [(40, [5, 6, 7, 30, 39]), (33, 33)], {"shuffle_views": True}),
]


@pytest.mark.parametrize("dtype,block_size,head_dim,group,num_kv_heads,seqs,extra", PACKED_CASES,
                         ids=lambda x: str(x).replace("torch.", "") if not isinstance(x, list) else f"B{len(x)}")
def test_packed_path_matches_twin(dtype, block_size, head_dim, group, num_kv_heads, seqs, extra):
    extra = dict(extra)
    max_len = extra.pop("max_len", 4)
    shuffle = extra.pop("shuffle_views", False)
    c = build_short_case(block_size * 100 + head_dim + group, dtype, block_size, head_dim, group, num_kv_heads,
                         seqs, max_len=max_len, shuffle_views=shuffle)
    assert prefers_packed(c.meta.max_views, c.meta.max_kv_len, block_size)
    assert_matches(run_triton(c, packed=True, **extra), twin(c), dtype)


def test_packed_path_gives_zeros_to_sequences_without_keys():
    # Sequence 1 has no views at all; sequence 2's keys start at 10, its first query sits at 3.
    c = build_short_case(21, torch.float32, 8, 64, 2, 1, [(20, 3), (0, 1), (12, [3, 15])], start=10)
    assert c.meta.num_views.tolist()[1] == 0
    out = run_triton(c, packed=True)
    assert_matches(out, twin(c), torch.float32)
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # no views
    assert torch.equal(out[4], torch.zeros_like(out[4]))  # a query before every key
    assert out[5].abs().sum() > 0


def test_packed_path_with_no_keys_in_the_whole_batch():
    c = build_short_case(22, torch.float32, 8, 64, 2, 1, [(0, 1), (0, 2)])
    assert c.meta.max_kv_len == 0
    out = run_triton(c, packed=True)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("builder,seqs,block_size,group", [
    (build_short_case, SHORT_MIXED, 8, 3),  # short views: many distinct deltas per packed tile
    (build_case, MIXED, 16, 4),  # block-aligned views: packed tiles mostly share one delta
    (build_case, DECODE, 32, 1),
])
def test_forced_page_and_packed_paths_agree(builder, seqs, block_size, group):
    c = builder(31, torch.float32, block_size, 64, group, 2, seqs)
    page = run_triton(c, packed=False)
    packed = run_triton(c, packed=True)
    assert not page.isnan().any()
    torch.testing.assert_close(packed, page, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_packed_split_k_equals_unsplit():
    c = build_short_case(41, torch.float32, 16, 64, 4, 1, [(150, 1), (2, 1), (60, 1)])
    one = run_triton(c, packed=True, num_splits=1)
    torch.testing.assert_close(run_triton(c, packed=True, num_splits=4), one, atol=2e-6, rtol=2e-6)


def test_key_map_lists_keys_in_view_order():
    # Sequence 0: a 2-token view, an empty view (lo == hi), a 1-token view; sequence 1: none.
    views = [[(3, 5, 7, 10, 4), (2, 0, 0, 12, 9), (1, 15, 16, 12, -2)], []]
    meta = build_metadata(views, [[12], [0]], 16)
    key_map, num_keys = build_key_map(meta.views, meta.num_views, 16, meta.max_kv_len)
    assert num_keys.tolist() == [3, 0]
    assert key_map.shape == (3, 2, 3) and key_map.dtype == torch.int32
    assert key_map[:, 0].tolist() == [[3 * 16 + 5, 3 * 16 + 6, 1 * 16 + 15], [10, 11, 12], [4, 4, -2]]
    assert key_map[1, 1].tolist() == [PAD_KEY_POS] * 3
    # Built once per step: every layer's call reuses it.
    assert step_key_map(meta) is step_key_map(meta)


# ---------------------------------------------------------------- the heuristic

def test_plan_picks_packed_for_short_views_and_page_for_block_aligned_views():
    short = build_short_case(51, torch.bfloat16, 16, 64, 4, 1, [(300, 1), (200, 1)])  # 1-4-token views
    aligned = build_case(52, torch.bfloat16, 16, 64, 4, 1, [(300, 1), (200, 8)])  # block views, some partial
    for c, expect in ((short, True), (aligned, False)):
        m = c.meta
        plan = plan_attention(m.q_pos.numel(), m.num_seqs, m.max_seqlen_q, m.max_views, 16, 4, 1, num_sms=132,
                              max_kv_len=m.max_kv_len)
        assert plan.packed is expect, (m.max_views, m.max_kv_len)
        assert plan.block_n >= 16
    # Exactly block-aligned: max_views * block_size == max_kv_len.
    assert not plan_attention(64, 64, 1, 256, 16, 4, 8, num_sms=132, max_kv_len=4096).packed
    # Without max_kv_len the page path stays; the knob forces either path.
    assert not plan_attention(1, 1, 1, 1000, 16, 4, 8, num_sms=132).packed
    assert plan_attention(1, 1, 1, 256, 16, 4, 8, num_sms=132, max_kv_len=4096, packed=True).packed
    assert not plan_attention(1, 1, 1, 4000, 16, 4, 8, num_sms=132, max_kv_len=4096, packed=False).packed


def test_plan_splits_long_packed_decodes_by_key_columns():
    # One agent decoding over 16K keys in 6000 short views: packed, and split-K still applies.
    plan = plan_attention(1, 1, 1, 6000, 16, 4, 8, num_sms=132, max_kv_len=16384)
    assert plan.packed and plan.num_splits > 1
    assert plan_attention(1, 1, 1, 3, 16, 4, 8, num_sms=132, max_kv_len=40, packed=True,
                          num_splits=64).num_splits == 1  # at most one split per N tile of keys
