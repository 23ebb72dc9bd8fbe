"""Prompt validation and encoding for `LLM` calls: everything is checked before anything is queued.

    encode_prompt(tokenizer, vocab_size, prompt, index) -> token ids        (generate)
    encode_round_prompt(tokenizer, vocab_size, engine_id, prompt, index)
        -> EncodedPrompt(token_ids, spans)                                   (run_round)

A prompt is a string (tokenized as is, no special tokens added), a list of token ids, chat
messages (rendered with the model's chat template, generation prompt added), or, in a round,
a list of segments with `Shared` blocks (segments.py). Every problem raises `RequestError`
naming the prompt's index, so a bad call loses nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

from nanodance.errors import RequestError
from nanodance.sampling import SamplingParams
from nanodance.segments import EncodedPrompt, encode_segments, is_chat, is_plain_prompt, is_segment_prompt, \
    is_token_ids


@dataclass
class PreparedCall:
    """A validated, encoded call: one entry per request (a prompt's n samples are n requests)."""

    encoded: list[EncodedPrompt]
    params: list[SamplingParams]
    agents: list[Hashable | None]
    prompts: list[Any]
    as_round: bool  # explicit or found shared spans (or run_round): the collector plans it
    sample_of: list[int | None] = field(default_factory=list)  # request j > 0 of n: index of the first


def expand_samples(call: PreparedCall) -> PreparedCall:
    """One request per sample: a prompt with `n` > 1 becomes n consecutive requests."""
    out = PreparedCall([], [], [], [], call.as_round)
    for i, (enc, params, agent, prompt) in enumerate(zip(call.encoded, call.params, call.agents, call.prompts)):
        if params.n > 1 and agent is not None:
            raise RequestError(f"prompt {i}: n={params.n} samples cannot all be persistent agent {agent!r}; "
                               f"use n=1 for a persistent agent")
        first = len(out.encoded)
        for j in range(params.n):
            out.encoded.append(enc if j == 0 else EncodedPrompt(enc.token_ids, list(enc.spans), enc.outputs))
            out.params.append(params.for_sample(j))
            out.agents.append(agent)
            out.prompts.append(prompt)
            out.sample_of.append(first if j else None)
    return out


def prompt_list(prompts: Any, what: str) -> list:
    bad = RequestError(f"{what} takes a list of prompts, got {type(prompts).__name__}")
    if isinstance(prompts, (str, bytes, dict)):
        raise bad
    try:
        prompts = list(prompts)
    except TypeError:
        raise bad from None
    if not prompts:
        raise RequestError(f"{what} needs at least one prompt")
    return prompts


def params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(sampling_params, SamplingParams):
        sampling_params.validate()  # it may have been changed since it was built
        return [sampling_params] * n
    if not isinstance(sampling_params, (list, tuple)):
        raise RequestError(f"sampling_params must be one SamplingParams or a list of {n} of them, "
                           f"got {type(sampling_params).__name__}")
    params = list(sampling_params)
    if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
        raise RequestError(f"sampling_params must be one SamplingParams or a list of {n} of them")
    for p in params:
        p.validate()
    return params


def check_agents(agents, n: int) -> list[Hashable | None]:
    """One agent id (or None) per prompt: hashable and unique within the round."""
    if agents is None:
        return [None] * n
    if isinstance(agents, (str, bytes)):
        raise RequestError("agents must be a list of ids (one per prompt, None for a one-shot agent), not a string")
    agents = list(agents)
    if len(agents) != n:
        raise RequestError(f"agents has {len(agents)} ids for {n} prompts")
    named = [a for a in agents if a is not None]
    for a in named:
        try:
            hash(a)
        except TypeError:
            raise RequestError(f"persistent agent ids must be hashable (a str or an int), got {a!r}") from None
    dupes = sorted({repr(a) for a in named if named.count(a) > 1})
    if dupes:
        raise RequestError(f"persistent agent ids must be unique within a round; repeated: {dupes}")
    return agents


def is_single_prompt(prompts: Any) -> bool:
    """`generate("Hi")`, `generate([1, 2])`, `generate([{"role": ...}])`: one prompt, not a list of them."""
    return isinstance(prompts, str) or is_token_ids(prompts) or is_chat(prompts)


def encode_prompt(tokenizer, vocab_size: int, prompt: Any, index: int = 0) -> list[int]:
    """Token ids of one plain prompt (string, token ids or chat messages)."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError(f"prompt {index} is an empty string")
        ids = _require_tokenizer(tokenizer, index).encode(prompt)
    elif is_token_ids(prompt):
        ids = list(prompt)
    elif is_chat(prompt):
        ids = _require_tokenizer(tokenizer, index).encode_chat([_joined(m) for m in prompt])
    else:
        raise RequestError(f"prompt {index} must be a string, a list of token ids or a list of chat "
                           f"messages ({{'role': ..., 'content': ...}}), got {type(prompt).__name__}")
    if not ids:
        raise RequestError(f"prompt {index} has no tokens")
    _check_vocabulary(ids, vocab_size, index)
    return ids


def encode_round_prompt(tokenizer, vocab_size: int, engine_id: str, prompt: Any, index: int) -> EncodedPrompt:
    """Token ids and shared spans of one round prompt (plain prompts have no spans)."""
    if is_plain_prompt(prompt) and not is_segment_prompt(prompt):
        return EncodedPrompt(encode_prompt(tokenizer, vocab_size, prompt, index), [])
    enc = encode_segments(prompt, tokenizer, index)
    for output in enc.outputs:  # an empty one too: it is the same mistake
        if getattr(output, "engine_id", None) != engine_id:
            raise RequestError(f"prompt {index}: Shared(output) of request {output.request_id} was produced "
                               f"by a different LLM instance; pass its text or token ids instead")
    _check_vocabulary(enc.token_ids, vocab_size, index)
    return enc


def _joined(message: dict) -> dict:
    """A message whose content is a list of strings (parts, none shared) has their concatenation."""
    content = message.get("content")
    if isinstance(content, (list, tuple)) and all(isinstance(part, str) for part in content):
        return {**message, "content": "".join(content)}
    return message


def _check_vocabulary(ids: list[int], vocab_size: int, index: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt {index} holds token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def _require_tokenizer(tokenizer, index: int):
    if tokenizer is None:
        raise RequestError(f"prompt {index} is text, but the model has no tokenizer.json: pass token ids instead")
    return tokenizer
