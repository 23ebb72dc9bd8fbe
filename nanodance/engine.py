"""`LLM`: the public engine. Loads a model, owns the KV pool, runs `generate`.

    llm = LLM()                                  # bundled SmolLM2-135M-Instruct, offline
    outs = llm.generate(["Hi", [1, 2, 3], [{"role": "user", "content": "Hi"}]],
                        SamplingParams(temperature=0, max_tokens=32))
    outs[i].text, outs[i].token_ids, outs[i].finish_reason, llm.stats()

A prompt is a string (tokenized as is, no special tokens added), a list of token ids, or a
list of chat messages (rendered with the model's chat template, generation prompt added).
Every prompt of a call is validated before any is enqueued, so a bad request raises and
loses nothing; a request that can never fit (longer than `max_model_len` or the KV pool)
returns an output with `finish_reason="error"` and the reason, while the others complete.

Wiring: prompts -> `Sequence`s -> `Scheduler` (queues, blocks, prefix cache) -> `ModelRunner`
(one forward per step) -> `Scheduler.postprocess` (tokens, stops) -> `RequestOutput`s.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence as Seq

import torch

from nanodance.cache import BlockPool, KVCache
from nanodance.config import ModelConfig
from nanodance.errors import CapacityError, ModelLoadError, RequestError
from nanodance.runner import ModelRunner
from nanodance.sampling import SamplingParams
from nanodance.scheduler import Scheduler
from nanodance.sequence import Sequence, Status
from nanodance.weights import load_model

logger = logging.getLogger("nanodance")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
REUSE_MODES = ("none", "prefix")
DEFAULT_KV_CACHE_MEMORY = 512 * 2**20  # bytes, when neither kv_cache_blocks nor kv_cache_memory is given


@dataclass
class RequestOutput:
    request_id: int
    prompt: Any
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]  # generated tokens (a final stop/eos token included)
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    error: str | None = None


class LLM:
    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "bfloat16",
                 block_size: int = 16, kv_cache_blocks: int | None = None, kv_cache_memory: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 reuse: str = "prefix", seed: int = 0, device: str | torch.device | None = None):
        if reuse not in REUSE_MODES:
            raise RequestError(f"unknown reuse mode {reuse!r}; choose one of {REUSE_MODES}")
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or value < 1:
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
        if not isinstance(kv_cache_blocks, int) or kv_cache_blocks < 1:
            raise RequestError(f"kv_cache_blocks must be a positive int, got {kv_cache_blocks!r}")
        self.block_bytes = block_bytes
        self.reuse = reuse
        self.pool = BlockPool(kv_cache_blocks, block_size, enable_prefix_caching=reuse == "prefix")
        self.kv_cache = KVCache.allocate(cfg.num_layers, kv_cache_blocks, block_size, cfg.num_kv_heads,
                                         cfg.head_dim, self.dtype, self.device)
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        eos = set(cfg.eos_token_ids) | (set(self.tokenizer.eos_token_ids) if self.tokenizer else set())
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens, eos)
        self.runner = ModelRunner(self.model, self.kv_cache, self.pool, self.device)
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._ids = itertools.count()
        self.num_requests_finished = 0

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: Any, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in submission order."""
        if isinstance(prompts, str) or _is_token_ids(prompts) or _is_chat(prompts):
            prompts = [prompts]  # a single prompt
        prompts = list(prompts)
        if not prompts:
            raise RequestError("generate() needs at least one prompt")
        params = self._params_per_prompt(sampling_params, len(prompts))
        token_ids = [self.encode_prompt(p, i) for i, p in enumerate(prompts)]
        seqs = [self._make_sequence(ids, p, prompt) for ids, p, prompt in zip(token_ids, params, prompts)]
        self._run(seqs, use_tqdm)
        return [self._output(s) for s in seqs]

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
        }

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    # ------------------------------------------------------------------ internals

    def _params_per_prompt(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
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

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        for seq in seqs:
            problem = self._capacity_error(seq)
            if problem is not None:
                logger.warning("request %d failed: %s", seq.seq_id, problem)
                seq.status, seq.finish_reason, seq.error = Status.FINISHED, "error", str(CapacityError(problem))
            else:
                self.scheduler.add(seq)
        bar = _progress(len(seqs), use_tqdm)
        done = sum(s.is_finished for s in seqs)
        bar.update(done)
        try:
            while self.scheduler.has_work():
                chunks = self.scheduler.schedule()
                if not chunks:
                    raise RuntimeError("scheduler made no progress with work queued (an engine bug)")
                tokens = self.runner.run(chunks)
                finished = self.scheduler.postprocess(chunks, tokens)
                self.num_requests_finished += len(finished)
                bar.update(len(finished))
        finally:
            bar.close()
            # On an exception (or Ctrl-C) nothing may stay half-run holding blocks.
            for seq in seqs:
                if not seq.is_finished:
                    self.scheduler.abort(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id, prompt=seq.prompt, prompt_token_ids=list(seq.prompt_token_ids), text=seq.text,
            token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=seq.num_preemptions, error=seq.error)


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


def _progress(total: int, enabled: bool):
    """A tqdm bar over finished requests, shown only for calls with several requests."""
    if not enabled or total < 2:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="generate", unit="req", leave=False)
