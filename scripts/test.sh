#!/usr/bin/env bash
# Set up with the test extras (scripts/setup.sh --test, quick when already done) and run the
# test suite on CPU.
#
#   bash scripts/test.sh                      # all tests
#   bash scripts/test.sh -k tokenizer         # extra arguments go to pytest
#   bash scripts/test.sh tests/test_prepare.py
#
# Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU tensors. The exit code is
# pytest's; "no tests collected" (5) is a failure too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export TRITON_INTERPRET=1

bash scripts/setup.sh --test

# Run all of tests/ unless a test path was given.
paths=(tests)
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then paths=(); break; fi
done

set +e
.venv/bin/python -m pytest -q ${paths[@]+"${paths[@]}"} "$@"
status=$?
set -e
if [[ $status -ne 0 ]]; then echo "test: pytest exited with status $status" >&2; fi
exit $status
