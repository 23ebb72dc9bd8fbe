"""The engine on the bundled default model (SmolLM2-135M-Instruct): text in, text out.

Specification:
- greedy decoding gives exactly the tokens of `transformers` generate on the same weights (fp32);
- a ragged batch gives exactly the tokens of the same prompts run one by one;
- a prefix-cache hit gives the same tokens and reports the prompt tokens it served;
- prompts may be strings, token ids or chat messages; stop strings, stop token ids, max_tokens
  and ignore_eos end generation as documented; seeded sampling is reproducible;
- invalid requests raise `RequestError` before anything runs, and the engine stays usable;
- after every call every block is free or cached: nothing leaks.
"""
from __future__ import annotations

import pytest
import torch

from fixtures_default_model import default_model_dir, default_tokenizer  # noqa: F401
from nanodance import LLM, RequestError, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", kv_cache_blocks=256, reuse="prefix")


def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def assert_no_leak(llm: LLM) -> None:
    assert llm.pool.num_used == 0, f"{llm.pool.num_used} blocks still referenced after every request finished"
    llm.pool.check_invariants(holders=[])


def test_greedy_equals_transformers_generate(llm, default_model_dir, default_tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    outs = llm.generate([chat(q) for q in QUESTIONS], GREEDY, use_tqdm=False)
    for q, out in zip(QUESTIONS, outs):
        ids = torch.tensor([default_tokenizer.encode_chat(chat(q))])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              pad_token_id=2, eos_token_id=2)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref, f"{q!r}: nanodance {out.text!r} vs transformers {default_tokenizer.decode(ref)!r}"
    assert "Paris" in outs[0].text
    assert_no_leak(llm)


def test_ragged_batch_equals_one_by_one(default_model_dir):
    engine = LLM(default_model_dir, dtype="float32", kv_cache_blocks=256, reuse="none")
    prompts = [chat(QUESTIONS[0]), "Once upon a time", chat(QUESTIONS[2] + " Keep it short, please, and calm.")]
    batched = engine.generate(prompts, GREEDY, use_tqdm=False)
    alone = [engine.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert [o.num_prompt_tokens for o in batched] == [o.num_prompt_tokens for o in alone]
    assert engine.stats()["prefill_tokens_reused"] == 0  # reuse="none" shares nothing
    assert_no_leak(engine)


def test_prefix_cache_hit_gives_same_tokens_and_reports_reuse(llm):
    prompt = chat("Explain in one sentence why the sky is blue. " * 3)
    llm.reset_prefix_cache()
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    reused_before = llm.stats()["prefill_tokens_reused"]
    second = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.token_ids == first.token_ids
    n, bs = second.num_prompt_tokens, llm.pool.block_size
    # Every full block but the one holding the last prompt token comes from the cache.
    assert second.num_cached_tokens == (n - 1) // bs * bs > 0
    assert llm.stats()["prefill_tokens_reused"] - reused_before == second.num_cached_tokens
    assert_no_leak(llm)


def test_prompt_forms_agree(llm, default_tokenizer):
    ids = default_tokenizer.encode_chat(chat(QUESTIONS[1]))
    as_chat, as_ids, as_text = llm.generate(
        [chat(QUESTIONS[1]), ids, default_tokenizer.render_chat(chat(QUESTIONS[1]))], GREEDY, use_tqdm=False)
    assert as_chat.prompt_token_ids == as_ids.prompt_token_ids == as_text.prompt_token_ids == ids
    assert as_chat.token_ids == as_ids.token_ids == as_text.token_ids


def test_stop_conditions(llm):
    q = chat(QUESTIONS[0])
    full = llm.generate([q], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert full.finish_reason == "stop" and full.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in full.text

    by_string = llm.generate([q], SamplingParams(temperature=0, max_tokens=24, stop=["France"]), use_tqdm=False)[0]
    assert by_string.finish_reason == "stop"
    assert by_string.text == full.text[:full.text.index("France")]

    stop_id = full.token_ids[2]
    by_id = llm.generate([q], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]),
                         use_tqdm=False)[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[:3]

    short = llm.generate([q], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert short.finish_reason == "length" and short.token_ids == full.token_ids[:3]

    past_eos = llm.generate([q], SamplingParams(temperature=0, max_tokens=len(full.token_ids) + 3, ignore_eos=True),
                            use_tqdm=False)[0]
    assert past_eos.finish_reason == "length" and len(past_eos.token_ids) == len(full.token_ids) + 3
    assert past_eos.token_ids[:len(full.token_ids)] == full.token_ids
    assert_no_leak(llm)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(llm):
    q = chat(QUESTIONS[2])
    hot = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=7)
    a = llm.generate([q], hot, use_tqdm=False)[0]
    b = llm.generate([q, chat(QUESTIONS[0])], [hot, GREEDY], use_tqdm=False)[0]  # other work in the batch
    assert a.token_ids == b.token_ids
    others = {tuple(llm.generate([q], SamplingParams(temperature=1.0, max_tokens=12, seed=s),
                                 use_tqdm=False)[0].token_ids) for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples at temperature 1"
    greedy = llm.generate([q], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    top1 = llm.generate([q], SamplingParams(temperature=0.8, top_k=1, max_tokens=12, seed=3), use_tqdm=False)[0]
    assert top1.token_ids == greedy.token_ids


@pytest.mark.parametrize("prompts, words", [
    (["fine prompt", ""], "empty"), ([], "at least one"), (["fine prompt", []], "must be"),
    (["fine prompt", [5, 10**7]], "vocabulary"), (["fine prompt", [3.5]], "must be"), ([None], "must be"),
])
def test_bad_prompts_raise_and_engine_stays_usable(llm, prompts, words):
    finished_before = llm.stats()["requests_finished"]
    with pytest.raises(RequestError, match=words):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.stats()["requests_finished"] == finished_before  # nothing ran, not even the fine prompt
    assert_no_leak(llm)
    assert llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0].token_ids


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(stop=[3]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_sampling_params_are_rejected(kwargs, words):
    with pytest.raises(RequestError, match=words):
        SamplingParams(**kwargs)


def test_request_that_cannot_fit_fails_alone(default_model_dir):
    engine = LLM(default_model_dir, dtype="float32", kv_cache_blocks=4, block_size=16, max_model_len=48)
    long_prompt = list(range(100, 160))  # 60 tokens > max_model_len 48
    fine, too_long = engine.generate([[100, 101, 102], long_prompt], GREEDY, use_tqdm=False)
    assert too_long.finish_reason == "error" and "max_model_len" in too_long.error
    assert fine.finish_reason in ("stop", "length") and fine.token_ids
    assert_no_leak(engine)


def test_chat_content_given_as_a_list_of_strings_is_their_concatenation(llm):
    """A message's content may be a list of parts; without `Shared` parts they are simply joined."""
    parts = [{"role": "user", "content": ["What is the capital ", "of France?"]}]
    whole = chat("What is the capital of France?")
    assert llm.encode_prompt(parts) == llm.encode_prompt(whole)
    assert [o.token_ids for o in llm.generate([parts, whole], GREEDY, use_tqdm=False)] == \
        [o.token_ids for o in llm.generate([whole, whole], GREEDY, use_tqdm=False)]
