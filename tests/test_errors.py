"""The error contract (issue 6): a clear error for every bad input, and the engine stays usable.

One test per line of the contract. Each checks the error's class (a `NanodanceError` that is also
the builtin that fits: `ValueError` for bad input, `RuntimeError` for capacity), that the message
names the problem (and the fix, where there is one), and then that the engine still serves a
valid request and that no block is referenced by nothing (`LLM.check_invariants`, and an empty
pool once everything is released).

Model loading (`LLM(folder)`), `ModelLoadError`:
- the model folder is missing: the message names the path;
- config.json is not JSON, names an unsupported architecture, or an unsupported rope type: the
  message names config.json, the architecture, the rope type;
- a tensor is missing, or has the wrong shape: the message names the tensor (and both shapes);
- the safetensors file is truncated or corrupt: the message names the file;
- no tokenizer: the engine loads and serves token ids; text, chat and text `Shared` prompts are
  refused with a message that says to pass token ids; an unreadable tokenizer.json is a
  `TokenizerError` naming it.
Requests, `RequestError` unless noted (nothing of the call is run):
- an empty prompt (empty string, empty list, no prompt at all);
- a token id outside the vocabulary (in a plain prompt and in a `Shared` block): the ids are listed;
- a prompt longer than `max_model_len`: finish_reason "error" for it alone, naming
  max_model_len; the others complete with the tokens they get alone;
- a request that cannot fit the whole KV pool fails alone the same way, in `generate` and in a
  round under every reuse mode, naming kv_cache_blocks; so does a round request that cannot fit
  next to the shared masters it needs (a `CapacityError` message, the others complete); shared
  blocks whose masters cannot all be prefilled together fail the round with a `CapacityError`
  (a `RuntimeError`) naming kv_cache_blocks, and the masters already prefilled are freed.
Sampling params, `RequestError` naming the parameter, at construction and when a changed one
is passed in: negative temperature, top_p outside (0, 1], top_k 0 or below -1, max_tokens < 1,
stop strings (and stop token ids) of the wrong type; sampling_params that are not
SamplingParams.
Round misuse, `RequestError`: an empty round; `Shared` of an unsupported type (and a bare
output or a number as a segment); `Shared` of an output with no tokens (refused by `Shared()`
itself, naming the request); a `Shared` output of another engine instance (engine ids are never
reused, even after an engine is collected); repeated or unhashable persistent agent ids;
`recompute_ratio` outside [0, 1]; an unknown `reuse` mode (the choices are listed); other
invalid engine options.
Chat markup, a `UserWarning` (not an error): a segment list of plain text and `Shared` blocks for
a model with a chat template, none of whose strings holds the template's markup, says that it
skips the template and shows chat messages with `Shared` parts; chat messages, strings with the
markup, token-id segments and models without a template do not warn.
Preparation: a default-model preparation that fails half-way raises `PrepareError` with the
command to retry and leaves no partial folder behind.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanodance import LLM, RequestOutput, SamplingParams, Shared
from nanodance.errors import CapacityError, ModelLoadError, NanodanceError, RequestError
from nanodance.segments import encode_segments
from fixtures_default_model import default_model_dir, default_tokenizer  # noqa: F401
from tiny_checkpoints import random_ids as ids, write_tiny_checkpoint

BLOCK = 4
VOCAB = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


PROMPT = ids(9, seed=1)


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _ = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), kind="llama3", seed=1)
    return path


def make_llm(folder, **kwargs) -> LLM:
    options = dict(dtype="float32", device="cpu", block_size=BLOCK, kv_cache_blocks=64, reuse="tokendance")
    options.update(kwargs)
    return LLM(folder, **options)


@pytest.fixture(scope="module")
def engine(folder):
    return make_llm(folder)


_ALONE = {}


def alone(llm: LLM, prompt) -> list[int]:
    """The greedy tokens `prompt` gets on a fresh roomy engine of the same kind."""
    key = (llm.model_path, llm.reuse, repr(prompt))
    if key not in _ALONE:
        fresh = make_llm(llm.model_path, reuse=llm.reuse, kv_cache_blocks=256)
        _ALONE[key] = fresh.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    return _ALONE[key]


def assert_usable(llm: LLM) -> None:
    """No block is held by nothing; a valid request still gets its tokens; releasing all empties the pool."""
    llm.check_invariants()
    out = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    assert out.finish_reason == "length" and out.token_ids == alone(llm, PROMPT)
    llm.check_invariants()
    for agent in llm.agents.ids():
        llm.release_agent(agent)
    llm.release_round_outputs()
    assert llm.pool.num_used == 0, f"{llm.pool.num_used} blocks leaked"
    llm.check_invariants()


def raises(cls, *words):
    """pytest.raises for a NanodanceError of `cls` whose message holds every one of `words`."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(cls)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            swallowed = self.ctx.__exit__(*exc)
            err = self.info.value
            assert isinstance(err, NanodanceError)
            for word in words:
                assert word in str(err), f"{word!r} not in the message: {err}"
            return swallowed
    return Check()


