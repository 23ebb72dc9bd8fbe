"""Triton paged attention over block views: one kernel for prefill, extend and decode, plus a
split-K variant for long decodes and the merge kernel that combines its partial results.

Owns `paged_attention_triton` (same signature as `torch_ref.paged_attention_torch`, plus
keyword-only test/tuning knobs: `num_splits`, `packed`, `out`, `poison_scratch`),
`plan_attention` (the launch heuristic; `prefers_packed` is its choice of path), and the
token-packed path's key map (`build_key_map`, cached per step by `step_key_map`).

Two paths through one kernel (constexpr PACKED):
  * page path (block-aligned views): an N tile is whole views, P slots each;
  * token-packed path (many short views, as packed diffs make them): an N tile is BLOCK_N
    consecutive keys of the sequence in view order, whatever views they come from, read
    through a key map built once per step on the device. A 1-token view costs one column, not
    P mostly masked ones.

Shapes (T query tokens, B sequences, Hq = GROUP * Hkv heads, D head_dim, P block size):
    q        [T, Hq, D]          queries, already rotated at their own positions (any strides)
    k_cache  [num_blocks, P, Hkv, D]   v_cache alike (any strides)
    out      [T, Hq, D]          q.dtype
    split-K scratch: partial fp32 [T, Hq, S, D] (normalized per split), lse fp32 [T, Hq, S]
    (log2 domain). Metadata: `nanodance.attention_metadata.AttentionMetadata`.
    token-packed path: key_map int32 [3, B, L] (L = meta.max_kv_len; fields: flat pool slot
    block * P + slot, key position, rope delta), num_keys int32 [B]; kept in meta.step_cache.

How one program works (grid: q tiles x Hkv heads x splits):
  * M tile = BLOCK_Q query tokens x GROUP_PAD heads of one KV head (GQA packing), so each K/V
    tile is loaded once for all query heads that share it. Row m is token m // GROUP_PAD, head
    m % GROUP_PAD; padded heads and tokens past the sequence are masked.
  * N tile, page path: VIEWS_PER_TILE consecutive views of the sequence, each contributing
    its block's P slots; slots outside [lo, hi) are masked (their memory may hold anything,
    even NaN). Token-packed path: BLOCK_N consecutive key-map columns, each loading K/V by
    its flat slot; only the columns past the sequence's num_keys are masked.
  * Causal by position: key position (pos0 + slot - lo, or the key map's) <= query position.
    Split-K cuts each sequence's views (page) or key columns (packed) into S ranges.
  * RoPE deltas: scores (R(-d) q) . k equal q . (R(d) k), so the kernel rotates whichever
    tile is smaller, in fp32, once per tile; the common d = 0 tile does no extra work.
    Decode (M <= N): the query tile is rotated by -d and K is used exactly as stored; a tile
    that straddles views with different deltas (a segment edge) is scored once per view.
    Prefill (M > N, ROTATE_KEYS): each key is rotated forward by its own view's delta (one
    angle per head-dim pair when the tile's views share it), then rounded for the dot once.
    Token-packed (always ROTATE_KEYS): a tile of short views holds up to BLOCK_N distinct
    deltas, so each key column is rotated by its own delta in fp32 (one cos/sin per column and
    dim pair); rotating the query instead would cost a rotation and a dot per distinct delta.
  * Online softmax in fp32 with exp2 (scale folded into log2 units); a row that sees no key
    keeps l = 0 and is written as zeros, never NaN.
The head dim is processed as two halves (see triton_common) so rotations are elementwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nanodance.attention_metadata import AttentionMetadata
from nanodance.kernels.triton_common import (check_launchable, compute_dtype, dot_precision, is_interpreted,
                                             next_pow2, rope_rotate)

FAR_POS: tl.constexpr = tl.constexpr(2**30)  # a key position past every query (masked keys)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    cu_ptr, qpos_ptr, views_ptr, nviews_ptr, inv_freq_ptr,
    key_map_ptr, nkeys_ptr,
    num_seqs, scale_log2, units_per_split,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_os, stride_od,
    stride_lt, stride_lh, stride_ls,
    stride_wb, stride_wv,
    stride_mf, stride_mb,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    PAGE: tl.constexpr, VIEWS_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_B: tl.constexpr, TILE_PAD: tl.constexpr, DIRECT: tl.constexpr,
    SPLIT: tl.constexpr, CAUSAL_SKIP: tl.constexpr, ROTATE_KEYS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # The body is written inline, without jit helpers in the loop: each helper call costs ~2 ms
    # under the interpreter, and the tests run this kernel there.
    # The loop walks "units": views on the page path (VIEWS_PER_TILE per N tile, BLOCK_N =
    # VIEWS_PER_TILE * PAGE columns), key columns of the step's key map on the token-packed
    # path (BLOCK_N per N tile). Split-K cuts each sequence's units.
    UNITS_PER_TILE: tl.constexpr = BLOCK_N if PACKED else VIEWS_PER_TILE
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # --- which sequence owns this q tile. Sequence b's tiles start at cu[b] // BLOCK_Q + b *
    # TILE_PAD: an upper bound on the tiles before it, so the host needs no sync to count them.
    if DIRECT:  # pure decode, one token per sequence: tile == token == sequence
        seq = tile
    else:
        b = tl.arange(0, BLOCK_B)
        cu_b = tl.load(cu_ptr + b, mask=b < num_seqs, other=0)
        starts = cu_b // BLOCK_Q + b * TILE_PAD
        seq = tl.sum(((starts <= tile) & (b < num_seqs)).to(tl.int32), axis=0) - 1
    q_begin = tl.load(cu_ptr + seq)
    q_end = tl.load(cu_ptr + seq + 1)
    first = q_begin + (tile - (q_begin // BLOCK_Q + seq * TILE_PAD)) * BLOCK_Q
    if first >= q_end:  # a spare tile of the upper-bound grid
        return

    # --- the M tile: BLOCK_Q tokens x GROUP_PAD heads of KV head `kvh`
    m = tl.arange(0, BLOCK_M)
    tok = first + m // GROUP_PAD
    hh = m % GROUP_PAD
    row_ok = (tok < q_end) & (hh < GROUP)
    head = kvh * GROUP + hh
    j = tl.arange(0, HALF_PAD)
    jmask = j < HALF
    q_off = tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + j[None, :] * stride_qd
    q_mask = row_ok[:, None] & jmask[None, :]
    # bf16 loads are raw integers in the interpreter: convert to fp32 right after every load.
    q1 = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32).to(DOT_DTYPE)
    q2 = tl.load(q_ptr + q_off + HALF * stride_qd, mask=q_mask, other=0.0).to(tl.float32).to(DOT_DTYPE)
    qpos = tl.load(qpos_ptr + tok, mask=row_ok, other=-1)  # -1: masked rows see no key
    inv_freq = tl.load(inv_freq_ptr + j, mask=jmask, other=0.0)[None, :]

    if PACKED:  # units are key columns of the sequence's row of the key map
        num_units = tl.load(nkeys_ptr + seq)
        map_row = key_map_ptr + seq.to(tl.int64) * stride_mb  # field f at + f * stride_mf
    else:  # units are views
        num_units = tl.load(nviews_ptr + seq)
    if SPLIT:
        u_begin = split * units_per_split
        u_end = tl.minimum(num_units, u_begin + units_per_split)
    else:
        u_begin = 0
        u_end = num_units

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF_PAD], tl.float32)
    n = tl.arange(0, BLOCK_N)
    q_last = tl.max(qpos, axis=0)
    seq_views = views_ptr + seq.to(tl.int64) * stride_wb
    if not PACKED:
        slot = n % PAGE
        # Every column reads its own view's row; the VIEWS_PER_TILE distinct rows come from cache.
        col_view = seq_views + (n // PAGE) * stride_wv

    u_stop = u_end
    if CAUSAL_SKIP:
        # Prefill: units past the last one that starts at or before the tile's last query are
        # wholly in its future (about half of them in a causal prefill): stop the loop there.
        # A scan, not a search, so views (and key columns) need not be sorted by position; and
        # a loop bound, not a branch in the loop, so the K/V loads below stay software-pipelined.
        last = num_units * 0 - 1
        for c0 in range(u_begin, u_end, BLOCK_N):
            idx = c0 + n
            if PACKED:
                first_pos = tl.load(map_row + stride_mf + idx, mask=idx < u_end, other=FAR_POS)
            else:
                first_pos = tl.load(seq_views + idx * stride_wv + 3, mask=idx < u_end, other=FAR_POS)
            last = tl.maximum(last, tl.max(tl.where(first_pos <= q_last, idx, -1), axis=0))
        u_stop = last + 1

    for u0 in range(u_begin, u_stop, UNITS_PER_TILE):
        if PACKED:
            # BLOCK_N consecutive keys of the sequence, whatever views they come from: no
            # masked holes but the tail. Each column carries its own slot, position and delta.
            col = u0 + n
            kok = col < u_end
            flat_slot = tl.load(map_row + col, mask=kok, other=0)
            kpos = tl.load(map_row + stride_mf + col, mask=kok, other=FAR_POS)
            dl = tl.load(map_row + 2 * stride_mf + col, mask=kok, other=0)
            blk = flat_slot // PAGE
            kslot = flat_slot % PAGE
            d0 = tl.load(map_row + 2 * stride_mf + u0)  # the tile's first column always exists
            mixed = tl.sum((kok & (dl != d0)).to(tl.int32), axis=0) != 0
        else:
            v0 = u0
            w = col_view + v0 * stride_wv
            vok = v0 + n // PAGE < u_end
            blk = tl.load(w, mask=vok, other=0)
            lo = tl.load(w + 1, mask=vok, other=0)
            hi = tl.load(w + 2, mask=vok, other=0)
            pos0 = tl.load(w + 3, mask=vok, other=0)
            dl = tl.load(w + 4, mask=vok, other=0)
            kok = vok & (slot >= lo) & (slot < hi)
            kpos = pos0 + slot - lo
            kslot = slot
            d0 = tl.load(seq_views + v0 * stride_wv + 4)  # the tile's first view always exists
            mixed = tl.sum((vok & (dl != d0)).to(tl.int32), axis=0) != 0
        # Cache offsets in int64: num_blocks * P * Hkv * D can pass 2**31 elements.
        k_row = blk.to(tl.int64) * stride_kb + kslot * stride_ks + kvh * stride_kh
        v_row = blk.to(tl.int64) * stride_vb + kslot * stride_vs + kvh * stride_vh
        kv_mask = kok[:, None] & jmask[None, :]
        k_off = k_row[:, None] + j[None, :] * stride_kd
        v_off = v_row[:, None] + j[None, :] * stride_vd
        k1 = tl.load(k_ptr + k_off, mask=kv_mask, other=0.0).to(tl.float32).to(DOT_DTYPE)
        k2 = tl.load(k_ptr + k_off + HALF * stride_kd, mask=kv_mask, other=0.0).to(tl.float32).to(DOT_DTYPE)
        v1 = tl.load(v_ptr + v_off, mask=kv_mask, other=0.0).to(tl.float32).to(DOT_DTYPE)
        v2 = tl.load(v_ptr + v_off + HALF * stride_vd, mask=kv_mask, other=0.0).to(tl.float32).to(DOT_DTYPE)

        # RoPE deltas. Scores (R(-d) q) . k equal q . (R(d) k): rotate whichever tile is
        # smaller, in fp32, once per tile. Delta 0, the common case, costs one branch.
        # (Names differ between sibling branches where shapes do: compiled Triton merges
        # same-named values of sibling branches.)
        if ROTATE_KEYS:
            # Prefill (M > N), and every token-packed tile: rotate each key forward by its
            # column's delta; a tile that straddles views with different deltas (on the packed
            # path: most tiles, many distinct deltas) needs no special case.
            if mixed:
                kr1, kr2 = rope_rotate(k1, k2, dl.to(tl.float32)[:, None] * inv_freq)
                s = tl.dot(q1, tl.trans(kr1.to(DOT_DTYPE)), input_precision=DOT_PREC)
                s = tl.dot(q2, tl.trans(kr2.to(DOT_DTYPE)), acc=s, input_precision=DOT_PREC)
            elif d0 != 0:
                kr1, kr2 = rope_rotate(k1, k2, d0.to(tl.float32) * inv_freq)  # one angle per dim
                s = tl.dot(q1, tl.trans(kr1.to(DOT_DTYPE)), input_precision=DOT_PREC)
                s = tl.dot(q2, tl.trans(kr2.to(DOT_DTYPE)), acc=s, input_precision=DOT_PREC)
            else:
                s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
                s = tl.dot(q2, tl.trans(k2), acc=s, input_precision=DOT_PREC)
        else:
            # Decode (M <= N): rotate the query tile by -delta; K is used exactly as stored
            # (and stays in shared memory as a dot operand on GPUs).
            qa = q1
            qb = q2
            if d0 != 0:
                qr1, qr2 = rope_rotate(q1, q2, -d0.to(tl.float32) * inv_freq)
                qa = qr1.to(DOT_DTYPE)
                qb = qr2.to(DOT_DTYPE)
            s = tl.dot(qa, tl.trans(k1), input_precision=DOT_PREC)
            s = tl.dot(qb, tl.trans(k2), acc=s, input_precision=DOT_PREC)  # [M, N] fp32
            if mixed:
                # Rare: the tile straddles views with other deltas (a segment edge). Score it
                # once per view, with the query rotated by that view's delta, and keep each
                # view's columns.
                for t in tl.static_range(1, VIEWS_PER_TILE):
                    d_t = tl.load(seq_views + (v0 + t) * stride_wv + 4, mask=v0 + t < u_end, other=0)
                    qt1, qt2 = rope_rotate(q1, q2, -d_t.to(tl.float32) * inv_freq)
                    s_t = tl.dot(qt1.to(DOT_DTYPE), tl.trans(k1), input_precision=DOT_PREC)
                    s_t = tl.dot(qt2.to(DOT_DTYPE), tl.trans(k2), acc=s_t, input_precision=DOT_PREC)
                    s = tl.where((n // PAGE == t)[None, :], s_t, s)

        visible = kok[None, :] & (kpos[None, :] <= qpos[:, None])
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet has m_new = -inf: subtract 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(DOT_DTYPE)
        acc1 = tl.dot(p, v1, acc=acc1 * alpha[:, None], input_precision=DOT_PREC)
        acc2 = tl.dot(p, v2, acc=acc2 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    # Rows that saw nothing have acc = 0 and l = 0: divide by 1 to write zeros.
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    o1 = acc1 / l_div[:, None]
    o2 = acc2 / l_div[:, None]
    o_off = tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + j[None, :] * stride_od
    if SPLIT:
        o_off += split * stride_os
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_div))  # log2 units
        tl.store(lse_ptr + tok.to(tl.int64) * stride_lt + head * stride_lh + split * stride_ls, lse, mask=row_ok)
    tl.store(out_ptr + o_off, o1.to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(out_ptr + o_off + HALF * stride_od, o2.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_splits,
                         stride_pt, stride_ph, stride_ps, stride_pd,
                         stride_lt, stride_lh, stride_ls,
                         stride_ot, stride_oh, stride_od,
                         D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    """out[t, h] = sum_s w_s * part[t, h, s] / sum_s w_s with w_s = 2 ** (lse_s - max lse)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    s_ok = s < num_splits
    lse = tl.load(lse_ptr + t * stride_lt + h * stride_lh + s * stride_ls, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits (lse = -inf) weigh 0
    part = tl.load(part_ptr + t * stride_pt + h * stride_ph + s[:, None] * stride_ps + d[None, :] * stride_pd,
                   mask=s_ok[:, None] & (d[None, :] < D), other=0.0)
    den = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * part, axis=0) / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d * stride_od, o.to(out_ptr.dtype.element_ty), mask=d < D)


