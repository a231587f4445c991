"""``sparsek validate``: measure a converted model against its dense self.

The dense reference is the same loaded weights run with SDPA (no second model in memory), or a
separate model named with ``--dense``. Every check of the report runs both sides on the same
tokens / prompts, so differences come from the attention method alone.

The result is a plain dict (see :func:`run_validation`) that :mod:`.report` prints, writes as
JSON / PNG and that ``push`` reads back (``validation.json`` in the model folder) for the card.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import evaluation, passkey, report, text_data
from .dense_switch import dense_attention
from .errors import CheckFailed, UserError
from .loading import (
    load_model,
    load_tokenizer,
    looks_like_hub_id,
    parse_dtype,
    resolve_device,
    resolve_model_path,
)

QUICK_SEQ_LEN = 1024
DEFAULT_SEQ_LEN = 4096


@dataclass
class ValidateOptions:
    """Everything ``validate`` can be asked for; ``None`` fields get defaults from the model."""

    source: str
    revision: str | None = None
    dense_source: str | None = None
    data: list[str] = field(default_factory=list)
    seq_lens: list[int] | None = None
    num_sequences: int | None = None
    batch_size: int = 1
    passkey_lengths: list[int] | None = None
    passkey_depths: list[float] | None = None
    passkey_trials: int | None = None
    passkey: bool = True
    consistency: bool = True
    consistency_steps: int | None = None
    speed: bool = True
    decode_steps: int | None = None
    recall: bool = True
    recall_sequences: int | None = None
    device: str | None = None
    dtype: str | None = None
    quick: bool = False
    max_ppl_increase: float | None = None
    min_passkey: float | None = None
    json_path: str | None = None
    plot_dir: str | None = None
    save_report: bool = True
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        """Usage errors (exit 2) before anything is loaded."""
        for name in ("num_sequences", "passkey_trials", "consistency_steps", "recall_sequences"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.decode_steps is not None and self.decode_steps < 0:
            raise UserError(f"--decode-steps must be >= 0, got {self.decode_steps}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        for n in (self.seq_lens or []) + (self.passkey_lengths or []):
            if n < 16:
                raise UserError(f"sequence lengths must be at least 16 tokens, got {n}")
        for d in self.passkey_depths or []:
            if not 0.0 <= d <= 1.0:
                raise UserError(f"passkey depths must be between 0 and 1, got {d}")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise UserError(f"--max-ppl-increase must be >= 0, got {self.max_ppl_increase}")
        if self.min_passkey is not None and not 0.0 <= self.min_passkey <= 1.0:
            raise UserError(f"--min-passkey must be between 0 and 1, got {self.min_passkey}")
        if self.min_passkey is not None and not self.passkey:
            raise UserError("--min-passkey needs the passkey test (drop --no-passkey)")
        parse_dtype(self.dtype)
        resolve_device(self.device)
        if self.plot_dir is not None:
            report._pyplot()  # fail early, before minutes of measuring, when matplotlib is missing
        if self.json_path is not None:
            parent = Path(self.json_path).expanduser().parent
            if not parent.is_dir():
                raise UserError(f"cannot write {self.json_path}: folder {parent} does not exist")


class _Progress:
    """One tqdm bar per phase (on stderr), or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def bar(self, desc: str, total: int):
        if not self.enabled or total <= 0:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _settings_dict(settings) -> dict:
    if settings.method == "sparsek":
        return {"topk": settings.topk, "window": settings.window, "alpha": settings.alpha}
    return {"group": settings.group, "window": settings.cca_window}


def _resolve_defaults(opts: ValidateOptions, context: int, settings) -> dict:
    seq_lens = opts.seq_lens or [min(QUICK_SEQ_LEN if opts.quick else DEFAULT_SEQ_LEN, context)]
    seq_lens = sorted(set(seq_lens))
    too_long = [n for n in seq_lens + (opts.passkey_lengths or []) if n > context]
    if too_long:
        raise UserError(f"length {max(too_long)} is longer than the model's context ({context} tokens)")
    if opts.passkey_lengths:
        pk_lengths = sorted(set(opts.passkey_lengths))
    else:
        pk_lengths = sorted(set(seq_lens) | ({context} if not opts.quick and context <= 4 * max(seq_lens) else set()))
    bound = settings.window + settings.topk if settings.method == "sparsek" else settings.cca_window + 2 * settings.group
    cons_len = min(max(seq_lens), bound + 64)
    cons_steps = min(opts.consistency_steps or (64 if opts.quick else 128), cons_len - 1)
    return {
        "seq_lens": seq_lens,
        "num_sequences": opts.num_sequences or (2 if opts.quick else 8),
        "pk_lengths": pk_lengths,
        "pk_depths": list(opts.passkey_depths or ([0.1, 0.5, 0.9] if opts.quick else [0.0, 0.25, 0.5, 0.75, 1.0])),
        "pk_trials": opts.passkey_trials or (1 if opts.quick else 2),
        "cons_len": cons_len,
        "cons_steps": cons_steps,
        "decode_steps": opts.decode_steps if opts.decode_steps is not None else (8 if opts.quick else 32),
        "recall_sequences": opts.recall_sequences or (1 if opts.quick else 2),
    }


