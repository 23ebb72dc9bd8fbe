"""Continuous batching: which positions of which sequences the next step computes.

Owns the waiting and running queues, block allocation for each step, prefix-cache matching
at admission, preemption by recompute, and the bookkeeping after a step (append the sampled
token, finish checks, publish full blocks to the prefix index); the engine releases finished
sequences (`release`) once it has kept what later rounds reuse.

One step (`schedule`) spends a token budget (`max_num_batched_tokens`):
1. running sequences in admission order take the next positions of their `pending` list
   (decode = 1 position, a prefill chunk = up to the remaining budget); when the pool has no
   block for them, the most recently admitted running sequence is preempted (its blocks
   released, its tokens recomputed later) until the allocation fits;
2. if nothing was preempted, waiting sequences are admitted in order while the budget, the
   pool and `max_num_seqs` allow; an admitted sequence first reuses its cached prefix blocks.
The result is a list of `ScheduledChunk`s; the runner turns them into one forward pass.

A round request is laid out at admission by a `LayoutSource` (the engine's `RoundLayouts`): the scheduler
asks it, through that one method, to give the sequence its views (master views, private blocks,
diff blocks). Nothing is stored on the sequence to call back, and the scheduler never reaches
into the engine: `postprocess` returns what happened (`StepResult`), and the engine decides
what to keep of a finished sequence before calling `release`.

Full blocks enter the prefix index when the step that completes them is scheduled, not after it
ran (as in vLLM v1). So prompts admitted in the same step share their common prefix. That is
safe because the forward pass writes every chunk's K/V into the pool before any attention of
the same layer reads it. If the step never runs (an exception between `schedule` and
`postprocess`), `forget_unwritten()` takes those blocks out of the index again.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from nanodance.cache import BlockPool, View, chain_hash
from nanodance.errors import NoFreeBlocks
from nanodance.sequence import ScheduledChunk, Sequence, Status


class LayoutSource(Protocol):
    """Who lays out a round request's views at admission (the KV collector)."""

    def lay_out(self, seq: Sequence) -> bool | None:
        """Give fresh `seq` its views: True when done, False when the pool is short (nothing
        is kept, the sequence is untouched), None when `seq` has no plan (plain prefix match)."""


@dataclass
class StepResult:
    """What one step changed: requests whose prompt is now computed, and requests that finished.

    Finished sequences still hold their views: the engine keeps what later rounds reuse (a
    pinned output, a persistent agent's cache), then calls `Scheduler.release`. Finished
    masters (`prefill_only`) keep theirs for the collector.
    """

    prefilled: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)