@dataclass(frozen=True)
class AttentionPlan:
    """Launch shape chosen by `plan_attention`."""

    block_q: int  # query tokens per M tile
    block_m: int  # rows per M tile, >= block_q * group_pad and >= 16 (tl.dot's minimum on GPUs)
    views_per_tile: int  # page path: views per N tile (N = views_per_tile * block_size)
    num_splits: int  # split-K factor over each sequence's views or key columns (1 = no split)
    num_warps: int
    num_stages: int
    packed: bool = False  # token-packed path: the N tile is block_n consecutive key-map columns
    block_n: int = 16  # key columns per N tile (page path: views_per_tile * block_size)


MIN_TOKENS_PER_SPLIT = 512  # below this a split's fixed cost (merge, scratch) is not repaid
MAX_SPLITS = 32
# The token-packed path is chosen when the page path would sweep more than this many tile
# columns per key: max_views * block_size > PACKED_COLUMNS_PER_KEY * max_kv_len. Block-aligned
# views give ~1 (1.3 with partial edge blocks), views of 1-4 tokens 4-16. Between, the packed
# path's per-column key rotation is weighed against the page path's masked columns; 2 is a
# guess at the break-even point, not a measurement (no GPU has timed either path yet).
PACKED_COLUMNS_PER_KEY = 2


