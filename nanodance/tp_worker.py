"""A tensor-parallel worker rank (1..N-1): join the group, load its shard, then replay rank 0's calls.

    worker_main(spec, rank, conn)   # the spawned process's entry point (tp_launch.py starts it)
    build_rank(spec, tp) -> Executor
    serve(executor, control)        # loop: receive a step description -> run it on the shard

A worker owns no scheduling, no block pool and no sampler: it holds its shard of the weights and
a KV cache of its own KV heads, at the same block ids as rank 0's, and runs exactly the executor
calls rank 0 runs, in the same order, so that the collectives inside the model pair up.
It reports its start-up on `conn` ("joining" before it enters the process group, "ready" once its
shard is loaded, or "error" with the reason), so rank 0 never waits on a rank that already died.
Ctrl-C is rank 0's to handle (it shuts the workers down), so workers ignore SIGINT.
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from nanodance import tp_protocol as proto
from nanodance.cache import KVCache
from nanodance.config import ModelConfig
from nanodance.engine_config import EngineConfig
from nanodance.executor import Executor
from nanodance.parallel import TensorParallel


@dataclass(frozen=True)
class GroupSpec:
    """What every rank needs to join the group and build its shard (pickled to spawned workers)."""

    folder: str
    model_config: ModelConfig
    engine_config: EngineConfig
    world: int
    init_method: str  # "tcp://127.0.0.1:port" (spawned on one machine) or "env://" (torchrun)
    timeout_s: float  # NCCL: a step's collective waiting longer fails (gloo: only a closed connection ends a wait)
    threads: int  # torch intra-op threads per worker (CPU)

    def device(self, rank: int, local_rank: int | None = None) -> torch.device:
        """The device of `rank`: CPU for all, or the GPU after the one rank 0 uses (or LOCAL_RANK)."""
        base = self.engine_config.torch_device()
        if base.type != "cuda":
            return base
        return torch.device("cuda", local_rank if local_rank is not None else (base.index or 0) + rank)

    @property
    def backend(self) -> str:
        return "nccl" if self.engine_config.torch_device().type == "cuda" else "gloo"


# Waits on a gloo group end when a peer's connection closes (it died); between calls workers wait
# for rank 0 as long as rank 0 is idle, so no other end is wanted there.
IDLE_TIMEOUT = timedelta(days=30)


def join_group(spec: GroupSpec, rank: int, device: torch.device) -> tuple[TensorParallel, object]:
    """Join the default group (the model's collectives) and return the control group (step descriptions).

    On CPU both are one gloo group. On CUDA the model's collectives run on NCCL with the short
    `timeout_s`, and step descriptions on a gloo group of their own, which idle waits cannot time out.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if spec.backend == "nccl":
        dist.init_process_group("nccl", init_method=spec.init_method, rank=rank, world_size=spec.world,
                                timeout=timedelta(seconds=spec.timeout_s))
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    else:
        dist.init_process_group("gloo", init_method=spec.init_method, rank=rank, world_size=spec.world,
                                timeout=IDLE_TIMEOUT)
        control = None  # the default group
    return TensorParallel(rank, spec.world), control


def build_rank(spec: GroupSpec, tp: TensorParallel, device: torch.device) -> Executor:
    """Load this rank's shard and allocate its KV cache (its KV heads, every block of the pool)."""
    from nanodance.weights import load_model

    cfg, mc = spec.engine_config, spec.model_config
    dtype = cfg.torch_dtype()
    model = load_model(Path(spec.folder), mc, dtype, device, tp)
    # The same pool size as rank 0's Engine computes (engine.py): same options, same shard sizes.
    block_bytes = KVCache.bytes_per_block(mc.num_layers, cfg.block_size, model.kv_heads, mc.head_dim, dtype)
    kv = KVCache.allocate(mc.num_layers, cfg.num_kv_blocks(block_bytes), cfg.block_size, model.kv_heads,
                          mc.head_dim, dtype, device)
    return Executor(model, kv)


def serve(executor: Executor, control) -> None:
    """Run rank 0's calls on this shard until it says SHUTDOWN."""
    device = executor.device
    while True:
        op, ints, cpu_tensors = proto.receive(control)
        tensors = [t.to(device) for t in cpu_tensors]
        if op == proto.SHUTDOWN:
            return
        if op == proto.FORWARD:
            executor.forward(*proto.decode_forward(ints, tensors))
        elif op == proto.DEVIATIONS:
            executor.key_deviations_packed(proto.decode_deviations(ints, tensors))
        elif op == proto.ROTATE_COPY:
            src, dst, delta = tensors
            executor.rotate_copy(src, dst, delta.to(torch.int32))
        else:
            raise RuntimeError(f"unknown tensor-parallel op {op}")


def worker_main(spec: GroupSpec, rank: int, conn) -> None:
    """Entry point of a spawned worker process; exits 0 after SHUTDOWN, 1 if anything failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    try:
        device = spec.device(rank)
        conn.send(("joining", None))
        tp, control = join_group(spec, rank, device)
        executor = build_rank(spec, tp, device)
        conn.send(("ready", None))
    except BaseException as e:  # report why, then die: rank 0 raises it
        _report(conn, e)
        _leave(1)
    try:
        serve(executor, control)
    except BaseException as e:  # rank 0 died or failed a collective: nothing to serve any more
        print(f"nanodance tensor-parallel worker rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        _leave(1)
    _leave(0)


def _leave(status: int) -> None:
    """Exit at once, without tearing the process group down here: gloo's teardown races rank 0's
    and can abort the process (std::terminate); rank 0 destroys the group after this exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_external_worker(spec: GroupSpec, rank: int, local_rank: int | None) -> None:
    """A rank > 0 launched by torchrun (env://): build the shard, serve rank 0, then exit the process."""
    device = spec.device(rank, local_rank)
    torch.set_num_threads(spec.threads)
    tp, control = join_group(spec, rank, device)
    executor = build_rank(spec, tp, device)
    dist.barrier(group=control)  # rank 0 waits here until every shard is loaded
    try:
        serve(executor, control)
    except BaseException as e:
        print(f"nanodance tensor-parallel worker rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        _leave(1)
    _leave(0)


def _report(conn, e: BaseException) -> None:
    try:
        conn.send(("error", f"{type(e).__name__}: {e}"))
    except (OSError, EOFError):
        pass
