"""Writing the converted folder's files: weights (shard by shard), config, code, tokenizer, README.

Weights keep the source's layout: the same shard files under the same names, every dense tensor
under its own name with its bytes unchanged (unless ``--dtype`` asks for a cast); the new scorer
tensors of layer ``i`` go into the shard that holds layer ``i``'s ``k_proj``, so no shard grows
much and the index only gains entries.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from sparsek.runtime.remote_code import REMOTE_CODE_FILES, auto_map

from .safetensors_io import (
    DTYPE_TO_CODE,
    FLOAT_CODES,
    OutTensor,
    SafetensorsHeader,
    convert_range,
    copy_range,
    from_tensor,
    write_safetensors,
    zeros_f32,
)
from .source import INDEX_FILE, SINGLE_FILE, Source

# Files copied from the source folder when present (tokenizer, chat template, generation config, licence).
AUX_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "chat_template*", "generation_config.json", "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*",
)


def scorer_tensors(config: dict, layer: int) -> list[OutTensor]:
    """Zero-initialised ``W_score [Hkv, hidden]`` and ``b_score [Hkv]`` of one layer (SPEC 1.1)."""
    hkv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    prefix = f"model.layers.{layer}.self_attn.scorer"
    return [zeros_f32(f"{prefix}.weight", (hkv, int(config["hidden_size"]))), zeros_f32(f"{prefix}.bias", (hkv,))]


def _layer_of_k_proj(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[3:] == ["self_attn", "k_proj", "weight"]:
        return int(parts[2])
    return None


def shard_plan(
    shard: SafetensorsHeader, config: dict, with_scorer: bool, dtype: torch.dtype | None
) -> list[OutTensor]:
    """What one output shard holds: the source tensors (copied or cast) and this shard's scorers."""
    out: list[OutTensor] = []
    scorers: list[OutTensor] = []
    for t in shard.tensors:
        if dtype is not None and t.dtype in FLOAT_CODES and t.dtype != DTYPE_TO_CODE[dtype]:
            nbytes = math.prod(t.shape) * dtype.itemsize
            out.append(OutTensor(t.name, DTYPE_TO_CODE[dtype], t.shape, nbytes, convert_range(shard.path, t, dtype)))
        else:
            out.append(OutTensor(t.name, t.dtype, t.shape, t.nbytes, copy_range(shard.path, t.start, t.nbytes),
                                 (shard.path, t.start)))
        layer = _layer_of_k_proj(t.name)
        if with_scorer and layer is not None:
            scorers += scorer_tensors(config, layer)
    return out + scorers


def write_weights(
    source: Source, tmp: Path, with_scorer: bool, dtype: torch.dtype | None, progress: Callable[[int], None]
) -> tuple[int, int]:
    """Write every shard (streaming) and the updated index; returns (tensors written, bytes)."""
    plans = [(s.path.name, shard_plan(s, source.config, with_scorer, dtype), s.metadata) for s in source.shards]
    return _write_plans(plans, tmp, source.sharded, source.index, progress)


def write_memory_weights(
    tensors: dict[str, torch.Tensor], config: dict, tmp: Path, with_scorer: bool, dtype: torch.dtype | None,
    progress: Callable[[int], None],
) -> tuple[int, int]:
    """Write in-memory tensors (the GGUF default) as one ``model.safetensors``."""
    plan = []
    for name, t in tensors.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        plan.append(from_tensor(name, t))
        layer = _layer_of_k_proj(name)
        if with_scorer and layer is not None:
            plan += scorer_tensors(config, layer)
    return _write_plans([(SINGLE_FILE, plan, {"format": "pt"})], tmp, False, None, progress)


def _write_plans(plans, tmp: Path, sharded: bool, index: dict | None, progress) -> tuple[int, int]:
    count = size = 0
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, plan, metadata in plans:
        size += write_safetensors(tmp / file_name, plan, metadata, progress)
        count += len(plan)
        for t in plan:
            weight_map[t.name] = file_name
            total += t.nbytes
    if sharded:
        new_index = dict(index or {})
        new_index["metadata"] = {**(new_index.get("metadata") or {}), "total_size": total}
        new_index["weight_map"] = dict(sorted(weight_map.items()))
        (tmp / INDEX_FILE).write_text(json.dumps(new_index, indent=2) + "\n")
    return count, size


def planned_bytes(source: Source, with_scorer: bool, dtype: torch.dtype | None) -> int:
    return sum(t.nbytes for s in source.shards for t in shard_plan(s, source.config, with_scorer, dtype))


def converted_config(source: Source, sparse_fields: dict, dtype: torch.dtype | None) -> dict:
    """The base config unchanged, plus the fields that make it a converted checkpoint."""
    base = source.base_model_type
    suffix = auto_map(base)["AutoModelForCausalLM"].split(".")[-1]
    config = dict(source.config)
    config.pop("auto_map", None)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    config.update(
        model_type=f"sparsek_{base}",
        base_model_type=base,
        architectures=[suffix],
        auto_map=auto_map(base),
        **sparse_fields,
    )
    return config


def write_config(tmp: Path, config: dict) -> None:
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_code(tmp: Path) -> list[str]:
    """The remote-code files, flat beside config.json."""
    for f in REMOTE_CODE_FILES:
        shutil.copyfile(f, tmp / Path(f).name)
    return [Path(f).name for f in REMOTE_CODE_FILES]


def copy_aux_files(folder: Path, tmp: Path) -> list[str]:
    """Tokenizer files, chat template, generation config and licence files of the source."""
    copied = []
    for pattern in AUX_PATTERNS:
        for f in sorted(folder.glob(pattern)):
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copyfile(f, tmp / f.name)
                copied.append(f.name)
    return copied