def _load_dense(opts: ValidateOptions, device, dtype):
    """The separate dense reference of ``--dense`` (plain transformers, SDPA), or ``None``."""
    if not opts.dense_source:
        return None
    from transformers import AutoModelForCausalLM

    from .registry import register_auto_classes

    register_auto_classes()
    folder = resolve_model_path(opts.dense_source)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the dense reference {opts.dense_source}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def run_validation(opts: ValidateOptions) -> dict:
    """Measure, build the report dict, write JSON / plots / ``validation.json``; raise
    :class:`CheckFailed` (after writing) when a threshold is not met."""
    opts.check()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    prog = _Progress(opts.progress)
    if not opts.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device = resolve_device(opts.device)
    folder = resolve_model_path(opts.source, opts.revision)
    model = load_model(str(folder), device=device, dtype=opts.dtype)
    tokenizer = load_tokenizer(str(folder))
    dtype = next(model.parameters()).dtype
    settings = model.sparse_settings
    context = int(getattr(model.config, "max_position_embeddings", 0) or DEFAULT_SEQ_LEN)
    plan = _resolve_defaults(opts, context, settings)
    dense_model = _load_dense(opts, device, parse_dtype(opts.dtype))
    if dense_model is not None and dense_model.config.vocab_size != model.config.vocab_size:
        raise UserError(
            f"--dense model has vocabulary {dense_model.config.vocab_size}, the sparse one {model.config.vocab_size}"
        )
    timings["load"] = time.perf_counter() - started

    result: dict = {
        "report_version": report.REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "source": opts.source,
            "revision": opts.revision,
            "method": settings.describe(),
            "sparse_method": settings.method,
            "settings": _settings_dict(settings),
            "base_model_type": getattr(model.config, "base_model_type", None),
            "context": context,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "dense_reference": opts.dense_source or "same weights, attn_implementation=sdpa",
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "data": text_data.describe_sources(opts.data),
        "settings": {k: v for k, v in plan.items()},
    }

    # 1. perplexity, KL, top-1 agreement at each length
    t0 = time.perf_counter()
    texts = text_data.load_texts(opts.data)
    stream = text_data.token_stream(tokenizer, texts)
    batches_by_len = {
        n: text_data.token_batches(tokenizer, (), n, plan["num_sequences"], opts.batch_size, stream=stream)
        for n in plan["seq_lens"]
    }
    result["perplexity"], result["loss_by_position"] = [], []
    for n, batches in batches_by_len.items():
        with prog.bar(f"perplexity @ {n}", len(batches)) as bar:
            cmp = evaluation.sparse_vs_dense(model, batches, dense_model=dense_model, progress=bar.update)
        result["perplexity"].append(cmp.as_dict())
        result["loss_by_position"].append(
            {"seq_len": n, "sparse": cmp.sparse.loss_by_position, "dense": cmp.dense.loss_by_position}
        )
    timings["perplexity"] = time.perf_counter() - t0

    # 2. selection recall (SparseK only), on the longest sequences
    t0 = time.perf_counter()
    result["selection_recall"] = None
    if opts.recall and settings.method == "sparsek":
        longest = batches_by_len[max(batches_by_len)]
        rows = torch.cat(longest)[: plan["recall_sequences"]]
        recall_batches = list(rows.split(1))
        with prog.bar("selection recall", len(recall_batches)) as bar:
            rec = evaluation.selection_recall(model, recall_batches, progress=bar.update)
        result["selection_recall"] = None if rec is None else {**rec.as_dict(), "seq_len": max(batches_by_len)}
    timings["selection_recall"] = time.perf_counter() - t0

    # 3. passkey retrieval, sparse and dense, same keys
    t0 = time.perf_counter()
    result["passkey"] = None
    if opts.passkey:
        cells = len(plan["pk_lengths"]) * len(plan["pk_depths"]) * plan["pk_trials"]
        pk = {"lengths": plan["pk_lengths"], "depths": plan["pk_depths"], "trials": plan["pk_trials"]}
        try:
            for which in ("sparse", "dense"):
                runner, dense_flag = (dense_model, False) if (which == "dense" and dense_model) else (model, which == "dense")
                with prog.bar(f"passkey ({which})", cells) as bar:
                    res = passkey.passkey_retrieval(
                        runner, tokenizer, plan["pk_lengths"], plan["pk_depths"], plan["pk_trials"],
                        seed=opts.seed, dense=dense_flag, progress=bar.update,
                    )
                pk[which] = res.as_dict()
        except ValueError as e:
            raise UserError(str(e)) from None
        result["passkey"] = pk
    timings["passkey"] = time.perf_counter() - t0

    # 4. prefill/decode consistency of the sparse path
    t0 = time.perf_counter()
    result["consistency"] = None
    if opts.consistency:
        ids = batches_by_len[max(batches_by_len)][0][:1, : plan["cons_len"]]
        prefill = ids.shape[1] - plan["cons_steps"]
        with prog.bar("prefill/decode consistency", plan["cons_steps"]) as bar:
            diff = evaluation.prefill_decode_consistency(model, ids, prefill, progress=bar.update)
        result["consistency"] = {
            "max_logit_diff": diff,
            "length": ids.shape[1],
            "prefill": prefill,
            "decode_steps": plan["cons_steps"],
            "cache": type(evaluation.new_decode_cache(model)).__name__,
        }
    timings["consistency"] = time.perf_counter() - t0

    # 5. speed and memory
    t0 = time.perf_counter()
    result["speed"] = None
    if opts.speed:
        result["speed"] = []
        with prog.bar("speed", 2 * len(plan["seq_lens"])) as bar:
            for n in plan["seq_lens"]:
                ids = batches_by_len[n][0][:1]
                row = {"length": n, "cache": type(evaluation.new_decode_cache(model)).__name__}
                with dense_attention(model):
                    row["dense_cache"] = type(evaluation.new_decode_cache(dense_model or model)).__name__
                row["sparse"] = evaluation.measure_speed(model, ids, plan["decode_steps"]).as_dict()
                bar.update(1)
                if dense_model is not None:
                    row["dense"] = evaluation.measure_speed(dense_model, ids, plan["decode_steps"]).as_dict()
                else:
                    row["dense"] = evaluation.measure_speed(model, ids, plan["decode_steps"], dense=True).as_dict()
                bar.update(1)
                row["kv_bytes"] = evaluation.bounded_cache_bytes(model.config, settings, n + plan["decode_steps"], dtype)
                result["speed"].append(row)
    timings["speed"] = time.perf_counter() - t0

    # 6. thresholds
    checks = []
    if opts.max_ppl_increase is not None:
        worst = max(r["ppl_increase"] for r in result["perplexity"])
        checks.append({"name": "perplexity increase (worst length)", "value": worst, "op": "<=",
                       "threshold": opts.max_ppl_increase, "passed": worst <= opts.max_ppl_increase})
    if opts.min_passkey is not None:
        acc = result["passkey"]["sparse"]["accuracy"]
        checks.append({"name": "passkey accuracy (sparse)", "value": acc, "op": ">=",
                       "threshold": opts.min_passkey, "passed": acc >= opts.min_passkey})
    result["checks"] = checks
    result["passed"] = all(c["passed"] for c in checks)
    timings["total"] = time.perf_counter() - started
    result["timings_s"] = timings
    result["environment"] = report.environment(device)

    _write_outputs(opts, folder, result)
    return result


