"""`ServingEngine`: one `LLM` on one background thread, fed by requests from any thread.

The OpenAI server (server.py) puts every HTTP request here; tests and scripts may use it directly.

    serving = ServingEngine(llm, admission_window=0.02)
    ticket = serving.submit(prompt, SamplingParams(...), on_update=callback)   # from any thread
    ticket.wait() -> list[RequestOutput]       # its n samples; `ticket.outputs` grows meanwhile
    serving.cancel(ticket)                     # a client went away: abort it, free its blocks
    serving.shutdown()

Rounds without a round call: the engine thread takes the first waiting request, waits
`admission_window` seconds for others, and runs all of them as one batch: one round
(`run_round`, its accounting in `llm.round_history` whatever the reuse mode), so under
`reuse="pic"`/`"tokendance"` requests that arrive together share one master and one recompute
choice per shared span, found in their prompts by auto_shared.py. Batching is continuous: a
plain request (no shared span found, no agent id) that arrives while a batch runs joins it at
the next step (`Engine.join`); one with shared spans waits for the next batch, its round, which
starts as soon as the current one ends. A ticket is done when its own outputs finish. Each batch's outputs
stay pinned for `keep_batches` batches (not only the next one), so a late request of a round
still reads the outputs of the round before as producer masters.

Requests are validated and encoded in the submitting thread (`submit` raises `RequestError` at
once: nothing is queued); everything that touches the engine's state runs on its thread.
`on_update(ticket)` is called on the engine thread after every step that changed the ticket's
outputs, and once more when it is done: keep it short (the server hands it to its event loop).
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from nanodance.engine import RequestOutput
from nanodance.errors import CapacityError, NanodanceError, RequestError
from nanodance.sampling import SamplingParams
from nanodance.segments import EncodedPrompt

logger = logging.getLogger("nanodance")

_STOP = object()  # the inbox's shutdown marker


@dataclass(eq=False)
class Ticket:
    """One submitted request (with its n samples) and what has come of it so far."""

    encoded: EncodedPrompt
    params: SamplingParams
    agent: Hashable | None
    prompt: Any
    on_update: Callable[["Ticket"], None] | None = None
    outputs: list[RequestOutput] = field(default_factory=list)  # the latest snapshot of its n samples
    error: BaseException | None = None  # the batch failed as a whole (e.g. CapacityError)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> list[RequestOutput]:
        """Block until finished; the final outputs, or the batch's error raised."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return self.outputs


@dataclass
class ServingCounters:
    batches: int = 0
    requests: int = 0  # tickets run (a ticket's n samples count once)
    cancelled: int = 0  # tickets cancelled by their client (before or while running)
    rejected: int = 0  # submits refused because the inbox was full
    batch_errors: int = 0  # batches that failed as a whole
    joined: int = 0  # plain requests that joined a batch in flight
    largest_batch: int = 0


