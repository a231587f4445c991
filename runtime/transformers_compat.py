"""Names that differ between the transformers releases we support (5.17 up to 6).

transformers 5.25 renamed the cache argument of every model's ``forward`` and of ``generate`` from
``past_key_values`` to ``cache`` (the old name still works there, with a FutureWarning, and goes in
5.40), and the output field with it. Our own calls use whichever name the model in hand takes, so
they neither warn on new releases nor break on old ones.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _forward_takes_cache(model_class: type) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def cache_argument(model) -> str:
    """The keyword under which ``model(...)`` and ``model.generate(...)`` take a cache object."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def with_cache(model, cache) -> dict[str, Any]:
    """``{name: cache}`` to splice into a model or ``generate`` call: ``model(ids, **with_cache(model, c))``."""
    return {cache_argument(model): cache}


def output_cache(output) -> Any:
    """The cache a model output carries (``output.cache`` on new releases, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
