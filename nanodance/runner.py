"""The model runner: turns a step's scheduled chunks into one forward pass and samples.

    run(chunks) -> list[int | None]     one sampled token per chunk that samples, else None

It flattens the chunks into the ragged batch the model takes (input_ids int64 [T],
positions int64 [T]) and builds the `AttentionMetadata` (DESIGN.md §3.1): query rows per
sequence, the flat slot each new K/V is written to, and each sequence's views clipped to the
positions this step can see (a view's slots past the last query position are left out, so
private blocks can be allocated whole and filled over several steps). Logits are computed only
for the rows that sample.
"""
from __future__ import annotations

import torch

from nanodance.attention_metadata import AttentionMetadata
from nanodance.cache import BlockPool, KVCache
from nanodance.model import CausalLM
from nanodance.sampling import sample
from nanodance.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, pool: BlockPool, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.pool = pool
        self.block_size = pool.block_size
        self.device = device

    def view_rows(self, chunk: ScheduledChunk) -> list[tuple[int, int, int, int, int]]:
        """(block, lo, hi, pos0, delta) rows of a chunk's sequence, clipped to its last query."""
        limit = chunk.positions[-1] + 1
        rows = []
        for v in chunk.seq.views:
            if v.pos0 >= limit:
                break
            hi = min(v.hi, v.lo + limit - v.pos0)
            rows.append((v.block, v.lo, hi, v.pos0, v.pos0 - (self.pool.blocks[v.block].frame0 + v.lo)))
        return rows

    def build_batch(self, chunks: list[ScheduledChunk]):
        """(input_ids [T], positions [T], meta, sample_rows [N]) for one step."""
        bs = self.block_size
        ids, pos, slots, cu, all_rows, sample_rows = [], [], [], [0], [], []
        for chunk in chunks:
            seq = chunk.seq
            for p in chunk.positions:
                ids.append(seq.token_at(p))
                slots.append(seq.slot_of(p, bs))
            pos.extend(chunk.positions)
            cu.append(len(ids))
            all_rows.append(self.view_rows(chunk))
            if chunk.sample:
                sample_rows.append(len(ids) - 1)
        max_views = max(len(r) for r in all_rows)
        views = torch.zeros(len(chunks), max_views, 5, dtype=torch.int32)
        for b, rows in enumerate(all_rows):
            views[b, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            q_pos=torch.tensor(pos, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            views=views.to(dev),
            num_views=torch.tensor([len(r) for r in all_rows], dtype=torch.int32, device=dev),
            max_seqlen_q=max(len(c.positions) for c in chunks),
            max_views=max_views,
            max_kv_len=max(sum(r[2] - r[1] for r in rows) for rows in all_rows),
            block_size=bs,
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(pos, dtype=torch.int64, device=dev)
        return input_ids, positions, meta, sample_rows

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> list[int | None]:
        input_ids, positions, meta, sample_rows = self.build_batch(chunks)
        hidden = self.model(input_ids, positions, meta, self.kv_cache.layers)
        sampling = [c for c in chunks if c.sample]
        tokens: list[int | None] = [None] * len(chunks)
        if sampling:
            logits = self.model.compute_logits(hidden[sample_rows])
            drawn = sample(logits, [c.seq.params for c in sampling], [c.seq.generator for c in sampling])
            it = iter(drawn)
            tokens = [next(it) if c.sample else None for c in chunks]
        return tokens
