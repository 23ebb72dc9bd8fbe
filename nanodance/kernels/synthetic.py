"""Synthetic paged batches for the kernel tests and the GPU benchmark (no model, no engine).

Owns:
    make_metadata(views, q_pos, block_size, device) -> AttentionMetadata
        views: per sequence a list of (block, lo, hi, pos0, delta); q_pos: per sequence a list
        of query positions. Builds exactly the tensors the model runner would.
    random_views(rng, kv_len, block_size, next_block, ...) -> list of views covering
        positions [start, start + kv_len), with optional lo > 0, partial hi and per-segment deltas.
    fill_cache(num_blocks, block_size, heads, dim, views, dtype, device, generator, poison)
        -> K or V cache [num_blocks, block_size, heads, dim] whose view slots hold N(0, 1) values
        and every other slot NaN (when poison), so a kernel reading outside its views fails.
    default_inv_freq(dim, theta) -> fp32 [dim / 2]
"""
from __future__ import annotations

import random

import torch

from nanodance.attention_metadata import AttentionMetadata

View = tuple[int, int, int, int, int]  # (block, lo, hi, pos0, delta)


def default_inv_freq(dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float()


def make_metadata(views: list[list[View]], q_pos: list[list[int]], block_size: int,
                  device: torch.device | str = "cpu") -> AttentionMetadata:
    """AttentionMetadata for B sequences given their view lists and query positions."""
    B = len(views)
    V = max(1, max(len(v) for v in views))
    view_t = torch.zeros(B, V, 5, dtype=torch.int32)
    for b, seq_views in enumerate(views):
        if seq_views:
            view_t[b, :len(seq_views)] = torch.tensor(seq_views, dtype=torch.int32)
    lens = [len(p) for p in q_pos]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    flat_pos = [p for ps in q_pos for p in ps]
    return AttentionMetadata(
        cu_seqlens_q=cu.to(device),
        q_pos=torch.tensor(flat_pos, dtype=torch.int32, device=device),
        slot_mapping=torch.full((len(flat_pos),), -1, dtype=torch.int64, device=device),
        views=view_t.to(device),
        num_views=torch.tensor([len(v) for v in views], dtype=torch.int32, device=device),
        max_seqlen_q=max(lens) if lens else 0,
        max_views=max(len(v) for v in views) if views else 0,
        max_kv_len=max(sum(hi - lo for _, lo, hi, _, _ in v) for v in views) if views else 0,
        block_size=block_size,
    )


def random_views(rng: random.Random, kv_len: int, block_size: int, next_block, *, start: int = 0,
                 p_lo: float = 0.0, p_partial: float = 0.0, deltas: tuple[int, ...] = (0,),
                 max_segment_views: int = 4) -> list[View]:
    """Views covering positions [start, start + kv_len).

    Consecutive views form segments (1..max_segment_views views) sharing one delta drawn from
    `deltas`, like a shared block placed at a new position; `p_lo` / `p_partial` are the chances
    that a view starts mid-block (lo > 0) or stops before the block's end (hi < block_size).
    `next_block()` returns the physical block of the next view.
    """
    out: list[View] = []
    pos = start
    end = start + kv_len
    left_in_segment = 0
    delta = 0
    while pos < end:
        if left_in_segment == 0:
            left_in_segment = rng.randint(1, max_segment_views)
            delta = rng.choice(deltas)
        lo = rng.randrange(1, block_size) if rng.random() < p_lo else 0
        n = block_size - lo
        if rng.random() < p_partial:
            n = rng.randint(1, n)
        n = min(n, end - pos)
        out.append((next_block(), lo, lo + n, pos, delta))
        pos += n
        left_in_segment -= 1
    return out


def fill_cache(num_blocks: int, block_size: int, heads: int, dim: int, views: list[list[View]],
               dtype: torch.dtype, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
               poison: bool = True) -> torch.Tensor:
    """A cache whose view slots hold N(0, 1) values; all other slots NaN when `poison`."""
    values = torch.randn(num_blocks, block_size, heads, dim, generator=generator).to(dtype)
    if not poison:
        return values.to(device)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for seq_views in views:
        for block, lo, hi, _, _ in seq_views:
            used[block, lo:hi] = True
    return torch.where(used[:, :, None, None], values, torch.full((), float("nan"), dtype=dtype)).to(device)