def broken_copy(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    return target


def edit_tensors(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_every_error_class_is_a_nanodance_error_and_the_builtin_that_fits():
    from nanodance.errors import ConfigError, ModelPackageUnavailable, PrepareError, TokenizerError

    for cls in (ModelLoadError, ConfigError, TokenizerError, RequestError):
        assert issubclass(cls, NanodanceError) and issubclass(cls, ValueError), cls
    for cls in (CapacityError, PrepareError, ModelPackageUnavailable):
        assert issubclass(cls, NanodanceError) and issubclass(cls, RuntimeError), cls
    assert issubclass(ConfigError, ModelLoadError) and issubclass(TokenizerError, ModelLoadError)


# --- model loading ------------------------------------------------------------------------------

def test_a_missing_model_folder_is_named(tmp_path, engine):
    missing = tmp_path / "no-such-model"
    with raises(ModelLoadError, str(missing), "does not exist"):
        make_llm(missing)
    assert issubclass(ModelLoadError, ValueError)
    assert_usable(engine)


@pytest.mark.parametrize("breakage, words", [
    ("not json", ["config.json", "JSON"]),
    ("architecture", ["GPT2LMHeadModel"]),
    ("rope", ["yarn"]),
])
def test_an_invalid_or_unsupported_config_is_named(folder, tmp_path, engine, breakage, words):
    broken = broken_copy(folder, tmp_path)
    if breakage == "not json":
        (broken / "config.json").write_text("{'num_hidden_layers': 2,")
    elif breakage == "architecture":
        edit_config(broken, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    else:
        edit_config(broken, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                             "original_max_position_embeddings": 64})
    with raises(ModelLoadError, *words):
        make_llm(broken)
    assert_usable(engine)
    assert_usable(make_llm(folder))  # the good folder still loads


def test_a_missing_tensor_is_named(folder, tmp_path, engine):
    broken = broken_copy(folder, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    edit_tensors(broken, lambda t: t.pop(name))
    with raises(ModelLoadError, name):
        make_llm(broken)
    assert_usable(engine)


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(folder, tmp_path, engine):
    broken = broken_copy(folder, tmp_path)
    name = "model.layers.0.self_attn.v_proj.weight"
    edit_tensors(broken, lambda t: t.update({name: torch.zeros(64, 64)}))  # MHA-sized v under a GQA config
    with raises(ModelLoadError, name, "(64, 64)", "(32, 64)"):
        make_llm(broken)
    assert_usable(engine)


@pytest.mark.parametrize("damage", ["truncated", "corrupt header"])
def test_a_truncated_or_corrupt_safetensors_file_is_named(folder, tmp_path, engine, damage):
    broken = broken_copy(folder, tmp_path)
    path = broken / "model.safetensors"
    if damage == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        data = bytearray(path.read_bytes())
        data[8:40] = b"\xff" * 32  # the JSON header is garbage now
        path.write_bytes(bytes(data))
    with raises(ModelLoadError, "model.safetensors"):
        make_llm(broken)
    assert_usable(engine)


def test_a_model_without_tokenizer_serves_token_ids_and_refuses_text(folder, tmp_path, engine):
    assert not (folder / "tokenizer.json").exists()  # the tiny checkpoints have none
    for prompt in ("Hello", [{"role": "user", "content": "Hello"}], [PROMPT, Shared("shared words")]):
        with raises(RequestError, "tokenizer", "token ids"):
            engine.generate([PROMPT, prompt], GREEDY, use_tqdm=False)
    assert_usable(engine)

    broken = broken_copy(folder, tmp_path)
    (broken / "tokenizer.json").write_text("{ this is not a tokenizer")
    with raises(ModelLoadError, "tokenizer.json"):
        make_llm(broken)


# --- requests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, words", [
    ([PROMPT, ""], ["prompt 1", "empty"]),
    ([PROMPT, []], ["prompt 1"]),
    ([], ["at least one prompt"]),
    (None, ["list of prompts"]),
])
def test_an_empty_prompt_is_refused_and_nothing_runs(engine, prompts, words):
    finished = engine.stats()["requests_finished"]
    with raises(RequestError, *words):
        engine.generate(prompts, GREEDY, use_tqdm=False)
    assert engine.stats()["requests_finished"] == finished  # not even the valid prompt ran
    assert_usable(engine)


@pytest.mark.parametrize("bad", [[5, VOCAB], [-1, 5], [5, 10**9]])
def test_a_token_id_outside_the_vocabulary_is_listed(engine, bad):
    wrong = [t for t in bad if not 0 <= t < VOCAB]
    with raises(RequestError, "vocabulary", str(wrong)):
        engine.generate([PROMPT, bad], GREEDY, use_tqdm=False)
    with raises(RequestError, "vocabulary", str(wrong)):
        engine.run_round([[PROMPT, Shared(bad)]], GREEDY, use_tqdm=False)
    assert_usable(engine)


def test_a_prompt_longer_than_max_model_len_fails_alone(folder):
    llm = make_llm(folder, max_model_len=24)
    short, long_, other = ids(7, seed=2), ids(25, seed=3), ids(12, seed=4)
    outs = llm.generate([short, long_, other], GREEDY, use_tqdm=False)
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert "max_model_len=24" in outs[1].error and "25 tokens" in outs[1].error
    assert [o.token_ids for o in (outs[0], outs[2])] == [alone(llm, short), alone(llm, other)]
    assert llm.stats()["requests_failed"] == 1
    assert_usable(llm)


@pytest.mark.parametrize("reuse", ["none", "prefix", "pic", "tokendance"])
def test_a_request_larger_than_the_whole_pool_fails_alone(folder, reuse):
    llm = make_llm(folder, reuse=reuse, kv_cache_blocks=10)  # 40 tokens
    huge, fine = ids(41, seed=5), ids(10, seed=6)
    outs = llm.generate([huge, fine], GREEDY, use_tqdm=False)
    assert outs[0].finish_reason == "error" and "kv_cache_blocks" in outs[0].error and "41 tokens" in outs[0].error
    assert outs[1].token_ids == alone(llm, fine)
    shared = ids(6, seed=7)
    r = llm.run_round([[fine, Shared(shared)], [huge, Shared(shared)], [ids(5, seed=8), Shared(shared)]], GREEDY,
                      use_tqdm=False)
    assert r[1].finish_reason == "error" and "kv_cache_blocks" in r[1].error
    assert r[0].finish_reason == r[2].finish_reason == "length"
    assert_usable(llm)


def test_a_round_request_that_cannot_fit_next_to_its_masters_fails_alone(folder):
    """A 40-token shared block takes 11 of 20 blocks as a standalone master (behind a sink);
    agent B's 73 tokens fit the pool alone but not beside the master they read, agent A's do."""
    llm = make_llm(folder, kv_cache_blocks=20)
    block, a, b, tail = ids(40, seed=9), ids(5, seed=10), ids(30, seed=11), [7, 8, 9]
    r = llm.run_round([[a, Shared(block), tail], [b, Shared(block), tail]], GREEDY, use_tqdm=False)
    assert r[1].finish_reason == "error" and "kv_cache_blocks" in r[1].error and "shared" in r[1].error
    assert r[0].finish_reason == "length"
    roomy = make_llm(folder, kv_cache_blocks=256)
    assert r[0].token_ids == roomy.run_round([[a, Shared(block), tail]], GREEDY, use_tqdm=False)[0].token_ids
    assert isinstance(CapacityError(""), RuntimeError)
    assert_usable(llm)


def test_shared_blocks_whose_masters_cannot_be_prefilled_together_fail_the_round_and_free_them(folder):
    """Standalone masters of 21 and 31 tokens (with their sink) need 6 + 8 blocks of a 12-block pool."""
    llm = make_llm(folder, kv_cache_blocks=12, master="standalone")
    first, second = ids(20, seed=13), ids(30, seed=14)
    with raises(CapacityError, "shared block", "kv_cache_blocks"):
        llm.run_round([[[5], Shared(first)], [[6], Shared(second)]], GREEDY, use_tqdm=False)
    assert llm.pool.num_used == 0  # the first master, prefilled before the second failed, is freed
    assert_usable(llm)


# --- sampling params ------------------------------------------------------------------------------

BAD_PARAMS = [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(max_tokens=2.0), "max_tokens"),
    (dict(stop=3), "stop"), (dict(stop=[3]), "stop"), (dict(stop=[""]), "stop"), (dict(stop=["ok", None]), "stop"),
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed="7"), "seed"),
]


