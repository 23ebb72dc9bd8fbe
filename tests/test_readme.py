"""The README's code runs as written (a new user copies it first).

Specification:
- every ```python block of README.md (and of docs/usage.md) runs in a fresh namespace, in order, on the default model;
  the usage example's agents answer something in both rounds (an instruct model given plain
  strings answers '' at once, the trap this guards against), round 1 reuses the shared answers,
  and the engine's cumulative `prefill_tokens_reused` counts what the rounds report;
- every command of a ```bash block that runs nanodance itself (`python -m nanodance ...`,
  `python examples/...`) exits 0 and prints something; `scripts/setup.sh` and `scripts/test.sh`
  are what CI runs around this very test, so they are checked there, not re-entered here.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_default_model import default_model_dir  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
USAGE = (ROOT / "docs" / "usage.md").read_text()


def code_blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def nanodance_commands() -> list[list[str]]:
    """The README's bash commands that run nanodance (setup and test scripts excluded)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if words and words[0].endswith("python"):
                    commands.append([sys.executable, *words[1:]])
    return commands


def test_the_readme_has_code_to_run():
    assert code_blocks("python") and nanodance_commands()


def test_every_python_block_runs_as_written(default_model_dir, capsys):
    namespaces = []
    for block in code_blocks("python"):
        namespace: dict = {"__name__": "__readme__"}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        namespaces.append(namespace)
    usage = next(ns for ns in namespaces if "r1" in ns)
    r0, r1, llm = usage["r0"], usage["r1"], usage["llm"]
    assert all(o.text.strip() and o.finish_reason in ("stop", "length") for o in [*r0, *r1])
    assert r1.stats["prefill_tokens_reused"] > 0
    assert llm.stats()["prefill_tokens_reused"] >= sum(h["prefill_tokens_reused"] for h in llm.round_history) > 0
    assert capsys.readouterr().out.strip()  # it printed what it computed


def test_every_python_block_of_the_usage_guide_runs(default_model_dir, capsys):
    blocks = code_blocks("python", USAGE)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/usage.md", "exec"), {"__name__": "__usage__"})  # noqa: S102
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("command", nanodance_commands(), ids=lambda c: " ".join(c[1:3]))
def test_every_nanodance_command_runs(default_model_dir, command):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
