"""Checkpoints of an adaptation run, for an exact `--resume`.

A checkpoint is a folder ``RUN/checkpoints/step-000100/`` holding everything the next step
depends on:

* ``trainable.safetensors``: the parameters that train (frozen ones are re-read from MODEL, which
  the run never changes), full tensors gathered from every process;
* ``optimizer.safetensors`` + ``optimizer.json``: AdamW's moments (keyed by parameter name, so the
  layout does not depend on how many processes shard them) and its parameter groups;
* ``rng.safetensors``: the torch RNG states (CPU, CUDA) and the query-sampling generator;
* ``trainer.json``: step, data position (batches consumed), scheduler state.

Everything is safetensors or JSON (no pickle). It is written to ``step-N.tmp`` and renamed, so a
run killed while saving leaves the previous checkpoint intact; older checkpoints beyond
``keep`` are deleted after the new one is in place.

The state dicts go through ``torch.distributed.checkpoint.state_dict``, which gathers full
tensors from FSDP2-sharded models and gives plain ones otherwise: the same code path on one CPU
and on many GPUs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_SEP = "|"


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _full_tensor(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_model_state(model, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors; every process must call it, only rank 0 gets data under FSDP."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: _full_tensor(v).detach().contiguous() for k, v in sd.items() if names is None or k in names}


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = [d for d in checkpoint_dirs(run_dir) if (d / "trainer.json").is_file()]
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, consumed: int,
                    sampler: torch.Generator, is_main: bool, keep: int) -> Path | None:
    """Collective: every process calls it; rank 0 writes."""
    params = gather_model_state(model, trainable_names(model))
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(params, str(tmp / "trainable.safetensors"))
    tensors, scalars = {}, {}
    for name, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}{_SEP}{key}"] = _full_tensor(value).detach().cpu().contiguous()
            else:
                scalars[f"{name}{_SEP}{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": scalars}, indent=1))
    rng = {"torch_cpu": torch.get_rng_state(), "sampler": sampler.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    trainer = {"step": step, "consumed_batches": consumed, "scheduler": sched}
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, sampler: torch.Generator) -> dict:
    """Restore model, optimizer, scheduler and RNG (every process reads the files); returns trainer.json."""
    params = load_file(str(path / "trainable.safetensors"))
    expected = trainable_names(model)
    if set(params) != expected:
        raise ValueError(f"checkpoint {path} trains other parameters than this run (--train differs?)")
    set_model_state_dict(model, params, options=StateDictOptions(full_state_dict=True, strict=False))
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    state: dict[str, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        name, key = flat.rsplit(_SEP, 1)
        state.setdefault(name, {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
    trainer = json.loads((path / "trainer.json").read_text())
    sched = dict(trainer["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    sampler.set_state(rng["sampler"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return trainer
