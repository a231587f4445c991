"""Settings of `sparsek adapt`: defaults, a YAML file (``--config run.yaml``), flags on top.

Precedence is defaults < YAML < flags: a flag that the user did not give is ``None`` and leaves
the YAML value alone. The resolved settings (plus library versions) are written next to the
checkpoints and into OUT, so a run can be reproduced and ``--resume`` can check it continues
the same run.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from sparsek.runtime.errors import UserError

OBJECTIVES = ("lm", "distill", "mix")
TRAIN_CHOICES = ("scorer", "attention", "all")
SCHEDULES = ("cosine", "linear", "constant")

# Settings whose change makes a resumed run a different run.
RUN_DEFINING = (
    "model", "data", "eval_data", "eval_fraction", "seq_len", "objective", "mix_weight", "scorer_loss",
    "scorer_queries", "train", "lr", "scorer_lr", "min_lr_ratio", "warmup", "schedule", "weight_decay", "batch_size",
    "grad_accum", "clip", "seed", "steps", "text_field", "shuffle_buffer", "temperature",
)


@dataclass
class AdaptConfig:
    """Everything one adaptation run depends on (see ``docs/adapt.md`` for each field)."""

    model: str = ""
    out: str = ""
    steps: int = 1000
    data: list[str] = field(default_factory=list)  # empty: the embedded corpus
    eval_data: list[str] = field(default_factory=list)  # empty: held-out split of --data
    eval_fraction: float = 0.05
    text_field: str = "text"
    seq_len: int = 0  # 0: min(2048, the model's max positions)
    objective: str = "distill"
    mix_weight: float = 0.5  # share of the distill loss in --objective mix
    temperature: float = 1.0  # of the distillation KL
    scorer_loss: float = 0.0  # weight of the SPEC 1.6 scorer loss (SparseK only)
    scorer_queries: int = 64  # sampled queries per row for the scorer loss
    train: str = "scorer"
    lr: float = 1e-3
    scorer_lr: float = 0.0  # peak lr of W_score/b_score; 0: --lr (new parameters often want a larger one)
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 1  # rows per micro-batch per process
    grad_accum: int = 1
    clip: float = 1.0
    seed: int = 0
    shuffle_buffer: int = 256  # rows shuffled (and length-bucketed) together
    device: str = "auto"
    autocast: str = "auto"  # auto: bf16 on CUDA, off on CPU; or bf16 / off
    gradient_checkpointing: bool = True
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    work_dir: str = ""  # default: OUT + ".adapt-run"
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True

    def run_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.out + ".adapt-run")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(AdaptConfig)}


def load_yaml(path: str | Path) -> dict:
    try:
        import yaml
    except ImportError:
        raise UserError("--config needs PyYAML: pip install pyyaml (or sparsek[data])") from None
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise UserError(f"cannot read config {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {p} must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(name: str, value):
    f = _FIELDS[name]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"option {name}: invalid value {value!r}") from None


def resolve_config(flags: dict, config_file: str | None = None) -> AdaptConfig:
    """Defaults, then the YAML file, then the flags that were given (not ``None``)."""
    values: dict = {}
    if config_file:
        for name, value in load_yaml(config_file).items():
            if name not in _FIELDS:
                raise UserError(f"config {config_file}: unknown option {name!r}")
            values[name] = _coerce(name, value)
    for name, value in flags.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if name not in _FIELDS:
            raise UserError(f"unknown option {name!r}")
        values[name] = _coerce(name, value)
    cfg = AdaptConfig(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: AdaptConfig) -> None:
    """Bad values are the user's: one clear line each."""
    if not cfg.model:
        raise UserError("no MODEL given")
    if not cfg.out:
        raise UserError("no output folder given (-o OUT)")
    if cfg.steps < 1:
        raise UserError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.seq_len != 0 and cfg.seq_len < 2:
        raise UserError(f"--seq-len must be >= 2, got {cfg.seq_len}")
    if cfg.objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.train not in TRAIN_CHOICES:
        raise UserError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, got {cfg.train!r}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.autocast not in ("auto", "bf16", "off"):
        raise UserError(f"--autocast must be auto, bf16 or off, got {cfg.autocast!r}")
    for name in ("batch_size", "grad_accum", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every",
                 "shuffle_buffer"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup", "eval_batches", "scorer_queries"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.scorer_lr < 0:
        raise UserError(f"--lr must be > 0 and --scorer-lr >= 0, got {cfg.lr} and {cfg.scorer_lr}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise UserError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not 0 <= cfg.mix_weight <= 1:
        raise UserError(f"--mix-weight must be in [0, 1], got {cfg.mix_weight}")
    if not 0 <= cfg.eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.scorer_loss < 0:
        raise UserError(f"--scorer-loss must be >= 0, got {cfg.scorer_loss}")
    if cfg.clip < 0 or cfg.weight_decay < 0 or cfg.temperature <= 0:
        raise UserError("--clip and --weight-decay must be >= 0 and --temperature > 0")


def library_versions() -> dict:
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        versions["sparsek"] = version("sparsek")
    except Exception:  # not installed as a distribution (source checkout)
        versions["sparsek"] = "unknown"
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def config_record(cfg: AdaptConfig, world_size: int) -> str:
    return json.dumps({"config": cfg.to_dict(), "world_size": world_size, "versions": library_versions()},
                      indent=2, sort_keys=True) + "\n"
