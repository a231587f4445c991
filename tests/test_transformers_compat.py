"""The cache argument across transformers releases (``past_key_values`` before 5.25, ``cache`` since).

Whatever release is installed, a bounded cache must reach the sparse attention under either name a
user may pass, and our own calls must use the name the installed release takes.
"""

import inspect
import warnings

import pytest
import torch

from sparsek.runtime.cache_cca import make_cache
from sparsek.runtime.transformers_compat import cache_argument, output_cache, with_cache

from .test_caches import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _Old:
    def forward(self, input_ids, past_key_values=None, **kwargs): ...


class _New:
    def forward(self, input_ids, cache=None, past_key_values=None, **kwargs): ...  # 5.25 lists both


def test_cache_argument_follows_the_forward_signature():
    assert cache_argument(_Old()) == "past_key_values"
    assert cache_argument(_New()) == "cache"
    assert with_cache(_New(), 1) == {"cache": 1}

    class Out:  # a ModelOutput of either release
        past_key_values = "old"

    assert output_cache(Out()) == "old"
    Out.cache = "new"
    assert output_cache(Out()) == "new"


@pytest.mark.parametrize("method", ["sparsek", "cca"])
def test_both_names_reach_the_bounded_cache(method):
    model = tiny_model("llama", method)
    ids = torch.randint(0, 97, (1, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
    names = {cache_argument(model), "past_key_values"}
    assert cache_argument(model) == ("cache" if "cache" in inspect.signature(model.forward).parameters
                                     else "past_key_values")
    for name in names:
        cache = make_cache(model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecated name warns on new releases
            steps = [model(ids[:, :9], **{name: cache}).logits]
            steps += [model(ids[:, t : t + 1], **{name: cache}, position_ids=torch.tensor([[t]])).logits
                      for t in range(9, 17)]
        assert cache.get_seq_length() == 17, name
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4), name


def test_transformers_imports_from_a_checkout_root():
    """From a checkout's root (``python -m sparsek.cli`` there), our top-level ``kernels/`` folder is on
    ``sys.path``; transformers >= 5.25 imports the Hub ``kernels`` package and must not get ours."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hub kernels package is not installed (transformers < 5.25 does not need it)")
    root = Path(__file__).resolve().parents[1]
    code = ("import sparsek.runtime, transformers.modeling_utils, kernels, sparsek.kernels; "
            "print(kernels.__file__ != sparsek.kernels.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr[-2000:]
