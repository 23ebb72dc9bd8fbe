"""Synthetic paged batches for the kernel tests and the GPU benchmark (no model, no engine).

Owns (metadata itself comes from `attention_metadata.build_metadata`, as in the engine):
    random_views(rng, kv_len, block_size, next_block, ...) -> list of views covering
        positions [start, start + kv_len), with optional lo > 0, partial hi and per-segment deltas.
    short_views(rng, kv_len, alloc, ...) -> views of 1..max_len tokens each with its own delta,
        as packed diffs make them; `SlotPacker(block_size, first_block)` is an `alloc` that
        packs them densely into the next free slots of consecutive blocks.
    fill_cache(num_blocks, block_size, heads, dim, views, dtype, device, generator, poison)
        -> K or V cache [num_blocks, block_size, heads, dim] whose view slots hold N(0, 1) values
        and every other slot NaN (when poison), so a kernel reading outside its views fails.
    default_inv_freq(dim, theta) -> fp32 [dim / 2]
"""
from __future__ import annotations

import random

import torch

View = tuple[int, int, int, int, int]  # (block, lo, hi, pos0, delta)


def default_inv_freq(dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float()


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


class SlotPacker:
    """Hands out runs of consecutive slots, densely, in blocks first_block, first_block + 1, ...
    (a run never straddles two blocks): `packer(n) -> (block, lo)`. `num_blocks` is one past
    the last block used."""

    def __init__(self, block_size: int, first_block: int = 1):
        self.block_size = block_size
        self.block = first_block
        self.free = 0

    def __call__(self, n: int) -> tuple[int, int]:
        if self.free + n > self.block_size:
            self.block, self.free = self.block + 1, 0
        self.free += n
        return self.block, self.free - n

    @property
    def num_blocks(self) -> int:
        return self.block + 1


def short_views(rng: random.Random, kv_len: int, alloc, *, start: int = 0, max_len: int = 4,
                p_zero: float = 0.1, max_delta: int = 3000) -> list[View]:
    """Views covering [start, start + kv_len) in runs of 1..max_len tokens, each in the slots
    `alloc(n) -> (block, lo)` gives it and with its own delta (0 with chance `p_zero`, else
    uniform in [-max_delta, max_delta]): an agent reading recomputed tokens from packed diffs."""
    views: list[View] = []
    pos, end = start, start + kv_len
    while pos < end:
        n = min(rng.randint(1, max_len), end - pos)
        block, lo = alloc(n)
        delta = 0 if rng.random() < p_zero else rng.randint(-max_delta, max_delta)
        views.append((block, lo, lo + n, pos, delta))
        pos += n
    return views


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