class ServingEngine:
    """Runs `llm` on a daemon thread (see the module docstring); `shutdown()` stops it."""

    def __init__(self, llm, admission_window: float = 0.02, max_waiting: int = 1024, keep_batches: int = 2):
        if admission_window < 0 or max_waiting < 1 or keep_batches < 1:
            raise ValueError("admission_window >= 0, max_waiting >= 1 and keep_batches >= 1")
        self.llm = llm
        self.admission_window = admission_window
        self.keep_batches = keep_batches
        self.counters = ServingCounters()
        self._inbox: queue.Queue = queue.Queue(maxsize=max_waiting)
        self._recent: collections.deque[list[RequestOutput]] = collections.deque(maxlen=keep_batches)
        self._carried: list[Ticket] = []  # tickets for the next batch (a repeated agent id, a late round request)
        self._stopping = False  # the shutdown marker was taken from the inbox
        self._thread = threading.Thread(target=self._loop, name="nanodance-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread

    def submit(self, prompt: Any, params: SamplingParams | None = None, agent: Hashable | None = None,
               on_update: Callable[[Ticket], None] | None = None) -> Ticket:
        """Validate and encode `prompt` (RequestError now if invalid) and queue it.

        CapacityError when `max_waiting` requests already wait, or the engine has stopped.
        """
        if not self._thread.is_alive():
            raise CapacityError("the engine thread has stopped")
        params = params or SamplingParams()
        params.validate()
        encoded = self.llm.encode_round_prompt(prompt)
        limit = self.llm.max_model_len
        if len(encoded.token_ids) > limit:
            raise RequestError(f"the prompt has {len(encoded.token_ids)} tokens, more than max_model_len={limit}")
        if agent is not None:
            hash(agent)  # TypeError now, not on the engine thread
        ticket = Ticket(encoded, params, agent, prompt, on_update)
        try:
            self._inbox.put_nowait(ticket)
        except queue.Full:
            self.counters.rejected += 1
            raise CapacityError(f"{self._inbox.maxsize} requests are already waiting; retry later") from None
        return ticket

    def generate(self, prompt: Any, params: SamplingParams | None = None, agent: Hashable | None = None,
                 timeout: float | None = None) -> list[RequestOutput]:
        """Submit and wait: the request's outputs (n of them)."""
        return self.submit(prompt, params, agent).wait(timeout)

    def cancel(self, ticket: Ticket) -> None:
        """Abort `ticket` at the engine's next step (or skip it if it has not started)."""
        if not ticket.done and not ticket.cancelled:
            ticket.cancelled = True
            self.counters.cancelled += 1

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, fail whatever still waits, stop the thread."""
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def waiting(self) -> int:
        return self._inbox.qsize()

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while not self._stopping:
            first = self._carried.pop(0) if self._carried else self._inbox.get()
            if first is _STOP:
                break
            batch = [first] + self._carried
            self._carried = []
            deadline = time.monotonic() + self.admission_window
            while (left := deadline - time.monotonic()) > 0:
                try:
                    ticket = self._inbox.get(timeout=left)
                except queue.Empty:
                    break
                if ticket is _STOP:
                    self._stopping = True
                    break
                batch.append(ticket)
            batch, self._carried = _split_repeated_agents(batch)
            self._run_batch(batch)
        for ticket in self._carried + _drain(self._inbox):
            self._finish(ticket, error=CapacityError("the server is shutting down"))

    def _run_batch(self, batch: list[Ticket]) -> None:
        for ticket in [t for t in batch if t.cancelled]:
            self._finish(ticket)
        batch = [t for t in batch if not t.cancelled]
        if not batch:
            return
        llm = self.llm
        self.counters.batches += 1
        self.counters.requests += len(batch)
        self.counters.largest_batch = max(self.counters.largest_batch, len(batch))
        slices, at = [], 0
        for t in batch:
            slices.append(slice(at, at + t.params.n))
            at += t.params.n
        joined: list[tuple[Ticket, list]] = []  # plain requests that arrived while the batch ran
        try:
            call = llm.prepare_call([t.encoded for t in batch], [t.params for t in batch], [t.agent for t in batch],
                                    [t.prompt for t in batch], as_round=True)
            final: list[RequestOutput] = []
            for snapshot in llm.stream_call(call):
                final = snapshot
                for t, part in zip(batch, slices):
                    self._update(t, snapshot[part])
                for t, seqs in joined:
                    self._update(t, [llm.engine.output(s) for s in seqs])
                if llm.engine.call is not None:  # the last snapshot comes after the call ended
                    joined += self._join_late_arrivals()
        except Exception as exc:  # NanodanceError (e.g. CapacityError), or an engine bug: fail this batch, keep serving
            self.counters.batch_errors += 1
            log = logger.warning if isinstance(exc, NanodanceError) else logger.exception
            log("a batch of %d requests failed: %s", len(batch) + len(joined), exc)
            for t in [*batch, *(t for t, _ in joined)]:
                if not t.done:
                    self._finish(t, error=exc)
            return
        self._keep_outputs(final)
        for t in [*batch, *(t for t, _ in joined)]:
            if not t.done:
                self._finish(t)

    def _update(self, ticket: Ticket, outputs: list[RequestOutput]) -> None:
        """New outputs of a running ticket: abort it if cancelled, tell its client, finish it when all are."""
        if ticket.done:
            return
        if ticket.cancelled:
            for out in outputs:
                if out.finish_reason is None:
                    self.llm.abort(out.request_id)
        if outputs != ticket.outputs:
            ticket.outputs = outputs
            self._notify(ticket)
        if all(out.finish_reason is not None for out in outputs):
            self._finish(ticket)  # now, not when the whole batch ends

    def _join_late_arrivals(self) -> list[tuple[Ticket, list]]:
        """Between two steps: plain requests that arrived since the batch started join it (continuous
        batching); those with shared spans or an agent id wait for the next batch, their round."""
        joined = []
        while not self._stopping:
            try:
                ticket = self._inbox.get_nowait()
            except queue.Empty:
                break
            if ticket is _STOP:
                self._stopping = True
                break
            if ticket.cancelled:
                self._finish(ticket)
                continue
            call = self.llm.prepare_call([ticket.encoded], [ticket.params], [ticket.agent], [ticket.prompt])
            if call.as_round or ticket.agent is not None:
                self._carried.append(ticket)
                continue
            seqs = self.llm.sequences(call)
            self.llm.engine.join(seqs)
            self.counters.requests += 1
            self.counters.joined += 1
            joined.append((ticket, seqs))
        return joined

    def _keep_outputs(self, outputs: list[RequestOutput]) -> None:
        """Keep the last `keep_batches` batches' outputs pinned (producer masters for late requests)."""
        llm = self.llm
        if llm.collector is None:
            return
        self._recent.append(outputs)
        llm.keep_outputs(outputs)
        llm.release_round_outputs(keep=[o for batch in self._recent for o in batch])

    def _finish(self, ticket: Ticket, error: BaseException | None = None) -> None:
        ticket.error = error
        ticket._done.set()
        self._notify(ticket)

    @staticmethod
    def _notify(ticket: Ticket) -> None:
        if ticket.on_update is None:
            return
        try:
            ticket.on_update(ticket)
        except Exception:  # a client's callback must not stop the engine
            logger.exception("on_update of a request failed")


def _split_repeated_agents(batch: list[Ticket]) -> tuple[list[Ticket], list[Ticket]]:
    """A persistent agent runs once per call: its second request waits for the next batch."""
    seen, now, later = set(), [], []
    for t in batch:
        if t.agent is not None and t.agent in seen:
            later.append(t)
        else:
            if t.agent is not None:
                seen.add(t.agent)
            now.append(t)
    return now, later


def _drain(inbox: queue.Queue) -> list[Ticket]:
    out = []
    while True:
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return out
        if item is not _STOP:
            out.append(item)

