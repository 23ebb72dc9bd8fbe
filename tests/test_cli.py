"""The command line (`python -m nanodance`): how it fails.

Every failure is one line on stderr, `error: <message>`, and exit status 1, with no traceback:
a bad sampling option (found before any model is loaded), a bad or missing argument, a model
folder that does not exist, a failed preparation, and a prompt too long for the model (its output
has finish_reason "error"; nothing is printed on stdout). A prompt that fits prints its text and
exits 0.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_default_model import default_model_dir  # noqa: F401

from nanodance.tools.cli import main
from nanodance.errors import PrepareError

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


def test_a_bad_temperature_is_reported_before_the_model_loads(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", "hi", "--temperature", "-1", "--model", str(missing)]) == 1
    line = one_error_line(capsys)
    # Loading first would have reported the missing folder instead.
    assert "temperature" in line and "-1" in line and str(missing) not in line


def test_a_bad_max_tokens_is_reported_before_the_model_loads(tmp_path, capsys):
    assert main(["generate", "hi", "--max-tokens", "0", "--model", str(tmp_path / "nope")]) == 1
    assert "max_tokens" in one_error_line(capsys)


@pytest.mark.parametrize("argv, words", [
    ([], ["required", "command"]),
    (["generate"], ["required", "prompt"]),
    (["generate", "hi", "--max-tokens", "many"], ["--max-tokens", "'many'"]),
    (["generate", "hi", "--dtype", "int4"], ["--dtype", "int4"]),
    (["serv"], ["invalid choice", "'serv'"]),
])
def test_a_bad_command_line_is_one_line(capsys, argv, words):
    assert main(argv) == 1
    line = one_error_line(capsys)
    for word in words:
        assert word in line, line


def test_an_unknown_model_folder_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", "hi", "--model", str(missing)]) == 1
    line = one_error_line(capsys)
    assert str(missing) in line and "does not exist" in line


def test_a_failed_preparation_is_one_line(monkeypatch, capsys):
    from nanodance.tools import prepare

    def fail(force=False):
        raise PrepareError("preparing failed: disk full\nNothing partial was kept. Retry with `x`.")

    monkeypatch.setattr(prepare, "prepare_default_model", fail)
    assert main(["prepare"]) == 1
    line = one_error_line(capsys)
    assert "disk full" in line and "Retry with" in line


def test_a_prompt_too_long_for_the_model_fails_with_its_error(default_model_dir, capsys):
    prompt = "Tell me everything about the history of the world, in great detail. " * 4
    argv = ["generate", prompt, "--model", str(default_model_dir), "--dtype", "float32", "--max-tokens", "2",
            "--max-model-len", "16", "--kv-cache-blocks", "8"]
    assert main(argv) == 1
    line = one_error_line(capsys)
    assert "max_model_len=16" in line


def test_a_prompt_that_fits_prints_its_text(default_model_dir, capsys):
    argv = ["generate", "Say hello.", "--model", str(default_model_dir), "--dtype", "float32", "--max-tokens", "3",
            "--kv-cache-blocks", "8"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "error" not in captured.err


def test_the_module_exits_1_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "nanodance", "generate", "hi", "--temperature", "nan",
                        "--model", str(tmp_path / "nope")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: temperature"), r.stderr


def test_a_too_long_prompt_is_one_line_from_the_module_too(default_model_dir):
    """The engine logs a request that fails; the command line says it once, not twice."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "nanodance", "generate", "word " * 60, "--model", str(default_model_dir),
                        "--max-model-len", "16", "--kv-cache-blocks", "8"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: prompt has"), r.stderr


# --- serve ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["serve", "--recompute-ratio", "2"], ["recompute_ratio"]),
    (["serve", "--port", "70000"], ["--port"]),
    (["serve", "--reuse", "sometimes"], ["--reuse", "sometimes"]),
    (["serve", "--admission-window-ms", "-5"], ["--admission-window-ms"]),
])
def test_bad_serve_options_are_one_line_before_the_model_loads(tmp_path, capsys, argv, words):
    missing = tmp_path / "no-such-model"
    assert main(argv + ["--model", str(missing)]) == 1
    line = one_error_line(capsys)
    assert all(w in line for w in words) and str(missing) not in line, line


def test_serve_answers_an_openai_client_until_it_is_stopped(default_model_dir):
    import signal
    import socket
    import time

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanodance", "serve", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 120
        while True:
            try:
                [model] = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        reply = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: the status is -SIGTERM, no traceback.
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err[-2000:]
    assert "serving 'SmolLM2-135M-Instruct'" in err


def test_serve_offers_every_master_source_and_reuse_mode():
    from nanodance.engine_config import MASTER_SOURCES, REUSE_MODES
    from nanodance.tools.cli import _parser

    for master in MASTER_SOURCES:
        assert _parser().parse_args(["serve", "--master", master]).master == master
    for reuse in REUSE_MODES:
        assert _parser().parse_args(["serve", "--reuse", reuse]).reuse == reuse
