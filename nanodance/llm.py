"""`LLM`: the public API. A thin facade: it validates and encodes prompts, then hands them to the
engine (engine.py) or to a round (round_runner.py).

    llm = LLM()                                   # bundled SmolLM2-135M-Instruct, offline
    outs = llm.generate(["Hi", [1, 2, 3], [{"role": "user", "content": "Hi"}]],
                        SamplingParams(temperature=0, max_tokens=32))
    outs[i].text, outs[i].token_ids, outs[i].finish_reason, llm.stats()

Errors (errors.py): every prompt of a call is validated before any is enqueued, so a bad
request raises `RequestError` and loses nothing; a request that can never fit (longer than
`max_model_len` or the KV pool) returns an output with `finish_reason="error"` and the reason,
while the others complete. Only shared blocks whose masters cannot be prefilled at all fail a
whole round (`CapacityError`). After any error no block stays referenced that nothing holds
(`check_invariants`).

Abort: `generate` and `run_round` are synchronous; `on_step(outputs)` is called after every
engine step with a snapshot of the call's requests (`finish_reason` None while running), and
`llm.abort(request_id)`, from that callback or from another thread, stops a request at the
next step: it finishes with `finish_reason="abort"`, keeps the tokens it has, and its blocks
are freed; the other requests are not disturbed. An exception raised by `on_step` aborts the
whole call and propagates.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Sequence as Seq

from nanodance import prompts as P
from nanodance.prompts import PreparedCall
from nanodance.config import ModelConfig
from nanodance.engine import Engine, RequestOutput, StepCallback
from nanodance.engine_config import EngineConfig
from nanodance.errors import ModelLoadError, RequestError
from nanodance.model import CausalLM
from nanodance.progress import Progress
from nanodance.round_runner import iterate_round, run_round
from nanodance.round_stats import RoundOutputs
from nanodance.runner import Sampler, default_sampler
from nanodance.sampling import SamplingParams
from nanodance.segments import EncodedPrompt


class LLM:
    """An engine over one model. Options (all keyword-only, validated before the model loads):

    dtype="auto"             "auto" (float32 on CPU, bfloat16 on CUDA), "float32", "bfloat16", "float16"
    device=None              "cpu", "cuda", "cuda:1"...; None picks cuda when available
    block_size=16            KV slots per block
    kv_cache_blocks=None     KV pool size in blocks; None sizes it from kv_cache_memory
    kv_cache_memory=None     KV pool size in bytes; None means 512 MiB
    max_num_seqs=64          requests running at once (continuous batching)
    max_num_batched_tokens=2048   tokens per engine step (prefill chunks and decodes together)
    max_model_len=None       longest prompt + output; None is the model's max_position_embeddings
    reuse="tokendance"       "none" | "prefix" (vLLM-style prefix caching) | "pic" (per-request
                             position-independent reuse, CacheBlend-style) | "tokendance"
    seed=0                   the engine's sampling generator (a request's own `seed` overrides it)
    recompute_ratio=0.01     share of each shared block each agent recomputes (1.0 is exact)
    recompute_scheme="block" "block" (first chunk + most deviating chunks) | "first" (first
                             tokens, no scoring) | "token" (first token + most deviating tokens)
    recompute_chunk=2        the "block" scheme's chunk in tokens for shared blocks of
                             `auto_standalone_tokens` (64) or more (None: block_size)
    short_recompute_ratio=0.15  a shorter shared block recomputes at least this share of its
                             tokens, chosen one by one (the first, then the most deviating);
                             None: `recompute_ratio` in whole-block chunks. Ratios 0 and 1
                             apply to every block alike
    master="agent"           where a shared block's K/V comes from: "producer" (the earlier
                             round's decode, no prefill), "standalone" (prefilled on its own;
                             better for long blocks of about 100 tokens or more), or "auto":
                             standalone for blocks of `auto_standalone_tokens` (64) or more,
                             producer below, or "agent" (the paper's Master): reference agents,
                             picked greedily by the shared tokens they hold, are prefilled
                             exactly first and their shared blocks are everyone's masters;
                             blocks no reference holds follow "auto"
    reference_min_new=0.5    "agent": a further reference must bring masters for at least this
                             share of its shared tokens
    master_sink=True         prefill standalone masters behind a bos sink token (dropped after)
    check_layer=1            the layer whose key deviation ranks the blocks to recompute
    selection="collective"   score each shared block once per round, or "per_agent" (pic always is)
    auto_shared=True         pic/tokendance: find recent outputs in prompts and share them unmarked
    auto_shared_min_tokens=None   shortest run shared automatically (None: block_size)
    auto_shared_outputs=256  recent outputs kept indexed for auto_shared
    tensor_parallel_size=1   split the model over this many ranks (Megatron tensor parallelism):
                             GPUs over NCCL on CUDA, processes over gloo on CPU; the same tokens
                             as one device. Ranks 1..N-1 are spawned worker processes, so guard a
                             script with `if __name__ == "__main__":`; `shutdown()` stops them
                             (garbage collection and exit do too). Under torchrun every rank runs
                             the script, and on ranks > 0 `LLM(...)` serves rank 0, then exits.

    Seams for experiments: `model` may be an already-loaded `CausalLM` (pass `tokenizer` too,
    or None for token-id prompts only); `sampler(logits, seqs) -> tokens` replaces the sampler;
    `config=EngineConfig(...)` passes the options as one object.
    """

    def __init__(self, model: str | Path | CausalLM | None = None, *, tokenizer: Any = None,
                 sampler: Sampler = default_sampler, config: EngineConfig | None = None, **options):
        self.engine_config = cfg = (config or EngineConfig()).with_options(**options)
        self._tp = None  # the tensor-parallel group (tp_launch.TPGroup) when tensor_parallel_size > 1
        if isinstance(model, CausalLM):
            self.model_path = None
            if cfg.tensor_parallel_size > 1:
                raise RequestError("tensor_parallel_size > 1 needs a model folder (each rank loads its own shard), "
                                   "not an already-loaded CausalLM")
            self.engine_config = cfg = _fit_injected(model, cfg)
            self.engine = Engine(cfg, model, tokenizer, sampler)
        else:
            self.model_path = Path(model) if model is not None else _default_model_dir()
            if not self.model_path.is_dir():
                raise ModelLoadError(f"model folder {self.model_path} does not exist (pass a Hugging Face folder, "
                                     f"or nothing for the bundled default model)")
            model_config = ModelConfig.from_folder(self.model_path)
            cfg.validate_for_model(model_config.num_layers)
            if tokenizer is None:
                tokenizer = _load_tokenizer(self.model_path)
            from nanodance.weights import load_model
            if cfg.tensor_parallel_size > 1:
                self.engine = self._start_tensor_parallel(model_config, cfg, tokenizer, sampler)
            else:
                loaded = load_model(self.model_path, model_config, cfg.torch_dtype(), cfg.torch_device())
                self.engine = Engine(cfg, loaded, tokenizer, sampler)
        e = self.engine
        # The engine's parts, for reading (tests, benchmarks, the curious): not a second API.
        self.model, self.tokenizer, self.config = e.model, e.tokenizer, e.model_config
        self.pool, self.kv_cache, self.scheduler, self.runner = e.pool, e.kv_cache, e.scheduler, e.runner
        self.collector, self.agents, self.counters = e.collector, e.agents, e.counters
        self.dtype, self.device, self.block_bytes, self.reuse = e.dtype, e.device, e.block_bytes, cfg.reuse
        self.max_model_len = e.max_model_len
        self.round_history = e.round_history

    def _start_tensor_parallel(self, model_config: ModelConfig, cfg: EngineConfig, tokenizer, sampler) -> Engine:
        """Start the worker ranks, load rank 0's shard, and build the engine on the group's executor."""
        from nanodance.parallel import check_split
        from nanodance.tp_launch import TPGroup
        from nanodance.weights import load_model

        check_split(model_config, cfg.tensor_parallel_size, cfg.torch_device())  # before any process starts
        group = TPGroup.start(self.model_path, model_config, cfg)
        self._tp = group
        # Not a method of self: the finalizer must not keep this LLM alive.
        weakref.finalize(self, group.shutdown, True, "the LLM was garbage-collected")
        try:
            loaded = load_model(self.model_path, model_config, cfg.torch_dtype(), group.device, group.tp)
            group.wait_ready()
            return Engine(cfg, loaded, tokenizer, sampler, make_executor=group.executor)
        except BaseException:
            group.shutdown(healthy=False, reason="start-up failed")
            raise

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (nothing to do on one device). The LLM cannot
        run the model afterwards; it is also done when the LLM is garbage-collected and at exit."""
        if self._tp is not None:
            self._tp.shutdown(reason="LLM.shutdown() was called")

    # ------------------------------------------------------------------ calls

    def generate(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, on_step: StepCallback | None = None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in submission order (with `n` > 1, a prompt's
        n samples are consecutive outputs).

        A prompt is a string (tokenized as is: no chat template), token ids, or chat messages
        (the model's chat template, generation prompt added). A segment list with `Shared`
        parts makes the call a round of its own (`run_round`); so do recent outputs of this
        engine found in the prompts, under `auto_shared` (the outputs then carry `.stats`).
        """
        return self._run(self._encode(prompts, sampling_params, None, "generate()"), use_tqdm, on_step)

    def generate_stream(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
                        ) -> Iterator[list[RequestOutput]]:
        """`generate`, streamed: after every engine step, a snapshot of every request's output so far
        (`finish_reason` None while it runs; text and token ids only grow). The last snapshot is
        what `generate` returns. Closing the iterator early aborts what is unfinished and frees its
        blocks; until it is exhausted or closed, the engine serves no other call.
        """
        return self._stream(self._encode(prompts, sampling_params, None, "generate_stream()"))

    def run_round(self, prompts: Seq[Any], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                  agents: Seq[Hashable | None] | None = None, use_tqdm: bool = True,
                  on_step: StepCallback | None = None) -> RoundOutputs:
        """One synchronized round of agents; outputs in prompt order, accounting in `.stats`.

        `prompts[i]` is a list of segments (strings are private, `Shared(x)` are shared blocks)
        or chat messages whose contents may hold `Shared` parts. `agents[i]`, when not None,
        makes agent i persistent: its cache is kept after the round and reused by its next
        prompt as far as that prompt repeats the tokens it has seen. An aborted agent keeps no
        cache and pins no output; the masters the others read stay.
        """
        return self._run(self._encode(prompts, sampling_params, agents, "a round", as_round=True), use_tqdm,
                         on_step)

    # ------------------------------------------------------------------ one call, in three parts

    def _encode(self, prompts: Any, sampling_params, agents, what: str, as_round: bool = False) -> PreparedCall:
        """Validate and encode a whole call before anything is queued (a bad call loses nothing)."""
        self._check_idle()
        if not as_round and P.is_single_prompt(prompts):
            prompts = [prompts]
        prompts = P.prompt_list(prompts, what)
        params = P.params_per_prompt(sampling_params, len(prompts))
        agent_ids = P.check_agents(agents, len(prompts))
        encoded = [self.encode_round_prompt(p, i) for i, p in enumerate(prompts)]
        return self.prepare_call(encoded, params, agent_ids, prompts, as_round)

    def encode_round_prompt(self, prompt: Any, index: int = 0) -> EncodedPrompt:
        """Token ids and explicit `Shared` spans of one prompt; RequestError if invalid. Touches
        no engine state: safe from any thread (the server encodes requests as they arrive)."""
        return P.encode_round_prompt(self.tokenizer, self.config.vocab_size, self.engine.engine_id, prompt, index)

    def prepare_call(self, encoded: list[EncodedPrompt], params: list[SamplingParams], agent_ids: list,
                     prompts: list, as_round: bool = False) -> PreparedCall:
        """Add the shared spans found in the prompts (auto_shared) and one request per sample.
        Reads the engine's recent outputs: call it where calls run (the engine's thread)."""
        for e, agent in zip(encoded, agent_ids):
            # A persistent agent's kept cache serves its leading tokens: nothing to find there.
            kept = self.agents.kept_prefix(agent, e.token_ids)
            found = self.engine.find_shared(e.token_ids, [(0, kept)] + [(sp.start, sp.end) for sp in e.spans])
            e.spans = sorted(e.spans + found, key=lambda sp: sp.start)
        return P.expand_samples(PreparedCall(encoded, params, agent_ids, prompts,
                                             as_round or any(e.spans for e in encoded)))

    def _run(self, call: PreparedCall, use_tqdm: bool, on_step: StepCallback | None) -> list[RequestOutput]:
        if call.as_round:
            return run_round(self.engine, call.encoded, call.params, call.agents, call.prompts, use_tqdm, on_step,
                             call.sample_of)
        seqs = self.sequences(call)
        with self.engine.serving(seqs):
            self.engine.run(seqs, Progress(seqs, use_tqdm), on_step)
        return [self.engine.output(s) for s in seqs]

    def stream_call(self, call: PreparedCall) -> Iterator[list[RequestOutput]]:
        """Run a prepared call, yielding a snapshot of its outputs after every step (the last one final)."""
        return self._stream(call)

    def _stream(self, call: PreparedCall) -> Iterator[list[RequestOutput]]:
        # A generator of its own, so that _encode's checks raise at the call, not at the first next().
        snapshot = None
        if call.as_round:
            steps = iterate_round(self.engine, call.encoded, call.params, call.agents, call.prompts, False,
                                  call.sample_of)
            try:
                while True:
                    snapshot = next(steps)
                    yield snapshot
            except StopIteration as done:
                final = list(done.value)
            finally:
                steps.close()
        else:
            seqs = self.sequences(call)
            with self.engine.serving(seqs):
                for snapshot in self.engine.snapshots(seqs):
                    yield snapshot
            final = [self.engine.output(s) for s in seqs]
        if final != snapshot:  # no step ran (every request failed first), or aborts after the last one
            yield final

    def sequences(self, call: PreparedCall) -> list:
        """The engine requests of a prepared call (samples 2..n linked to their first)."""
        seqs = [self.engine.make_sequence(e.token_ids, sp, p) for e, sp, p in zip(call.encoded, call.params,
                                                                                  call.prompts)]
        for seq, first in zip(seqs, call.sample_of):
            seq.sample_of = seqs[first] if first is not None else None
        return seqs

    def encode_prompt(self, prompt: Any, index: int = 0) -> list[int]:
        """Token ids of one prompt (string, token ids or chat messages); RequestError if invalid."""
        return P.encode_prompt(self.tokenizer, self.config.vocab_size, prompt, index)

    def abort(self, request_id: int) -> bool:
        """Stop a request of the call in flight at the next step boundary (see the module docstring).

        True if the request was still unfinished, False for an unknown or finished one. Safe
        from `on_step` and from another thread (it only records the id).
        """
        return self.engine.abort(request_id)

    # ------------------------------------------------------------------ state

    def stats(self) -> dict[str, Any]:
        """Engine counters since construction and the pool's state now (every key: README, "Stats")."""
        return self.engine.stats()

    def keep_outputs(self, outputs: Iterable[RequestOutput]) -> None:
        """Keep these round outputs' K/V pinned across later rounds (not only the next one), until
        `release_round_outputs`: several follow-up rounds can then all read them as masters."""
        if self.collector is not None:
            self.collector.keep_outputs({o.request_id for o in outputs})

    def release_round_outputs(self, keep: Iterable[RequestOutput] = ()) -> None:
        """Unpin round outputs' K/V (kept so that the next round can use them as masters), all
        but `keep`. `run_round` does it itself for the round before; call it after the last
        round to get the pool back to empty."""
        if self.collector is not None:
            self.collector.release_outputs(keep={o.request_id for o in keep}, forget_kept=True)

    def release_agent(self, agent_id: Hashable) -> None:
        """Forget a persistent agent's kept cache (its blocks are released)."""
        self.agents.release(agent_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that nobody uses (they become plain free blocks)."""
        self.pool.reset_prefix_cache()

    def reconfigure(self, **options) -> None:
        """Change reuse options between calls (e.g. a recompute-ratio sweep on one engine).

        Only what the collector reads may change (`recompute_ratio`, `recompute_scheme`,
        `recompute_chunk`, `short_recompute_ratio`, `check_layer`, `selection`, `master_sink`, `auto_shared`,
        `auto_shared_min_tokens`, and `reuse` between "pic" and "tokendance").
        """
        self._check_idle()
        allowed = {"recompute_ratio", "recompute_scheme", "recompute_chunk", "short_recompute_ratio", "check_layer",
                   "selection", "master_sink", "reuse", "auto_shared", "auto_shared_min_tokens"}
        fixed = sorted(set(options) - allowed)
        if fixed:
            raise RequestError(f"{fixed} cannot change after construction; only {sorted(allowed)} can")
        cfg = self.engine_config.with_options(**options)
        if self.collector is None or not cfg.uses_collector:
            raise RequestError(f"reconfigure needs reuse 'pic' or 'tokendance' before and after, got "
                               f"{self.engine_config.reuse!r} -> {cfg.reuse!r}")
        cfg.validate_for_model(self.config.num_layers)
        self.engine.reconfigure(cfg)
        self.engine_config, self.reuse = cfg, cfg.reuse

    def check_invariants(self) -> None:
        """AssertionError unless every block's ref count equals the references held to it."""
        self.engine.check_invariants()

    def _check_idle(self) -> None:
        self.engine.check_idle()


def _default_model_dir() -> Path:
    from nanodance.tools.prepare import default_model_dir
    return default_model_dir()


def _load_tokenizer(folder: Path):
    from nanodance.tokenizer import Tokenizer
    if not (folder / "tokenizer.json").is_file():
        return None  # token-id prompts only; a text prompt gets a RequestError saying so
    return Tokenizer.from_folder(folder)


def _fit_injected(model: CausalLM, cfg: EngineConfig) -> EngineConfig:
    """The options for an already-loaded model: its dtype and device, unless they contradict it."""
    cfg.validate_for_model(model.config.num_layers)
    param = next(model.parameters())
    if cfg.dtype != "auto" and param.dtype != cfg.torch_dtype():
        raise RequestError(f"the model passed in is {param.dtype}, but dtype={cfg.dtype!r} was asked for")
    if cfg.device is not None and param.device.type != cfg.torch_device().type:
        raise RequestError(f"the model passed in is on {param.device}, but device={cfg.device!r} was asked for")
    return cfg.with_options(dtype=param.dtype, device=param.device)
