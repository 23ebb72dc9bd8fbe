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

Host-side ints: `max_seqlen_q`, `max_views`, `block_size`, and `max_kv_len` (the largest
sum of view lengths of one sequence). Attention semantics (DESIGN.md §3.1): query at position
p attends every key of its views with key position <= p; for a view with delta d the scores
are computed as (R(-d) q) . k_cached, which equals attention over keys re-rotated to their
positions in this sequence.

`kv_gather` is a torch-path helper, built lazily once per step and reused by all layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVGather:
    """Dense gather indices for the torch attention path (one per step, shared by layers).

    slots   int64 [B, L]  flat pool slot of each key (0 for padding)
    pos     int32 [B, L]  key position in the sequence (huge for padding, so it is masked)
    delta   int32 [B, L]  rope delta of the view that holds the key
    any_delta bool        False when every delta is 0 (skip the rotation entirely)
    """

    slots: torch.Tensor
    pos: torch.Tensor
    delta: torch.Tensor
    any_delta: bool


PAD_POS = 2**30  # a key position no query can reach


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
    _gather: KVGather | None = field(default=None, repr=False)
    # Per-step values a backend derives once and reuses in every layer (e.g. the torch path's
    # padded query indices and causal mask); cleared with the metadata after the step.
    step_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    def kv_gather(self) -> KVGather:
        if self._gather is None:
            self._gather = build_kv_gather(self.views, self.num_views, self.block_size, self.max_kv_len)
        return self._gather


def build_kv_gather(views: torch.Tensor, num_views: torch.Tensor, block_size: int, max_kv_len: int) -> KVGather:
    """Expand view rows into per-key slot/position/delta rows (vectorized, no Python per key)."""
    device = views.device
    B, V, _ = views.shape
    L = max(max_kv_len, 1)
    block, lo, hi, pos0, delta = views.long().unbind(-1)  # each [B, V]
    valid_view = torch.arange(V, device=device)[None, :] < num_views.long()[:, None]
    length = torch.where(valid_view, hi - lo, torch.zeros_like(hi))
    start = torch.cumsum(length, dim=1) - length  # offset of each view in the gathered keys
    # For each key column j, find its view: the last view whose start <= j.
    j = torch.arange(L, device=device)
    owner = torch.searchsorted(torch.cumsum(length, dim=1), j[None, :].expand(B, L).contiguous(), right=True)
    total = length.sum(dim=1, keepdim=True)
    valid = j[None, :] < total
    owner = owner.clamp(max=V - 1)
    offset = j[None, :] - torch.gather(start, 1, owner)
    slot = torch.gather(block * block_size + lo, 1, owner) + offset
    pos = torch.gather(pos0, 1, owner) + offset
    dlt = torch.gather(delta, 1, owner)
    slots = torch.where(valid, slot, torch.zeros_like(slot))
    pos = torch.where(valid, pos, torch.full_like(pos, PAD_POS)).to(torch.int32)
    dlt = torch.where(valid, dlt, torch.zeros_like(dlt)).to(torch.int32)
    return KVGather(slots=slots, pos=pos, delta=dlt, any_delta=bool((dlt != 0).any()))
