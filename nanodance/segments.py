"""Round-aware prompts: `Shared` blocks and the encoding of segment lists into token ids.

A round prompt is a list of segments, `[persona, Shared(o_a), Shared(o_b), tail]`, where a
plain string (or list of token ids) is private to the agent and `Shared(x)` marks a block that
other agents' prompts carry too. `x` is text, token ids, or a `RequestOutput` of an earlier
round (then its tokens are the output's, without a final stop token, and its producer's KV can
serve as the master). A prompt may also be chat messages whose `content` is a string or a list
of parts (strings and `Shared`); it is rendered through the chat template with a placeholder
per shared part, and every piece is tokenized on its own.

Each segment is tokenized on its own and the ids are joined, so a shared block is the same
token ids in every prompt (BPE cannot merge across a boundary), at whatever position.

    encode_segments(prompt, tokenizer) -> EncodedPrompt(token_ids, spans)
    spans: [SharedSpan(start, end, key, source)] with key = tuple of the block's token ids

Also owns telling prompt kinds apart, for the engine too: `is_token_ids`, `is_chat`,
`is_plain_prompt` (string, token ids or chat messages) and `is_segment_prompt` (carries a
`Shared`). Two easy mistakes are caught here: `Shared(output)` of an output with no tokens is
refused, and a segment list of plain text given to a model with a chat template, without any of
the template's markup, warns (the model then sees no chat turn and may answer nothing).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from nanodance.errors import RequestError


class Shared:
    """A block that several agents' prompts carry: text, token ids, or an earlier output."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        if isinstance(value, Shared):
            value = value.value
        if not (isinstance(value, str) or is_token_ids(value) or _is_output(value)):
            raise RequestError(f"Shared() takes text, a list of token ids or an output of an earlier round, "
                               f"got {type(value).__name__}")
        if isinstance(value, str) and not value:
            raise RequestError("Shared() of an empty string")
        if _is_output(value) and not output_block_ids(value):
            # Sharing it would silently add nothing to every prompt that carries it.
            raise RequestError(f"Shared() of request {value.request_id}'s output, but that earlier request "
                               f"produced no tokens ({_why_empty(value)}); check an output's token_ids "
                               f"before sharing it")
        self.value = value

    def __repr__(self) -> str:
        v = self.value
        shown = repr(v[:40]) if isinstance(v, str) else (f"output {v.request_id}" if _is_output(v) else f"{len(v)} ids")
        return f"Shared({shown})"


def _why_empty(output) -> str:
    reason = output.finish_reason
    if reason == "error":
        return f"it failed: {output.error}"
    if reason == "stop":
        return ("it stopped at once; a chat model given a plain-string prompt, for one, often answers '' "
                "at once: prompt it with chat messages")
    return f"finish_reason {reason!r}"


@dataclass(frozen=True)
class SharedSpan:
    start: int  # first position of the block in the prompt
    end: int  # one past its last position
    key: tuple[int, ...]  # the block's token ids: its identity (hash and equality)
    source: Any = None  # the RequestOutput it came from, if any (a producer-master candidate)
    source_offset: int = 0  # where the block starts in that output (a found span may be part of it)

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class EncodedPrompt:
    token_ids: list[int]
    spans: list[SharedSpan]
    outputs: list = field(default_factory=list)  # every earlier output it shares, empty ones included


def shared_token_ids(value: Any, tokenizer) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise RequestError("a text Shared block needs a tokenizer; this model has none: pass token ids")
        return tokenizer.encode(value)
    if _is_output(value):
        return output_block_ids(value)
    return list(value)


def output_block_ids(output) -> list[int]:
    """The tokens an output contributes as a shared block: its tokens without a final stop token."""
    ids = list(output.token_ids)
    if ids and output.stopped_by_token:
        ids = ids[:-1]
    return ids


def is_segment_prompt(prompt: Any) -> bool:
    """True for prompts that carry at least one `Shared` (a segment list or chat with shared parts)."""
    if isinstance(prompt, (list, tuple)):
        for part in prompt:
            if isinstance(part, Shared):
                return True
            # Keep looking past a message whose list content has no Shared: a later one may.
            if isinstance(part, dict) and isinstance(part.get("content"), (list, tuple)):
                if any(isinstance(p, Shared) for p in part["content"]):
                    return True
    return False


