"""The contract between the scheduler's batch and the attention kernels.

One `AttentionMetadata` describes one forward step over a ragged batch of B sequences
with T query tokens in total (prefill chunks, recomputed blocks and decode tokens mixed).
It is built once per step by the model runner and read by every layer.

Tensors (all on the model's device):
    cu_seqlens_q  int32 [B+1]    query tokens of sequence b are rows cu[b]:cu[b+1] of q
    q_pos         int32 [T]      position of each query token in its sequence (need not be
                                 contiguous: recomputed blocks sit between reused ones)
    slot_mapping  int64 [T]      flat pool slot (block * block_size + offset) where the token's
                                 new K/V is written; -1 = do not write
    views         int32 [B, V, 5] per sequence, its block views, padded with zeros:
                                 (block, lo, hi, pos0, delta). Slots [lo, hi) of `block`;
                                 slot `s` holds the key of position pos0 + (s - lo);
                                 delta = pos0 - (frame0[block] + lo) is the rope delta: the
                                 cached key was rotated at position (pos - delta)
    num_views     int32 [B]      valid rows of `views` per sequence
    k_pos         int32 [T] or None  the position each new key is rotated at: the frame position
                                 of the slot it is written to (`frame0 + slot`). It equals q_pos
                                 (None) except for tokens packed into a diff block at another
                                 frame; attention then reads them through their view's delta.

Host-side ints: `max_seqlen_q`, `max_views`, `block_size`, and `max_kv_len` (the largest
sum of view lengths of one sequence). Attention semantics (docs/design.md, "Why the query is
rotated"): query at position p attends every key of its views with key position <= p; for a
view with delta d the scores are computed as (R(-d) q) . k_cached, which equals attention over
keys re-rotated to their positions in this sequence.

Build one with `build_metadata`: the runner, the collector's reference forward and the tests
all do (only the GPU benchmark assembles its large batches on the device directly).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

ViewRow = tuple[int, int, int, int, int]  # (block, lo, hi, pos0, delta), one row of `views`


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor
    q_pos: torch.Tensor
    slot_mapping: torch.Tensor
    views: torch.Tensor
    num_views: torch.Tensor
    max_seqlen_q: int
    max_views: int
    max_kv_len: int
    block_size: int
    k_pos: torch.Tensor | None = None
    # Per-step values a backend derives once and reuses in every layer (e.g. the torch path's
    # key gather indices and causal masks); they live and die with the metadata of one step.
    step_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1


def build_metadata(view_rows: Sequence[Sequence[ViewRow]], q_pos: Sequence[Sequence[int]], block_size: int,
                   device: torch.device | str = "cpu", slots: Sequence[int] | None = None,
                   k_pos: Sequence[int] | None = None) -> AttentionMetadata:
    """The metadata of one step: per sequence b, its view rows and its query positions.

    `slots` is the flat pool slot of every query token in order (its new K/V is written there);
    None writes nothing (slot -1), as kernel tests that fill the cache themselves want.
    `k_pos` is the rotation position of every new key, in order (None: its own position).
    """
    B = len(view_rows)
    max_views = max((len(rows) for rows in view_rows), default=0)
    views = torch.zeros(B, max(max_views, 1), 5, dtype=torch.int32)
    for b, rows in enumerate(view_rows):
        if rows:
            views[b, :len(rows)] = torch.tensor(rows, dtype=torch.int32)
    lens = [len(p) for p in q_pos]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    flat_pos = [p for ps in q_pos for p in ps]
    slot_mapping = [-1] * len(flat_pos) if slots is None else list(slots)
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        q_pos=torch.tensor(flat_pos, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        views=views.to(device),
        num_views=torch.tensor([len(rows) for rows in view_rows], dtype=torch.int32, device=device),
        max_seqlen_q=max(lens, default=0),
        max_views=max_views,
        max_kv_len=max((sum(hi - lo for _, lo, hi, _, _ in rows) for rows in view_rows), default=0),
        block_size=block_size,
        k_pos=None if k_pos is None else torch.tensor(list(k_pos), dtype=torch.int32, device=device),
    )
