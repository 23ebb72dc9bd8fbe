"""The OpenAI wire format: requests parsed into engine terms, engine outputs shaped into responses.

    check_model(body, served_name)                 # ApiError 400 for another model
    parse_request(body, chat) -> ParsedRequest     # prompts (chat messages, or completion prompts),
                                                   # SamplingParams, agent id, stream options
    shape = ResponseShape(rid, created, model, chat, tokenizer, params)
    shape.response(outputs) / shape.chunk(choices) / shape.delta(output, sent, finished) / shape.usage(outputs)
    event(payload) -> one server-sent event

No HTTP here (server.py owns that): this module is what "OpenAI-compatible" means, checked field
by field. `ApiError` carries the HTTP status and OpenAI's error body. What the engine cannot
honour (UNSUPPORTED with a value other than "unused") is refused, never silently ignored;
unknown fields are ignored, as OpenAI's own server does for extra client fields.
`extra_body={"nanodance": {"agent": id, "shared": [text, ...]}}` marks a persistent agent and
cuts each shared string out of the prompt as a `Shared` block.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from nanodance.engine import RequestOutput
from nanodance.errors import RequestError
from nanodance.sampling import SamplingParams
from nanodance.segments import Shared

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


@dataclass
class ParsedRequest:
    prompts: list  # one prompt per completion prompt (chat: one list of messages)
    params: SamplingParams
    agent: Any  # a persistent agent's id, or None
    stream: bool
    include_usage: bool
    fill_max_tokens: bool  # no max_tokens given: up to the context length, as OpenAI


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(400, f"model {model!r} is not served here; this server serves {model_name!r}", param="model")


def parse_request(body: dict, chat: bool) -> ParsedRequest:
    """A chat or completions request body in engine terms (ApiError 400 naming the bad field)."""
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
    return ParsedRequest(prompts, params, extra.get("agent"), stream, stream and bool(options.get("include_usage")),
                         max_tokens is None)


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


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class ResponseShape:
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