@dataclass
class SchedulerCounters:
    prefill_tokens_computed: int = 0  # positions computed in chunks that were not decode steps
    prefill_tokens_reused: int = 0  # prompt positions not computed (prefix hits, master views), per prefilled request
    decode_tokens: int = 0
    preemptions: int = 0
    steps: int = 0


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: Iterable[int] = (), layouts: LayoutSource | None = None):
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.counters = SchedulerCounters()
        self.layouts = layouts
        self._unwritten: list[int] = []  # blocks published by `schedule` whose step has not run yet

    # ------------------------------------------------------------------ queues

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence, reason: str = "abort", error: str | None = None) -> None:
        """Stop `seq` wherever it is (running, waiting, or not queued yet) and free its blocks.

        Its output keeps the tokens it has; `reason` becomes its finish reason ("abort", or
        "error" with `error` for a request the pool can never serve).
        """
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, reason, error)
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Free a finished sequence's blocks (after the engine took what it keeps of them)."""
        self.pool.release(seq.views)
        seq.replace_views([])
        seq.pending = []

    # ------------------------------------------------------------------ one step

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            take = seq.pending[:budget]
            while not self._ensure_slots(seq, take[-1]):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it preempted itself: nothing after it can run either
            chunks.append(ScheduledChunk(seq, take, sample=self._samples(seq, take)))
            self._publish_full_blocks(seq, computed=self._computed_after(seq, take))
            budget -= len(take)
            i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                fresh = not seq.views
                if fresh:
                    laid_out = self.layouts.lay_out(seq) if self.layouts is not None else None
                    if laid_out is False:  # the layout could not get its blocks; it cleaned up
                        break
                    if laid_out is None:
                        seq.take_cached_prefix(self.pool)
                take = seq.pending[:budget]
                if not self._ensure_slots(seq, take[-1]):
                    if fresh:  # give back what admission took; it stays first in line
                        self.pool.release(seq.views)
                        seq.reset_for_recompute()
                    break
                self.waiting.popleft()
                seq.status = Status.RUNNING
                self.running.append(seq)
                chunks.append(ScheduledChunk(seq, take, sample=self._samples(seq, take)))
                self._publish_full_blocks(seq, computed=self._computed_after(seq, take))
                budget -= len(take)
        self.counters.steps += bool(chunks)
        return chunks

    @staticmethod
    def _samples(seq: Sequence, take: list[int]) -> bool:
        return len(take) == len(seq.pending) and not seq.prefill_only

    @staticmethod
    def _computed_after(seq: Sequence, take: list[int]) -> int:
        """Positions below this hold K/V once the step computing `take` has run."""
        return seq.pending[len(take)] if len(take) < len(seq.pending) else seq.num_tokens

    def forget_unwritten(self) -> None:
        """The scheduled step did not run: unpublish the blocks it was to complete."""
        for block in self._unwritten:
            self.pool.unpublish(block)
        self._unwritten = []

    def _ensure_slots(self, seq: Sequence, last_pos: int) -> bool:
        """Give `seq` private blocks until its views cover `last_pos`; False if the pool ran dry."""
        while seq.covered <= last_pos:
            try:
                block = self.pool.allocate(frame0=seq.covered)
            except NoFreeBlocks:
                return False
            seq.add_view(View(block, 0, self.block_size, seq.covered))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.views)
        seq.block_hashes = []
        seq.reset_for_recompute()
        seq.num_preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ after the step

    def postprocess(self, chunks: list[ScheduledChunk], tokens: list[int | None]) -> StepResult:
        """Apply a step's results (`tokens[i]` for chunks that sampled)."""
        result = StepResult()
        self._unwritten = []  # the step ran: what `schedule` published is written
        for chunk, token in zip(chunks, tokens):
            seq = chunk.seq
            del seq.pending[:len(chunk.positions)]
            if chunk.sample and len(chunk.positions) == 1 and seq.output_token_ids:
                self.counters.decode_tokens += 1
            else:
                self.counters.prefill_tokens_computed += len(chunk.positions)
            if seq.prefill_only and not seq.pending:
                # A master: its K/V is computed; the views now belong to whoever asked for it.
                self.running.remove(seq)
                seq.status, seq.finish_reason = Status.FINISHED, "prefill"
                result.finished.append(seq)
                continue
            if not chunk.sample:
                continue
            if not seq.output_token_ids:
                self.counters.prefill_tokens_reused += seq.reused_positions
                result.prefilled.append(seq)
            reason = self._append_token(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                result.finished.append(seq)
            else:
                seq.pending = [seq.num_tokens - 1]
        return result

    def _append_token(self, seq: Sequence, token: int) -> str | None:
        """Append a sampled token; the finish reason if the sequence is done, else None."""
        seq.output_token_ids.append(token)
        p = seq.params
        if seq.decoder is not None:
            before = len(seq.text)
            seq.text += seq.decoder.push(token)
            for stop in p.stop:
                # Search only where a new match can start: the new text and the stop's length before it.
                at = seq.text.find(stop, max(0, before - len(stop) + 1))
                if at != -1:
                    seq.text = seq.text[:at]
                    seq.decoder = None  # the text is final: nothing may be flushed after the cut
                    return "stop"
        if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
            seq.stopped_by_token = True
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= seq.max_len:
            return "length"
        return None

    def _publish_full_blocks(self, seq: Sequence, computed: int) -> None:
        """Put the full blocks below position `computed` that hold exactly computed K/V in the
        prefix index (called when the step that writes them is scheduled)."""
        bs = self.block_size
        known = min(computed, seq.exact_prefix_len)
        while (seq.num_hashed_blocks + 1) * bs <= known:
            i = seq.num_hashed_blocks
            view = seq.views[i]
            if (view.lo, view.hi, view.pos0) != (0, bs, i * bs):
                seq.exact_prefix_len = i * bs  # not a plain aligned block: the chain stops here
                return
            block_tokens = seq.token_ids[i * bs:(i + 1) * bs]
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, block_tokens)
            if self.pool.register(view.block, h, block_tokens):
                self._unwritten.append(view.block)
            seq.block_hashes.append(h)
            seq.num_hashed_blocks += 1

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.decoder is not None:
            seq.text += seq.decoder.flush()
        seq.finish_reason = reason
        seq.error = error
        seq.status = Status.FINISHED
