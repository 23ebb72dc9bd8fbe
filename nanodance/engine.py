"""`LLM`: the public engine. Loads a model, owns the KV pool, runs `generate`.

    llm = LLM()                                  # bundled SmolLM2-135M-Instruct, offline
    outs = llm.generate(["Hi", [1, 2, 3], [{"role": "user", "content": "Hi"}]],
                        SamplingParams(temperature=0, max_tokens=32))
    outs[i].text, outs[i].token_ids, outs[i].finish_reason, llm.stats()

A prompt is a string (tokenized as is, no special tokens added), a list of token ids, or a
list of chat messages (rendered with the model's chat template, generation prompt added).

Errors (nanodance/errors.py): every prompt of a call is validated before any is enqueued, so a
bad request raises `RequestError` and loses nothing; a request that can never fit (longer than
`max_model_len` or the KV pool, or too big for what the round's shared masters leave) returns
an output with `finish_reason="error"` and the reason, while the others complete. Under memory
pressure the engine first gives up what only saves work later (kept caches of persistent
agents, then pinned round outputs and masters that no unfinished request of the call lays
out), then fails the request it cannot serve; only shared blocks whose masters cannot be
prefilled at all fail a whole round (`CapacityError`). After any error no block stays
referenced that nothing holds (`check_invariants`).

Abort: `generate` and `run_round` are synchronous; `on_step(outputs)` is called after every
engine step with a snapshot of the call's requests (`finish_reason` None while running), and
`llm.abort(request_id)`, from that callback or from another thread, stops a request at the
next step boundary: it finishes with `finish_reason="abort"`, keeps the tokens it has, and its
blocks are freed; the other requests (and agents of a round) are not disturbed.

    def stop_rambling(outputs):
        for out in outputs:
            if out.finish_reason is None and len(out.token_ids) >= 20:
                llm.abort(out.request_id)
    llm.generate(prompts, sp, on_step=stop_rambling)

Wiring: prompts -> `Sequence`s -> `Scheduler` (queues, blocks, prefix cache) -> `ModelRunner`
(one forward per step) -> `Scheduler.postprocess` (tokens, stops) -> `RequestOutput`s.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence as Seq

import torch

from nanodance.cache import BlockPool, KVCache
from nanodance.collector import AgentCache, AgentPlan, Collector, CollectorConfig, materialize, plan_agent
from nanodance.config import ModelConfig
from nanodance.errors import CapacityError, ModelLoadError, RequestError
from nanodance.runner import ModelRunner
from nanodance.sampling import SamplingParams
from nanodance.round_stats import RoundOutputs, round_stats
from nanodance.scheduler import Scheduler
from nanodance.segments import EncodedPrompt, encode_segments, is_segment_prompt
from nanodance.sequence import Sequence, Status
from nanodance.weights import load_model

logger = logging.getLogger("nanodance")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
REUSE_MODES = ("none", "prefix", "pic", "tokendance")
DEFAULT_KV_CACHE_MEMORY = 512 * 2**20  # bytes, when neither kv_cache_blocks nor kv_cache_memory is given


@dataclass
class RequestOutput:
    request_id: int
    prompt: Any
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # generated tokens (a final stop/eos token included)
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"; None in `on_step` snapshots of running requests
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    error: str | None = None
    stopped_by_token: bool = False  # the last token is an eos / stop id (not part of a Shared block)
    engine_id: str = ""  # which LLM produced it (Shared(output) is only valid on that engine)


@dataclass
class EngineCounters:
    """How often the engine degraded or refused work instead of failing a whole call."""

    kept_caches_dropped: int = 0  # persistent agents' kept caches released under pool pressure
    outputs_unpinned: int = 0  # pinned round outputs released under pool pressure
    requests_failed: int = 0  # requests finished with "error" (could never fit)
    requests_aborted: int = 0  # requests finished with "abort"


StepCallback = Callable[[list[RequestOutput]], None]


class LLM:
    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "bfloat16",
                 block_size: int = 16, kv_cache_blocks: int | None = None, kv_cache_memory: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 reuse: str = "tokendance", seed: int = 0, device: str | torch.device | None = None,
                 recompute_ratio: float = 0.15, recompute_scheme: str = "block", master: str = "producer",
                 master_sink: bool = True, check_layer: int = 1, selection: str = "collective"):
        if reuse not in REUSE_MODES:
            raise RequestError(f"unknown reuse mode {reuse!r}; choose one of {REUSE_MODES}")
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens), ("kv_cache_blocks", kv_cache_blocks),
                            ("kv_cache_memory", kv_cache_memory), ("max_model_len", max_model_len)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise RequestError(f"{name} must be a positive int, got {value!r}")
        self.dtype = _resolve_dtype(dtype)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            from nanodance.prepare import default_model_dir
            model = default_model_dir()
        self.model_path = Path(model)
        if not self.model_path.is_dir():
            raise ModelLoadError(f"model folder {self.model_path} does not exist (pass a Hugging Face folder, "
                                 f"or nothing for the bundled default model)")
        self.config = ModelConfig.from_folder(self.model_path)
        self.tokenizer = _load_tokenizer(self.model_path)
        self.model = load_model(self.model_path, self.config, self.dtype, self.device)
        cfg = self.config

        block_bytes = KVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if kv_cache_blocks is None:
            kv_cache_blocks = max(1, (kv_cache_memory or DEFAULT_KV_CACHE_MEMORY) // block_bytes)
        self.block_bytes = block_bytes
        self.reuse = reuse
        # Every mode but "none" keeps vLLM-style prefix caching of exact leading blocks.
        self.pool = BlockPool(kv_cache_blocks, block_size, enable_prefix_caching=reuse != "none")
        self.kv_cache = KVCache.allocate(cfg.num_layers, kv_cache_blocks, block_size, cfg.num_kv_heads,
                                         cfg.head_dim, self.dtype, self.device)
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        eos = set(cfg.eos_token_ids) | (set(self.tokenizer.eos_token_ids) if self.tokenizer else set())
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens, eos)
        self.runner = ModelRunner(self.model, self.kv_cache, self.pool, self.device)
        self.collector = None
        if reuse in ("pic", "tokendance"):
            ccfg = CollectorConfig(recompute_ratio=recompute_ratio, scheme=recompute_scheme, master=master,
                                   master_sink=master_sink, check_layer=check_layer,
                                   selection="per_agent" if reuse == "pic" else selection, dense_copy=reuse == "pic")
            try:
                self.collector = Collector(ccfg, self.model, self.pool, self.kv_cache, self.dtype, self.device)
            except ValueError as e:
                raise RequestError(str(e)) from None
        self.scheduler.on_finish = self._on_finish
        self.scheduler.on_prefilled = self._on_prefilled
        self._agents: dict[Any, AgentCache] = {}  # persistent agents' kept caches
        self._prefilled_at: dict[int, tuple[float, list]] = {}  # seq id -> (time, prompt block keys)
        self.round_history: list[dict] = []
        # Not id(self): an id is reused once an engine is collected, and an output of the dead
        # engine would then pass for one of this engine.
        self._engine_id = uuid.uuid4().hex
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._ids = itertools.count()
        self.num_requests_finished = 0
        self.counters = EngineCounters()
        # The call in flight (one at a time): its requests by id, the aborts asked for them, the
        # kept caches its agents took out of `_agents`, and its layouts by request id (None while
        # the collector makes them: then no master or pinned output may be dropped).
        self._busy = False
        self._in_flight: dict[int, Sequence] = {}
        self._abort_requests: set[int] = set()
        self._owns_in_flight: list[AgentCache] = []
        self._plans: dict[int, AgentPlan] | None = {}

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, on_step: StepCallback | None = None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in submission order.

        `on_step(outputs)`, if given, is called after every engine step with a snapshot of every
        request of this call (see the module docstring); it may call `abort`. An exception it
        raises aborts the whole call and propagates.
        """
        self._check_idle()
        if isinstance(prompts, str) or _is_token_ids(prompts) or _is_chat(prompts):
            prompts = [prompts]  # a single prompt
        prompts = _prompt_list(prompts, "generate()")
        if any(is_segment_prompt(p) or not _is_plain_prompt(p) for p in prompts):
            return self.run_round(prompts, sampling_params, use_tqdm=use_tqdm, on_step=on_step)  # a round of its own
        params = self._params_per_prompt(sampling_params, len(prompts))
        token_ids = [self.encode_prompt(p, i) for i, p in enumerate(prompts)]
        seqs = [self._make_sequence(ids, p, prompt) for ids, p, prompt in zip(token_ids, params, prompts)]
        with self._serving(seqs):
            self._run(seqs, use_tqdm, on_step=on_step)
        return [self._output(s) for s in seqs]

    def run_round(self, prompts: Seq[Any], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                  agents: Seq[Any] | None = None, use_tqdm: bool = True,
                  on_step: StepCallback | None = None) -> RoundOutputs:
        """One synchronized round of agents; outputs in prompt order, accounting in `.stats`.

        `prompts[i]` is a list of segments (strings are private, `Shared(x)` are shared blocks)
        or chat messages whose contents may hold `Shared` parts. `agents[i]`, when not None,
        makes agent i persistent: its cache is kept after the round, and reused by its next
        prompt as far as that prompt repeats the tokens it has seen. `on_step` is as in
        `generate`; an aborted agent keeps no cache and pins no output (its blocks are freed,
        the masters the others read stay).
        """
        self._check_idle()
        prompts = _prompt_list(prompts, "a round")
        params = self._params_per_prompt(sampling_params, len(prompts))
        agent_ids = self._check_agents(agents, len(prompts))
        encoded = [self._encode_round_prompt(p, i) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        sc, cc = self.scheduler.counters, self.collector.counters if self.collector else None
        computed_before = sc.prefill_tokens_computed
        ref_before, coll_before = (cc.reference_token_layers, cc.seconds) if cc else (0, 0.0)
        seqs = [self._make_sequence(e.token_ids, p, prompt) for e, p, prompt in zip(encoded, params, prompts)]
        for seq, agent in zip(seqs, agent_ids):
            seq.agent_id = agent
            # Its output may be a producer master next round; standalone masters never read it.
            seq.pin_output = self.collector is not None and self.collector.cfg.master == "producer"
        valid = [i for i, seq in enumerate(seqs) if self._capacity_error(seq) is None]
        plans = [None] * len(seqs)
        master_blocks: set = set()
        succeeded = False
        with self._serving(seqs):
            owns = [self._own_cache(agent_ids[i], encoded[i].token_ids) for i in valid]
            self._owns_in_flight = [own for own in owns if own is not None]
            self._plans = None  # the collector picks producer masters among the pinned outputs first
            try:
                if self.collector is not None:
                    got = self.collector.prepare_round([encoded[i].token_ids for i in valid],
                                                       [encoded[i].spans for i in valid], self._run_masters, owns)
                    for i, plan in zip(valid, got):
                        plans[i] = plan
                else:
                    for i, own in zip(valid, owns):
                        if own is not None:
                            plans[i] = plan_agent(len(encoded[i].token_ids), [], {}, {}, CollectorConfig(),
                                                  self.pool.block_size, own)
                self._plans = {seq.seq_id: plan for seq, plan in zip(seqs, plans) if plan is not None}
                # Every master the round's layouts use (standalone ones and producers' outputs).
                master_blocks = {(v.block, self.pool.blocks[v.block].serial) for p in plans if p is not None
                                 for r in p.runs if r.master is not None for v in r.master.views}
                for seq, plan in zip(seqs, plans):
                    if plan is not None:
                        seq.layout = self._layout_fn(plan)
                self._prefilled_at = {}
                self._run(seqs, use_tqdm, desc="round", on_step=on_step)
                succeeded = True
            finally:
                t_end = time.perf_counter()
                if self.collector is not None:
                    self.collector.release_round()
                    # After a failure the previous round's outputs stay usable for a retry.
                    self.collector.release_outputs(keep={s.seq_id for s in seqs} | (set() if succeeded else
                                                                                      set(self.collector.outputs)))
                for i, own in zip(valid, owns):
                    if own is not None and own.views:  # never admitted: give the kept cache back to its agent
                        if agent_ids[i] not in self._agents:
                            self._agents[agent_ids[i]] = own
                        else:
                            self.pool.release(own.take())
        done = [s for s in seqs if s.seq_id in self._prefilled_at]
        shared_lens = {span.key: span.length for e in encoded for span in e.spans}
        stats = round_stats(
            mode=self.reuse, prompt_lens=[s.num_prompt_tokens for s in done],
            private_tokens=[len(e.token_ids) - sum(sp.length for sp in e.spans)
                            for s, e in zip(seqs, encoded) if s in done],
            private_heads=[e.token_ids[:min((sp.start for sp in e.spans), default=len(e.token_ids))]
                           for s, e in zip(seqs, encoded) if s in done],
            distinct_shared_lens=list(shared_lens.values()),
            agent_blocks=[self._prefilled_at[s.seq_id][1] for s in done], master_blocks=master_blocks,
            block_size=self.pool.block_size, block_bytes=self.block_bytes, num_layers=self.config.num_layers,
            prefill_tokens_computed=sc.prefill_tokens_computed - computed_before,
            reused_tokens=sum(s.reused_positions if s.layout else s.num_cached_tokens for s in done),
            recomputed_tokens=sum(len(p.recompute) for p in plans if p is not None),
            reference_token_layers=(cc.reference_token_layers - ref_before) if cc else 0,
            collector_seconds=(cc.seconds - coll_before) if cc else 0.0,
            num_masters=len({id(m) for p in plans if p for r in p.runs if r.master is not None for m in [r.master]}),
            diff_blocks=sum(math.ceil((r.end - r.start) / self.pool.block_size) for p in plans if p for r in p.runs
                            if r.start >= p.prefix_len and r.kind in ("compute", "copy") and _inside_span(r, p)),
            prefill_seconds=max((self._prefilled_at[s.seq_id][0] for s in done), default=t0) - t0,
            round_seconds=t_end - t0)
        self.round_history.append(stats)
        return RoundOutputs([self._output(s) for s in seqs], stats)

    def encode_prompt(self, prompt: Any, index: int = 0) -> list[int]:
        """Token ids of one prompt (string, token ids or chat messages); RequestError if invalid."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError(f"prompt {index} is an empty string")
            ids = self._require_tokenizer(index).encode(prompt)
        elif _is_token_ids(prompt):
            ids = list(prompt)
        elif _is_chat(prompt):
            ids = self._require_tokenizer(index).encode_chat(prompt)
        else:
            raise RequestError(f"prompt {index} must be a string, a list of token ids or a list of chat "
                               f"messages ({{'role': ..., 'content': ...}}), got {type(prompt).__name__}")
        if not ids:
            raise RequestError(f"prompt {index} has no tokens")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"prompt {index} holds token ids outside the vocabulary [0, {self.config.vocab_size}): "
                               f"{bad[:5]}")
        return ids

    def stats(self) -> dict[str, Any]:
        """Engine counters since construction (cumulative) and the pool's state now."""
        pool, sc = self.pool, self.scheduler.counters
        return {
            "reuse": self.reuse,
            "blocks_total": pool.num_blocks,
            "blocks_used": pool.num_used,
            "blocks_cached": pool.num_hashed,
            "blocks_free": pool.num_free,
            "block_bytes": self.block_bytes,
            "kv_bytes_used": pool.num_used * self.block_bytes,
            "prefill_tokens_computed": sc.prefill_tokens_computed,
            "prefill_tokens_reused": sc.prefix_cached_tokens,
            "decode_tokens": sc.decode_tokens,
            "preemptions": sc.preemptions,
            "steps": sc.steps,
            "prefix_cache_queries": pool.counters.prefix_queries,
            "prefix_cache_hits": pool.counters.prefix_hits,
            "requests_finished": self.num_requests_finished,
            "rounds": len(self.round_history),
            "persistent_agents": len(self._agents),
            **vars(self.counters),
            **({f"collector_{k}": v for k, v in vars(self.collector.counters).items()} if self.collector else {}),
        }

    def release_round_outputs(self) -> None:
        """Unpin the last round's output K/V (kept so the next round can use it as masters).

        `run_round` does this itself for the round before; call it after the final round to
        get the pool back to empty.
        """
        if self.collector is not None:
            self.collector.release_outputs()

    def release_agent(self, agent_id: Any) -> None:
        """Forget a persistent agent's kept cache (its blocks are released)."""
        own = self._agents.pop(agent_id, None)
        if own is not None:
            self.pool.release(own.take())

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    def abort(self, request_id: int) -> bool:
        """Stop a request of the call in flight at the next step boundary (see the module docstring).

        It finishes with `finish_reason="abort"` and the tokens it has; its blocks are freed (a
        persistent agent's cache is not kept, an aborted round output is not pinned). Call it
        from `on_step` or from another thread (it only records the id). True if the request
        was still unfinished, False for an unknown or finished one.
        """
        seq = self._in_flight.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self._abort_requests.add(request_id)
        return True

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block's ref count equals the references held to it.

        Holders: queued requests' views, standalone masters of the round in flight, pinned round
        outputs, persistent agents' kept caches (also those a round took out but did not use
        yet). Between calls and from `on_step`, this is the whole truth about the pool.
        """
        sc = self.scheduler
        held = [s.views for s in (*sc.running, *sc.waiting)]
        held += [own.views for own in (*self._agents.values(), *self._owns_in_flight)]
        if self.collector is not None:
            held += [m.views for m in (*self.collector.outputs.values(), *self.collector.round_masters)]
        self.pool.check_invariants(holders=[[v.block for v in views] for views in held])

    # ------------------------------------------------------------------ internals

    def _check_idle(self) -> None:
        if self._busy:
            raise RequestError("this LLM is already running a generate() or run_round() call (called from on_step?); "
                               "it serves one call at a time")

    @contextlib.contextmanager
    def _serving(self, seqs: list[Sequence]):
        """Mark `seqs` as the call in flight (abortable); forget them and their aborts after."""
        self._busy = True
        self._in_flight = {s.seq_id: s for s in seqs}
        try:
            yield
        finally:
            self._busy = False
            self._in_flight = {}
            self._abort_requests.clear()
            self._owns_in_flight = []
            self._plans = {}

    # ------------------------------------------------------------------ rounds

    def _check_agents(self, agents, n: int) -> list:
        if agents is None:
            return [None] * n
        if isinstance(agents, (str, bytes)):
            raise RequestError("agents must be a list of ids (one per prompt, None for a one-shot agent), not a string")
        agents = list(agents)
        if len(agents) != n:
            raise RequestError(f"agents has {len(agents)} ids for {n} prompts")
        named = [a for a in agents if a is not None]
        for a in named:
            try:
                hash(a)
            except TypeError:
                raise RequestError(f"persistent agent ids must be hashable (a str or an int), got {a!r}") from None
        dupes = sorted({repr(a) for a in named if named.count(a) > 1})
        if dupes:
            raise RequestError(f"persistent agent ids must be unique within a round; repeated: {dupes}")
        return agents

    def _encode_round_prompt(self, prompt: Any, index: int) -> EncodedPrompt:
        if _is_plain_prompt(prompt) and not is_segment_prompt(prompt):
            return EncodedPrompt(self.encode_prompt(prompt, index), [])
        enc = encode_segments(prompt, self.tokenizer, index)
        for output in enc.outputs:  # an empty one too: it is the same mistake
            if getattr(output, "engine_id", None) != self._engine_id:
                raise RequestError(f"prompt {index}: Shared(output) of request {output.request_id} was produced "
                                   f"by a different LLM instance; pass its text or token ids instead")
        bad = [t for t in enc.token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RequestError(f"prompt {index} holds token ids outside the vocabulary [0, {self.config.vocab_size}): "
                               f"{bad[:5]}")
        return enc

    def _own_cache(self, agent_id, token_ids: list[int]) -> AgentCache | None:
        """The agent's kept cache narrowed to what the new prompt repeats, or None."""
        if agent_id is None or agent_id not in self._agents:
            return None
        own = self._agents.pop(agent_id)
        m = 0
        limit = min(len(own.token_ids), len(token_ids) - 1)  # at least one token is computed
        while m < limit and own.token_ids[m] == token_ids[m]:
            m += 1
        if m == 0:
            self.pool.release(own.take())
            return None
        own.truncate(m, self.pool)
        return own

    def _layout_fn(self, plan):
        def layout(seq: Sequence) -> bool:
            return materialize(seq, plan, self.pool, self.kv_cache, self.model.inv_freq, self.scheduler.match_prefix)
        return layout

    def _run_masters(self, id_lists: list[list[int]]) -> list[Sequence]:
        """Prefill standalone masters (no sampling) in one batch; their views stay referenced."""
        seqs = []
        for ids in id_lists:
            seq = Sequence(seq_id=next(self._ids), prompt_token_ids=ids, params=SamplingParams(max_tokens=1),
                           max_len=self.pool.num_blocks * self.pool.block_size, prefill_only=True)
            seq.pending = list(range(len(ids)))
            problem = self._capacity_error(seq)
            if problem is not None:
                raise CapacityError(f"a shared block cannot be prefilled: {problem}")
            seqs.append(seq)
        try:
            self._run(seqs, use_tqdm=False)
        except BaseException:
            # The masters prefilled before the failure hold views that nobody will take over.
            for seq in seqs:
                self.pool.release(seq.views)
                seq.replace_views([])
            raise
        return seqs

    def _relieve_pressure(self) -> bool:
        """The pool is stuck: free what only saves work later. True if anything was freed.

        First the kept caches of persistent agents (those of agents not in this call, and those
        this round's agents have not used yet: they recompute), then the masters and pinned
        round outputs that no unfinished request of this call lays out (a running one may
        still be preempted and laid out again); a pinned output's next use prefills it instead.
        """
        kept = [own for own in (*self._agents.values(), *self._owns_in_flight) if own.views]
        if kept:
            for own in kept:
                self.pool.release(own.take())
            self._agents.clear()
            self.counters.kept_caches_dropped += len(kept)
            logger.warning("KV pool full: dropped %d kept caches of persistent agents to make room", len(kept))
            return True
        if self.collector is None or self._plans is None:
            return False
        needed = {id(r.master) for rid, plan in self._plans.items() if not self._in_flight[rid].is_finished
                  for r in plan.runs if r.master is not None}
        col = self.collector
        idle_outputs = [rid for rid, m in col.outputs.items() if id(m) not in needed]
        idle_masters = [m for m in col.round_masters if id(m) not in needed]
        for rid in idle_outputs:
            self.pool.release(col.outputs.pop(rid).views)
        for m in idle_masters:
            col.round_masters.remove(m)
            self.pool.release(m.views)
        self.counters.outputs_unpinned += len(idle_outputs)
        if idle_outputs or idle_masters:
            logger.warning("KV pool full: released %d pinned round outputs and %d masters no waiting request needs",
                           len(idle_outputs), len(idle_masters))
        return bool(idle_outputs or idle_masters)

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
        problem = (f"request {seq.seq_id} ({seq.num_tokens} tokens, about {need} blocks) cannot get KV blocks: "
                   f"{pool.num_used} of the pool's {pool.num_blocks} blocks are held by the shared masters that "
                   f"this round's waiting requests need; raise kv_cache_blocks or run fewer agents (or shorter "
                   f"shared blocks) per round")
        logger.warning("request %d failed: %s", seq.seq_id, problem)
        self.scheduler.abort(seq, "error", str(CapacityError(problem)))
        self.counters.requests_failed += 1

    def _on_prefilled(self, seq: Sequence) -> None:
        n = seq.num_prompt_tokens
        blocks = [(v.block, self.pool.blocks[v.block].serial) for v in seq.views if v.pos0 < n]
        self._prefilled_at[seq.seq_id] = (time.perf_counter(), blocks)

    def _on_finish(self, seq: Sequence) -> None:
        """Before a finished sequence's blocks are released: pin what later rounds may reuse."""
        if seq.finish_reason in ("error", "abort") or seq.prefill_only:
            return
        if seq.pin_output:
            ids = seq.output_token_ids[:-1] if seq.stopped_by_token else seq.output_token_ids
            self.collector.pin_output(seq, tuple(ids))
        if seq.agent_id is not None:
            n = seq.num_tokens - 1  # the last sampled token was never fed back: no K/V
            views = [v for v in seq.views if v.pos0 < n]
            own = AgentCache(seq.token_ids[:n], views, seq.exact_prefix_len)
            for v in views:
                self.pool.ref(v.block)
            own.truncate(n, self.pool)
            self._agents[seq.agent_id] = own

    # ------------------------------------------------------------------ requests

    def _params_per_prompt(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            sampling_params.validate()  # it may have been changed since it was built
            return [sampling_params] * n
        if not isinstance(sampling_params, (list, tuple)):
            raise RequestError(f"sampling_params must be one SamplingParams or a list of {n} of them, "
                               f"got {type(sampling_params).__name__}")
        params = list(sampling_params)
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise RequestError(f"sampling_params must be one SamplingParams or a list of {n} of them")
        for p in params:
            p.validate()
        return params

    def _require_tokenizer(self, index: int):
        if self.tokenizer is None:
            raise RequestError(f"prompt {index} is text, but {self.model_path} has no tokenizer.json: "
                               f"pass token ids instead")
        return self.tokenizer

    def _make_sequence(self, ids: list[int], params: SamplingParams, prompt: Any) -> Sequence:
        max_len = min(self.max_model_len, self.pool.num_blocks * self.pool.block_size)
        seq = Sequence(seq_id=next(self._ids), prompt_token_ids=ids, params=params, max_len=max_len, prompt=prompt)
        seq.pending = list(range(len(ids)))
        seq.generator = (torch.Generator(device=self.device).manual_seed(params.seed)
                         if params.seed is not None else self._generator)
        if self.tokenizer is not None:
            seq.decoder = self.tokenizer.incremental_decoder()
        return seq

    def _capacity_error(self, seq: Sequence) -> str | None:
        n = seq.num_prompt_tokens
        if n > self.max_model_len:
            return f"prompt has {n} tokens, more than max_model_len={self.max_model_len}"
        capacity = self.pool.num_blocks * self.pool.block_size
        if n > capacity:
            return (f"prompt has {n} tokens, more than the whole KV pool holds ({self.pool.num_blocks} blocks x "
                    f"{self.pool.block_size} = {capacity} tokens); raise kv_cache_blocks")
        return None

    def _run(self, seqs: list[Sequence], use_tqdm: bool, desc: str = "generate",
             on_step: StepCallback | None = None) -> None:
        for seq in seqs:
            if seq.is_finished:  # aborted before it was queued (while the collector ran)
                continue
            problem = self._capacity_error(seq)
            if problem is not None:
                logger.warning("request %d failed: %s", seq.seq_id, problem)
                seq.status, seq.finish_reason, seq.error = Status.FINISHED, "error", str(CapacityError(problem))
                self.counters.requests_failed += 1
            else:
                self.scheduler.add(seq)
        bar = _progress(len(seqs), use_tqdm, desc)
        done = sum(s.is_finished for s in seqs)
        bar.update(done)
        try:
            while True:
                self._apply_aborts()
                if not self.scheduler.has_work():
                    break
                chunks = self.scheduler.schedule()
                if not chunks:
                    if not self._relieve_pressure():
                        self._fail_head_of_line()
                else:
                    tokens = self.runner.run(chunks)
                    finished = [s for s in self.scheduler.postprocess(chunks, tokens) if not s.prefill_only]
                    self.num_requests_finished += len(finished)
                    if on_step is not None:
                        on_step([self._output(s) for s in seqs])
                now = sum(s.is_finished for s in seqs)  # finished, aborted or failed
                bar.update(now - done)
                done = now
        finally:
            bar.close()
            # A step scheduled but never run must not leave unwritten blocks in the prefix index.
            self.scheduler.forget_unwritten()
            # On an exception (or Ctrl-C) nothing may stay half-run holding blocks.
            for seq in seqs:
                if not seq.is_finished:
                    self.scheduler.abort(seq)
                    self.counters.requests_aborted += not seq.prefill_only

    def _apply_aborts(self) -> None:
        while self._abort_requests:
            seq = self._in_flight.get(self._abort_requests.pop())
            if seq is not None and not seq.is_finished:
                self.scheduler.abort(seq)
                self.counters.requests_aborted += 1

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id, prompt=seq.prompt, prompt_token_ids=list(seq.prompt_token_ids), text=seq.text,
            token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=seq.num_preemptions, error=seq.error, stopped_by_token=seq.stopped_by_token,
            engine_id=self._engine_id)


def _prompt_list(prompts: Any, what: str) -> list:
    bad = RequestError(f"{what} takes a list of prompts, got {type(prompts).__name__}")
    if isinstance(prompts, (str, bytes, dict)):
        raise bad
    try:
        prompts = list(prompts)
    except TypeError:
        raise bad from None
    if not prompts:
        raise RequestError(f"{what} needs at least one prompt")
    return prompts


def _inside_span(run, plan) -> bool:
    """A private run that replaces part of a shared block (a diff block), not private text."""
    return run.kind == "copy" or any(run.start <= p < run.end for p in plan.recompute)


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise RequestError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def _load_tokenizer(folder: Path):
    from nanodance.tokenizer import Tokenizer
    if not (folder / "tokenizer.json").is_file():
        logger.info("%s has no tokenizer.json: only token-id prompts are accepted", folder)
        return None
    return Tokenizer.from_folder(folder)


def _is_plain_prompt(x) -> bool:
    """A string, token ids or chat messages (as opposed to a list of segments)."""
    return isinstance(x, str) or _is_token_ids(x) or _is_chat(x)


def _is_token_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in x)


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str):
    """A tqdm bar over finished requests, shown only for calls with several requests."""
    if not enabled or total < 2:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="req", leave=False)
