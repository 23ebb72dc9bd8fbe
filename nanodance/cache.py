"""The paged KV cache: physical blocks, views onto them, ref counts and the prefix index.

Owns the bookkeeping only; the KV tensors themselves (`KVCache`) are plain per-layer tensors
`[num_blocks, block_size, Hkv, D]` for K and for V, zero-initialized so a never-written slot
holds finite values.

- `Block`: one physical block: `ref_count` (views + owners holding it), `frame0` (the position
  its slot 0 had when its keys were rotated, docs/design.md), and for prefix caching the
  chained `hash` and the `token_ids` it holds (checked on every hit, so a hash collision can
  never serve wrong KV).
- `View(block, lo, hi, pos0)`: slots [lo, hi) of a block, slot lo sitting at position pos0 of
  the sequence that holds the view. Its rope delta is `pos0 - (frame0 + lo)`.
- `BlockPool`: allocation (free list first, then the least recently freed cached block),
  ref counting, and the prefix index of full blocks (vLLM APC semantics: a block whose last
  holder finished stays cached, and is found again by hash, until it is evicted).

Invariant (checked by `check_invariants`): every block is exactly one of free (ref 0, no hash),
cached (ref 0, hashed, in the LRU) or used (ref > 0); free + cached + used = total.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from nanodance.errors import NoFreeBlocks


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    frame0: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    serial: int = 0  # which allocation of this block (accounting tells reuses of one block apart)


@dataclass(frozen=True)
class View:
    """Slots [lo, hi) of physical `block`; slot `lo` holds the key of position `pos0`."""

    block: int
    lo: int
    hi: int
    pos0: int

    @property
    def length(self) -> int:
        return self.hi - self.lo

    @property
    def end(self) -> int:
        """One past the last position this view covers."""
        return self.pos0 + self.hi - self.lo

    def clip(self, start: int, end: int) -> "View | None":
        """The part of this view that covers positions [start, end), or None if they do not meet.

        The one place views are narrowed: a kept cache truncated, a pinned output cut out of its
        producer, a master trimmed to its segment, a view hidden past a step's last query.
        """
        x, y = max(start, self.pos0), min(end, self.end)
        if x >= y:
            return None
        return View(self.block, self.lo + x - self.pos0, self.lo + y - self.pos0, x)

    def moved(self, pos0: int) -> "View":
        """The same slots placed at another position (a shared block read elsewhere)."""
        return View(self.block, self.lo, self.hi, pos0)


def chain_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """Hash of a full block given the hash of the block before it (None for the first)."""
    return hash((parent, tuple(token_ids)))


@dataclass
class PoolCounters:
    prefix_queries: int = 0  # full blocks looked up
    prefix_hits: int = 0
    evictions: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0 but hashed; oldest first
        self._index: dict[int, int] = {}  # hash -> block id
        self.counters = PoolCounters()
        self._serial = 0

    # ------------------------------------------------------------------ capacity

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can take now (free ones plus evictable cached ones)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_unused(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_hashed(self) -> int:
        """Blocks registered in the prefix index (in use or not)."""
        return len(self._index)

    # ------------------------------------------------------------------ allocation

    def allocate(self, frame0: int) -> int:
        """A fresh private block (ref 1) whose slot 0 will be rotated at position `frame0`."""
        if self._free:
            block_id = self._free.popleft()
        elif self._cached:
            block_id, _ = self._cached.popitem(last=False)
            self._unregister(block_id)
            self.counters.evictions += 1
        else:
            raise NoFreeBlocks
        block = self.blocks[block_id]
        self._serial += 1
        block.ref_count, block.frame0, block.serial = 1, frame0, self._serial
        return block_id

    def ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            if block_id not in self._cached:
                raise RuntimeError(f"block {block_id} is free; it cannot gain a reference")
            del self._cached[block_id]
        block.ref_count += 1

    def unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released more often than referenced")
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self._cached[block_id] = None  # most recently freed last
            else:
                self._free.append(block_id)

    def release(self, views: Iterable[View]) -> None:
        """Drop one reference per view (a sequence finishing or being preempted)."""
        for view in views:
            self.unref(view.block)

    # ------------------------------------------------------------------ prefix index

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> int | None:
        """The cached block holding exactly `token_ids` under `block_hash`, or None."""
        self.counters.prefix_queries += 1
        block_id = self._index.get(block_hash)
        if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
            return None
        self.counters.prefix_hits += 1
        return block_id

    def match_prefix(self, token_ids: Sequence[int], max_blocks: int) -> tuple[list[View], list[int]]:
        """Take the longest run of cached full blocks of `token_ids` (at most `max_blocks`).

        Returns their views (one reference taken on each, the caller now holds it) and their
        chained hashes; empty when prefix caching is off or nothing matches.
        """
        views: list[View] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching:
            return views, hashes
        bs, parent = self.block_size, None
        for i in range(max_blocks):
            block_tokens = token_ids[i * bs:(i + 1) * bs]
            h = chain_hash(parent, block_tokens)
            block = self.lookup(h, block_tokens)
            if block is None:
                break
            self.ref(block)
            views.append(View(block, 0, bs, i * bs))
            hashes.append(h)
            parent = h
        return views, hashes

    def register(self, block_id: int, block_hash: int, token_ids: Sequence[int]) -> bool:
        """Publish a full, exactly computed block in the prefix index (first writer wins).

        True if this call published it. The scheduler publishes a block as soon as the step that
        writes it is scheduled, so requests of that same step can share it (see scheduler.py).
        """
        if not self.enable_prefix_caching or block_hash in self._index:
            return False
        block = self.blocks[block_id]
        if block.hash is not None:
            return False
        block.hash, block.token_ids = block_hash, tuple(token_ids)
        self._index[block_hash] = block_id
        return True

    def unpublish(self, block_id: int) -> None:
        """Take a block out of the prefix index: the step that was to write its K/V never ran."""
        if block_id in self._cached:
            del self._cached[block_id]
            self._free.append(block_id)
        self._unregister(block_id)

    def _unregister(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self._index.get(block.hash) == block_id:
            del self._index[block.hash]
        block.hash, block.token_ids = None, ()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that nobody uses (they become plain free blocks)."""
        while self._cached:
            block_id, _ = self._cached.popitem(last=False)
            self._unregister(block_id)
            self._free.append(block_id)

    # ------------------------------------------------------------------ checks

    def check_invariants(self, holders: Iterable[Iterable[int]] | None = None) -> None:
        """Raise AssertionError unless the pool is consistent.

        `holders` lists, per holder (a sequence's views, a master's pin...), the block ids it
        references once each; when given (an empty list included: then no block may be
        referenced), every ref count must equal the number of holders' references exactly (so
        no holder's view points at a free or cached block).
        """
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & cached, "a block is both free and cached"
        for block in self.blocks:
            b = block.block_id
            if block.ref_count > 0:
                assert b not in free and b not in cached, f"used block {b} is on a free list"
            elif block.hash is not None:
                assert b in cached, f"unused hashed block {b} is not in the cached LRU"
            else:
                assert b in free, f"block {b} is lost: ref 0, not cached, not free"
        used = sum(block.ref_count > 0 for block in self.blocks)
        assert len(free) + len(cached) + used == self.num_blocks, (
            f"free {len(free)} + cached {len(cached)} + used {used} != total {self.num_blocks}")
        for h, b in self._index.items():
            assert self.blocks[b].hash == h, f"index entry of block {b} is stale"
        if holders is not None:
            expected = [0] * self.num_blocks
            for held in holders:
                for b in held:
                    expected[b] += 1
            actual = [blk.ref_count for blk in self.blocks]
            bad = [(b, actual[b], expected[b]) for b in range(self.num_blocks) if actual[b] != expected[b]]
            assert not bad, f"ref counts differ from holders (block, ref, expected): {bad[:8]}"


@dataclass
class KVCache:
    """Per-layer K and V pools: `layers[i] = (k, v)`, each [num_blocks, block_size, Hkv, D]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "KVCache":
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return cls([(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                    for _ in range(num_layers)])

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
