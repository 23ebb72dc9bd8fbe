"""The executor: every piece of engine work that runs the model or touches the KV tensors, in one
place, so that tensor parallelism can replay it on every rank (docs/design.md, "Tensor parallelism").

    ex = Executor(model, kv_cache)
    ex.forward(input_ids int64 [T], positions int64 [T], meta, logit_rows int64 [N]) -> fp32 [N, vocab] | None
    ex.key_deviations(prompts, check_layer, block_size, queries) -> [fp32 [len(query)] per query]
    ex.rotate_copy(src_slots int64 [C], dst_slots int64 [C], delta int32 [C])   # every layer, in place

The rest of the engine (scheduler, block pool, collector decisions, layouts) is bookkeeping on
host ints and never reads or writes a KV tensor itself: the runner calls `forward`, the
collector `key_deviations`, `pic` layouts `rotate_copy`. On one device these run here. Under
tensor parallelism rank 0's executor (`tp_launch.TPExecutor`) first broadcasts each call to the
worker ranks, whose own `Executor` runs it on their shard; the packed forms (`*_packed`) are what
travels. `forward` returns None when no row samples, and on ranks other than 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nanodance import kernels
from nanodance.attention_metadata import AttentionMetadata, build_metadata
from nanodance.cache import KVCache
from nanodance.model import CausalLM


@dataclass(frozen=True)
class DeviationQuery:
    """Score a master's keys in one prompt's context: prompt `prompt` positions [start, start + len(src_slots))
    against the cached keys at `src_slots`, rotated forward by `delta` (their position shift)."""

    prompt: int  # index into the prompts of the call
    start: int
    src_slots: tuple[int, ...]
    delta: tuple[int, ...]


@dataclass
class DeviationBatch:
    """`key_deviations`' arguments as int64 tensors on the model's device (what a worker receives)."""

    ids: torch.Tensor  # [sum of prompt lengths], the prompts back to back
    prompt_lens: torch.Tensor  # [P]
    queries: torch.Tensor  # [Q, 3]: (prompt, start, length)
    src_slots: torch.Tensor  # [sum of lengths]
    delta: torch.Tensor  # [sum of lengths]
    check_layer: int
    block_size: int


class Executor:
    """Runs model forwards and KV copies on this process's model (or shard) and its KV cache."""

    def __init__(self, model: CausalLM, kv: KVCache):
        self.model, self.kv = model, kv
        self.device = model.inv_freq.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                logit_rows: torch.Tensor) -> torch.Tensor | None:
        """One step's forward over the KV cache; logits of `logit_rows` (None if there are none)."""
        hidden = self.model(input_ids, positions, meta, self.kv.layers)
        if logit_rows.numel() == 0:
            return None
        return self.model.compute_logits(hidden[logit_rows])

    def key_deviations(self, prompts: list[list[int]], check_layer: int, block_size: int,
                       queries: list[DeviationQuery]) -> list[torch.Tensor]:
        """Per query, fp32 [len(query.src_slots)] key deviations at `check_layer` (collector.py)."""
        lengths = [len(q.src_slots) for q in queries]
        dev = self.key_deviations_packed(self.pack_deviations(prompts, check_layer, block_size, queries))
        return list(dev.cpu().split(lengths)) if dev is not None else []

    def pack_deviations(self, prompts: list[list[int]], check_layer: int, block_size: int,
                        queries: list[DeviationQuery]) -> DeviationBatch:
        def longs(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return DeviationBatch(
            ids=longs([t for p in prompts for t in p]), prompt_lens=longs([len(p) for p in prompts]),
            queries=longs([(q.prompt, q.start, len(q.src_slots)) for q in queries]).view(-1, 3),
            src_slots=longs([s for q in queries for s in q.src_slots]),
            delta=longs([d for q in queries for d in q.delta]), check_layer=check_layer, block_size=block_size)

    @torch.inference_mode()
    def key_deviations_packed(self, batch: DeviationBatch) -> torch.Tensor | None:
        """fp32 [sum of query lengths]: one reference forward for all prompts, one deviation kernel.

        Deviation sums over heads, so under tensor parallelism each rank sums its own KV heads and
        the ranks' sums are added (a replicated head counted by its first holder only).
        """
        if batch.queries.shape[0] == 0:
            return None
        lens = batch.prompt_lens.tolist()
        prompts = [p.tolist() for p in batch.ids.split(lens)]
        keys = reference_keys(self.model, prompts, batch.check_layer, batch.block_size, self.kv_dtype, self.device)
        fresh = torch.cat([keys[p][s:s + n] for p, s, n in batch.queries.tolist()])
        dev = kernels.key_deviation(fresh, self.kv.layers[batch.check_layer][0], batch.src_slots,
                                    batch.delta.to(torch.int32), self.model.inv_freq)
        tp = self.model.tp
        if tp.active:
            if not tp.owns_kv_heads(self.model.config):
                dev.zero_()
            tp.all_reduce(dev)
        return dev

    def rotate_copy(self, src_slots: torch.Tensor, dst_slots: torch.Tensor, delta: torch.Tensor) -> None:
        """Copy K/V from src to dst slots in every layer, keys re-rotated by `delta` (the `pic` copies)."""
        for k_cache, v_cache in self.kv.layers:
            kernels.rotate_copy(k_cache, v_cache, src_slots, dst_slots, delta, self.model.inv_freq)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.kv.layers[0][0].dtype


@torch.inference_mode()
def reference_keys(model: CausalLM, prompts: list[list[int]], check_layer: int, block_size: int,
                   dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Exact keys [n_i, Hkv, D] of layer `check_layer` for each prompt, from one batched forward
    of the first `check_layer` layers over a scratch cache (the pool is not touched). Under
    tensor parallelism these are this rank's KV heads."""
    cfg = model.config
    lens = [len(p) for p in prompts]
    blocks_each = [math.ceil(n / block_size) for n in lens]
    scratch = KVCache.allocate(max(check_layer, 1), sum(blocks_each), block_size, model.kv_heads, cfg.head_dim,
                               dtype, device)
    rows, slots, first = [], [], 0
    for n, nb in zip(lens, blocks_each):
        rows.append([(first + j, 0, min(block_size, n - j * block_size), j * block_size, 0) for j in range(nb)])
        slots.extend(first * block_size + p for p in range(n))
        first += nb
    meta = build_metadata(rows, [range(n) for n in lens], block_size, device, slots)
    positions = meta.q_pos.long()
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    hidden = model(ids, positions, meta, scratch.layers, num_layers=check_layer)
    keys = model.layer_keys(check_layer, hidden, positions)
    return list(keys.split(lens))
