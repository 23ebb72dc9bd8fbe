"""Text <-> token ids for a Hugging Face folder: tokenizer, chat template, stop ids, streaming.

Owns:
- `Tokenizer`: `tokenizer.json` through the `tokenizers` library (no special tokens are ever
  added implicitly: the chat template writes them as text, and they are matched as added tokens),
  the chat template from `tokenizer_config.json` rendered with a sandboxed jinja2 environment set
  up the way `transformers` sets it up, and the end-of-sequence ids gathered from
  `generation_config.json`, `config.json` and `tokenizer_config.json`.
- `IncrementalDecoder`: turns a stream of generated ids into a stream of text pieces whose
  concatenation is the full decode, never emitting half of a multi-byte UTF-8 character (a
  byte-level BPE token can end inside one); the engine checks stop strings on its text.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from nanodance.errors import TokenizerError

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A Hugging Face tokenizer folder, reduced to what an inference engine needs."""

    def __init__(self, backend, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 eos_token_ids: Iterable[int] = ()):
        """`backend` is a `tokenizers.Tokenizer`; most callers want `from_folder`."""
        self._backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        eos_ids = set(eos_token_ids)
        if eos_token and self.token_to_id(eos_token) is not None:
            eos_ids.add(self.token_to_id(eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self._template = _compile_chat_template(chat_template) if chat_template else None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` plus the chat template and special tokens next to it."""
        from tokenizers import Tokenizer as Backend

        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"{tokenizer_file} not found: nanodance needs a fast-tokenizer `tokenizer.json` "
                f"in the model folder (sentencepiece-only or vocab.json/merges.txt folders can be "
                f"converted once with transformers: "
                f"`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`)")
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:
            raise TokenizerError(f"{tokenizer_file} could not be loaded: {exc}") from exc
        tok_config = _read_json(folder / "tokenizer_config.json")
        eos_ids = set()
        for name in ("generation_config.json", "config.json"):
            eos_ids |= _ids(_read_json(folder / name).get("eos_token_id"))
        chat_template = tok_config.get("chat_template")
        if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in chat_template}
            chat_template = named.get("default")
        if chat_template is None and (folder / "chat_template.jinja").is_file():
            chat_template = (folder / "chat_template.jinja").read_text()
        return cls(backend, chat_template=chat_template,
                   bos_token=_token_content(tok_config.get("bos_token")),
                   eos_token=_token_content(tok_config.get("eos_token")),
                   eos_token_ids=eos_ids)

    # ------------------------------------------------------------------ ids and text

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids, none are added."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ------------------------------------------------------------------ chat

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs) -> str:
        """The prompt text for a conversation, as the model's chat template writes it.

        `messages` are dicts with "role" and "content" strings; extra keyword arguments reach the
        template as variables (e.g. `tools`), like `transformers`' `apply_chat_template`.
        """
        if self._template is None:
            raise TokenizerError("this model has no chat template (tokenizer_config.json has no "
                                 "`chat_template`); pass plain text prompts instead")
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **template_kwargs)
        except TemplateError as exc:  # incl. the template's own raise_exception("...")
            raise TokenizerError(f"the chat template refused these messages: {exc}") from exc

    def encode_chat(self, messages: Sequence[dict[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Text of a growing id sequence, piece by piece: `"".join(pieces) + flush()` == full decode.

    A byte-level BPE token may carry only part of a UTF-8 character; decoding it alone yields
    U+FFFD. So the ids not yet emitted ("pending") are decoded together with the previous piece's
    ids as context, and new text is emitted only once it no longer ends in U+FFFD. The context
    matters for decoders that treat the start of a sequence specially (sentencepiece's leading
    space); since every piece ends at a character boundary, decoding from the previous piece on
    gives the same text as decoding everything. Each push decodes a few ids, so streaming costs
    O(1) per token. `text` is everything emitted so far, for stop-string checks.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] is the previous piece: context for the next decode
        self._read = 0  # ids[read:] are pending: not yet emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Append one id; return the newly complete text (possibly "")."""
        self._ids.append(int(token_id))
        # Held-back ids are released as soon as the text ends in a whole character again: an
        # invalid byte in the middle decodes to U+FFFD there, exactly as in the full decode.
        return self._emit_until(len(self._ids)) or ""

    def flush(self) -> str:
        """Emit whatever is pending (an incomplete character decodes to U+FFFD, as in full decode)."""
        if self._read == len(self._ids):
            return ""
        return self._emit_until(len(self._ids), force=True)

    def _emit_until(self, end: int, force: bool = False) -> str | None:
        """Emit and return the text of ids[read:end]; None (nothing emitted) if it ends
        mid-character, unless forced."""
        context = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:end])
        if text.endswith(REPLACEMENT_CHAR) and not force:
            return None
        piece = text[len(context):]
        self._prefix, self._read = self._read, end
        if piece:
            self._pieces.append(piece)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


# ---------------------------------------------------------------------- helpers


def _compile_chat_template(source: str):
    """Compile a chat template the way transformers does (sandboxed, trimmed blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise TokenizerError(f"the chat template does not compile: {exc}") from exc


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _token_content(value) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value
