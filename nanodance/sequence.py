"""One request's state while the engine runs it: tokens, views, what is left to compute.

A sequence holds positions 0..n-1 (`token_ids`, prompt then output). Its `views` cover a
prefix of those positions in order (each view's pos0 is the previous view's end). `pending`
is the sorted list of positions whose K/V must still be computed; every step computes a
prefix of it and, when that empties it, samples the next token from the last position's
logits. Plain prefill is `pending = [num_cached, n)`, decode is `pending = [n-1]`, and the
TokenDance extend prefill is any sorted set (private tokens and recomputed blocks) while
reused shared views cover the rest.

`exact_prefix_len` is how many leading positions hold K/V computed exactly from the token
prefix alone (no reused or approximate KV before them): only blocks inside it may be
published in the prefix index.
"""
from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

from nanodance.cache import BlockPool, View
from nanodance.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_len: int  # generation stops once prompt + output reach this (a prompt of exactly max_len still samples one)
    prompt: object = None  # what the caller passed, echoed in the output
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    views: list[View] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    exact_prefix_len: int = 1 << 62
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    reused_positions: int = 0  # prompt positions whose K/V this admission did not compute (prefix hits, views)
    num_preemptions: int = 0
    num_hashed_blocks: int = 0  # leading full blocks already published / matched
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stopped_by_token: bool = False  # finished on eos / a stop token id (that token has no KV)
    error: str | None = None
    agent_id: object = None  # a persistent agent's id: its cache is kept when it finishes
    pin_output: bool = False  # a round request: keep its output's K/V as a producer master candidate
    prefill_only: bool = False  # a master: compute the prompt's K/V, sample nothing, keep the views
    sample_of: "Sequence | None" = None  # sample j > 0 of n: queued once that one's prompt is prefilled
    decoder: object = None  # IncrementalDecoder, set by the engine when it has a tokenizer
    generator: object = None  # torch.Generator for sampling (the request's own when seeded)
    text: str = ""
    logprobs: list = field(default_factory=list)  # TokenLogprobs per sampled token, when params ask
    _view_starts: list[int] = field(default_factory=list, repr=False)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def covered(self) -> int:
        """Positions covered by views (slots exist for them)."""
        return self.views[-1].end if self.views else 0

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_at(self, pos: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < n else self.output_token_ids[pos - n]

    def add_view(self, view: View) -> None:
        assert view.pos0 == self.covered, "views must cover positions contiguously"
        self.views.append(view)
        self._view_starts.append(view.pos0)

    def replace_views(self, views: list[View]) -> None:
        self.views = list(views)
        self._view_starts = [v.pos0 for v in self.views]

    def view_at(self, pos: int) -> View:
        i = bisect.bisect_right(self._view_starts, pos) - 1
        return self.views[i]

    def slot_of(self, pos: int, block_size: int) -> int:
        """Flat pool slot that holds (or will hold) the K/V of position `pos`."""
        v = self.view_at(pos)
        return v.block * block_size + v.lo + (pos - v.pos0)

    def take_cached_prefix(self, pool: BlockPool) -> int:
        """Reuse the longest run of cached full blocks of the token prefix; returns the tokens reused.

        Only at a fresh start (`pending` begins at 0), only inside `exact_prefix_len`, and at
        least one token is always left to compute (its logits sample the first output).
        """
        if self.pending[:1] != [0]:
            return 0
        bs = pool.block_size
        views, hashes = pool.match_prefix(self.token_ids, min(self.num_tokens - 1, self.exact_prefix_len) // bs)
        for view in views:
            self.add_view(view)
        self.block_hashes.extend(hashes)
        self.num_hashed_blocks = len(hashes)
        hit = len(views) * bs
        if hit:
            self.pending = [p for p in self.pending if p >= hit]
        self.reused_positions = hit
        if self.num_preemptions == 0:
            self.num_cached_tokens = hit
        return hit

    def reset_for_recompute(self) -> None:
        """After preemption: no views, everything (prompt and output so far) to compute again."""
        self.replace_views([])
        self.pending = list(range(self.num_tokens))
        self.num_hashed_blocks = 0
        self.status = Status.WAITING


@dataclass
class ScheduledChunk:
    seq: Sequence
    positions: list[int]  # sorted positions whose K/V this step computes
    sample: bool  # the chunk empties `pending`: sample the next token from its last row
