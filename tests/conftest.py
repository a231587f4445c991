"""Test set-up shared by the whole suite.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set
before any kernel module is imported, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Before anything imports transformers: importing sparsek.runtime keeps the installed Hub
# ``kernels`` package importable although this checkout's ``kernels/`` folder is on the path.
import sparsek.runtime  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny ops single-threaded: on the shared 2-core CI box they are far faster so."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