def _write_outputs(opts: ValidateOptions, folder: Path, result: dict) -> None:
    written = []
    if opts.json_path:
        written.append(report.write_json_atomic(opts.json_path, result))
    if opts.plot_dir:
        written += report.write_plots(result, opts.plot_dir)
    saved = None
    if opts.save_report and not looks_like_hub_id(opts.source) and Path(opts.source).expanduser().is_dir():
        try:
            saved = report.write_json_atomic(Path(opts.source).expanduser() / report.REPORT_FILENAME, result)
        except OSError:
            saved = None
    result["_written"] = [str(p) for p in written]
    result["_saved_in_model"] = str(saved) if saved else None


def failed_checks_message(result: dict) -> str | None:
    failed = [c for c in result.get("checks", []) if not c["passed"]]
    if not failed:
        return None
    return "; ".join(f"{c['name']} {c['value']:.4f} (needs {c['op']} {c['threshold']:g})" for c in failed)


def validate(opts: ValidateOptions) -> dict:
    """:func:`run_validation`, raising :class:`CheckFailed` when a threshold is missed."""
    result = run_validation(opts)
    message = failed_checks_message(result)
    if message:
        raise CheckFailed(f"validation failed: {message}")
    return result


def parse_int_list(values: Sequence[str] | None) -> list[int] | None:
    """``["2048", "4096,8192"]`` -> ``[2048, 4096, 8192]`` (repeatable and comma separated)."""
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip().lower()
            if not part:
                continue
            mult = 1024 if part.endswith("k") else 1
            try:
                out.append(int(part[:-1] if mult > 1 else part) * mult)
            except ValueError:
                raise UserError(f"not a length: {part!r}") from None
    return out


def parse_float_list(values: Sequence[str] | None) -> list[float] | None:
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise UserError(f"not a number: {part!r}") from None
    return out
