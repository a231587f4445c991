"""Test set-up shared by the whole suite.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set
before any kernel module is imported, so it is set here, first.
"""

import importlib
import os
import sys
from pathlib import Path

import torch


def _import_installed_hub_kernels() -> None:
    """Make ``import kernels`` mean the installed Hub-kernels distribution, not our ``kernels/`` folder.

    transformers >= 5.25 depends on the ``kernels`` distribution and imports it when present. The
    repository root is on ``sys.path`` under pytest, and there our top-level ``kernels/`` folder (which
    installs as ``sparsek.kernels``) would shadow it and break ``import transformers``. Importing the
    installed package once, with the root left out of the path, pins it in ``sys.modules``.
    """
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        sys.modules.pop("kernels", None)  # not installed: transformers then skips it too
    finally:
        sys.path[:] = saved


_import_installed_hub_kernels()

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
