"""Finding and checking what ``sparsek convert`` reads: a local folder, a Hub id, or the default.

Everything that can be wrong with the input is found here, before anything is written: a
missing or unreadable folder, an architecture we have no sparse classes for, pickle-only
checkpoints (we never unpickle), quantised or already converted checkpoints, index files that
point at missing shards, and weights without the attention projections the scorer hangs off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sparsek.runtime.configuration_sparsek import SUPPORTED_ARCHITECTURES
from sparsek.runtime.errors import UserError
from sparsek.runtime.loading import resolve_model_path

from .safetensors_io import SafetensorsHeader, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass
class Source:
    """A checked conversion source."""

    name: str  # what the user gave (folder, Hub id) or the default's description
    folder: Path  # where config, tokenizer and generation config come from
    config: dict  # the base config.json, as written
    base_model_type: str
    shards: list[SafetensorsHeader] = field(default_factory=list)  # empty for the GGUF default
    index: dict | None = None  # the source's model.safetensors.index.json, when sharded
    gguf_file: str | None = None  # set for the embedded default
    hub_id: str | None = None

    @property
    def sharded(self) -> bool:
        return self.index is not None

    def tensor_names(self) -> list[str]:
        return [n for s in self.shards for n in s.names()]

    def total_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return data


def check_config(config: dict, where: str) -> str:
    """The base model type of a dense config; clear errors for anything we cannot convert."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("sparsek_"):
        raise UserError(f"{where} is already a converted sparsek model ({model_type}); convert its dense source instead")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"{where}: unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UserError(f"{where} is a quantised checkpoint ({method}); convert an unquantised (float) checkpoint")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise UserError(f"{where}: config.json has no valid {key}")
    return model_type


def _weight_files(folder: Path) -> tuple[list[Path], dict | None]:
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, "index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no weight_map")
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if Path(name).name != name or not (folder / name).is_file():
                raise UserError(f"{index_path} lists shard {name!r}, which is missing from {folder}")
        return [folder / name for name in files], index
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], None
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in folder.glob(pat))
    if pickles:
        raise UserError(
            f"{folder} has only pickle checkpoints ({', '.join(pickles[:3])}); sparsek never unpickles weights: "
            "convert them to safetensors first"
        )
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise UserError(f"{folder} has {', '.join(others[:3])} but neither {SINGLE_FILE} nor {INDEX_FILE}")
    raise UserError(f"{folder} has no model weights ({SINGLE_FILE} or {INDEX_FILE})")


def check_layers(names: list[str], config: dict, where: str) -> None:
    """Every layer must have a k_proj (the scorer sits beside it) and no scorer yet."""
    present = set(names)
    for i in range(config["num_hidden_layers"]):
        key = f"model.layers.{i}.self_attn.k_proj.weight"
        if key not in present:
            raise UserError(f"{where}: weights have no {key}; not a standard {config['model_type']} checkpoint")
    if any(".scorer." in n for n in names):
        raise UserError(f"{where}: weights already contain scorer tensors")


def open_folder(folder: Path, name: str, hub_id: str | None = None) -> Source:
    if not folder.is_dir():
        raise UserError(f"source not found: {name}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{name} has no config.json: not a Hugging Face model folder")
    config = read_json(config_path, "config")
    base = check_config(config, name)
    files, index = _weight_files(folder)
    shards = [read_header(f) for f in files]
    if index is not None:
        for shard in shards:
            for n in shard.names():
                if index["weight_map"].get(n) != shard.path.name:
                    raise UserError(f"{shard.path} holds {n!r}, which the index does not map to it")
        stored = {n for s in shards for n in s.names()}
        missing = [n for n in index["weight_map"] if n not in stored]
        if missing:
            raise UserError(f"index maps {missing[0]!r} to a shard that does not contain it")
    names = [n for s in shards for n in s.names()]
    check_layers(names, config, name)
    return Source(name=name, folder=folder, config=config, base_model_type=base, shards=shards, index=index,
                  hub_id=hub_id)


def find_source(source: str | None, revision: str | None = None) -> Source:
    """Resolve SOURCE (folder, Hub id, or ``None`` for the embedded default) and check it."""
    if source is None:
        from .default_model import default_source

        return default_source()
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        if path.suffix == ".gguf":
            raise UserError(f"{source}: give the folder, not a file (GGUF files are read only for the embedded default)")
        raise UserError(f"{source} is a file; SOURCE must be a model folder or a Hub id")
    folder = resolve_model_path(source, revision)
    hub_id = None if path.is_dir() else source
    return open_folder(folder, source, hub_id)
