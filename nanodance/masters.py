"""Masters: the one pooled copy of a shared block's K/V that every agent of a round reads.

A master covers a segment's tokens in order with views at *master positions* (where its keys
were rotated). Agents read it at their own positions through views with a rope delta
(`views_at`). It comes from one of three sources:
- "producer": the previous round's request that generated the block already wrote its K/V
  while decoding; `Master.of_output` cuts those views out of the finished sequence (zero
  prefill). Its last sampled token was never fed back, so the master may lack that token's K/V.
- "standalone": the block prefilled on its own (behind a sink token, dropped after with
  `trim`), in one batch with the round's other new blocks.
- "agent": cut out of a reference agent's prompt, prefilled exactly (collector.py): its keys
  were computed in nearly the company every other agent of the round reads them in.

A master holds one pool reference per view; whoever holds the master releases them.
"""
from __future__ import annotations

from dataclasses import dataclass

from nanodance.cache import BlockPool, View
from nanodance.sequence import Sequence


@dataclass
class Master:
    """One pooled copy of a segment's K/V; holds one reference on each block it views."""

    key: tuple[int, ...]
    views: list[View]  # cover the segment's tokens in order, at master positions
    source: str  # "producer" | "standalone" | "agent"

    @property
    def start(self) -> int:
        return self.views[0].pos0

    @property
    def num_tokens_with_kv(self) -> int:
        """Leading tokens of the segment that have K/V (a producer master may lack its last)."""
        return sum(v.length for v in self.views)

    def views_at(self, a: int, b: int, at: int) -> list[View]:
        """Views onto the master's slots of segment offsets [a, b), placed at agent position `at`."""
        out = []
        for view in self.views:
            clipped = view.clip(self.start + a, self.start + b)
            if clipped is not None:
                out.append(clipped.moved(at + clipped.pos0 - self.start - a))
        return out

    def slots(self, block_size: int) -> list[int]:
        """Flat pool slot of every segment token that has K/V, in order."""
        return [v.block * block_size + s for v in self.views for s in range(v.lo, v.hi)]

    def key_positions(self, pool: BlockPool) -> list[int]:
        """The position each of those keys was rotated at: its slot's frame position. It is the
        token's master position unless the producer packed it into a diff block."""
        return [pool.blocks[v.block].frame0 + s for v in self.views for s in range(v.lo, v.hi)]

    @classmethod
    def of_output(cls, seq: Sequence, key: tuple[int, ...]) -> "Master | None":
        """The views of `seq`'s output tokens `key` that have K/V, or None if none has.

        No reference is taken here: the caller refs the views it keeps.
        """
        start = seq.num_prompt_tokens
        # The last sampled token was never fed back: a block that includes it gets a master of
        # all but that token, and the agents compute the rest.
        end = min(start + len(key), seq.num_tokens - 1)
        views = [c for c in (v.clip(start, end) for v in seq.views) if c is not None]
        return cls(key, views, "producer") if views else None

    def part(self, offset: int, key: tuple[int, ...]) -> "Master | None":
        """The master of the segment `key` that starts `offset` tokens into this one, or None if
        the ids differ there or none of them has K/V. The whole segment is `self`; a part holds no
        reference of its own: the caller refs the views it keeps."""
        if tuple(self.key[offset:offset + len(key)]) != tuple(key):
            return None
        if offset == 0 and len(key) == len(self.key):
            return self
        views = [c for c in (v.clip(self.start + offset, self.start + offset + len(key)) for v in self.views)
                 if c is not None]
        return Master(tuple(key), views, self.source) if views else None

    def trim(self, skip: int) -> list[View]:
        """Narrow a standalone master's views to its segment: drop `skip` leading (sink) tokens.

        Each kept view carries over its reference; the views returned (blocks outside the
        segment) still hold theirs, and the caller releases them.
        """
        start = self.views[0].pos0 + skip
        narrowed, dropped = [], []
        for view in self.views:
            clipped = view.clip(start, start + len(self.key))
            if clipped is None:
                dropped.append(view)
            else:
                narrowed.append(clipped)
        self.views = narrowed
        return dropped
