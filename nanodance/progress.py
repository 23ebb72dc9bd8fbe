"""Progress of one call, in tokens: a tqdm bar that moves during prefill as well as decode.

Counting finished requests left long rounds at 0/N through their whole prefill. This bar
counts the positions the engine computed (the scheduler's prefill and decode counters), so its
rate is the engine's tokens per second; the postfix splits prefill from decode and says how
many requests are done. The total is re-estimated every step from what is left: the pending
positions of unfinished requests (a round's layout shrinks them at admission) plus the tokens
each may still sample (an early stop frees the rest of its `max_tokens`).
"""
from __future__ import annotations

from nanodance.sequence import Sequence


class Progress:
    def __init__(self, seqs: list[Sequence], enabled: bool = True, desc: str = "generate"):
        self.seqs = seqs
        self._bar = None
        self._start: tuple[int, int] | None = None  # the counters when the call began
        if enabled and len(seqs) >= 2:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self._remaining(), desc=desc, unit="tok", leave=False, dynamic_ncols=True)

    def _remaining(self) -> int:
        left = 0
        for s in self.seqs:
            if not s.is_finished:
                left += len(s.pending) + max(0, s.params.max_tokens - len(s.output_token_ids) - 1)
        return left

    def begin(self, counters) -> None:
        """Before the first step, with the scheduler's cumulative counters (`SchedulerCounters`)."""
        self._start = (counters.prefill_tokens_computed, counters.decode_tokens)

    def update(self, counters) -> None:
        """After a step, with the same counters."""
        if self._bar is None or self._start is None:
            return
        now = (counters.prefill_tokens_computed, counters.decode_tokens)
        prefill, decode = now[0] - self._start[0], now[1] - self._start[1]
        self._bar.total = prefill + decode + self._remaining()
        self._bar.update(prefill + decode - self._bar.n)
        finished = sum(s.is_finished for s in self.seqs)
        self._bar.set_postfix_str(f"prefill {prefill} tok, decode {decode} tok, {finished}/{len(self.seqs)} "
                                  f"requests done", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
