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

from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Sequence as Seq

from nanodance import prompts as P
from nanodance.config import ModelConfig
from nanodance.engine import Engine, RequestOutput, StepCallback
from nanodance.engine_config import EngineConfig
from nanodance.errors import ModelLoadError, RequestError
from nanodance.model import CausalLM
from nanodance.progress import Progress
from nanodance.round_runner import run_round
from nanodance.round_stats import RoundOutputs
from nanodance.runner import Sampler, default_sampler
from nanodance.sampling import SamplingParams


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
    recompute_ratio=0.05     share of each shared block each agent recomputes (1.0 is exact)
    recompute_scheme="block" "block" (first block + most deviating blocks) | "first" (first
                             tokens, no scoring) | "token" (first token + most deviating tokens)
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

    Seams for experiments: `model` may be an already-loaded `CausalLM` (pass `tokenizer` too,
    or None for token-id prompts only); `sampler(logits, seqs) -> tokens` replaces the sampler;
    `config=EngineConfig(...)` passes the options as one object.
    """

    def __init__(self, model: str | Path | CausalLM | None = None, *, tokenizer: Any = None,
                 sampler: Sampler = default_sampler, config: EngineConfig | None = None, **options):
        self.engine_config = cfg = (config or EngineConfig()).with_options(**options)
        if isinstance(model, CausalLM):
            self.model_path = None
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

    # ------------------------------------------------------------------ calls

    def generate(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, on_step: StepCallback | None = None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in submission order.

        A prompt is a string (tokenized as is: no chat template), token ids, or chat messages
        (the model's chat template, generation prompt added). A segment list with `Shared`
        parts makes the call a round of its own (`run_round`).
        """
        self._check_idle()
        if P.is_single_prompt(prompts):
            prompts = [prompts]
        prompts = P.prompt_list(prompts, "generate()")
        if any(P.needs_round(p) for p in prompts):
            return self.run_round(prompts, sampling_params, use_tqdm=use_tqdm, on_step=on_step)
        params = P.params_per_prompt(sampling_params, len(prompts))
        ids = [P.encode_prompt(self.tokenizer, self.config.vocab_size, p, i) for i, p in enumerate(prompts)]
        seqs = [self.engine.make_sequence(x, sp, p) for x, sp, p in zip(ids, params, prompts)]
        with self.engine.serving(seqs):
            self.engine.run(seqs, Progress(seqs, use_tqdm), on_step)
        return [self.engine.output(s) for s in seqs]

    def generate_stream(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
                        ) -> Iterator[list[RequestOutput]]:
        """`generate`, streamed: after every engine step, a snapshot of every request's output so far
        (`finish_reason` None while it runs; text and token ids only grow). The last snapshot is
        what `generate` returns. Closing the iterator early aborts what is unfinished and frees its
        blocks; until it is exhausted or closed, the engine serves no other call.
        """
        self._check_idle()
        if P.is_single_prompt(prompts):
            prompts = [prompts]
        prompts = P.prompt_list(prompts, "generate_stream()")
        if any(P.needs_round(p) for p in prompts):
            raise RequestError("generate_stream() takes plain prompts (text, token ids or chat messages); "
                               "prompts with Shared parts go to run_round()")
        params = P.params_per_prompt(sampling_params, len(prompts))
        ids = [P.encode_prompt(self.tokenizer, self.config.vocab_size, p, i) for i, p in enumerate(prompts)]
        seqs = [self.engine.make_sequence(x, sp, p) for x, sp, p in zip(ids, params, prompts)]
        return self._stream(seqs)

    def _stream(self, seqs) -> Iterator[list[RequestOutput]]:
        # A generator of its own, so that the checks above raise at the call, not at the first next().
        with self.engine.serving(seqs):
            streamed = False
            for _ in self.engine.iterate(seqs):
                streamed = True
                yield [self.engine.output(s) for s in seqs]
            if not streamed:  # every request failed before a step ran: their errors are the news
                yield [self.engine.output(s) for s in seqs]

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
        self._check_idle()
        prompts = P.prompt_list(prompts, "a round")
        params = P.params_per_prompt(sampling_params, len(prompts))
        agent_ids = P.check_agents(agents, len(prompts))
        encoded = [P.encode_round_prompt(self.tokenizer, self.config.vocab_size, self.engine.engine_id, p, i)
                   for i, p in enumerate(prompts)]
        return run_round(self.engine, encoded, params, agent_ids, prompts, use_tqdm, on_step)

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
        `check_layer`, `selection`, `master_sink`, and `reuse` between "pic" and "tokendance").
        """
        self._check_idle()
        allowed = {"recompute_ratio", "recompute_scheme", "check_layer", "selection", "master_sink", "reuse"}
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
