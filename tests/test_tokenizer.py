"""The tokenizer of the default model: round trips, digits, special tokens, ChatML, streaming."""
from __future__ import annotations

import json
import random

import pytest
from fixtures_default_model import default_model_dir, default_tokenizer  # noqa: F401

from nanodance.errors import TokenizerError
from nanodance.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is 3.14159.",
    "naïve café, Übermaß, straße, 日本語のテキスト, Ελληνικά, עברית",
    "emoji: 🤗🎉👩‍👩‍👧 and flags 🇫🇷",
    "  leading spaces\n\nblank lines\ttabs  trailing  ",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "I'm sure they'll say we've done it, don't you?",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(default_tokenizer, text):
    ids = default_tokenizer.encode(text)
    assert default_tokenizer.decode(ids) == text


def test_known_ids(default_tokenizer):
    # Pinned from this conversion; the same ids come from transformers' own GGUF tokenizer loader.
    assert default_tokenizer.encode("What is the capital of France?") == [1780, 314, 260, 3575, 282, 4649, 47]


def test_digits_are_split_one_by_one(default_tokenizer):
    tok = default_tokenizer
    ids = tok.encode("in 12345 steps")
    assert [tok.decode([i]) for i in ids] == ["in", " ", "1", "2", "3", "4", "5", " steps"]


def test_special_tokens(default_tokenizer):
    tok = default_tokenizer
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert tok.bos_token_id == 1 and tok.eos_token_ids == frozenset({2})
    assert tok.special_token_ids == frozenset(range(17))
    assert tok.vocab_size == 49152
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # matched as whole tokens, not spelled out
    assert tok.decode(ids) == "user\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


def test_no_special_tokens_are_added(default_tokenizer):
    ids = default_tokenizer.encode("Hello")
    assert 1 not in ids and 2 not in ids and len(ids) == 1


def test_chat_template_renders_chatml(default_tokenizer):
    tok = default_tokenizer
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    assert tok.render_chat(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n")
    # Without a system message the template inserts SmolLM's default one.
    rendered = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                        "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert tok.encode_chat([{"role": "user", "content": "Hi"}])[-4:] == tok.encode("<|im_start|>assistant\n")


def test_chat_template_renders_like_transformers(default_model_dir, default_tokenizer):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(default_model_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3? 🙂"}]
    for gen in (True, False):
        assert default_tokenizer.render_chat(messages, add_generation_prompt=gen) == \
            reference.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_template_errors_are_tokenizer_errors(default_tokenizer):
    from tokenizers import Tokenizer as Backend

    strict = Tokenizer(Backend.from_str(default_tokenizer._backend.to_str()),
                       chat_template="{% if messages[0]['role'] != 'user' %}"
                                     "{{ raise_exception('first message must be from the user') }}"
                                     "{% endif %}{{ messages[0]['content'] }}")
    assert strict.render_chat([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(TokenizerError, match="first message must be from the user"):
        strict.render_chat([{"role": "assistant", "content": "no"}])
    plain = Tokenizer(Backend.from_str(default_tokenizer._backend.to_str()))
    with pytest.raises(TokenizerError, match="no chat template"):
        plain.render_chat([{"role": "user", "content": "Hi"}])


def test_missing_tokenizer_json_is_a_clear_error(tmp_path, default_model_dir):
    (tmp_path / "config.json").write_text((default_model_dir / "config.json").read_text())
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError):  # TokenizerError is a ValueError
        Tokenizer.from_folder(tmp_path)


def test_eos_ids_gathered_from_every_config(tmp_path, default_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (tmp_path / name).write_text((default_model_dir / name).read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert Tokenizer.from_folder(tmp_path).eos_token_ids == frozenset({0, 2})


# ----------------------------------------------------------------------------- streaming


def stream(tok, ids, skip_special_tokens=True):
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert decoder.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_concatenates_to_full_decode(default_tokenizer, text):
    ids = default_tokenizer.encode(text)
    pieces = stream(default_tokenizer, ids)
    assert "".join(pieces) == default_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_incremental_decode_waits_for_whole_characters(default_tokenizer):
    tok = default_tokenizer
    ids = tok.encode("🤗")
    assert len(ids) > 1  # one emoji, several byte tokens
    pieces = stream(tok, ids)
    assert pieces[:len(ids)] == [""] * (len(ids) - 1) + ["🤗"]


def test_incremental_decode_with_special_tokens(default_tokenizer):
    tok = default_tokenizer
    ids = tok.encode("<|im_start|>assistant\nOui, 🇫🇷!<|im_end|>")
    assert "".join(stream(tok, ids)) == tok.decode(ids)
    kept = "".join(stream(tok, ids, skip_special_tokens=False))
    assert kept == tok.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nOui, 🇫🇷!<|im_end|>"


def test_incremental_decode_of_arbitrary_ids(default_tokenizer):
    """Random ids (incl. lone UTF-8 lead and continuation bytes) still concatenate exactly."""
    tok = default_tokenizer
    rng = random.Random(0)
    byte_tokens = [i for i in range(tok.vocab_size) if len(tok.id_to_token(i)) == 1]
    for _ in range(20):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.6 else rng.randrange(tok.vocab_size)
               for _ in range(60)]
        for skip in (True, False):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_decode_releases_invalid_bytes_at_the_next_whole_character(default_tokenizer):
    tok = default_tokenizer
    lead = tok.encode("🤗")[0]  # the first bytes of a 4-byte character, never completed
    decoder = tok.incremental_decoder()
    assert decoder.push(tok.encode("ok")[0]) == "ok"
    assert [decoder.push(lead) for _ in range(5)] == [""] * 5
    assert decoder.push(tok.encode("go")[0]).endswith("go")
    assert decoder.text == tok.decode(tok.encode("ok") + [lead] * 5 + tok.encode("go"))
    assert "\ufffd" in decoder.text