def encode_segments(prompt: Any, tokenizer, index: int = 0) -> EncodedPrompt:
    """Token ids and shared spans of one round prompt (segment list or chat messages)."""
    if isinstance(prompt, str) or is_token_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RequestError(f"prompt {index} must be a non-empty list of segments or chat messages")
    if is_chat(prompt):
        pieces = _chat_pieces(prompt, tokenizer, index)
    else:
        pieces = list(prompt)
        _warn_if_chat_markup_is_missing(pieces, tokenizer)
    ids: list[int] = []
    spans: list[SharedSpan] = []
    outputs = []
    for piece in pieces:
        if isinstance(piece, Shared):
            if _is_output(piece.value):
                outputs.append(piece.value)
            block = shared_token_ids(piece.value, tokenizer)
            if not block:
                if _is_output(piece.value):
                    continue  # emptied after Shared() checked it (outputs are plain dataclasses): adds nothing
                raise RequestError(f"prompt {index}: {piece!r} has no tokens")
            spans.append(SharedSpan(len(ids), len(ids) + len(block), tuple(block),
                                    piece.value if _is_output(piece.value) else None))
            ids.extend(block)
        elif isinstance(piece, str):
            if piece:
                if tokenizer is None:
                    raise RequestError(f"prompt {index} has text, but the model has no tokenizer: pass token ids")
                ids.extend(tokenizer.encode(piece))
        elif is_token_ids(piece):
            ids.extend(piece)
        elif _is_output(piece):
            raise RequestError(f"prompt {index}: wrap an earlier output in Shared(...) to reuse it")
        elif isinstance(piece, dict):
            raise RequestError(f"prompt {index}: a segment must be a string, token ids or Shared(...), got a "
                               f"dict; chat messages need a 'role' each, and a prompt is either all chat "
                               f"messages or a list of segments")
        else:
            raise RequestError(f"prompt {index}: a segment must be a string, token ids or Shared(...), "
                               f"got {type(piece).__name__}")
    if not ids:
        raise RequestError(f"prompt {index} has no tokens")
    return EncodedPrompt(ids, spans, outputs)


_PLACEHOLDER = "\u2063nanodance-shared-{}\u2063"  # invisible separator: never in real text


def _chat_pieces(messages: Sequence[dict], tokenizer, index: int) -> list:
    """Render chat messages with placeholders for shared parts; split back into pieces."""
    if tokenizer is None:
        raise RequestError(f"prompt {index} is chat messages, but the model has no tokenizer")
    shared: list[Shared] = []
    flat = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            text = []
            for part in content:
                if isinstance(part, Shared):
                    text.append(_PLACEHOLDER.format(len(shared)))
                    shared.append(part)
                elif isinstance(part, str):
                    text.append(part)
                else:
                    raise RequestError(f"prompt {index}: message content parts must be strings or Shared(...), "
                                       f"got {type(part).__name__}")
            m = {**m, "content": "".join(text)}
        flat.append(m)
    rendered = tokenizer.render_chat(flat)
    pieces: list = []
    rest = rendered
    for i, part in enumerate(shared):
        mark = _PLACEHOLDER.format(i)
        before, found, rest = rest.partition(mark)
        if not found:
            raise RequestError(f"prompt {index}: the chat template dropped a shared part")
        pieces.extend([before, part])
    pieces.append(rest)
    return pieces


CHAT_MARKUP_WARNING = (
    "a segment-list prompt of plain strings and Shared(...) skips the model's chat template, and "
    "none of its strings holds the template's markup: an instruct model may answer nothing. Pass "
    "chat messages with Shared parts instead, e.g. [{'role': 'user', 'content': ['Others said: ', "
    "Shared(out), ' Your answer?']}], or write the template's markup into the strings")


def _warn_if_chat_markup_is_missing(pieces: list, tokenizer) -> None:
    """Warn when plain text segments go to a chat model with none of its chat markup in them."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return
    texts = []
    for piece in pieces:
        if isinstance(piece, str):
            texts.append(piece)
        elif isinstance(piece, Shared):
            if isinstance(piece.value, str):
                texts.append(piece.value)
        else:
            return  # token ids (or a mistake reported below): they may hold the markup already
    markup = _chat_markup(tokenizer, template)
    if markup and not any(mark in text for text in texts for mark in markup):
        # One fixed message: Python's default filter then shows it once per process, not per prompt.
        warnings.warn(CHAT_MARKUP_WARNING, UserWarning, stacklevel=3)


def _chat_markup(tokenizer, template: str) -> list[str]:
    """The special-token strings the chat template writes (all special tokens if it names none)."""
    ids = getattr(tokenizer, "special_token_ids", ())
    specials = [t for t in (tokenizer.id_to_token(i) for i in sorted(ids)) if t]
    return [t for t in specials if t in template] or specials


def is_token_ids(x) -> bool:
    """A non-empty list or tuple of ints (bools excluded): a prompt or block given as token ids."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in x)


def is_chat(x) -> bool:
    """A non-empty list or tuple of dicts that each have a "role": chat messages."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


def is_plain_prompt(x) -> bool:
    """A string, token ids or chat messages (as opposed to a list of segments)."""
    return isinstance(x, str) or is_token_ids(x) or is_chat(x)


def _is_output(x) -> bool:
    return hasattr(x, "token_ids") and hasattr(x, "request_id") and hasattr(x, "finish_reason")
