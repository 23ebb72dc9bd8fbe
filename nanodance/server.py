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

Supported: messages / prompt, max_tokens (max_completion_tokens), temperature, top_p, seed, stop,
n, stream (+ stream_options.include_usage), logprobs / top_logprobs, and vLLM's top_k and
ignore_eos; usage reports prompt_tokens_details.cached_tokens = prompt tokens whose K/V was
reused, not computed. Everything the engine cannot honour (tools, penalties, logit_bias, echo,
best_of, non-text content) is refused with HTTP 400, OpenAI-shaped (`{"error": {"message",
"type", "param", "code"}}`), as are malformed JSON, an unknown model, a bad parameter and a
prompt too long; a full queue or a batch the pool cannot hold is 503. A client that disconnects
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
from nanodance.sampling import SamplingParams
from nanodance.segments import Shared
from nanodance.serving import ServingEngine, Ticket

UNSUPPORTED = {  # parameter -> the values that mean "not used"
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}},
                            status_code=self.status)


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
            _check_model(body, model_name)
            prompts, params, agent, stream, include_usage, fill = _parse(body, chat, tokenizer)
            tickets = [_submit(serving, p, params, agent, fill) for p in prompts]
        except ApiError as exc:
            metrics.requests.labels(endpoint, str(exc.status)).inc()
            return exc.response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        shape = _Shape(rid, int(time.time()), model_name, chat, tokenizer, params)
        if stream:
            metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(_sse(serving, tickets, shape, include_usage, metrics, started),
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


# ---------------------------------------------------------------------- parsing

async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(400, f"model {model!r} is not served here; this server serves {model_name!r}", param="model")


def _parse(body: dict, chat: bool, tokenizer) -> tuple[list, SamplingParams, Any, bool, bool, bool]:
    """(prompts, sampling params, agent id, stream, include_usage, fill max_tokens to the context)."""
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise ApiError(400, f"{name} is not supported by nanodance", param=name)
    extra = body.get("nanodance") or {}
    if not isinstance(extra, dict):
        raise ApiError(400, "nanodance must be an object: {\"agent\": id, \"shared\": [text, ...]}", param="nanodance")
    unknown = sorted(set(extra) - {"agent", "shared"})
    if unknown:
        raise ApiError(400, f"unknown nanodance field(s) {unknown}; known: agent, shared", param="nanodance")
    shared = extra.get("shared") or []
    if not isinstance(shared, list) or not all(isinstance(s, str) and s for s in shared):
        raise ApiError(400, "nanodance.shared must be a list of non-empty strings", param="nanodance.shared")
    if chat:
        prompts = [_messages(body.get("messages"), shared)]
    else:
        prompts = _completion_prompts(body.get("prompt"), shared)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens", 16)
    logprobs = _logprobs(body, chat)
    try:
        params = SamplingParams(
            temperature=_field(body, "temperature", 1.0), top_p=_field(body, "top_p", 1.0),
            top_k=_field(body, "top_k", -1), max_tokens=max_tokens if max_tokens is not None else 1 << 30,
            seed=body.get("seed"), stop=body.get("stop"), n=_field(body, "n", 1),
            ignore_eos=bool(body.get("ignore_eos", False)), logprobs=logprobs)
    except RequestError as exc:
        raise ApiError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    stream = bool(body.get("stream", False))
    return prompts, params, extra.get("agent"), stream, stream and bool(options.get("include_usage")), \
        max_tokens is None


def _field(body: dict, name: str, default):
    value = body.get(name)
    return default if value is None else value


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        if not body.get("logprobs"):
            return None
        return _field(body, "top_logprobs", 0)
    value = body.get("logprobs")
    return None if value is None else value


def _messages(messages: Any, shared: list[str]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out, found = [], set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # parts: only text is supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        parts = _mark(content, shared, found)
        out.append({"role": m["role"], "content": parts if len(parts) != 1 or not isinstance(parts[0], str)
                    else parts[0]})
    _all_found(shared, found)
    return out


def _completion_prompts(prompt: Any, shared: list[str]) -> list:
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a string, a list of strings, token ids or lists of them", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            found: set[int] = set()
            parts = _mark(p, shared, found)
            _all_found(shared, found)
            out.append(parts[0] if len(parts) == 1 and isinstance(parts[0], str) else parts)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(p)
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, token ids or lists of them",
                           param="prompt")
    return out


def _mark(text: str, shared: list[str], found: set[int]) -> list:
    """`text` cut into plain strings and `Shared` parts at every occurrence of a shared string."""
    parts: list = [text]
    for k, block in enumerate(shared):
        cut = []
        for part in parts:
            if isinstance(part, Shared) or block not in part:
                cut.append(part)
                continue
            found.add(k)
            pieces = part.split(block)
            for j, piece in enumerate(pieces):
                if j:
                    cut.append(Shared(block))
                if piece:
                    cut.append(piece)
        parts = cut
    return parts


def _all_found(shared: list[str], found: set[int]) -> None:
    missing = [k for k in range(len(shared)) if k not in found]
    if missing:
        raise ApiError(400, f"nanodance.shared[{missing[0]}] does not occur in the prompt", param="nanodance.shared")


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


async def _sse(serving: ServingEngine, tickets: list[Ticket], shape: "_Shape", include_usage: bool,
               metrics: "_Metrics", started: float) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of text, per choice; usage; [DONE]."""
    watches = [_watch(t) for t in tickets]
    n = tickets[0].params.n
    sent = [(0, 0)] * (n * len(tickets))
    first_token = False
    try:
        if shape.chat:
            yield _event(shape.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
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
                    yield _event(shape.chunk(choices, include_usage))
        if include_usage:
            yield _event({**shape.chunk([], False), "usage": shape.usage([o for f in finals for o in f])})
        metrics.latency.labels("chat" if shape.chat else "completions").observe(time.monotonic() - started)
    except ApiError as exc:
        yield _event({"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.status}})
    finally:  # also when the client went away (the response task is cancelled): abort, free the blocks
        for t in tickets:
            serving.cancel(t)
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Shape:
    """The OpenAI response shapes of one request (chat or completion)."""

    def __init__(self, rid: str, created: int, model: str, chat: bool, tokenizer, params: SamplingParams):
        self.rid, self.created, self.model, self.chat, self.tokenizer = rid, created, model, chat, tokenizer
        # Text that might be the start of a stop string is held back until the request ends.
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.logprobs, self.n = params.logprobs, params.n

    def response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(outputs):
            lp = self._logprobs(out, 0, len(out.token_ids))
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": out.text}, "logprobs": lp,
                                "finish_reason": out.finish_reason})
            else:
                choices.append({"index": i, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(outputs)}

    def usage(self, outputs: list[RequestOutput]) -> dict:
        firsts = outputs[::self.n]  # a prompt's n samples count it once, as OpenAI does
        prompt = sum(o.num_prompt_tokens for o in firsts)
        completion = sum(len(o.token_ids) for o in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(o.num_reused_tokens for o in firsts)}}

    def chunk(self, choices: list[dict], include_usage: bool) -> dict:
        out = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            out["usage"] = None
        return out

    def delta(self, out: RequestOutput, sent: tuple[int, int], finished: bool) -> tuple[str, tuple[int, int], Any]:
        """(new text, (characters, tokens) sent after it, logprobs of the tokens since) of one choice."""
        chars, tokens = sent
        ready = len(out.text) if finished else max(chars, len(out.text) - self.holdback)
        piece = out.text[chars:ready]
        logprobs = self._logprobs(out, tokens, len(out.token_ids)) if len(out.token_ids) > tokens else None
        return piece, (chars + len(piece), len(out.token_ids)), logprobs

    def choice_delta(self, index: int, piece: str, logprobs: Any, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": index, "delta": {"content": piece} if piece else {}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": finish_reason}

    def _logprobs(self, out: RequestOutput, a: int, b: int) -> dict | None:
        if self.logprobs is None or out.logprobs is None:
            return None
        entries = out.logprobs[a:b]
        if self.chat:
            return {"content": [{**self._token(e.token_id, e.logprob),
                                 "top_logprobs": [self._token(t, lp) for t, lp in e.top]} for e in entries]}
        tokens = [self._text(e.token_id) for e in entries]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self._text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)


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
