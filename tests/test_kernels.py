"""Paged attention over block views: the torch twin against a naive fp64 loop, the Triton kernel
(under TRITON_INTERPRET=1, set in conftest) against the twin, and the identity the design rests
on: attention through a delta view equals attention over keys re-rotated to their new positions.

Cases are a representative cross-section (dtypes fp32/fp16/bf16, block sizes 16/32, head dims
64/128 (+96), GQA ratios 1/3/4/8, ragged lengths incl. 1 and exact block edges, lo > 0, partial
hi, deltas +/-/0, mixed prefill+decode, split-K), each small enough to interpret in about a
second. Caches hold NaN in every slot outside the views and outputs are NaN-filled before each
run, so a read outside a view or an unwritten output element fails.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from nanodance.attention_metadata import AttentionMetadata, build_metadata
from nanodance.tools.synthetic import default_inv_freq, fill_cache, random_views
from nanodance.kernels.torch_ref import paged_attention_torch
from nanodance.kernels.triton_attention import paged_attention_triton, plan_attention

# Absolute/relative tolerance of Triton vs twin, about 3 ulps of the dtype at 1.0 (bf16 output
# stores truncate in the interpreter, and the two paths round the rotated query/key differently).
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.4e-2}


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    views: list
    q_pos: list
    inv_freq: torch.Tensor
    scale: float


def build_case(seed: int, dtype: torch.dtype, block_size: int, head_dim: int, group: int, num_kv_heads: int,
               seqs: list, *, p_lo: float = 0.3, p_partial: float = 0.3, deltas=(0, 5, -7, 300, -250),
               p_share: float = 0.2, shuffle_views: bool = False, start: int = 0, segment_views: int = 4) -> Case:
    """seqs: (kv_len, queries) per sequence; queries = n (the last n positions) or a position list."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    used: list[int] = []

    def next_block() -> int:  # sometimes a block another view already uses: a shared master block
        if used and rng.random() < p_share:
            return rng.choice(used)
        used.append(len(used) + 1)  # block 0 stays unused (NaN): the twin's padding slot
        return used[-1]

    views, q_pos = [], []
    for kv_len, queries in seqs:
        v = random_views(rng, kv_len, block_size, next_block, start=start, p_lo=p_lo, p_partial=p_partial,
                         deltas=deltas, max_segment_views=segment_views)
        if shuffle_views:
            rng.shuffle(v)
        views.append(v)
        q_pos.append(list(range(start + kv_len - queries, start + kv_len)) if isinstance(queries, int) else queries)
    num_blocks = len(used) + 1
    k_cache = fill_cache(num_blocks, block_size, num_kv_heads, head_dim, views, dtype, generator=gen)
    v_cache = fill_cache(num_blocks, block_size, num_kv_heads, head_dim, views, dtype, generator=gen)
    meta = build_metadata(views, q_pos, block_size)
    q = torch.randn(meta.q_pos.numel(), group * num_kv_heads, head_dim, generator=gen).to(dtype)
    return Case(q, k_cache, v_cache, meta, views, q_pos, default_inv_freq(head_dim), head_dim ** -0.5)


