"""The adaptation loop of `sparsek adapt`: one CPU, one GPU, or many through FSDP2 + torchrun.

Flow: check every input first (so bad input fails before minutes of loading), load the converted
model in float32 (AdamW keeps float32 moments; bf16 autocast on CUDA does the math), freeze what
``--train`` does not name (frozen parameters get no optimizer state), wrap model + losses in
:class:`AdaptObjective`, shard with ``fully_shard`` when launched with several processes, then
step: micro-batches, accumulation, clipping, AdamW, warm-up + schedule, periodic evaluation,
checkpoints. At the end the full state dict is gathered and rank 0 writes OUT.

Losses are normalised by the target tokens of the whole *global* step (every process sees the
global batch and takes its rows), so one process with batch 2B and two processes with batch B
compute the same gradient.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sparsek.runtime.errors import UserError
from sparsek.runtime.loading import (
    load_model,
    load_tokenizer,
    require_converted,
    resolve_device,
    resolve_model_path,
)

from .adapt_checkpoint import gather_model_state, latest_checkpoint, load_checkpoint, save_checkpoint
from .adapt_config import RUN_DEFINING, AdaptConfig, config_record
from .adapt_data import TrainStream, eval_batches, eval_period, list_files
from .adapt_objective import AdaptObjective
from .adapt_output import write_output

WRAPPER_PREFIX = "model."
DEFAULT_SEQ_LEN = 2048


class SimulatedKill(Exception):
    """Raised by ``run_adapt(..., abort_after_step=N)``: tests use it to kill a run mid-way."""


@dataclass
class AdaptResult:
    out: Path | None
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    start_step: int = 0
    tokens_per_s: float = 0.0


# --- set-up -------------------------------------------------------------------------------------


def _dist_setup() -> tuple[int, int, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), True


def select_trainable(model, train: str) -> list[str]:
    """Freeze everything but what ``--train`` names; returns the trainable parameter names.

    scorer: ``W_score``/``b_score`` only; attention: the scorer plus every parameter of the
    attention modules (q/k/v/o projections, q/k norms); all: everything.
    """
    method = model.sparse_settings.method
    if train == "scorer" and method != "sparsek":
        raise UserError(f"--train scorer needs a SparseK model; this one is {method} (no new parameters): "
                        "use --train attention or all")
    names = []
    for name, param in model.named_parameters():
        if train == "all":
            keep = True
        elif train == "attention":
            keep = ".self_attn." in name
        else:
            keep = ".self_attn.scorer." in name
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise UserError(f"--train {train}: this model has no such parameters")
    return names


def lr_lambda(cfg: AdaptConfig):
    def factor(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / (cfg.warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / span)
        if cfg.schedule == "linear":
            shape = 1 - progress
        else:
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def check_inputs(cfg: AdaptConfig) -> tuple[Path, dict, list[Path] | None, list[Path] | None]:
    """Every user-input check that needs no model: fails fast with one line."""
    folder = resolve_model_path(cfg.model)
    model_cfg = require_converted(folder)
    out = Path(cfg.out)
    if out.exists():
        raise UserError(f"output folder {out} already exists; choose another -o or remove it")
    run_dir = cfg.run_dir()
    if not cfg.resume and latest_checkpoint(run_dir) is not None:
        raise UserError(f"run folder {run_dir} holds checkpoints of an earlier run; pass --resume to continue it "
                        "or remove the folder")
    max_len = model_cfg.get("max_position_embeddings")
    if cfg.seq_len == 0:
        cfg.seq_len = min(DEFAULT_SEQ_LEN, max_len or DEFAULT_SEQ_LEN)
    if max_len and cfg.seq_len > max_len:
        raise UserError(f"--seq-len {cfg.seq_len} is larger than the model supports ({max_len} positions)")
    method = model_cfg.get("sparse_method")
    if cfg.scorer_loss > 0 and method != "sparsek":
        raise UserError(f"--scorer-loss applies to SparseK models only; this one is {method}")
    if cfg.train == "scorer" and method != "sparsek":
        raise UserError(f"--train scorer needs a SparseK model; this one is {method}: use --train attention or all")
    files = list_files(cfg.data) if cfg.data else None
    eval_files = list_files(cfg.eval_data) if cfg.eval_data else None
    return folder, model_cfg, files, eval_files


def _check_resume_config(run_dir: Path, cfg: AdaptConfig) -> None:
    record = run_dir / "adapt_config.json"
    if not record.is_file():
        return
    saved = json.loads(record.read_text())["config"]
    now = cfg.to_dict()
    diff = [k for k in RUN_DEFINING if saved.get(k) != now.get(k)]
    if diff:
        raise UserError(f"--resume with different settings than the run in {run_dir}: {', '.join(diff)}")


# --- metrics ------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard when installed), written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path, self.enabled, self.writer = path, enabled, None
        if not enabled:
            return
        if resume_step is None and path.is_file():  # a fresh run: no lines of an earlier one
            path.unlink()
        elif resume_step is not None and path.is_file():  # drop what the killed run logged after its checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL only
                self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(prefix + k, v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the run ------------------------------------------------------------------------------------


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def evaluate(objective, batches, device, world: int) -> dict | None:
    if not batches:
        return None
    total = torch.zeros(4, dtype=torch.float64)
    tokens = 0
    for batch in batches:
        b = batch.to(device)
        _, stats = objective(b.input_ids, b.attention_mask, mode="eval")
        total += stats.double().cpu()
        tokens += batch.target_tokens
    sparse, dense = total[0].item() / tokens, total[1].item() / tokens
    rec = {"kind": "eval", "sparse_loss": sparse, "dense_loss": dense, "sparse_ppl": math.exp(min(sparse, 50)),
           "dense_ppl": math.exp(min(dense, 50)), "tokens": tokens}
    if total[3] > 0:
        rec["recall"] = total[2].item() / total[3].item()
    return rec


def run_adapt(cfg: AdaptConfig, abort_after_step: int | None = None) -> AdaptResult:
    """Train, checkpoint, write OUT. Collective under torchrun; returns the run's losses and evals."""
    rank, world, owns_pg = _dist_setup()
    main = rank == 0
    try:
        return _run(cfg, rank, world, main, abort_after_step)
    finally:
        if owns_pg and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: AdaptConfig, rank: int, world: int, main: bool, abort_after_step: int | None) -> AdaptResult:
    folder, model_cfg, files, eval_files = check_inputs(cfg)
    run_dir = cfg.run_dir()
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        _check_resume_config(run_dir, cfg)
    if world > 1 and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(cfg.seed)

    tokenizer = load_tokenizer(folder)
    period = 0 if eval_files else eval_period(cfg.eval_fraction)
    describe = ", ".join(cfg.data) if cfg.data else "the embedded corpus"
    stream = TrainStream(tokenizer, files, cfg.seq_len, cfg.batch_size * world, cfg.seed, cfg.shuffle_buffer,
                         period, cfg.text_field, describe)
    held_out = eval_batches(tokenizer, eval_files if eval_files else files, cfg.seq_len, cfg.batch_size,
                            cfg.eval_batches, 0 if eval_files else period, cfg.text_field)

    model = load_model(folder, device=device, dtype="float32")
    model.config.use_cache = False
    trainable = select_trainable(model, cfg.train)
    if cfg.gradient_checkpointing:
        # transformers >= 5.2x renamed it; 5.17 (the GPU machine) has only the old name
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    use_amp = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    objective = AdaptObjective(model, cfg.objective, cfg.mix_weight, cfg.temperature, use_amp)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(objective)
    if cfg.objective in ("distill", "mix"):
        # the teacher is the model as it starts (before any checkpoint is loaded): see AdaptObjective
        objective.freeze_teacher()
    named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    scorer = [p for n, p in named if ".scorer." in n]
    others = [p for n, p in named if ".scorer." not in n]
    groups = [{"params": g, "lr": lr} for g, lr in ((others, cfg.lr), (scorer, cfg.scorer_lr or cfg.lr)) if g]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    sampler = torch.Generator().manual_seed(cfg.seed + 1)

    start = 0
    if ckpt is not None:
        trainer = load_checkpoint(ckpt, objective, optimizer, scheduler, sampler)
        start = trainer["step"]
        stream.skip(trainer["consumed_batches"])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "adapt_config.json").write_text(config_record(cfg, world))
    log = MetricsLog(run_dir / "metrics.jsonl", main, cfg.tensorboard, start if ckpt is not None else None)
    result = AdaptResult(out=None, start_step=start)
    n_layers = len(model.model.layers)

    def do_eval(step: int) -> None:
        objective.eval()
        rec = evaluate(objective, held_out, device, world)
        objective.train()
        if rec is not None:
            rec["step"] = step
            result.evals.append(rec)
            log.write(rec)

    if start == 0:
        do_eval(0)
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="adapt", unit="step", dynamic_ncols=True)
    t_run, tokens_run = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        globals_ = [stream.next() for _ in range(cfg.grad_accum)]
        step_tokens = sum(b.target_tokens for b in globals_)
        stats_sum = torch.zeros(4, dtype=torch.float64)
        for gb in globals_:
            local = gb.rows(rank * cfg.batch_size, (rank + 1) * cfg.batch_size).to(device)
            queries = None
            if cfg.scorer_loss > 0:
                queries = _sample(local.input_ids.shape[1], cfg, model.sparse_settings, sampler, device)
            # FSDP2 averages gradients over processes, hence the factor ``world``.
            loss, stats = objective(local.input_ids, local.attention_mask, loss_scale=world / max(step_tokens, 1),
                                    scorer_scale=cfg.scorer_loss / (cfg.grad_accum * n_layers), query_index=queries)
            loss.backward()
            stats_sum += stats.double().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        lr = scheduler.get_last_lr()[-1]  # the scorer's group when it trains
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats_all = _all_reduce(stats_sum.to(device), world).cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        ce, kl = stats_all[0].item() / step_tokens, stats_all[1].item() / step_tokens
        total = {"lm": ce, "distill": kl, "mix": (1 - cfg.mix_weight) * ce + cfg.mix_weight * kl}[cfg.objective]
        tokens_run += step_tokens
        rec = {"kind": "train", "step": step + 1, "loss": total, "lm_loss": ce, "kl": kl, "lr": lr,
               "grad_norm": grad_norm, "tokens": step_tokens, "tokens_per_s": step_tokens / dt, "seconds": dt}
        if stats_all[3] > 0:
            rec["scorer_loss"] = stats_all[2].item() / stats_all[3].item()
        result.losses.append(total)
        if main and (step + 1) % cfg.log_every == 0:
            log.write(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{step_tokens / dt:,.0f}")
            bar.update(1)
        done = step + 1
        if done % cfg.eval_every == 0 and done < cfg.steps:
            do_eval(done)
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint(run_dir, done, objective, optimizer, scheduler, stream.consumed, sampler, main,
                            cfg.keep_checkpoints)
            if world > 1:
                dist.barrier()
        if abort_after_step is not None and done >= abort_after_step:
            raise SimulatedKill(f"stopped after step {done}")
    if bar is not None:
        bar.close()
    result.tokens_per_s = tokens_run / max(time.perf_counter() - t_run, 1e-9)
    do_eval(cfg.steps)
    log.close()

    state = gather_model_state(objective)
    if main:
        state = {k[len(WRAPPER_PREFIX):] if k.startswith(WRAPPER_PREFIX) else k: v for k, v in state.items()}
        extra = {"adapt_config.json": run_dir / "adapt_config.json", "adapt_metrics.jsonl": run_dir / "metrics.jsonl"}
        result.out = write_output(folder, Path(cfg.out), state, extra)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if world > 1:
        dist.barrier()
    del trainable
    return result


def _sample(length: int, cfg: AdaptConfig, settings, sampler: torch.Generator, device) -> torch.Tensor:
    from sparsek.kernels.sparsek_scorer_loss import sample_queries

    return sample_queries(length, cfg.scorer_queries, settings.topk, settings.window, sampler, device)
