"""Progress of one call, in tokens: a tqdm bar that moves during prefill as well as decode.

Counting finished requests left long rounds at 0/N through their whole prefill. This bar
counts token positions computed (prefill chunks and decode steps alike) against what is left
to compute, so its rate is the engine's tokens per second; the postfix splits prefill from
decode and says how many requests are done. The total is re-estimated every step: a round's
layout shrinks what its prompts still need, and an early stop frees the rest of `max_tokens`.
"""
from __future__ import annotations

from nanodance.sequence import Sequence


class Progress:
    def __init__(self, seqs: list[Sequence], enabled: bool = True, desc: str = "generate"):
        self.seqs = seqs
        self._bar = None
        self._done_tokens = 0
        self._prefill = self._decode = 0
        if enabled and len(seqs) >= 2:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self._remaining(), desc=desc, unit="tok", leave=False, dynamic_ncols=True)
        self._last = self._snapshot()

    def _remaining(self) -> int:
        """Positions still to compute: pending prompt positions plus the tokens left to sample."""
        left = 0
        for s in self.seqs:
            if not s.is_finished:
                left += len(s.pending) + max(0, s.params.max_tokens - len(s.output_token_ids) - 1)
        return left

    def _snapshot(self) -> dict[int, tuple[int, int]]:
        return {s.seq_id: (len(s.pending), len(s.output_token_ids)) for s in self.seqs}

    def update(self) -> None:
        """After a step: count what each request computed since the last update."""
        if self._bar is None:
            return
        now = self._snapshot()
        for s in self.seqs:
            pending0, out0 = self._last[s.seq_id]
            pending1, out1 = now[s.seq_id]
            if out0 == 0 and s.output_token_ids:  # its prompt finished: count what was pending
                self._prefill += pending0
            elif out0 == 0 and not s.is_finished:
                self._prefill += max(0, pending0 - pending1)
            else:
                self._decode += max(0, out1 - out0)
        self._last = now
        done = self._prefill + self._decode
        self._bar.total = done + self._remaining()
        self._bar.update(done - self._done_tokens)
        self._done_tokens = done
        finished = sum(s.is_finished for s in self.seqs)
        self._bar.set_postfix_str(f"prefill {self._prefill} tok, decode {self._decode} tok, "
                                  f"{finished}/{len(self.seqs)} requests done", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
