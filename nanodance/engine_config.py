"""`EngineConfig`: every engine option in one object, validated in one place, passed whole.

`LLM(path, **options)` builds one; the engine, the scheduler's limits and the collector all
read from it. Options that depend on the model (`check_layer` against its layer count) are
checked by `validate_for_model` as soon as the model's config is known, before any weight
is loaded.

Defaults are what a CPU user should get: `dtype="auto"` is float32 on CPU (PyTorch's bf16
matmuls are slower than fp32 on CPUs without native bf16; prefill-heavy rounds run ~2x
faster in fp32 there) and bfloat16 on CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from nanodance.errors import RequestError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
REUSE_MODES = ("none", "prefix", "pic", "tokendance")
SCHEMES = ("block", "first", "token")
MASTER_SOURCES = ("producer", "standalone", "auto", "agent")
SELECTIONS = ("collective", "per_agent")
DEFAULT_KV_CACHE_MEMORY = 512 * 2**20  # bytes, when neither kv_cache_blocks nor kv_cache_memory is given


@dataclass
class EngineConfig:
    """Engine options (see the `LLM` docstring for what each does)."""

    dtype: str | torch.dtype = "auto"  # "auto" | "float32" | "bfloat16" | "float16" (or a torch.dtype)
    device: str | torch.device | None = None  # None: cuda if available, else cpu
    block_size: int = 16  # KV slots per block
    kv_cache_blocks: int | None = None  # pool size in blocks; None: from kv_cache_memory
    kv_cache_memory: int | None = None  # pool size in bytes; None: 512 MiB
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens per engine step (prefill chunks + decodes)
    max_model_len: int | None = None  # longest sequence; None: the model's max_position_embeddings
    reuse: str = "tokendance"  # "none" | "prefix" | "pic" | "tokendance"
    seed: int = 0  # the engine's sampling generator (a request's own `seed` overrides it)
    recompute_ratio: float = 0.01  # share of each long shared block recomputed per agent (0 and 1: of every block)
    recompute_scheme: str = "block"  # "block" | "first" | "token"
    recompute_chunk: int | None = 2  # "block": its unit in tokens for long shared blocks; None: block_size
    short_recompute_ratio: float | None = 0.15  # shorter blocks: at least this share, token by token (recompute_for)
    master: str = "agent"  # "producer" (last round's decode KV) | "standalone" (prefilled alone) | "auto"
    #                       | "agent" (cut from reference agents' exact prompts; the rest as "auto")
    auto_standalone_tokens: int = 64  # shared blocks this long or longer are "long": standalone masters under "auto"
    #                                   (and "agent"'s fallback), and `recompute_chunk`-token chunks
    reference_min_new: float = 0.5  # "agent": a reference must bring masters for this share of its shared tokens
    master_sink: bool = True  # prefill standalone masters behind a bos sink token
    check_layer: int = 1  # layer whose key deviation picks the recomputed blocks
    selection: str = "collective"  # "collective" (once per block) | "per_agent" (pic always is)
    auto_shared: bool = True  # pic/tokendance: find recent outputs in prompts and share them (auto_shared.py)
    auto_shared_min_tokens: int | None = None  # shortest run shared automatically; None: block_size
    auto_shared_outputs: int = 256  # recent outputs indexed for auto_shared
    tensor_parallel_size: int = 1  # ranks the model is split over (parallel.py); 1 = this process only

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise RequestError naming the first bad option; nothing has been built yet."""
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_blocks", "kv_cache_memory",
                     "max_model_len", "recompute_chunk", "auto_standalone_tokens", "auto_shared_min_tokens",
                     "auto_shared_outputs", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise RequestError(f"{name} must be a positive int, got {value!r}")
        _choice("reuse", self.reuse, REUSE_MODES)
        _choice("recompute_scheme", self.recompute_scheme, SCHEMES)
        _choice("master", self.master, MASTER_SOURCES)
        _choice("selection", self.selection, SELECTIONS)
        for name in ("recompute_ratio", "reference_min_new", "short_recompute_ratio"):
            value = getattr(self, name)
            if value is None and name == "short_recompute_ratio":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise RequestError(f"{name} must be in [0, 1], got {value!r}")
        if isinstance(self.check_layer, bool) or not isinstance(self.check_layer, int) or self.check_layer < 0:
            raise RequestError(f"check_layer must be a non-negative int, got {self.check_layer!r}")
        if not isinstance(self.auto_shared, bool):
            raise RequestError(f"auto_shared must be True or False, got {self.auto_shared!r}")
        if not isinstance(self.seed, int):
            raise RequestError(f"seed must be an int, got {self.seed!r}")
        self.torch_dtype()  # raises for an unknown dtype

    def validate_for_model(self, num_layers: int) -> None:
        if self.uses_collector and not self.check_layer < num_layers:
            raise RequestError(f"check_layer must be in [0, {num_layers}), got {self.check_layer}")

    def num_kv_blocks(self, block_bytes: int) -> int:
        """The pool size in blocks, for blocks of `block_bytes` (per rank under tensor parallelism,
        so `kv_cache_memory` is a budget per device and N ranks hold N times the KV heads' room)."""
        return self.kv_cache_blocks or max(1, (self.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY) // block_bytes)

    def torch_dtype(self) -> torch.dtype:
        dtype = self.dtype
        if dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
            return dtype
        if isinstance(dtype, str) and dtype in DTYPES:
            return DTYPES[dtype]
        raise RequestError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")

    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except (RuntimeError, TypeError):
            raise RequestError(f"device must be a torch device such as 'cpu' or 'cuda:0', "
                               f"got {self.device!r}") from None

    @property
    def uses_collector(self) -> bool:
        """Modes that reuse shared blocks at new positions (the others never call the collector)."""
        return self.reuse in ("pic", "tokendance")

    @property
    def finds_shared(self) -> bool:
        """Prompts are searched for recent outputs (auto_shared.py), which then count as `Shared`."""
        return self.uses_collector and self.auto_shared

    def recompute_for(self, length: int) -> tuple[float, int]:
        """(ratio, chunk) for a shared block of `length` tokens: the share of it recomputed, and
        the "block" scheme's unit (it recomputes the first chunk, then the most deviating ones).

        A long block (`auto_standalone_tokens` or more) takes `recompute_ratio` in chunks of
        `recompute_chunk` tokens: packed diffs store any run of recomputed tokens densely, so the
        unit is free to be shorter than a KV block, and on long blocks the reuse error sits in
        the first few tokens. A short block's error is spread over all its tokens (measured on
        the default model, docs/results.md: recomputing the first 4 or 8 tokens of 12-24-token
        blocks left 3-4x the KL of recomputing the first 16). So a short block takes whole-block
        chunks, or, with `short_recompute_ratio`, at least that share of its tokens chosen one by
        one (the first, then the most deviating). Ratios 0 (pure reuse) and 1 (exact) apply to
        every block alike."""
        ratio = self.recompute_ratio
        if length >= self.auto_standalone_tokens:
            return ratio, self.recompute_chunk or self.block_size
        if self.short_recompute_ratio is not None and 0 < ratio < 1:
            return max(ratio, self.short_recompute_ratio), 1
        return ratio, self.block_size

    @property
    def auto_shared_threshold(self) -> int:
        return self.auto_shared_min_tokens or self.block_size

    @property
    def pins_outputs(self) -> bool:
        """Round outputs are kept for the next round only if a producer master may read them."""
        return self.uses_collector and self.master in ("producer", "auto", "agent")

    def producer_master_for(self, length: int) -> bool:
        """Does a shared block of `length` tokens that is an earlier output use its producer's KV?

        Measured on the default model (docs/results.md): standalone masters give about 2x lower
        first-token KL on 128-token blocks, and 2.5-7x higher on 12-48-token ones; "auto" splits
        at `auto_standalone_tokens` (64 by default, between the two). "agent" falls back to the
        same rule for the blocks that no reference agent's prompt holds."""
        return self.master == "producer" or (self.master in ("auto", "agent") and length < self.auto_standalone_tokens)

    @property
    def per_agent_selection(self) -> bool:
        return self.selection == "per_agent" or self.reuse == "pic"

    @property
    def dense_copy(self) -> bool:
        """The `pic` baseline: every shared token copied into the agent's private blocks."""
        return self.reuse == "pic"

    def with_options(self, **changes) -> "EngineConfig":
        """A validated copy with some options changed (RequestError for an unknown name)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise RequestError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return replace(self, **changes)


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RequestError(f"unknown {name} {value!r}; choose one of {choices}")
