"""What rank 0 tells the worker ranks, once per executor call: one compact step description.

    send(op, ints, tensors, group)           # rank 0: header, then one payload, both by dist.broadcast
    op, ints, tensors = receive(group)       # a worker: the same, in the same order (CPU tensors)
    encode_forward(...) / decode_forward(ints, tensors), encode_deviations / decode_deviations

A message is two broadcasts from rank 0: a fixed int64 header [HEADER] (op code, its small ints,
the length of each tensor) and every tensor flattened into one int64 payload, both CPU tensors
over the control group: a gloo group whose timeout outlasts any idle time (workers wait in
`receive` while rank 0 is between calls, for as long as it likes; a dead rank 0 still ends the
wait at once, by a closed connection), so with NCCL the model's own collectives keep their short
timeout while the control plane never times out. Ops:
    FORWARD        input_ids, positions, the AttentionMetadata tensors (slot mapping, views,
                   k_pos...), the rows that sample; every rank runs the forward on its shard
                   and rank 0 gathers the logits
    DEVIATIONS     the collector's reference prompts and (prompt, start, length) queries with the
                   master slots and deltas; every rank scores its KV heads, the sums are reduced
    ROTATE_COPY    `pic` copies: src slots, dst slots, deltas, applied to every layer
    SHUTDOWN       the workers leave the group and exit
Block ids and slots mean the same on every rank: each rank's KV cache holds its own KV heads
of the same blocks, and only rank 0 keeps the pool's bookkeeping.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from nanodance.attention_metadata import AttentionMetadata
from nanodance.executor import DeviationBatch

FORWARD, DEVIATIONS, ROTATE_COPY, SHUTDOWN = 1, 2, 3, 4
HEADER = 32
_MAX_INTS = 12  # header: [op, n_ints, n_tensors, ints (12), tensor lengths (17)]
_MAX_TENSORS = HEADER - 3 - _MAX_INTS


def send(op: int, ints: list[int], tensors: list[torch.Tensor], group) -> None:
    """Rank 0: broadcast one message (the header, then the payload if there is one)."""
    assert len(ints) <= _MAX_INTS and len(tensors) <= _MAX_TENSORS, "message too large for the header"
    header = [op, len(ints), len(tensors)] + ints + [0] * (_MAX_INTS - len(ints))
    header += [t.numel() for t in tensors] + [0] * (_MAX_TENSORS - len(tensors))
    dist.broadcast(torch.tensor(header, dtype=torch.int64), src=0, group=group)
    if any(t.numel() for t in tensors):
        payload = torch.cat([t.reshape(-1).to(device="cpu", dtype=torch.int64) for t in tensors])
        dist.broadcast(payload, src=0, group=group)


def receive(group) -> tuple[int, list[int], list[torch.Tensor]]:
    """A worker: the next message from rank 0 (blocks until it comes): op, ints, int64 CPU tensors."""
    header = torch.empty(HEADER, dtype=torch.int64)
    dist.broadcast(header, src=0, group=group)
    h = header.tolist()
    op, n_ints, n_tensors = h[0], h[1], h[2]
    ints = h[3:3 + n_ints]
    lengths = h[3 + _MAX_INTS:3 + _MAX_INTS + n_tensors]
    payload = torch.empty(sum(lengths), dtype=torch.int64)
    if payload.numel():
        dist.broadcast(payload, src=0, group=group)
    return op, ints, list(payload.split(lengths))


# ---------------------------------------------------------------- FORWARD

def encode_forward(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   logit_rows: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    has_k_pos = meta.k_pos is not None
    ints = [meta.max_seqlen_q, meta.max_views, meta.max_kv_len, meta.block_size, int(has_k_pos),
            meta.views.shape[1]]
    tensors = [input_ids, positions, meta.cu_seqlens_q, meta.q_pos, meta.slot_mapping, meta.views,
               meta.num_views, meta.k_pos if has_k_pos else input_ids[:0], logit_rows]
    return ints, tensors


def decode_forward(ints: list[int], tensors: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    max_seqlen_q, max_views, max_kv_len, block_size, has_k_pos, view_rows = ints
    input_ids, positions, cu, q_pos, slots, views, num_views, k_pos, rows = tensors
    meta = AttentionMetadata(
        cu_seqlens_q=cu.to(torch.int32), q_pos=q_pos.to(torch.int32), slot_mapping=slots,
        views=views.to(torch.int32).view(-1, view_rows, 5), num_views=num_views.to(torch.int32),
        max_seqlen_q=max_seqlen_q, max_views=max_views, max_kv_len=max_kv_len, block_size=block_size,
        k_pos=k_pos.to(torch.int32) if has_k_pos else None)
    return input_ids, positions, meta, rows


# ---------------------------------------------------------------- DEVIATIONS

def encode_deviations(batch: DeviationBatch) -> tuple[list[int], list[torch.Tensor]]:
    return [batch.check_layer, batch.block_size], [batch.ids, batch.prompt_lens, batch.queries, batch.src_slots,
                                                   batch.delta]


def decode_deviations(ints: list[int], tensors: list[torch.Tensor]) -> DeviationBatch:
    ids, prompt_lens, queries, src, delta = tensors
    return DeviationBatch(ids, prompt_lens, queries.view(-1, 3), src, delta, check_layer=ints[0], block_size=ints[1])