@pytest.mark.parametrize("kwargs, name", BAD_PARAMS, ids=[f"{k}" for k, _ in BAD_PARAMS])
def test_invalid_sampling_params_are_named(engine, kwargs, name):
    with raises(RequestError, name):
        SamplingParams(**kwargs)
    changed = SamplingParams(temperature=0.0, max_tokens=4)
    for key, value in kwargs.items():
        setattr(changed, key, value)  # a valid object changed afterwards is checked when it is used
    with raises(RequestError, name):
        engine.generate([PROMPT], changed, use_tqdm=False)
    assert_usable(engine)


@pytest.mark.parametrize("params", [{"temperature": 0}, 0.5, [GREEDY], [GREEDY, None]])
def test_sampling_params_that_are_not_sampling_params_are_refused(engine, params):
    with raises(RequestError, "sampling_params", "SamplingParams"):
        engine.generate([PROMPT, PROMPT[:3]], params, use_tqdm=False)
    assert_usable(engine)


# --- round misuse ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts", [[], (), "not a list"])
def test_an_empty_round_is_refused(engine, prompts):
    with raises(RequestError, "round"):
        engine.run_round(prompts, GREEDY, use_tqdm=False)
    assert_usable(engine)


def test_shared_of_an_unsupported_type_is_refused(engine):
    for value in (3.5, None, {"text": "x"}, [1.5, 2], [], ""):
        with raises(RequestError, "Shared()"):
            Shared(value)
    out = engine.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    with raises(RequestError, "Shared(...)"):
        engine.run_round([[PROMPT, out]], GREEDY, use_tqdm=False)  # an output must be wrapped
    with raises(RequestError, "segment", "float"):
        engine.run_round([[PROMPT, 3.5]], GREEDY, use_tqdm=False)
    assert_usable(engine)


