"""Write the adapted model: a converted folder like `sparsek convert` writes.

The source folder's non-weight files (config with its ``auto_map``, modeling code, tokenizer,
chat template, generation config, README) are copied unchanged; the weights are written as
safetensors with exactly the source's tensor names and dtypes (the scorer stays float32), and
sharded like the source. The config is *copied*, never re-serialised from a live model: a model
wrapped by FSDP2 would otherwise put torch's internal classes into ``auto_map``.

Everything is written into a hidden temporary folder beside OUT and renamed at the end, so an
interrupted write never leaves a half-written OUT.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsek.runtime.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def source_layout(folder: Path) -> tuple[dict[str, torch.dtype], bool]:
    """Tensor name -> dtype of the source weights, and whether the source is sharded."""
    index = folder / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    layout: dict[str, torch.dtype] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as fh:
            for key in fh.keys():
                layout[key] = _DTYPES.get(fh.get_slice(key).get_dtype(), torch.float32)
    return layout, index.is_file()


def write_output(source: Path, out: Path, state: dict[str, torch.Tensor], extra_files: dict[str, Path]) -> Path:
    layout, sharded = source_layout(source)
    missing = [k for k in layout if k not in state]
    if missing:
        raise RuntimeError(f"trained model lacks {len(missing)} source tensors, e.g. {missing[0]}")
    tensors = {k: state[k].detach().to("cpu", layout[k]).contiguous() for k in layout}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for item in source.iterdir():
            if item.name == INDEX_NAME or item.suffix in WEIGHT_SUFFIXES or item.name.startswith("."):
                continue
            if item.is_dir():
                if item.name not in ("__pycache__",):
                    shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        if sharded:
            from huggingface_hub import split_torch_state_dict_into_shards

            split = split_torch_state_dict_into_shards(tensors, max_shard_size="5GB")
            for filename, keys in split.filename_to_tensors.items():
                save_file({k: tensors[k] for k in keys}, str(tmp / filename), metadata={"format": "pt"})
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        else:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, path in extra_files.items():
            if path.is_file():
                shutil.copy2(path, tmp / name)
        if out.exists():
            raise UserError(f"output folder {out} appeared while training; not overwriting it")
        tmp.rename(out)
    except BaseException:
        if tmp.exists() and not out.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
