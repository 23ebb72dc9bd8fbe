"""The model runner: turns a step's scheduled chunks into one forward pass and samples.

    run(chunks) -> list[int | None]     one sampled token per chunk that samples, else None

It flattens the chunks into the ragged batch the model takes (input_ids int64 [T],
positions int64 [T]) and builds the `AttentionMetadata` (docs/design.md): query rows per
sequence, the flat slot each new K/V is written to and the frame position its key is rotated
at (a packed diff slot's frame may differ from the token's position), each sequence's views clipped to the
positions this step can see (a view's slots past the last query position are left out, so
private blocks can be allocated whole and filled over several steps). Logits are computed only
for the rows that sample, and a token is drawn for each by the runner's `sampler` (by default
each request's `SamplingParams`; experiments may pass their own, e.g. to record log-probs or
force tokens). The forward itself is the executor's (executor.py), so that under tensor
parallelism every rank runs it on its shard; sampling stays here, on rank 0.
"""
from __future__ import annotations

from typing import Callable

import torch

from nanodance.attention_metadata import AttentionMetadata, ViewRow, build_metadata
from nanodance.cache import BlockPool
from nanodance.executor import Executor
from nanodance.sampling import sample, token_logprobs
from nanodance.sequence import ScheduledChunk, Sequence

Sampler = Callable[[torch.Tensor, list[Sequence]], list[int]]  # (logits [N, vocab], sequences) -> tokens


def default_sampler(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Each sequence's `SamplingParams`, drawn from its own generator (see sampling.py)."""
    return sample(logits, [s.params for s in seqs], [s.generator for s in seqs])


class ModelRunner:
    def __init__(self, executor: Executor, pool: BlockPool, device: torch.device,
                 sampler: Sampler = default_sampler):
        self.executor = executor
        self.model, self.kv_cache = executor.model, executor.kv  # for reading
        self.pool = pool
        self.block_size = pool.block_size
        self.device = device
        self.sampler = sampler

    def view_rows(self, chunk: ScheduledChunk) -> list[ViewRow]:
        """(block, lo, hi, pos0, delta) rows of a chunk's sequence, clipped to its last query."""
        limit = chunk.positions[-1] + 1
        rows = []
        for view in chunk.seq.views:
            v = view.clip(0, limit)
            if v is None:
                break
            rows.append((v.block, v.lo, v.hi, v.pos0, v.pos0 - (self.pool.blocks[v.block].frame0 + v.lo)))
        return rows

    def build_batch(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids int64 [T], positions int64 [T], metadata) for one step."""
        bs = self.block_size
        ids, slots, k_pos = [], [], []
        for chunk in chunks:
            seq = chunk.seq
            ids.extend(seq.token_at(p) for p in chunk.positions)
            for p in chunk.positions:
                slot = seq.slot_of(p, bs)
                slots.append(slot)
                k_pos.append(self.pool.blocks[slot // bs].frame0 + slot % bs)  # the frame rule
        q_pos = [p for c in chunks for p in c.positions]
        meta = build_metadata([self.view_rows(c) for c in chunks], [c.positions for c in chunks], bs,
                              self.device, slots, None if k_pos == q_pos else k_pos)
        positions = torch.tensor(q_pos, dtype=torch.int64, device=self.device)
        return torch.tensor(ids, dtype=torch.int64, device=self.device), positions, meta

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> list[int | None]:
        """One forward over the step's chunks; a token for each chunk that samples, else None."""
        input_ids, positions, meta = self.build_batch(chunks)
        sampling = [k for k, c in enumerate(chunks) if c.sample]
        last_rows = meta.cu_seqlens_q[1:].long() - 1
        logits = self.executor.forward(input_ids, positions, meta, last_rows[sampling])
        tokens: list[int | None] = [None] * len(chunks)
        if sampling:
            seqs = [chunks[k].seq for k in sampling]
            drawn = self.sampler(logits, seqs)
            for k, token in zip(sampling, drawn):
                tokens[k] = token
            _record_logprobs(logits, seqs, drawn)
        return tokens


def _record_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> None:
    """Append each sampled token's log-probabilities to the sequences that asked for them."""
    asked = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not asked:
        return
    found = token_logprobs(logits[asked], [tokens[i] for i in asked], [seqs[i].params.logprobs for i in asked])
    for i, entry in zip(asked, found):
        seqs[i].logprobs.append(entry)