def rotate64(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp64: x [..., D], angle [..., D/2] broadcastable."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = angle.cos(), angle.sin()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def naive_attention(c: Case) -> torch.Tensor:
    """fp64, one query at a time: gather each view's keys, rotate them forward by the view's
    delta, mask by position, softmax. A query that sees no key gets zeros."""
    T, Hq, D = c.q.shape
    Hkv = c.k_cache.shape[2]
    inv = c.inv_freq.double()
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    row = 0
    for seq_views, positions in zip(c.views, c.q_pos):
        keys, vals, kpos = [], [], []
        for block, lo, hi, pos0, delta in seq_views:
            for s in range(lo, hi):
                keys.append(rotate64(c.k_cache[block, s].double(), delta * inv))
                vals.append(c.v_cache[block, s].double())
                kpos.append(pos0 + s - lo)
        K, V, P = torch.stack(keys), torch.stack(vals), torch.tensor(kpos)  # [L, Hkv, D], [L]
        for p in positions:
            vis = P <= p
            if vis.any():
                for h in range(Hq):
                    kv = h // (Hq // Hkv)
                    w = torch.softmax((K[vis, kv] @ c.q[row, h].double()) * c.scale, dim=0)
                    out[row, h] = w @ V[vis, kv]
            row += 1
    return out


def run_triton(c: Case, **kw) -> torch.Tensor:
    out = torch.full_like(c.q, float("nan"))  # an unwritten element fails the comparison
    res = paged_attention_triton(c.q, c.k_cache, c.v_cache, c.meta, c.inv_freq, c.scale, out=out,
                                 poison_scratch=True, **kw)
    assert res is out
    return out


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "NaN in output: an element was not written or a NaN slot leaked"
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


# A mixed step: a prefill (37 tokens), a decode over 50 keys, an extend of 5 queries over
# exactly 64 keys (block edges), a one-token sequence, and a decode over exactly one block.
MIXED = [(37, 37), (50, 1), (64, 5), (1, 1), (16, 1)]
DECODE = [(1, 1), (16, 1), (32, 1), (77, 1), (45, 1)]


# ---------------------------------------------------------------- the twin is right

@pytest.mark.parametrize("group,block_size,shuffle", [(1, 16, False), (3, 32, True), (4, 16, False)])
def test_twin_matches_naive_fp64_loop(group, block_size, shuffle):
    c = build_case(1, torch.float32, block_size, 64, group, 2, MIXED, shuffle_views=shuffle)
    out = paged_attention_torch(c.q, c.k_cache, c.v_cache, c.meta, c.inv_freq, c.scale)
    # fp32 rope angles (|angle| <= 300 rad) cost ~3e-5 relative in the rotated keys.
    torch.testing.assert_close(out.double(), naive_attention(c), atol=5e-4, rtol=5e-4)


def test_twin_gives_zeros_to_a_query_that_sees_no_key():
    # Keys start at position 10; the first query sits at position 3 and sees nothing.
    c = build_case(2, torch.float32, 16, 64, 2, 1, [(20, [3, 12, 29])], start=10)
    out = paged_attention_torch(c.q, c.k_cache, c.v_cache, c.meta, c.inv_freq, c.scale)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out.double(), naive_attention(c), atol=5e-4, rtol=5e-4)


# ---------------------------------------------------------------- Triton vs the twin

CASES = [
    # dtype, block_size, head_dim, group, num_kv_heads, seqs, extra
    (torch.float32, 16, 64, 1, 2, MIXED, {}),
    (torch.float16, 32, 128, 4, 2, MIXED, {}),
    (torch.bfloat16, 16, 128, 3, 2, MIXED, {}),
    (torch.bfloat16, 32, 64, 8, 1, MIXED, {}),
    (torch.float32, 16, 96, 3, 1, MIXED, {}),  # head_dim not a power of two: padded halves
    (torch.float32, 16, 128, 8, 1, DECODE, {}),
    (torch.bfloat16, 32, 64, 3, 2, DECODE, {}),
    (torch.float16, 16, 64, 4, 2, DECODE, {"num_splits": 3}),
    (torch.bfloat16, 16, 128, 1, 2, [(200, 1), (1, 1), (33, 1)], {"num_splits": 4}),
    (torch.float32, 32, 64, 4, 1, [(150, 1), (70, 1)], {"num_splits": 2, "shuffle_views": True}),
    # Every view its own delta: every multi-view tile straddles deltas (prefill tiles rotate
    # keys per view, decode tiles score once per view).
    (torch.float16, 16, 64, 4, 1, [(70, 70), (20, 1)], {"segment_views": 1}),
    (torch.bfloat16, 16, 64, 3, 1, [(90, 1), (17, 1)], {"segment_views": 1}),
]


@pytest.mark.parametrize("dtype,block_size,head_dim,group,num_kv_heads,seqs,extra", CASES,
                         ids=lambda x: str(x).replace("torch.", "") if not isinstance(x, list) else f"B{len(x)}")
def test_triton_matches_twin(dtype, block_size, head_dim, group, num_kv_heads, seqs, extra):
    extra = dict(extra)
    shuffle = extra.pop("shuffle_views", False)
    segment_views = extra.pop("segment_views", 4)
    c = build_case(block_size * 1000 + head_dim * 10 + group, dtype, block_size, head_dim, group, num_kv_heads,
                   seqs, shuffle_views=shuffle, segment_views=segment_views)
    expected = paged_attention_torch(c.q, c.k_cache, c.v_cache, c.meta, c.inv_freq, c.scale)
    assert_matches(run_triton(c, **extra), expected, dtype)


