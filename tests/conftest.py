"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before any `@triton.jit` decorator runs, so it is set here,
before the test modules import nanodance.kernels (docs/design.md, "Kernels").
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after the interpreter flag, on purpose)
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny models gain nothing from threads and crawl when the cores are shared: use one.

    Modules of tiny-model tests opt in with `pytestmark = pytest.mark.usefixtures("one_cpu_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
