"""Sampling parameters (validated at construction) and the batched sampler.

    sample(logits fp32 [N, vocab], params: list[SamplingParams], generators) -> list[int]

Temperature 0 is greedy: the exact argmax of the logits (first index on ties, like
`torch.argmax`), never a sampled draw. Otherwise logits are divided by the temperature,
restricted to the top-k and then to the top-p nucleus, and one token is drawn with the
request's own `torch.Generator` (seeded from `seed` when given), so a seeded request gives the
same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from nanodance.errors import RequestError

MAX_LOGPROBS = 20  # as OpenAI's API: top_logprobs <= 20
MAX_N = 128  # as OpenAI's API


@dataclass
class SamplingParams:
    """How one request samples (the defaults are vLLM's: sampled at temperature 1, 16 tokens)."""

    temperature: float = 1.0  # 0 is greedy (exact argmax); higher flattens the distribution
    top_p: float = 1.0  # nucleus: sample among the smallest set of tokens whose probability reaches top_p
    top_k: int = -1  # sample among the k likeliest tokens; -1: no top-k restriction
    max_tokens: int = 16  # new tokens at most (finish_reason "length" when reached)
    seed: int | None = None  # the request's own generator: same tokens whatever else is in the batch
    stop: list[str] | str | None = None  # stop strings (finish_reason "stop"; not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)  # stop on these ids too (kept in token_ids)
    ignore_eos: bool = False  # keep going past the model's end-of-sequence tokens
    logprobs: int | None = None  # report each sampled token's log-probability and the top-k (k <= 20)
    n: int = 1  # samples of the prompt (consecutive outputs; the copies read the first's prompt blocks)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Normalize stop / stop_token_ids to lists; RequestError naming the first invalid field.

        The engine calls it again when the params are used: they may have been changed since.
        """
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple, type(None))):
            raise RequestError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            raise RequestError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise RequestError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or (self.top_k < 1 and self.top_k != -1):
            raise RequestError(f"top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise RequestError(f"seed must be an int or None, got {self.seed!r}")
        bad_stop = [s for s in self.stop if not isinstance(s, str) or not s]
        if bad_stop:
            raise RequestError(f"stop must be a non-empty string or a list of them, got {bad_stop!r}")
        bad_ids = [t for t in self.stop_token_ids if not isinstance(t, int) or isinstance(t, bool) or t < 0]
        if bad_ids:
            raise RequestError(f"stop_token_ids must be non-negative ints, got {bad_ids!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise RequestError(f"n must be an int in [1, {MAX_N}], got {self.n!r}")
        k = self.logprobs
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
            raise RequestError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_sample(self, j: int) -> "SamplingParams":
        """The params of sample `j` of `n`: one sample each; a seeded request's samples draw from
        seeds `seed`, `seed + 1`, ... (the same seed would draw the same tokens n times)."""
        if self.n == 1:
            return self
        return replace(self, n=1, seed=None if self.seed is None else self.seed + j)


@dataclass
class TokenLogprobs:
    """One sampled token's log-probability under the model (before temperature, top-k and top-p)
    and the `k` most likely tokens with theirs, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprobs]:
    """For rows of fp32 `logits` [N, vocab]: each row's sampled token and its top-`ks[i]` tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, max(max(ks), 1), dim=-1)
    out = []
    for row, (token, k) in enumerate(zip(tokens, ks)):
        pairs = list(zip(top.indices[row, :k].tolist(), top.values[row, :k].tolist()))
        out.append(TokenLogprobs(token, float(logp[row, token]), pairs))
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of `logits` (fp32 [N, vocab])."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        tokens[row] = _draw(logits[row], p, gen)
    return tokens


def _draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    scores = logits.float() / p.temperature
    if p.top_k != -1 and p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before
        # it already does (the most likely token is always kept).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen).item())
