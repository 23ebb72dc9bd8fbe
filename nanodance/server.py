"""The OpenAI-compatible HTTP server: multi-agent frameworks get TokenDance by changing `base_url`.

    python -m nanodance serve --port 8000          # the bundled model; --model, --reuse, ... (cli.py)
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    app = build_app(ServingEngine(llm), "SmolLM2-135M-Instruct")   # a FastAPI app (tests run it in a thread)

Routes: POST /v1/chat/completions and /v1/completions (also streamed, as server-sent events),
GET /v1/models, /health, /stats (the engine's `stats()`, the serving counters and the last
rounds' accounting, as JSON) and /metrics (Prometheus text format, from a registry of this app's
own: no global state).

Nothing needs marking: the engine finds earlier outputs in the prompts (auto_shared.py), and
requests that arrive together are run as one round (serving.py). A client may still mark
explicitly with `extra_body={"nanodance": {"agent": "alice", "shared": ["text", ...]}}`: `agent`
makes the request a persistent agent's turn (its cache is kept for its next request), each
`shared` string is cut out of the prompt as a `Shared` block.

The wire format (which fields, what they mean, the response shapes) is openai_protocol.py's;
this module is the HTTP side: routes, waiting on the engine thread (serving.py) without
blocking the event loop, server-sent events, metrics. Malformed JSON, an unknown model, a bad
or unsupported parameter and a prompt too long are HTTP 400 with OpenAI's error body
(`{"error": {"message", "type", "param", "code"}}`); a full queue or a batch the pool cannot
hold is 503. A client that disconnects
(mid-stream or while waiting) has its request aborted and its blocks freed.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from nanodance.engine import RequestOutput
from nanodance.errors import CapacityError, NanodanceError, RequestError
from nanodance.openai_protocol import ApiError, ResponseShape, check_model, event, parse_request
from nanodance.sampling import SamplingParams
from nanodance.serving import ServingEngine, Ticket

def build_app(serving: ServingEngine, model_name: str) -> FastAPI:
    """The FastAPI app over `serving` (the app stops it on shutdown)."""
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        serving.shutdown()

    app = FastAPI(title="nanodance", version="0.1.0", lifespan=lifespan)
    metrics = _Metrics(serving)
    tokenizer = serving.llm.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, _exc) -> JSONResponse:
        return ApiError(404, f"no route {request.method} {request.url.path}", "not_found_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not serving.running:
            return ApiError(503, "the engine thread has stopped", "server_error").response()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanodance"}]}

    @app.get("/stats")
    async def stats() -> dict:
        llm = serving.llm
        return {"engine": llm.stats(), "serving": {**vars(serving.counters), "waiting": serving.waiting()},
                "rounds": list(llm.round_history[-8:])}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, chat=False)

    async def _complete(request: Request, chat: bool):
        endpoint = "chat" if chat else "completions"
        started = time.monotonic()
        try:
            body = await _json_body(request)
            check_model(body, model_name)
            req = parse_request(body, chat)
            tickets = [_submit(serving, p, req.params, req.agent, req.fill_max_tokens) for p in req.prompts]
        except ApiError as exc:
            metrics.requests.labels(endpoint, str(exc.status)).inc()
            return exc.response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        shape = ResponseShape(rid, int(time.time()), model_name, chat, tokenizer, req.params)
        if req.stream:
            metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(_sse(serving, tickets, shape, req.include_usage, metrics, started),
                                     media_type="text/event-stream")
        try:
            outputs = await _wait_all(serving, tickets, request)
        except ApiError as exc:
            metrics.requests.labels(endpoint, str(exc.status)).inc()
            return exc.response()
        metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        return JSONResponse(shape.response(outputs))

    return app


# ---------------------------------------------------------------------- requests

async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _submit(serving: ServingEngine, prompt: Any, params: SamplingParams, agent: Any, fill: bool) -> Ticket:
    try:
        if fill:  # no max_tokens given: up to the context length, as OpenAI
            ids = serving.llm.encode_round_prompt(prompt).token_ids
            params = replace(params, max_tokens=max(1, serving.llm.max_model_len - len(ids)))
        return serving.submit(prompt, params, agent)
    except CapacityError as exc:
        raise ApiError(503, str(exc), "server_error") from None
    except (NanodanceError, TypeError) as exc:
        raise ApiError(400, str(exc)) from None


# ---------------------------------------------------------------------- waiting and streaming

def _watch(ticket: Ticket) -> asyncio.Queue:
    """An asyncio queue that receives (outputs, done, error) from the engine thread."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()

    def push(t: Ticket) -> None:
        loop.call_soon_threadsafe(updates.put_nowait, (list(t.outputs), t.done, t.error))

    ticket.on_update = push
    if ticket.done:  # finished before the callback was attached
        push(ticket)
    return updates


