"""The engine loop: one `step()` = schedule, run the model, postprocess; and the loop around it.

    engine = Engine(config, model, tokenizer)
    engine.step()        # scheduler.schedule() -> runner.run(chunks) -> postprocess(chunks, tokens)

The engine owns the pieces and wires them in one direction: the scheduler (queues, blocks,
preemption) asks `RoundLayouts` (the plans the collector made) to lay out round requests at
admission; the runner turns a step's chunks into one forward pass of the model; after the step
the engine keeps what later rounds reuse of each finished request (a producer's output as next
round's master, a persistent agent's cache), then the scheduler frees the rest. The forward, the
collector's scoring and the `pic` copies all go through one executor (executor.py), the only
part that touches the model and the KV tensors; under tensor parallelism `make_executor` gives
rank 0's, which replays each call on every rank.

One call (a `generate` or `run_round`) is in flight at a time. Its call-scoped state (its
requests, the aborts asked for them, when each prompt finished prefilling) lives in one `Call`
object in one slot, `engine.call`, set by `serving()` and cleared after, whatever happens.

Under memory pressure (a step that can schedule nothing) the engine first gives up what only
saves work later (persistent agents' kept caches, then pinned outputs and masters that no
unfinished request needs), then fails the head-of-line request alone (`finish_reason="error"`).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from nanodance.agents import AgentCache, AgentCaches
from nanodance.auto_shared import OutputIndex
from nanodance.cache import BlockPool, KVCache, View
from nanodance.collector import Collector
from nanodance.config import ModelConfig
from nanodance.engine_config import EngineConfig
from nanodance.errors import CapacityError, RequestError
from nanodance.executor import Executor
from nanodance.layout import RoundLayouts, plan_agent
from nanodance.model import CausalLM
from nanodance.progress import Progress
from nanodance.runner import ModelRunner, Sampler, default_sampler
from nanodance.sampling import SamplingParams, TokenLogprobs
from nanodance.scheduler import Scheduler, StepResult
from nanodance.segments import SharedSpan
from nanodance.sequence import Sequence

logger = logging.getLogger("nanodance")


@dataclass
class RequestOutput:
    request_id: int
    prompt: Any
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # generated tokens (a final stop/eos token included)
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"; None in `on_step` snapshots of running requests
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache (first admission)
    num_reused_tokens: int = 0  # prompt positions whose K/V was not computed (prefix hits, masters, a kept cache)
    num_preemptions: int = 0
    error: str | None = None
    stopped_by_token: bool = False  # the last token is an eos / stop id (not part of a Shared block)
    engine_id: str = ""  # which LLM produced it (Shared(output) is only valid on that engine)
    logprobs: list[TokenLogprobs] | None = None  # per generated token, when SamplingParams.logprobs is set


@dataclass
class EngineCounters:
    """How often the engine degraded or refused work instead of failing a whole call, and what
    automatic shared-span matching found (auto_shared.py)."""

    kept_caches_dropped: int = 0  # persistent agents' kept caches released under pool pressure
    outputs_unpinned: int = 0  # pinned round outputs released under pool pressure
    requests_failed: int = 0  # requests finished with "error" (could never fit)
    requests_aborted: int = 0  # requests finished with "abort"
    requests_finished: int = 0  # requests that finished normally ("stop" or "length")
    auto_shared_spans: int = 0  # spans of earlier outputs found in prompts
    auto_shared_tokens: int = 0  # prompt tokens they cover
    auto_shared_seconds: float = 0.0  # time spent searching prompts


StepCallback = Callable[[list[RequestOutput]], None]


@dataclass
class Prefilled:
    """A request's prompt, the moment its prefill completed: what the round's accounting reads."""

    seconds: float  # time.perf_counter() then
    views: list[View]  # its views over prompt positions
    blocks: list[tuple[int, int]]  # (block, allocation serial) of those views: tells reuses of a block apart
    reused: int  # prompt positions it did not compute (prefix hits, master views, a kept cache)


@dataclass
class Call:
    """The call in flight: its requests by id, the aborts asked for them, prefill completions."""

    seqs: dict[int, Sequence]
    aborts: set[int] = field(default_factory=set)
    prefilled: dict[int, Prefilled] = field(default_factory=dict)  # by request id
    joined: list[Sequence] = field(default_factory=list)  # plain requests that joined it in flight (`join`)
    held: list[Sequence] = field(default_factory=list)  # samples 2..n waiting for their first's prefill


ExecutorFactory = Callable[[CausalLM, KVCache], Executor]  # Executor, or tensor parallelism's rank-0 driver


class Engine:
    def __init__(self, cfg: EngineConfig, model: CausalLM, tokenizer, sampler: Sampler = default_sampler,
                 make_executor: ExecutorFactory = Executor):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.model_config: ModelConfig = model.config
        mc = self.model_config
        self.dtype, self.device = cfg.torch_dtype(), cfg.torch_device()
        # model.kv_heads: all KV heads on one device, this rank's under tensor parallelism (bytes per rank).
        self.block_bytes = KVCache.bytes_per_block(mc.num_layers, cfg.block_size, model.kv_heads, mc.head_dim,
                                                   self.dtype)
        num_blocks = cfg.num_kv_blocks(self.block_bytes)
        # Every mode but "none" keeps vLLM-style prefix caching of exact leading blocks.
        self.pool = BlockPool(num_blocks, cfg.block_size, enable_prefix_caching=cfg.reuse != "none")
        self.kv_cache = KVCache.allocate(mc.num_layers, num_blocks, cfg.block_size, model.kv_heads, mc.head_dim,
                                         self.dtype, self.device)
        # Everything that runs the model or touches KV tensors goes through the executor.
        self.executor = make_executor(model, self.kv_cache)
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        self.collector = Collector(cfg, self.executor, self.pool) if cfg.uses_collector else None
        self.layouts = RoundLayouts(self.pool, self.executor)
        eos = set(mc.eos_token_ids) | (set(tokenizer.eos_token_ids) if tokenizer else set())
        self.scheduler = Scheduler(self.pool, cfg.max_num_seqs, cfg.max_num_batched_tokens, eos,
                                   layouts=self.layouts)
        self.runner = ModelRunner(self.executor, self.pool, self.device, sampler)
        self.agents = AgentCaches(self.pool)
        # Recent outputs, to find in later prompts (used when cfg.finds_shared; kept either way so
        # that `auto_shared` can be switched on by reconfigure).
        self.output_index = OutputIndex(capacity=cfg.auto_shared_outputs) if cfg.uses_collector else None
        self.counters = EngineCounters()
        self.round_history: list[dict] = []
        # Not id(self): an id is reused once an engine is collected, and an output of the dead
        # engine would then pass for one of this engine.
        self.engine_id = uuid.uuid4().hex
        self._generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._ids = itertools.count()
        self.call: Call | None = None

    # ------------------------------------------------------------------ requests

    def make_sequence(self, ids: list[int], params: SamplingParams, prompt: Any = None,
                      prefill_only: bool = False) -> Sequence:
        max_len = self.pool.num_blocks * self.pool.block_size
        if not prefill_only:
            max_len = min(self.max_model_len, max_len)
        seq = Sequence(seq_id=next(self._ids), prompt_token_ids=ids, params=params, max_len=max_len, prompt=prompt,
                       prefill_only=prefill_only)
        seq.pending = list(range(len(ids)))
        seq.generator = (torch.Generator(device=self.device).manual_seed(params.seed)
                         if params.seed is not None else self._generator)
        if self.tokenizer is not None and not prefill_only:
            seq.decoder = self.tokenizer.incremental_decoder()
        return seq

    def find_shared(self, ids: list[int], taken: list[tuple[int, int]] = ()) -> list[SharedSpan]:
        """Runs of `ids` (outside `taken`) that are recent outputs, as shared spans (auto_shared.py)."""
        if not self.cfg.finds_shared:
            return []
        t0 = time.perf_counter()
        spans = self.output_index.find_spans(ids, self.cfg.auto_shared_threshold, taken)
        self.counters.auto_shared_seconds += time.perf_counter() - t0
        self.counters.auto_shared_spans += len(spans)
        self.counters.auto_shared_tokens += sum(sp.length for sp in spans)
        return spans

    def capacity_error(self, seq: Sequence) -> str | None:
        """Why `seq` can never run (too long for the model or the pool), or None."""
        n = seq.num_prompt_tokens
        if n > self.max_model_len and not seq.prefill_only:
            return f"prompt has {n} tokens, more than max_model_len={self.max_model_len}"
        capacity = self.pool.num_blocks * self.pool.block_size
        if n > capacity:
            return (f"prompt has {n} tokens, more than the whole KV pool holds ({self.pool.num_blocks} blocks x "
                    f"{self.pool.block_size} = {capacity} tokens); raise kv_cache_blocks")
        return None

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id, prompt=seq.prompt, prompt_token_ids=list(seq.prompt_token_ids), text=seq.text,
            token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
            num_reused_tokens=seq.reused_positions,
            num_preemptions=seq.num_preemptions, error=seq.error, stopped_by_token=seq.stopped_by_token,
            engine_id=self.engine_id,
            logprobs=list(seq.logprobs[:len(seq.output_token_ids)]) if seq.params.logprobs is not None else None)

    # ------------------------------------------------------------------ the call in flight

    @contextlib.contextmanager
    def serving(self, seqs: list[Sequence]):
        """Make `seqs` the call in flight (abortable); forget them and their aborts after."""
        self.check_idle()
        self.call = Call({s.seq_id: s for s in seqs})
        try:
            yield self.call
        finally:
            self.call = None
            self.layouts.plans = {}
            self.agents.end_call()

    def check_idle(self) -> None:
        if self.call is not None:
            raise RequestError("this LLM is already running a generate() or run_round() call (called from "
                               "on_step?); it serves one call at a time")

    def abort(self, request_id: int) -> bool:
        """Ask to stop a request of the call in flight at the next step; False if unknown or finished."""
        call = self.call  # read once: another thread may be ending the call
        seq = call.seqs.get(request_id) if call is not None else None
        if seq is None or seq.is_finished:
            return False
        call.aborts.add(request_id)
        return True

    def reconfigure(self, cfg: EngineConfig) -> None:
        """New reuse options between calls (the collector reads them from the next round on)."""
        self.check_idle()
        self.cfg = cfg
        if self.collector is not None:
            self.collector.cfg = cfg

    # ------------------------------------------------------------------ one step

    def step(self) -> StepResult:
        """Schedule, run the model, postprocess. A step that can schedule nothing frees memory
        (or fails the head-of-line request) instead, so the next one can."""
        if not self.scheduler.has_work():
            return StepResult()
        chunks = self.scheduler.schedule()
        if not chunks:
            self._relieve_pressure()
            return StepResult()
        tokens = self.runner.run(chunks)
        return self.postprocess(self.scheduler.postprocess(chunks, tokens))

    def postprocess(self, result: StepResult) -> StepResult:
        """Record prefill completions; keep what later rounds reuse of finished requests, free the rest."""
        now = time.perf_counter()
        for seq in result.prefilled:
            if self.call is not None:
                views = [v for v in seq.views if v.pos0 < seq.num_prompt_tokens]
                blocks = [(v.block, self.pool.blocks[v.block].serial) for v in views]
                self.call.prefilled[seq.seq_id] = Prefilled(now, views, blocks, seq.reused_positions)
        for seq in result.finished:
            if seq.prefill_only:
                continue  # a master: its views now belong to the collector
            if seq.finish_reason not in ("error", "abort"):
                if seq.pin_output:
                    self.collector.pin_output(seq)
                if seq.agent_id is not None:
                    self.agents.keep(seq)
                if self.output_index is not None and seq.output_token_ids:
                    self.output_index.add(self.output(seq))
                self.counters.requests_finished += 1
            self.scheduler.release(seq)
        return result

    # ------------------------------------------------------------------ the loop

    def run(self, seqs: list[Sequence], progress: Progress | None = None,
            on_step: StepCallback | None = None) -> None:
        """Queue `seqs` (failing alone those that can never fit) and step until all are finished."""
        if on_step is None:
            for _ in self.iterate(seqs, progress):
                pass
        else:
            for snapshot in self.snapshots(seqs, progress):
                on_step(snapshot)

    def snapshots(self, seqs: list[Sequence], progress: Progress | None = None) -> Iterator[list[RequestOutput]]:
        """`iterate`, as the outputs of `seqs` after every step that prefilled, finished or ran something."""
        for ran in self.iterate(seqs, progress):
            if ran.prefilled or ran.finished or self.scheduler.running:
                yield [self.output(s) for s in seqs]

    def iterate(self, seqs: list[Sequence], progress: Progress | None = None) -> Iterator[StepResult]:
        """`run`, one step at a time: yields after every engine step until all of `seqs` finished.

        On an exception (or Ctrl-C, or the caller closing the iterator early) every unfinished
        request is aborted, so nothing half-run keeps blocks, and a step that was scheduled but
        never ran unpublishes its blocks.

        Samples 2..n of a prompt (`sample_of`) wait until the first's prompt is prefilled: they
        then find its full blocks in the prefix cache instead of computing them again.
        """
        call = self.call
        held = call.held if call is not None else []
        self._queue(seqs)
        progress = progress or Progress(seqs, enabled=False)
        progress.begin(self.scheduler.counters)
        try:
            while True:
                self._apply_aborts()
                ready = [s for s in held if s.sample_of.seq_id in call.prefilled or s.sample_of.is_finished
                         or not self.scheduler.has_work()]
                if ready:
                    held[:] = [s for s in held if s not in ready]
                    self._queue(ready)
                if not self.scheduler.has_work():
                    break
                ran = self.step()
                progress.update(self.scheduler.counters)
                yield ran
        finally:
            progress.close()
            self.scheduler.forget_unwritten()
            for seq in [*seqs, *(call.joined if call is not None else [])]:
                if not seq.is_finished:
                    self.scheduler.abort(seq)
                    self.counters.requests_aborted += not seq.prefill_only

    def join(self, seqs: list[Sequence]) -> None:
        """Add plain requests (no round layout) to the call in flight, between two of its steps:
        the scheduler batches them with it, the call's loop runs until they finish too, and they
        can be aborted like its own. The caller reads their outputs (`output(seq)`)."""
        call = self.call
        if call is None:
            raise RequestError("no call is in flight to join")
        for seq in seqs:
            call.seqs[seq.seq_id] = seq
        call.joined.extend(seqs)
        self._queue(seqs)

    def _queue(self, seqs: list[Sequence]) -> None:
        """Add to the scheduler (samples 2..n to the call's `held`); fail alone a request that can never fit."""
        for seq in seqs:
            if seq.is_finished:  # aborted before it was queued (while the masters were prefilled)
                continue
            waits = seq.sample_of is not None and not seq.sample_of.is_finished and self.scheduler.has_work()
            if waits and self.call is not None and seq.sample_of.seq_id not in self.call.prefilled:
                self.call.held.append(seq)
                continue
            problem = self.capacity_error(seq)
            if problem is not None:
                self._fail(seq, problem)
            else:
                self.scheduler.add(seq)

    def prefill_masters(self, id_lists: list[list[int]],
                        leads: list[AgentCache | None] | None = None) -> list[Sequence]:
        """Prefill masters (no sampling) in one batch; their views stay referenced.

        `leads[i]`, when given, is a persistent agent's kept cache that prompt i (a reference
        agent's carrier) extends: its views are handed over and only the rest is computed."""
        seqs = [self.make_sequence(ids, SamplingParams(max_tokens=1), prefill_only=True) for ids in id_lists]
        for seq in seqs:
            problem = self.capacity_error(seq)
            if problem is not None:
                raise CapacityError(f"a shared block cannot be prefilled: {problem}")
        for seq, lead in zip(seqs, leads or []):
            if lead is not None:
                lead.truncate(min(len(lead.token_ids), seq.num_prompt_tokens - 1), self.pool)  # one token computes
                self.layouts.plans[seq.seq_id] = plan_agent(seq.num_prompt_tokens, [], {}, {}, own=lead)
        try:
            self.run(seqs)
        except BaseException:
            # The masters prefilled before the failure hold views that nobody will take over.
            for seq in seqs:
                self.pool.release(seq.views)
                seq.replace_views([])
            raise
        return seqs

    def _apply_aborts(self) -> None:
        call = self.call
        while call is not None and call.aborts:
            seq = call.seqs.get(call.aborts.pop())
            if seq is not None and not seq.is_finished:
                self.scheduler.abort(seq)
                self.counters.requests_aborted += 1

    def _fail(self, seq: Sequence, problem: str) -> None:
        logger.warning("request %d failed: %s", seq.seq_id, problem)
        self.scheduler.abort(seq, "error", str(CapacityError(problem)))
        self.counters.requests_failed += 1

    def _relieve_pressure(self) -> None:
        """The pool is stuck: free what only saves work later, else fail the head-of-line request.

        First the kept caches of persistent agents (they recompute), then the masters and pinned
        round outputs that no unfinished request of this call lays out; a pinned output's next
        use prefills it instead.
        """
        dropped = self.agents.drop_all()
        if dropped:
            self.counters.kept_caches_dropped += dropped
            logger.warning("KV pool full: dropped %d kept caches of persistent agents to make room", dropped)
            return
        if self.collector is not None:
            unfinished = {sid for sid, s in self.call.seqs.items() if not s.is_finished} if self.call else set()
            outputs, masters = self.collector.release_idle(self.layouts.masters_needed(unfinished))
            self.counters.outputs_unpinned += outputs
            if outputs or masters:
                logger.warning("KV pool full: released %d pinned round outputs and %d masters no waiting request "
                               "needs", outputs, masters)
                return
        self._fail_head_of_line()

    def _fail_head_of_line(self) -> None:
        """Nothing runs and the first waiting request cannot be admitted: it fails alone."""
        if not self.scheduler.waiting:
            raise RuntimeError("engine bug: a step scheduled nothing, yet no request waits")
        seq = self.scheduler.waiting[0]
        pool = self.pool
        need = math.ceil(seq.num_tokens / pool.block_size)
        if seq.prefill_only:
            raise CapacityError(
                f"a shared block of {seq.num_tokens} tokens (about {need} blocks) cannot be prefilled: {pool.num_used} "
                f"of the pool's {pool.num_blocks} blocks hold the round's other masters and the pinned outputs it "
                f"reuses; raise kv_cache_blocks or use fewer or shorter shared blocks per round")
        self._fail(seq, f"request {seq.seq_id} ({seq.num_tokens} tokens, about {need} blocks) cannot get KV blocks: "
                        f"{pool.num_used} of the pool's {pool.num_blocks} blocks are held by the shared masters that "
                        f"this round's waiting requests need; raise kv_cache_blocks or run fewer agents (or shorter "
                        f"shared blocks) per round")

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        """Engine counters since construction (cumulative) and the pool's state now (see README)."""
        pool, sc = self.pool, self.scheduler.counters
        return {
            "reuse": self.cfg.reuse,
            "blocks_total": pool.num_blocks,
            "blocks_used": pool.num_used,
            "blocks_cached": pool.num_hashed,
            "blocks_free": pool.num_free,
            "block_bytes": self.block_bytes,
            "kv_bytes_used": pool.num_used * self.block_bytes,
            "prefill_tokens_computed": sc.prefill_tokens_computed,
            "prefill_tokens_reused": sc.prefill_tokens_reused,
            "decode_tokens": sc.decode_tokens,
            "preemptions": sc.preemptions,
            "steps": sc.steps,
            "prefix_cache_queries": pool.counters.prefix_queries,
            "prefix_cache_hits": pool.counters.prefix_hits,
            "rounds": len(self.round_history),
            "persistent_agents": len(self.agents),
            **vars(self.counters),
            **({f"collector_{k}": v for k, v in vars(self.collector.counters).items()} if self.collector else {}),
        }

    def check_invariants(self) -> None:
        """AssertionError unless every block's ref count equals the references its holders hold.

        Holders: queued requests' views, kept caches of persistent agents (also those a round
        took out but did not use yet), pinned round outputs and the round's standalone masters.
        """
        sc = self.scheduler
        held = [s.views for s in (*sc.running, *sc.waiting)]
        held += list(self.agents.holders())
        if self.collector is not None:
            held += list(self.collector.holders())
        self.pool.check_invariants(holders=[[v.block for v in views] for views in held])