def test_triton_recomputed_queries_sit_between_reused_keys():
    # Extend step of the collector: queries at scattered positions (a recomputed block in the
    # middle, plus the tail), keys from views in shuffled order; one sequence's first query
    # precedes all of its keys and must come out as zeros.
    seqs = [(96, [16, 17, 18, 19, 20, 21, 22, 23, 90, 95]), (40, [2, 39])]
    c = build_case(7, torch.float32, 16, 64, 4, 1, seqs, shuffle_views=True)
    c_late = build_case(8, torch.float32, 16, 64, 4, 1, [(30, [1, 12, 44])], start=10)
    for case in (c, c_late):
        expected = paged_attention_torch(case.q, case.k_cache, case.v_cache, case.meta, case.inv_freq, case.scale)
        assert_matches(run_triton(case), expected, torch.float32)
    out = run_triton(c_late)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_triton_split_k_equals_unsplit():
    c = build_case(11, torch.float32, 16, 64, 4, 2, [(180, 1), (1, 1), (100, 1)])
    one = run_triton(c, num_splits=1)
    torch.testing.assert_close(run_triton(c, num_splits=5), one, atol=2e-6, rtol=2e-6)


def test_triton_accepts_strided_queries():
    # q as the model produces it: a slice of a fused qkv projection, not contiguous.
    c = build_case(12, torch.float32, 16, 64, 2, 2, [(40, 40), (20, 1)])
    T, Hq, D = c.q.shape
    qkv = torch.randn(T, Hq + 4, D)
    qkv[:, :Hq] = c.q
    q = qkv[:, :Hq]
    assert not q.is_contiguous()
    expected = paged_attention_torch(c.q, c.k_cache, c.v_cache, c.meta, c.inv_freq, c.scale)
    out = paged_attention_triton(q, c.k_cache, c.v_cache, c.meta, c.inv_freq, c.scale)
    assert_matches(out, expected, torch.float32)


# ---------------------------------------------------------------- the identity

