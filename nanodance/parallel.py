"""Tensor parallelism's arithmetic and collectives: which rows of each weight a rank holds, and
the three collectives the sharded model needs (docs/design.md, "Tensor parallelism").

    tp = TensorParallel(rank, world)          # SINGLE = TensorParallel(0, 1): one device, no collectives
    tp.q_heads(cfg), tp.kv_heads(cfg)         # this rank's query / KV heads (ranges of head indices)
    tp.split(n)                               # this rank's part of an evenly split dimension (intermediate)
    tp.vocab(V)                               # this rank's vocabulary rows (the last part may be short)
    tp.all_reduce(x)                          # sum over ranks, in place (row-parallel outputs, embeddings)
    tp.gather_vocab(logits [N, v_local], V)   # -> fp32 [N, V] on rank 0, None on the others
    check_split(cfg, world, device)           # RequestError, with the fix, for a split that cannot work

Megatron sharding: q/k/v and gate/up are column-parallel (each rank computes its heads and its
part of the intermediate), o_proj and down_proj row-parallel (each rank's partial product is
summed by one all-reduce), embedding and LM head vocab-parallel. KV heads are split across
ranks; when there are fewer KV heads than ranks each is replicated on `world / num_kv_heads`
ranks (rank r holds head r * num_kv_heads // world), as vLLM does, so every rank still holds
the KV heads its own query heads read.

The collectives use torch.distributed's default process group (gloo on CPU, NCCL on CUDA), which
`tp_launch.py` creates and destroys; with world 1 every collective is the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanodance.config import ModelConfig
from nanodance.errors import RequestError


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group: its rank among `world` ranks."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ shard arithmetic

    def split(self, n: int) -> range:
        """This rank's part of a dimension of `n` split evenly (check_split made sure it divides)."""
        part = n // self.world
        return range(self.rank * part, (self.rank + 1) * part)

    def q_heads(self, cfg: ModelConfig) -> range:
        return self.split(cfg.num_heads)

    def kv_heads(self, cfg: ModelConfig) -> range:
        """KV heads of this rank: an even split, or one replicated head when there are fewer heads than ranks."""
        if cfg.num_kv_heads >= self.world:
            return self.split(cfg.num_kv_heads)
        head = self.rank * cfg.num_kv_heads // self.world
        return range(head, head + 1)

    def owns_kv_heads(self, cfg: ModelConfig) -> bool:
        """Is this rank the first holder of its KV heads? Sums over heads count each head once so."""
        if cfg.num_kv_heads >= self.world:
            return True
        return self.rank % (self.world // cfg.num_kv_heads) == 0

    def vocab_part(self, vocab_size: int) -> int:
        """Rows of every rank's vocabulary part but perhaps the last (which holds the rest)."""
        return math.ceil(vocab_size / self.world)

    def vocab(self, vocab_size: int) -> range:
        part = self.vocab_part(vocab_size)
        return range(min(vocab_size, self.rank * part), min(vocab_size, (self.rank + 1) * part))

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over ranks, in place (the identity on one device)."""
        if self.active:
            dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """This rank's logits [N, its vocab rows] -> all of them, fp32 [N, vocab_size], on rank 0.

        Every rank's part is padded to the same width (`dist.gather` takes equal shapes); the
        other ranks get None: only rank 0 samples.
        """
        if not self.active:
            return logits
        part = self.vocab_part(vocab_size)
        if logits.shape[1] < part:
            logits = torch.nn.functional.pad(logits, (0, part - logits.shape[1]))
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=1)[:, :vocab_size] if parts is not None else None


SINGLE = TensorParallel()


def check_split(cfg: ModelConfig, world: int, device: torch.device) -> None:
    """RequestError, naming the fix, unless `cfg` can be split over `world` ranks on `device`'s kind.

    Checked before any process starts or any weight loads. The vocabulary needs no check: its
    last part may be shorter.
    """
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise RequestError(f"tensor_parallel_size must be a positive int, got {world!r}")
    if world == 1:
        return
    sizes = [n for n in range(1, cfg.num_heads + 1) if _fits(cfg, n)]  # a split never exceeds the heads
    fix = f"; this model splits over tensor_parallel_size in {sizes[:8]}"
    if cfg.num_heads % world:
        raise RequestError(f"tensor_parallel_size={world} does not divide the model's {cfg.num_heads} attention "
                           f"heads{fix}")
    kv = cfg.num_kv_heads
    if kv % world and world % kv:
        raise RequestError(f"tensor_parallel_size={world} neither divides the model's {kv} KV heads nor is a "
                           f"multiple of them (then each KV head is replicated){fix}")
    if cfg.intermediate_size % world:
        raise RequestError(f"tensor_parallel_size={world} does not divide the model's intermediate size "
                           f"{cfg.intermediate_size}{fix}")
    if device.type == "cuda":
        first = device.index or 0
        count = torch.cuda.device_count()
        if first + world > count:
            raise RequestError(f"tensor_parallel_size={world} needs GPUs {first}..{first + world - 1}, but "
                               f"{count} are visible; use tensor_parallel_size <= {count - first}, or run on CPU "
                               f"processes with device='cpu'")


def _fits(cfg: ModelConfig, world: int) -> bool:
    kv = cfg.num_kv_heads
    return cfg.num_heads % world == 0 and (kv % world == 0 or world % kv == 0) and cfg.intermediate_size % world == 0