def test_a_shared_output_of_another_engine_is_refused(folder, engine):
    other = make_llm(folder)
    foreign = other.run_round([[PROMPT]], GREEDY, use_tqdm=False)[0]
    with raises(RequestError, "different LLM instance", "token ids"):
        engine.run_round([[ids(4, seed=12), Shared(foreign)]], GREEDY, use_tqdm=False)
    # Passing its token ids is the fix.
    ok = engine.run_round([[ids(4, seed=12), Shared(foreign.token_ids)]], GREEDY, use_tqdm=False)[0]
    assert ok.finish_reason == "length"
    failed = other.generate([ids(600, seed=15)], GREEDY, use_tqdm=False)[0]  # too long: no tokens at all
    assert failed.finish_reason == "error" and failed.token_ids == []
    # An empty output is refused already by Shared(), before the engine could tell whose it is.
    with raises(RequestError, "produced no tokens"):
        engine.run_round([[ids(4, seed=12), Shared(failed)]], GREEDY, use_tqdm=False)
    assert_usable(engine)
    assert_usable(other)


def test_sharing_an_output_without_tokens_is_refused_at_shared(engine):
    failed = engine.generate([ids(600, seed=15)], GREEDY, use_tqdm=False)[0]  # too long: no tokens
    assert failed.finish_reason == "error" and failed.token_ids == []
    with raises(RequestError, "Shared()", f"request {failed.request_id}", "produced no tokens", "it failed",
                failed.error, "token_ids"):
        Shared(failed)
    # Only a stop token is no tokens either: a Shared block never carries the final stop token.
    said_nothing = RequestOutput(request_id=99, prompt=PROMPT, prompt_token_ids=PROMPT, text="", token_ids=[0],
                                 finish_reason="stop", num_prompt_tokens=len(PROMPT), num_cached_tokens=0,
                                 stopped_by_token=True, engine_id=failed.engine_id)
    with raises(RequestError, "request 99", "produced no tokens", "stopped at once", "plain-string prompt",
                "chat messages"):
        Shared(said_nothing)
    aborted = RequestOutput(**{**said_nothing.__dict__, "token_ids": [], "finish_reason": "abort",
                               "stopped_by_token": False})
    with raises(RequestError, "request 99", "produced no tokens", "'abort'"):
        Shared(aborted)
    said_one = RequestOutput(**{**said_nothing.__dict__, "token_ids": [7, 0]})
    assert Shared(said_one).value is said_one
    assert_usable(engine)


