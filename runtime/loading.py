"""Finding and loading converted models: a local folder or a Hub id.

Hub ids are downloaded with ``snapshot_download`` (progress bar, revision pinning) into the
usual Hugging Face cache, so a model works offline once cached (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .configuration_sparsek import SUPPORTED_ARCHITECTURES
from .errors import UserError
from .registry import register_auto_classes

register_auto_classes()

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose one of auto, {', '.join(sorted(set(DTYPES)))}") from None


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def looks_like_hub_id(source: str) -> bool:
    return not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "/", "~"))


def resolve_model_path(source: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder as is; a Hub id downloaded (or found in the cache) with a progress bar."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not looks_like_hub_id(source):
        raise UserError(f"model not found: {source!r} is neither a folder nor a Hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=source, revision=revision, token=token))
    except RepositoryNotFoundError:
        raise UserError(f"Hub repository {source!r} not found (or not visible with your token)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{source!r} is not in the local cache and the Hub cannot be reached") from None
    except HfHubHTTPError as e:
        raise UserError(f"downloading {source!r} failed: {str(e).splitlines()[0]}") from None


def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UserError(f"{folder} has no config.json: not a model folder")
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {cfg}: {e}") from None


def require_converted(folder: Path) -> dict:
    """The config of a converted folder; a clear error for anything else."""
    cfg = read_config(folder)
    model_type = cfg.get("model_type", "")
    if not model_type.startswith("sparsek_") or cfg.get("sparse_method") is None:
        raise UserError(f"{folder} is not a converted sparsek model (model_type {model_type!r}); run `sparsek convert` first")
    if cfg.get("base_model_type") not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{folder}: unsupported base architecture {cfg.get('base_model_type')!r}")
    return cfg


def load_model(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    dense: bool = False,
    revision: str | None = None,
    **overrides,
):
    """Load a converted model with the package's classes (sparse by default, or ``dense=True``).

    ``overrides`` set config fields at load time (``sparsek_topk=...``, ``cca_window=...``).
    """
    from transformers import AutoModelForCausalLM

    register_auto_classes()
    folder = resolve_model_path(str(source), revision)
    require_converted(folder)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, (str, type(None))) else dtype
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    kwargs = dict(overrides)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="sdpa" if dense else None, **kwargs
    )
    return model.to(dev).eval()


def load_tokenizer(source: str | Path, revision: str | None = None):
    from transformers import AutoTokenizer

    folder = resolve_model_path(str(source), revision)
    return AutoTokenizer.from_pretrained(folder)
