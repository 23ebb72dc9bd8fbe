"""Session fixtures for tests that need the default model (SmolLM2-135M-Instruct).

`default_model_dir` is the converted Hugging Face folder in the normal cache (`$NANODANCE_CACHE`
or ~/.cache/nanodance), prepared on first use (~10-15 s once, then instant), so every test module
and every test run share one conversion. Tests skip, with the reason, only where the model
package can be had neither installed nor downloaded.

Use it from a test module with:

    from fixtures_default_model import default_model_dir, default_tokenizer  # noqa: F401
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from nanodance.errors import ModelPackageUnavailable
    from nanodance.tools.prepare import default_model_dir as prepared_dir

    try:
        return prepared_dir()
    except ModelPackageUnavailable as exc:
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from nanodance.tokenizer import Tokenizer

    return Tokenizer.from_folder(default_model_dir)