def test_engine_ids_are_never_reused_after_an_engine_is_collected(folder):
    seen = set()
    for _ in range(6):
        llm = make_llm(folder, kv_cache_blocks=8)
        out = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]
        assert out.engine_id not in seen
        # Not the address: CPython hands it to a later object once this engine is collected.
        assert out.engine_id not in (id(llm), str(id(llm)))
        seen.add(out.engine_id)
        del llm
        gc.collect()  # CPython would hand the next engine the same id()
    fresh = make_llm(folder, kv_cache_blocks=8)
    with raises(RequestError, "different LLM instance"):
        fresh.run_round([[PROMPT, Shared(out)]], GREEDY, use_tqdm=False)
    assert_usable(fresh)


def test_repeated_or_unhashable_persistent_agent_ids_are_refused(engine):
    r0 = engine.run_round([[PROMPT], [PROMPT[:5]]], GREEDY, agents=["x", "y"], use_tqdm=False)
    kept = engine.pool.num_used
    with raises(RequestError, "unique", "'x'"):
        engine.run_round([[PROMPT], [PROMPT[:5]]], GREEDY, agents=["x", "x"], use_tqdm=False)
    with raises(RequestError, "hashable"):
        engine.run_round([[PROMPT], [PROMPT[:5]]], GREEDY, agents=["x", ["y"]], use_tqdm=False)
    with raises(RequestError, "2 prompts"):
        engine.run_round([[PROMPT], [PROMPT[:5]]], GREEDY, agents=["x"], use_tqdm=False)
    with raises(RequestError, "list of ids"):
        engine.run_round([[PROMPT], [PROMPT[:5]]], GREEDY, agents="xy", use_tqdm=False)
    assert engine.pool.num_used == kept and set(engine.agents.ids()) == {"x", "y"}  # the kept caches are intact
    r1 = engine.run_round([[PROMPT + r0[0].token_ids, [5]]], GREEDY, agents=["x"], use_tqdm=False)
    assert r1[0].num_cached_tokens == 0 and r1.stats["prefill_tokens_computed"] < len(PROMPT)  # x's cache served it
    assert_usable(engine)