def prefers_packed(max_views: int, max_kv_len: int, block_size: int) -> bool:
    """The heuristic, from host ints only: do a step's views waste most of the page path's tiles?

    `max_views * block_size` is how many columns the page path sweeps for the sequence with the
    most views, `max_kv_len` how many the packed path sweeps for the longest one. (Per-sequence
    counts live on the device; reading them would cost a sync per step.)"""
    return max_views * block_size > PACKED_COLUMNS_PER_KEY * max(max_kv_len, 1)


def plan_attention(num_tokens: int, num_seqs: int, max_seqlen_q: int, max_views: int, block_size: int,
                   group: int, num_kv_heads: int, num_sms: int, num_splits: int | None = None,
                   fp32: bool = False, *, max_kv_len: int | None = None,
                   packed: bool | None = None) -> AttentionPlan:
    """Choose the path, tiles and split-K for one launch, from host-side ints only (no device sync).

    Tile sizes were chosen by compiling for sm_90 and reading ptxas' register/spill report
    (bf16, head_dim 128): decode M16 x N64 with 4 warps and prefill M128 x N32 with 8 warps
    (M64 x N16, 4 warps, for short prompts) compile without spills. fp32 uses full-precision
    dots (no tensor cores) and smaller tiles. Split-K pays in decode with few sequences and
    long contexts: B * Hkv programs cannot fill the GPU, so each sequence's views (or key
    columns, on the packed path) are cut into splits that run in parallel and are merged.

    `packed` forces the token-packed path (True) or the page path (False); None applies
    `prefers_packed`, which needs `max_kv_len` (without it the page path is kept).
    """
    group_pad = next_pow2(group)
    decode = max_seqlen_q <= 1
    if decode:
        block_q, block_m = 1, max(16, group_pad)
        tile_keys, num_warps = (32, 8) if fp32 else (64, 4)
    else:
        if fp32:
            block_m, tile_keys, num_warps = 16, 32, 8
        elif max_seqlen_q * group_pad >= 128:
            block_m, tile_keys, num_warps = 128, 32, 8
        else:
            block_m, tile_keys, num_warps = 64, 16, 4
        block_m = max(block_m, group_pad)
        block_q = block_m // group_pad
    if packed is None:
        packed = max_kv_len is not None and prefers_packed(max_views, max_kv_len, block_size)
    views_per_tile = max(1, tile_keys // block_size)
    if packed:
        context = max(max_kv_len if max_kv_len is not None else max_views * block_size, 1)
        # Every packed tile may rotate K per column (fp32 cos/sin over N x D/2), which costs
        # registers: bf16/fp16 decode N64 needs 8 warps, fp32 needs N16 (4 warps in decode, 8
        # in prefill) to compile without spills (ptxas, sm_90). 16 is tl.dot's minimum on GPUs.
        block_n = 16 if fp32 else max(16, tile_keys)
        if decode:
            num_warps = 4 if fp32 else 8
        num_tiles = triton.cdiv(context, block_n)  # N tiles of the longest key list
    else:
        context = max_views * block_size
        block_n = views_per_tile * block_size
        num_tiles = max(max_views, 1)  # a split holds at least one view
    if num_splits is None:
        num_splits = 1
        programs = max(num_seqs, 1) * num_kv_heads
        target = 2 * num_sms  # about two waves of programs
        if decode and programs < target and context >= 2 * MIN_TOKENS_PER_SPLIT:
            num_splits = min(triton.cdiv(target, programs), context // MIN_TOKENS_PER_SPLIT, MAX_SPLITS)
    num_splits = max(1, min(num_splits, num_tiles))
    return AttentionPlan(block_q, block_m, views_per_tile, num_splits, num_warps, num_stages=2,
                         packed=packed, block_n=block_n)


PAD_KEY_POS = 2**30  # key position of key-map padding columns: past every query


def build_key_map(views: torch.Tensor, num_views: torch.Tensor, block_size: int,
                  max_kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's keys in view order, for the token-packed path; torch ops on the views'
    device, no host sync.

    Returns `key_map` int32 [3, B, L] (L = max(max_kv_len, 1)) and `num_keys` int32 [B]: column
    c < num_keys[b] of sequence b is key_map[0, b, c] the flat pool slot (block * block_size +
    slot), key_map[1, b, c] the key position, key_map[2, b, c] the rope delta of its view.
    Padding columns hold slot 0, position PAD_KEY_POS and delta 0 (the kernel masks them by
    num_keys anyway). Field-major so a tile's loads of one field are contiguous.
    """
    device = views.device
    B, V, _ = views.shape
    L = max(max_kv_len, 1)
    block, lo, hi, pos0, delta = views.long().unbind(-1)  # each [B, V]
    valid_view = torch.arange(V, device=device)[None, :] < num_views.long()[:, None]
    length = torch.where(valid_view, (hi - lo).clamp(min=0), torch.zeros_like(hi))
    ends = torch.cumsum(length, dim=1)
    starts = ends - length
    col = torch.arange(L, device=device)
    # The view that holds column c: the first whose end exceeds c (empty views never do).
    owner = torch.searchsorted(ends, col[None, :].expand(B, L).contiguous(), right=True).clamp(max=V - 1)
    offset = col[None, :] - torch.gather(starts, 1, owner)
    # max_kv_len bounds every sequence's key count (the metadata contract); clamping keeps a
    # wrong bound from sending the kernel past the map (the twin truncates at it alike).
    num_keys = ends[:, -1].clamp(max=L)
    valid = col[None, :] < num_keys[:, None]
    flat_slot = torch.gather(block * block_size + lo, 1, owner) + offset
    pos = torch.gather(pos0, 1, owner) + offset
    dlt = torch.gather(delta, 1, owner)
    key_map = torch.stack([torch.where(valid, flat_slot, 0), torch.where(valid, pos, PAD_KEY_POS),
                           torch.where(valid, dlt, 0)]).to(torch.int32)
    return key_map.contiguous(), num_keys.to(torch.int32).contiguous()


def step_key_map(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """`build_key_map` of this step, built on the first layer's call and kept in
    `meta.step_cache` for every other layer."""
    cached = meta.step_cache.get("triton_key_map")
    if cached is None:
        cached = meta.step_cache["triton_key_map"] = build_key_map(
            meta.views, meta.num_views, meta.block_size, meta.max_kv_len)
    return cached


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreted runs: any small number; tests pass num_splits explicitly


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, inv_freq: torch.Tensor, scale: float, *,
                           num_splits: int | None = None, packed: bool | None = None,
                           out: torch.Tensor | None = None, poison_scratch: bool = False) -> torch.Tensor:
    """Triton twin of `paged_attention_torch`. Returns [T, Hq, D] in q.dtype.

    Keyword-only extras: `num_splits` forces the split-K factor (None = heuristic), `packed`
    forces the token-packed path (True) or the page path (False) (None = `plan_attention`'s
    heuristic), `out` is written in place (tests pre-fill it with NaN), `poison_scratch`
    NaN-fills split-K scratch.
    """
    T, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    if Dk != D or D % 2 or Hq % Hkv or page != meta.block_size:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"block_size {meta.block_size}")
    check_launchable(_attention_kernel, q, k_cache, v_cache)
    if out is None:
        out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    B = meta.num_seqs
    if T == 0 or B == 0:
        return out
    interpreted = is_interpreted(_attention_kernel)
    group = Hq // Hkv
    views = meta.views.to(torch.int32).contiguous()
    max_views = min(max(meta.max_views, 1), views.shape[1])
    plan = plan_attention(T, B, meta.max_seqlen_q, max_views, page, group, Hkv, _num_sms(q.device), num_splits,
                          fp32=q.dtype == torch.float32, max_kv_len=meta.max_kv_len, packed=packed)
    direct = meta.max_seqlen_q <= 1 and T == B  # every sequence has exactly one query token
    tile_pad = 0 if plan.block_q == 1 else 1
    num_tiles = T // plan.block_q + B * tile_pad
    dot_dtype = compute_dtype(q.dtype, interpreted)
    half = D // 2
    cu = meta.cu_seqlens_q.to(torch.int32).contiguous()
    q_pos = meta.q_pos.to(torch.int32).contiguous()
    num_views = meta.num_views.to(torch.int32).contiguous()
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    if plan.packed:
        key_map, num_keys = step_key_map(meta)
        units, units_per_tile = key_map.shape[2], plan.block_n  # key columns
        map_strides = (key_map.stride(0), key_map.stride(1))
    else:
        key_map, num_keys = views, num_views  # unread on the page path
        units, units_per_tile = max_views, plan.views_per_tile  # views
        map_strides = (0, 0)

    S = plan.num_splits
    if S > 1:
        units_per_split = triton.cdiv(triton.cdiv(units, S), units_per_tile) * units_per_tile
        S = triton.cdiv(units, units_per_split)  # drop splits that would always be empty
    if S > 1:
        fill = torch.full if poison_scratch else (lambda shape, _v, **kw: torch.empty(shape, **kw))
        part = fill((T, Hq, S, D), float("nan"), dtype=torch.float32, device=q.device)
        lse = fill((T, Hq, S), float("nan"), dtype=torch.float32, device=q.device)
        target, o_strides, l_strides = part, part.stride(), lse.stride()
    else:
        units_per_split = units
        target, lse = out, out  # lse unused without split
        o_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        l_strides = (0, 0, 0)

    grid = (num_tiles, Hkv, S)
    _attention_kernel[grid](
        q, k_cache, v_cache, target, lse,
        cu, q_pos, views, num_views, inv_freq,
        key_map, num_keys,
        B, scale * math.log2(math.e), units_per_split,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *o_strides, *l_strides,
        views.stride(0), views.stride(1),
        *map_strides,
        HALF=half, HALF_PAD=next_pow2(half), GROUP=group, GROUP_PAD=next_pow2(group),
        BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, PAGE=page, VIEWS_PER_TILE=plan.views_per_tile,
        BLOCK_N=plan.block_n, PACKED=plan.packed,
        BLOCK_B=16 if direct else max(16, next_pow2(B)), TILE_PAD=tile_pad, DIRECT=direct,
        SPLIT=S > 1, CAUSAL_SKIP=meta.max_seqlen_q > 1,
        # The packed path always rotates keys: its tiles mix many deltas, and one rotation per
        # key column beats one query rotation and dot per distinct delta.
        ROTATE_KEYS=plan.packed or plan.block_m > plan.block_n,
        DOT_DTYPE=dot_dtype, DOT_PREC=dot_precision(dot_dtype),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if S > 1:
        _merge_splits_kernel[(T, Hq)](
            part, lse, out, S, *part.stride(), *lse.stride(), *out.stride(),
            D=D, D_PAD=next_pow2(D), S_PAD=next_pow2(S), num_warps=4)
    return out
