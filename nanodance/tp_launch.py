"""Rank 0 of tensor parallelism: start the workers, drive them, notice a dead one, shut them down.

    group = TPGroup.start(folder, model_config, cfg)  # spawn ranks 1..N-1 (or join torchrun's group)
    model = load_model(folder, model_config, dtype, group.device, group.tp)   # rank 0's own shard
    group.wait_ready()                                # every worker has loaded its shard
    Engine(cfg, model, tokenizer, sampler, make_executor=group.executor)
    group.shutdown()                                  # idempotent; LLM also runs it on GC and at exit

Rank 0 is the engine process itself: its scheduler, block pool, collector and sampler are the
only ones; its `TPExecutor` broadcasts every executor call (tp_protocol.py) and then runs it on
its own shard, taking part in the collectives like any rank. Workers are `torch.multiprocessing`
spawn processes on this machine (gloo on CPU, NCCL on CUDA), or, under `torchrun` (RANK,
WORLD_SIZE, MASTER_ADDR... set), the other ranks of torchrun's job on any node: there each rank
runs the same script, and `LLM(...)` on a rank > 0 serves rank 0 and then exits the process.

Faults: before each call rank 0 checks its workers are alive; a collective that fails (a closed
connection is noticed at once; an NCCL collective also fails after `TIMEOUT_S`) or any exception
during a call (Ctrl-C included: the ranks would no longer be in step) shuts every worker down
and raises `WorkerDiedError` naming the dead rank, or `TensorParallelError`. Later calls raise
`TensorParallelError`: the LLM cannot run the model again. Not detected: a worker that hangs
while alive, on CPU (gloo waits have no deadline, so that workers may idle between calls for as
long as rank 0 does).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from typing import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanodance import tp_protocol as proto
from nanodance.cache import KVCache
from nanodance.config import ModelConfig
from nanodance.engine_config import EngineConfig
from nanodance.errors import RequestError, TensorParallelError, WorkerDiedError
from nanodance.executor import DeviationBatch, Executor
from nanodance.model import CausalLM
from nanodance.parallel import TensorParallel
from nanodance.tp_worker import GroupSpec, join_group, run_external_worker, worker_main

TIMEOUT_S = 300.0  # joining the group, or (NCCL) one step's collective, waiting this long fails
_REAP_S = 3.0  # after a failed collective, how long a dying worker gets to be seen dead


class TPGroup:
    """Rank 0's handle on the group: worker processes, their start-up pipes, and whether it still serves."""

    def __init__(self, spec: GroupSpec, processes: list, conns: list):
        self.spec, self.processes, self.conns = spec, processes, conns
        self.tp = TensorParallel(0, spec.world)
        self.device = spec.device(0)
        self.control = None  # the group step descriptions go over (tp_worker.join_group)
        self.closed: str | None = None  # why the group stopped serving, once it has

    # ------------------------------------------------------------------ start-up

    @classmethod
    def start(cls, folder, model_config: ModelConfig, cfg: EngineConfig) -> "TPGroup":
        """Start (or, under torchrun, join) the group; on a torchrun rank > 0 serve, then exit."""
        world = cfg.tensor_parallel_size
        if dist.is_available() and dist.is_initialized():
            raise RequestError("a torch.distributed process group already exists in this process: one tensor-parallel "
                               "LLM per process at a time; call shutdown() on the other LLM first")
        threads = min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) // world))
        launched = _torchrun_ranks()
        if launched is not None:
            rank, env_world, local_rank = launched
            if env_world != world:
                raise RequestError(f"torchrun started {env_world} processes (WORLD_SIZE) but tensor_parallel_size="
                                   f"{world}; launch with as many processes in all as tensor_parallel_size")
            spec = GroupSpec(str(folder), model_config, cfg, world, "env://", TIMEOUT_S, threads)
            if rank != 0:
                run_external_worker(spec, rank, local_rank)
                raise SystemExit(0)
            group = cls(spec, [], [])
            group.device = spec.device(0, local_rank)
            _, group.control = join_group(spec, 0, group.device)
            return group
        spec = GroupSpec(str(folder), model_config, cfg, world, f"tcp://127.0.0.1:{_free_port()}", TIMEOUT_S, threads)
        ctx = mp.get_context("spawn")
        group = cls(spec, [], [])
        try:
            for rank in range(1, world):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=worker_main, args=(spec, rank, writer), daemon=True,
                                   name=f"nanodance-tp-rank{rank}")
                proc.start()
                writer.close()
                group.processes.append(proc)
                group.conns.append(reader)
            group._await("joining", spec.timeout_s)
            _, group.control = join_group(spec, 0, group.device)
        except BaseException:
            group.shutdown(healthy=False, reason="start-up failed")
            raise
        return group

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard (a failed or dead one raises)."""
        if self.processes:
            self._await("ready", None)  # loading a large shard takes what it takes, while the worker lives
        else:
            dist.barrier(group=self.control)  # torchrun: the other ranks pass it after loading

    def _await(self, state: str, timeout_s: float | None) -> None:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
        for rank, (proc, conn) in enumerate(zip(self.processes, self.conns), start=1):
            while True:
                if conn.poll(0.05):
                    try:
                        kind, message = conn.recv()
                    except EOFError:  # it closed its end: it is dying
                        proc.join(_REAP_S)
                        raise WorkerDiedError(f"tensor-parallel worker rank {rank} {_how_ended(proc)} while starting")
                    if kind == "error":
                        raise TensorParallelError(f"tensor-parallel worker rank {rank} failed to start: {message}")
                    if kind == state:
                        break
                elif not proc.is_alive():
                    raise WorkerDiedError(f"tensor-parallel worker rank {rank} {_how_ended(proc)} while starting")
                elif time.monotonic() > deadline:
                    raise TensorParallelError(f"tensor-parallel worker rank {rank} did not start within "
                                              f"{timeout_s:.0f} s")

    def executor(self, model: CausalLM, kv: KVCache) -> "TPExecutor":
        """The Engine's executor factory: rank 0's executor, which drives this group."""
        return TPExecutor(model, kv, self)

    # ------------------------------------------------------------------ calls and faults

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Around one executor call: refuse if the group is down; on any failure shut it down and say why."""
        if self.closed is not None:
            raise TensorParallelError(f"the tensor-parallel group is shut down ({self.closed}); make a new LLM")
        dead = self._dead()
        if dead:
            error = self._died(dead)
            self.shutdown(healthy=False, reason=str(error))
            raise error
        try:
            yield
        except BaseException as e:
            dead = self._dead(wait_s=_REAP_S)
            error = (self._died(dead) if dead else
                     TensorParallelError(f"a tensor-parallel step failed on rank 0 ({type(e).__name__}: {e}); the "
                                         f"workers were shut down; make a new LLM"))
            self.shutdown(healthy=False, reason=str(error))
            if isinstance(e, KeyboardInterrupt):
                raise  # Ctrl-C stays Ctrl-C; the workers are down already
            raise error from e

    def _dead(self, wait_s: float = 0.0) -> list[int]:
        """Ranks whose process has ended (waiting up to `wait_s` for one to be seen dead)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [r for r, p in enumerate(self.processes, start=1) if not p.is_alive()]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _died(self, ranks: list[int]) -> WorkerDiedError:
        how = "; ".join(f"rank {r} (pid {self.processes[r - 1].pid}) {_how_ended(self.processes[r - 1])}"
                        for r in ranks)
        return WorkerDiedError(f"tensor-parallel worker died: {how}; the other workers were shut down and this LLM "
                               f"cannot run the model any more; make a new LLM")

    def shutdown(self, healthy: bool = True, reason: str = "shut down") -> None:
        """Stop every worker and leave the process group. Idempotent; safe from a finalizer."""
        if self.closed is not None:
            return
        self.closed = reason
        if healthy and not self._dead() and dist.is_initialized():
            with contextlib.suppress(Exception):
                proto.send(proto.SHUTDOWN, [], [], self.control)
        for proc in self.processes:
            proc.join(5.0 if healthy else 0.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        for conn in self.conns:
            conn.close()
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class TPExecutor(Executor):
    """Rank 0's executor: broadcast each call to the workers, then run it on rank 0's own shard."""

    def __init__(self, model: CausalLM, kv: KVCache, group: TPGroup):
        super().__init__(model, kv)
        self.group = group

    def forward(self, input_ids, positions, meta, logit_rows):
        with self.group.call():
            ints, tensors = proto.encode_forward(input_ids, positions, meta, logit_rows)
            proto.send(proto.FORWARD, ints, tensors, self.group.control)
            return super().forward(input_ids, positions, meta, logit_rows)

    def key_deviations_packed(self, batch: DeviationBatch):
        if batch.queries.shape[0] == 0:
            return None  # nothing to score: no rank runs anything
        with self.group.call():
            ints, tensors = proto.encode_deviations(batch)
            proto.send(proto.DEVIATIONS, ints, tensors, self.group.control)
            return super().key_deviations_packed(batch)

    def rotate_copy(self, src_slots, dst_slots, delta):
        with self.group.call():
            proto.send(proto.ROTATE_COPY, [], [src_slots, dst_slots, delta], self.group.control)
            super().rotate_copy(src_slots, dst_slots, delta)


def _how_ended(proc) -> str:
    code = proc.exitcode
    if code is None:
        return "is not responding"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_ranks() -> tuple[int, int, int | None] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) when a launcher such as torchrun started this process, else None."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env:
        return None
    local = env.get("LOCAL_RANK")
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(local) if local is not None else None
