"""Automatic shared spans: find the engine's own recent outputs inside new prompts, unmarked.

Multi-agent frameworks paste the other agents' answers into plain message text and send one
request per agent; none of them marks what is shared. The engine generated those answers, so
it can recognize them: `OutputIndex` keeps the token ids of the last `capacity` outputs and a
k-gram index over them (each run of `k` consecutive ids -> where it occurs), and
`find_spans(prompt ids)` returns each long enough run of the prompt that equals a run of one
output as a `SharedSpan` whose `source` is that output and `source_offset` where the run starts
in it. The collector then treats it exactly as an explicit `Shared` block (a producer master
cut out of the output's K/V when still pinned, else a standalone one).

Matching is exact on token ids, greedy and left to right: at each prompt position the index
proposes outputs sharing the next k ids; each is extended as far as the ids agree, the longest
wins (the most recent output on a tie) and the scan resumes after it. Where the pasted text
meets its surroundings (a quote, a newline, a backtick), BPE may merge the output's first or
last token with its neighbour; the ids then differ there and the span simply starts or ends a
token or two inside the output: those tokens are prefilled as private text. A run shorter than
`min_tokens` (about a block) is left private: reusing it would save less than it costs.

    index = OutputIndex(k=8, capacity=256)
    index.add(output)                         # a RequestOutput (its tokens, final stop token dropped)
    index.find_spans(prompt_ids, min_tokens=16, taken=[(start, end), ...]) -> list[SharedSpan]

Cost: one dict lookup per prompt position plus the extension of the candidates; measured
against prefill in bench/auto_shared.py.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable

from nanodance.segments import SharedSpan, output_block_ids

MAX_CANDIDATES_PER_GRAM = 16  # common phrases occur in many outputs: look at the most recent few


class OutputIndex:
    """The last `capacity` outputs' token ids, indexed by their k-grams (least recently added goes first)."""

    def __init__(self, k: int = 8, capacity: int = 256):
        if k < 1 or capacity < 1:
            raise ValueError("k and capacity must be >= 1")
        self.k, self.capacity = k, capacity
        self._outputs: OrderedDict[int, tuple[Any, list[int]]] = OrderedDict()  # request id -> (output, ids)
        self._grams: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # k ids -> [(request id, offset)]

    def __len__(self) -> int:
        return len(self._outputs)

    def add(self, output: Any) -> None:
        """Index a finished output (RequestOutput); outputs shorter than k ids are not indexed."""
        ids = output_block_ids(output)
        rid = output.request_id
        if len(ids) < self.k or rid in self._outputs:
            return
        self._outputs[rid] = (output, ids)
        for j, gram in enumerate(self._k_grams(ids)):
            hits = self._grams.setdefault(gram, [])
            hits.append((rid, j))
            if len(hits) > MAX_CANDIDATES_PER_GRAM:
                del hits[0]
        while len(self._outputs) > self.capacity:
            self._forget(next(iter(self._outputs)))

    def _forget(self, rid: int) -> None:
        _, ids = self._outputs.pop(rid)
        for gram in set(self._k_grams(ids)):
            hits = [h for h in self._grams.get(gram, ()) if h[0] != rid]
            if hits:
                self._grams[gram] = hits
            else:
                self._grams.pop(gram, None)

    def _k_grams(self, ids: list[int]) -> Iterable[tuple[int, ...]]:
        return (tuple(ids[j:j + self.k]) for j in range(len(ids) - self.k + 1))

    def find_spans(self, prompt: list[int], min_tokens: int,
                   taken: Iterable[tuple[int, int]] = ()) -> list[SharedSpan]:
        """Runs of `prompt` equal to runs of indexed outputs, `min_tokens` long or longer, in order.

        `taken` are [start, end) ranges already shared explicitly: no span overlaps them.
        """
        if not self._outputs:
            return []
        free = _free_ranges(len(prompt), sorted(taken))
        spans = []
        for lo, hi in free:
            i = lo
            while i + self.k <= hi:
                best = self._longest_at(prompt, i, hi)
                if best is not None and best[0] >= max(min_tokens, self.k):
                    length, rid, offset = best
                    output = self._outputs[rid][0]
                    spans.append(SharedSpan(i, i + length, tuple(prompt[i:i + length]), output, offset))
                    i += length
                else:
                    i += 1
        return spans

    def _longest_at(self, prompt: list[int], i: int, hi: int) -> tuple[int, int, int] | None:
        """(length, request id, offset) of the longest output run starting at prompt[i], not past hi."""
        best = None
        for rid, offset in reversed(self._grams.get(tuple(prompt[i:i + self.k]), ())):  # most recent first
            ids = self._outputs[rid][1]
            n = 0
            while i + n < hi and offset + n < len(ids) and prompt[i + n] == ids[offset + n]:
                n += 1
            if best is None or n > best[0]:
                best = (n, rid, offset)
        return best


def _free_ranges(n: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[0, n) minus the `taken` ranges (sorted by start; they may overlap)."""
    free, at = [], 0
    for start, end in taken:
        if start > at:
            free.append((at, start))
        at = max(at, end)
    if at < n:
        free.append((at, n))
    return free