async def _wait_all(serving: ServingEngine, tickets: list[Ticket], request: Request) -> list[RequestOutput]:
    """Every ticket's final outputs; a client that goes away cancels them."""
    futures = [asyncio.ensure_future(_final(_watch(t))) for t in tickets]
    try:
        while True:
            done, _ = await asyncio.wait(futures, timeout=0.5)
            if len(done) == len(futures):
                break
            if await request.is_disconnected():
                for t in tickets:
                    serving.cancel(t)
                raise ApiError(499, "the client disconnected")
    finally:
        for f in futures:
            f.cancel()
    outputs = []
    for f in futures:
        outputs.extend(f.result())
    return outputs


async def _final(updates: asyncio.Queue) -> list[RequestOutput]:
    while True:
        outputs, done, error = await updates.get()
        if done:
            if error is not None:
                raise _api_error(error)
            _raise_failed(outputs)
            return outputs


def _api_error(error: BaseException) -> ApiError:
    if isinstance(error, CapacityError):
        return ApiError(503, str(error), "server_error")
    if isinstance(error, RequestError):
        return ApiError(400, str(error))
    return ApiError(500, f"internal error: {error}", "server_error")


def _raise_failed(outputs: list[RequestOutput]) -> None:
    for out in outputs:
        if out.finish_reason == "error":
            too_long = "max_model_len" in (out.error or "")
            raise ApiError(400 if too_long else 503, out.error or "the request failed",
                           "invalid_request_error" if too_long else "server_error")


async def _sse(serving: ServingEngine, tickets: list[Ticket], shape: ResponseShape, include_usage: bool,
               metrics: "_Metrics", started: float) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of text, per choice; usage; [DONE]."""
    watches = [_watch(t) for t in tickets]
    n = tickets[0].params.n
    sent = [(0, 0)] * (n * len(tickets))
    first_token = False
    try:
        if shape.chat:
            yield event(shape.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None} for i in range(len(sent))], include_usage))
        finals: list[list[RequestOutput]] = [[] for _ in tickets]
        pending = set(range(len(tickets)))
        while pending:
            gets = {asyncio.ensure_future(watches[k].get()): k for k in pending}
            done, rest = await asyncio.wait(gets, return_when=asyncio.FIRST_COMPLETED)
            for f in rest:
                f.cancel()
            for f in done:
                k = gets[f]
                outputs, finished, error = f.result()
                if finished and error is not None:
                    raise _api_error(error)
                if finished:
                    _raise_failed(outputs)
                    finals[k] = outputs
                    pending.discard(k)
                choices = []
                for j, out in enumerate(outputs):
                    index = k * n + j
                    piece, sent[index], logprobs = shape.delta(out, sent[index], finished)
                    if piece or logprobs:
                        choices.append(shape.choice_delta(index, piece, logprobs, None))
                    if finished:
                        choices.append(shape.choice_delta(index, "", None, out.finish_reason))
                if choices:
                    if not first_token:
                        first_token = True
                        metrics.first_token.observe(time.monotonic() - started)
                    yield event(shape.chunk(choices, include_usage))
        if include_usage:
            yield event({**shape.chunk([], False), "usage": shape.usage([o for f in finals for o in f])})
        metrics.latency.labels("chat" if shape.chat else "completions").observe(time.monotonic() - started)
    except ApiError as exc:
        yield event({"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.status}})
    finally:  # also when the client went away (the response task is cancelled): abort, free the blocks
        for t in tickets:
            serving.cancel(t)
    yield "data: [DONE]\n\n"


class _Metrics:
    """Prometheus metrics of one app (its own registry): request counts and latencies, and the
    engine's and the server's counters, read at every scrape."""

    def __init__(self, serving: ServingEngine):
        self.registry = CollectorRegistry()
        self.requests = Counter("nanodance_http_requests", "HTTP completion requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("nanodance_request_seconds", "Time from request to last token", ["endpoint"],
                                 registry=self.registry)
        self.first_token = Histogram("nanodance_time_to_first_token_seconds", "Streamed requests: time to the "
                                     "first text chunk", registry=self.registry)
        self.registry.register(_EngineStats(serving))


class _EngineStats:
    """A Prometheus collector over `llm.stats()` and the serving counters (gauges, read at scrape)."""

    def __init__(self, serving: ServingEngine):
        self.serving = serving

    def collect(self):
        values = {**self.serving.llm.stats(), **{f"serving_{k}": v for k, v in vars(self.serving.counters).items()},
                  "serving_waiting": self.serving.waiting()}
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"nanodance_{key}", f"nanodance stats()['{key}']", value=value)


class BackgroundServer:
    """The app served by uvicorn on a thread of this process (tests, examples, notebooks).

        with BackgroundServer(ServingEngine(llm), "my-model") as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    """

    def __init__(self, serving: ServingEngine, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 start_timeout: float = 30.0):
        import socket
        import threading

        import uvicorn

        if port == 0:  # a free port, chosen now so that the URL is known before the server starts
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.serving, self.url = serving, f"http://{host}:{port}"
        config = uvicorn.Config(build_app(serving, model_name), host=host, port=port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="nanodance-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving (the app's shutdown stops the engine thread too)."""
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
