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
    (["serve"], ["invalid choice", "'serve'"]),
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