def test_delta_view_equals_keys_rerotated_to_new_positions():
    """Raw keys k0 of a shared segment were rotated at their master positions f + i and cached;
    the sequence places the segment at p + i (delta = p - f). Attention through the delta views
    must equal fp64 attention over R(p + i) k0_i, keys computed afresh at the new positions."""
    gen = torch.Generator().manual_seed(3)
    P, Hkv, G, D = 16, 2, 3, 64
    inv = default_inv_freq(D)
    inv64 = inv.double()
    # Master segment A: 40 tokens written at frame positions 100.. starting mid-block (slot 5).
    # Master segment B: 20 tokens at frame positions 7.., from slot 0 of block 6.
    # Sequence: 12 private tokens at 0..11 (block 8, delta 0), then B at 12.. (delta +5),
    # then A at 32.. (delta -68), then 3 private query tokens at 72..74 (block 9, delta 0).
    k0 = torch.randn(80, Hkv, D, generator=gen, dtype=torch.float64)  # unrotated keys, by token
    vals = torch.randn(80, Hkv, D, generator=gen, dtype=torch.float64)
    k_cache = torch.full((10, P, Hkv, D), float("nan"))
    v_cache = torch.full((10, P, Hkv, D), float("nan"))
    new_pos = torch.empty(80, dtype=torch.float64)

    def place(tokens, block, slot, frame_pos, seq_pos):
        for i, t in enumerate(tokens):
            b, s = block + (slot + i) // P, (slot + i) % P
            k_cache[b, s] = rotate64(k0[t], (frame_pos + i) * inv64).float()  # rounded once, at write
            v_cache[b, s] = vals[t].float()
            new_pos[t] = seq_pos + i

    place(range(0, 12), 8, 0, 0, 0)        # private
    place(range(12, 32), 6, 0, 7, 12)      # B: frame0 of block 6 is 7
    place(range(32, 72), 1, 5, 100, 32)    # A: block 1 slot 5 holds frame position 100
    place(range(72, 75), 9, 0, 72, 72)     # private tail (the queries' own keys)
    views = [[(8, 0, 12, 0, 0),
              (6, 0, 16, 12, 12 - 7), (7, 0, 4, 28, 28 - (7 + 16)),
              (1, 5, 16, 32, 32 - 100), (2, 0, 16, 43, 43 - (100 + 11)), (3, 0, 13, 59, 59 - (100 + 27)),
              (9, 0, 3, 72, 0)]]
    assert [v[4] for v in views[0]] == [0, 5, 5, -68, -68, -68, 0]
    q_pos = [[72, 73, 74]]
    meta = build_metadata(views, q_pos, P)
    q64 = torch.randn(3, G * Hkv, D, generator=gen, dtype=torch.float64)
    q = q64.float()

    fresh_k = rotate64(k0[:75], new_pos[:75, None, None] * inv64)  # keys computed at their new positions
    ref = torch.zeros(3, G * Hkv, D, dtype=torch.float64)
    for r, p in enumerate(q_pos[0]):
        vis = new_pos[:75] <= p
        for h in range(G * Hkv):
            w = torch.softmax(fresh_k[vis, h // G] @ q64[r, h] * D ** -0.5, dim=0)
            ref[r, h] = w @ vals[:75][vis, h // G]
    twin = paged_attention_torch(q, k_cache, v_cache, meta, inv, D ** -0.5)
    tri = paged_attention_triton(q, k_cache, v_cache, meta, inv, D ** -0.5, out=torch.full_like(q, float("nan")))
    torch.testing.assert_close(twin.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(tri.double(), ref, atol=2e-5, rtol=2e-5)
    # And the deltas matter: the same views with delta 0 give a clearly different answer.
    meta0 = build_metadata([[v[:4] + (0,) for v in views[0]]], q_pos, P)
    wrong = paged_attention_torch(q, k_cache, v_cache, meta0, inv, D ** -0.5)
    assert (wrong.double() - ref).abs().max() > 1e-2


# ---------------------------------------------------------------- the launch heuristic

def test_plan_splits_long_decodes_of_few_sequences_only():
    long_single = plan_attention(1, 1, 1, 16384 // 16, 16, 4, 8, num_sms=132)
    assert long_single.num_splits > 1
    assert plan_attention(64, 64, 1, 4096 // 16, 16, 4, 8, num_sms=132).num_splits == 1  # GPU already full
    assert plan_attention(1, 1, 1, 256 // 16, 16, 4, 8, num_sms=132).num_splits == 1  # short context
    assert plan_attention(512, 1, 512, 16384 // 16, 16, 4, 8, num_sms=132).num_splits == 1  # prefill
    assert plan_attention(1, 1, 1, 3, 16, 4, 8, num_sms=132, num_splits=64).num_splits == 3  # <= views


@pytest.mark.parametrize("group", [1, 3, 4, 8, 16, 32])
@pytest.mark.parametrize("max_seqlen_q", [1, 7, 300])
def test_plan_tiles_are_large_enough_for_gpu_dots(group, max_seqlen_q):
    plan = plan_attention(max_seqlen_q, 1, max_seqlen_q, 10, 16, group, 2, num_sms=132)
    group_pad = 1 << (group - 1).bit_length()
    assert plan.block_m >= 16 and plan.block_m >= plan.block_q * group_pad  # rows of one tile
    assert plan.block_q == 1 or plan.block_m == plan.block_q * group_pad  # no idle rows in prefill
    assert plan.views_per_tile * 16 >= 16
    if max_seqlen_q == 1:
        assert plan.block_q == 1  # decode: one token per tile, so no tile is spent on padding


def test_scale_is_applied_in_log2_units():
    # A guard for the exp2 softmax: a very peaked scale must still select the best key.
    c = build_case(5, torch.float32, 16, 64, 1, 1, [(20, 1)], deltas=(0,), p_lo=0, p_partial=0)
    c.scale = 50.0 / math.sqrt(64)
    expected = paged_attention_torch(c.q, c.k_cache, c.v_cache, c.meta, c.inv_freq, c.scale)
    assert_matches(run_triton(c), expected, torch.float32)