@pytest.mark.parametrize("ratio", [1.5, -0.1, float("nan")])
@pytest.mark.parametrize("reuse", ["tokendance", "pic"])
def test_recompute_ratio_outside_0_1_is_refused(folder, engine, reuse, ratio):
    with raises(RequestError, "recompute_ratio", "[0, 1]"):
        make_llm(folder, reuse=reuse, recompute_ratio=ratio)
    assert_usable(engine)


def test_an_unknown_reuse_mode_is_refused_with_the_choices(folder, engine):
    with raises(RequestError, "'everything'", "none", "prefix", "pic", "tokendance"):
        make_llm(folder, reuse="everything")
    assert_usable(engine)


@pytest.mark.parametrize("kwargs, name", [
    (dict(kv_cache_blocks=0), "kv_cache_blocks"), (dict(kv_cache_blocks=2.5), "kv_cache_blocks"),
    (dict(kv_cache_blocks=None, kv_cache_memory=-1), "kv_cache_memory"), (dict(max_model_len=0), "max_model_len"),
    (dict(block_size=0), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"), (dict(dtype="int8"), "dtype"),
    (dict(recompute_scheme="random"), "scheme"), (dict(master="oracle"), "master"),
    (dict(selection="global"), "selection"), (dict(check_layer=2), "check_layer"),
])
def test_other_invalid_engine_options_are_named(folder, engine, kwargs, name):
    with raises(RequestError, name):
        make_llm(folder, **kwargs)
    assert_usable(engine)


# --- chat markup -----------------------------------------------------------------------------------

def test_plain_text_segments_for_a_chat_model_without_its_markup_warn(default_tokenizer):
    tok = default_tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    with pytest.warns(UserWarning, match="skips the model's chat template") as caught:
        enc = encode_segments(["You are agent A. ", Shared("the shared news"), " Your answer?"], tok)
    assert len(caught) == 1 and "'role': 'user'" in str(caught[0].message)  # the one-line example
    assert enc.token_ids == tok.encode("You are agent A. ") + tok.encode("the shared news") + tok.encode(" Your answer?")
    with pytest.warns(UserWarning, match="chat template"):
        encode_segments(["no markup, ", "no Shared either"], tok)


@pytest.mark.parametrize("prompt", [
    ["<|im_start|>user\nYou are agent A. ", Shared("the shared news"), "<|im_end|>\n<|im_start|>assistant\n"],
    [Shared("<|im_start|>system\nThe town rules.<|im_end|>\n"), "<|im_start|>user\nHi<|im_end|>\n"],
    [{"role": "user", "content": ["Others said: ", Shared("the shared news"), " Your answer?"]}],
    [[1, 2, 3], Shared("the shared news"), " Your answer?"],  # ids may carry the markup already
])
def test_chat_messages_or_prompts_with_the_markup_do_not_warn(default_tokenizer, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_segments(prompt, default_tokenizer)


def test_plain_text_segments_for_a_model_without_a_chat_template_do_not_warn(default_tokenizer):
    from nanodance.tokenizer import Tokenizer

    no_template = Tokenizer(default_tokenizer._backend, eos_token=default_tokenizer.eos_token)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_segments(["You are agent A. ", Shared("the shared news")], no_template)


# --- preparation ------------------------------------------------------------------------------------

def test_a_preparation_failing_half_way_leaves_nothing_and_says_how_to_retry(tmp_path, monkeypatch):
    from nanodance.errors import PrepareError
    from nanodance.tools import prepare

    if prepare._installed_gguf() is None:
        pytest.skip(f"{prepare.PACKAGE_NAME} is not installed ({prepare.INSTALL_COMMAND})")

    def convert_then_fail(gguf_path, out_dir, progress=True):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"\0" * 100)  # half-written
        raise OSError("No space left on device")

    monkeypatch.setattr(prepare, "convert_gguf_to_hf", convert_then_fail)
    with raises(PrepareError, prepare.RETRY_COMMAND, "No space left"):
        prepare.prepare_default_model(cache_root=tmp_path, progress=False)
    models = tmp_path / "models"
    assert not models.exists() or list(models.iterdir()) == []
