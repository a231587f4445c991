"""``sparsek convert``: dense checkpoint in, converted (sparse-attention) folder out.

Order of work: check the options, check the source, check OUT (nothing written so far); then
write everything into a temp folder beside OUT and rename it into place only when complete
(see ``staging.py``). Weights are streamed shard by shard and tensor by tensor (``writer.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm import tqdm

from sparsek.runtime.configuration_sparsek import (
    METHODS,
    SparseSettings,
    default_sparse_fields,
    sparse_settings,
)
from sparsek.runtime.errors import UserError
from sparsek.runtime.loading import parse_dtype

from . import writer
from .model_card import model_card
from .source import Source, find_source
from .staging import Staging, check_output


@dataclass
class ConvertOptions:
    """What the user asked for; ``None`` means the method's / model's default."""

    method: str = "sparsek"
    topk: int | None = None
    window: int | None = None
    alpha: float | None = None
    group: int | None = None
    dtype: str | None = None
    force: bool = False
    revision: str | None = None
    progress: bool = True

    def check(self) -> None:
        """Hyper-parameter errors, before any file is looked at."""
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for flag, value, minimum in (("--k", self.topk, 1), ("--window", self.window, 1), ("--group", self.group, 1)):
            if value is not None and value < minimum:
                raise UserError(f"{flag} must be >= {minimum}, got {value}")
        if self.alpha is not None and not self.alpha >= 0:
            raise UserError(f"--alpha must be >= 0, got {self.alpha}")
        wrong = {"sparsek": [("--group", self.group)], "cca": [("--k", self.topk), ("--alpha", self.alpha)]}
        for flag, value in wrong[self.method]:
            if value is not None:
                raise UserError(f"{flag} does not apply to --method {self.method}")
        parse_dtype(self.dtype)

    def sparse_fields(self, config: dict) -> dict:
        fields = default_sparse_fields(self.method, config.get("max_position_embeddings"))
        if self.method == "sparsek":
            updates = {"sparsek_topk": self.topk, "sparsek_window": self.window, "sparsek_alpha": self.alpha}
        else:
            updates = {"cca_group": self.group, "cca_window": self.window}
        fields.update({k: v for k, v in updates.items() if v is not None})
        return fields


@dataclass
class ConvertSummary:
    source: str
    out: Path
    base_model_type: str
    settings: SparseSettings
    dtype: str
    sharded: bool
    shards: int
    dense_tensors: int
    scorer_tensors: int
    weight_bytes: int
    seconds: float
    files: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        kib = self.weight_bytes / 2**20
        layout = f"{self.shards} shards" if self.sharded else "1 file"
        return [
            f"converted {self.source} ({self.base_model_type}) -> {self.out}",
            f"  method:  {self.settings.describe()}",
            f"  tensors: {self.dense_tensors} dense + {self.scorer_tensors} scorer, {self.dtype}, {layout}, {kib:,.1f} MiB",
            f"  time:    {self.seconds:.1f} s",
        ]


def _package_version() -> str:
    try:
        return version("sparsek")
    except PackageNotFoundError:
        return "0+unknown"


class _Settings:  # duck-typed config for sparse_settings()
    def __init__(self, d: dict):
        self.__dict__.update(d)


def convert(source: str | None, out: str | Path, options: ConvertOptions | None = None) -> ConvertSummary:
    """Convert SOURCE (folder, Hub id, or ``None`` = the embedded default) into the folder OUT."""
    options = options or ConvertOptions()
    started = time.perf_counter()
    options.check()
    out = Path(out).expanduser()
    if out.exists() and not options.force:  # cheap check first: no download or GGUF parse for nothing
        raise UserError(f"OUT {out} already exists; pass --force to replace it")
    src = find_source(source, options.revision)
    check_output(out, [src.folder], options.force)

    dtype = parse_dtype(options.dtype)
    fields = options.sparse_fields(src.config)
    config = writer.converted_config(src, fields, dtype)
    settings = sparse_settings(_Settings(config))
    with_scorer = settings.method == "sparsek"

    staging = Staging(out, options.force)
    with staging as tmp:
        count, size = _write_weights(src, tmp, with_scorer, dtype, options.progress)
        writer.write_config(tmp, config)
        writer.copy_code(tmp)
        if src.gguf_file is not None:
            src.tokenizer.save_pretrained(str(tmp))
            src.model.generation_config.save_pretrained(str(tmp))
        else:
            writer.copy_aux_files(src.folder, tmp)
        card = model_card(src.name, src.base_model_type, settings, _package_version(), src.hub_id)
        (tmp / "README.md").write_text(card)
        files = sorted(p.name for p in tmp.iterdir())
        staging.commit()
    scorers = 2 * int(src.config["num_hidden_layers"]) if with_scorer else 0
    return ConvertSummary(
        source=src.name, out=out, base_model_type=src.base_model_type, settings=settings,
        dtype=config.get("dtype") or config.get("torch_dtype") or "?", sharded=src.sharded,
        shards=max(1, len(src.shards)), dense_tensors=count - scorers, scorer_tensors=scorers,
        weight_bytes=size, seconds=time.perf_counter() - started, files=files,
    )


def _write_weights(src: Source, tmp: Path, with_scorer: bool, dtype: torch.dtype | None, progress: bool):
    if src.gguf_file is not None:
        from .default_model import default_tensors

        tensors = default_tensors(src)
        total = sum(t.numel() * (dtype or t.dtype).itemsize for t in tensors.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing model.safetensors", disable=not progress) as bar:
            return writer.write_memory_weights(tensors, src.config, tmp, with_scorer, dtype, bar.update)
    total = writer.planned_bytes(src, with_scorer, dtype)
    desc = f"writing {len(src.shards)} shard{'s' if len(src.shards) > 1 else ''}"
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        return writer.write_weights(src, tmp, with_scorer, dtype, bar.update)
