"""Presenting a validation report: terminal table, JSON file, PNG figures, model-card table.

The report itself is a plain dict (built by :mod:`sparsek.runtime.validate`) so it can be written
as JSON, read back by ``push`` for the model card, and compared across runs. This module only
formats it; nothing here measures anything.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from .errors import UserError

REPORT_FILENAME = "validation.json"
REPORT_VERSION = 1


# --- environment -----------------------------------------------------------------------------


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Versions and hardware, so a number in the report can be traced to where it was measured."""
    hardware = {"device": str(device), "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        hardware["gpu"] = torch.cuda.get_device_name(device)
        hardware["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        hardware["cuda"] = torch.version.cuda
    return {
        "versions": {
            "python": platform.python_version(),
            "sparsek": _version("sparsek"),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "huggingface_hub": _version("huggingface_hub"),
            "triton": _version("triton"),
        },
        "hardware": hardware,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- files -----------------------------------------------------------------------------------


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir():
        raise UserError(f"{path} is a folder; give a file name for the JSON report")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_report(folder: str | Path) -> dict | None:
    """The validation report saved in a model folder, or ``None``."""
    path = Path(folder) / REPORT_FILENAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# --- tables ----------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def quality_rows(report: dict) -> list[list[str]]:
    return [
        [
            str(r["seq_len"]),
            str(r["sequences"]),
            _fmt(r["ppl_dense"]),
            _fmt(r["ppl_sparse"]),
            f"{100 * r['ppl_increase']:+.2f}%",
            _fmt(r["mean_kl"], ".4f"),
            f"{100 * r['top1_agreement']:.1f}%",
        ]
        for r in report.get("perplexity", [])
    ]


QUALITY_HEADERS = ["seq len", "seqs", "ppl dense", "ppl sparse", "increase", "KL(dense‖sparse)", "top-1 agree"]


def format_report(report: dict) -> str:
    """The terminal table: model, quality, passkey, consistency, speed, recall, checks."""
    m = report["model"]
    parts = [f"{m['source']}  ·  {m['method']}  ·  {report['device']} {report['dtype']}  ·  data: {report['data']}"]
    if report.get("perplexity"):
        parts += ["", "Perplexity (held-out text)", _table(QUALITY_HEADERS, quality_rows(report))]
    pk = report.get("passkey")
    if pk:
        headers = ["length"] + [f"depth {d:g}" for d in pk["depths"]] + ["sparse", "dense"]
        rows = []
        for i, n in enumerate(pk["lengths"]):
            sparse_row, dense_row = pk["sparse"]["grid"][i], pk["dense"]["grid"][i]
            cells = [f"{s:.0%}/{d:.0%}" for s, d in zip(sparse_row, dense_row, strict=True)]
            rows.append([str(n), *cells, f"{pk['sparse']['accuracy_by_length'][str(n)]:.0%}",
                         f"{pk['dense']['accuracy_by_length'][str(n)]:.0%}"])
        parts += ["", f"Passkey retrieval (sparse/dense accuracy, {pk['trials']} trial(s) per cell)", _table(headers, rows)]
    cons = report.get("consistency")
    if cons:
        parts += ["", f"Prefill/decode consistency: max |logit diff| = {cons['max_logit_diff']:.2e} "
                      f"({cons['decode_steps']} decode steps after a {cons['prefill']}-token prefill)"]
    speed = report.get("speed")
    if speed:
        headers = ["length", "prefill tok/s s/d", "decode tok/s s/d", "KV dense", "KV sparse (formula)",
                   "cache held s/d"]
        rows = [
            [
                str(s["length"]),
                f"{s['sparse']['prefill_tokens_per_s']:.0f} / {s['dense']['prefill_tokens_per_s']:.0f}",
                f"{s['sparse']['decode_tokens_per_s']:.1f} / {s['dense']['decode_tokens_per_s']:.1f}",
                _fmt_bytes(s["kv_bytes"]["dense"]),
                _fmt_bytes(s["kv_bytes"].get("sparse")),
                f"{_fmt_bytes(s['sparse']['cache_bytes_measured'])} / {_fmt_bytes(s['dense']['cache_bytes_measured'])}",
            ]
            for s in speed
        ]
        parts += ["", f"Speed and memory (sparse/dense; caches {speed[0]['cache']} / {speed[0]['dense_cache']})",
                  _table(headers, rows)]
    recall = report.get("selection_recall")
    if recall:
        per_layer = " ".join(_fmt(r, ".2f") for r in recall["per_layer"])
        parts += ["", f"SparseK selection recall: mean {_fmt(recall['mean'])} (per layer: {per_layer})"]
    checks = report.get("checks") or []
    if checks:
        parts.append("")
        for c in checks:
            parts.append(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {_fmt(c['value'], '.4f')} "
                         f"(threshold {c['op']} {c['threshold']:g})")
    return "\n".join(parts)


def markdown_table(report: dict) -> str:
    """The quality table (and passkey summary) in Markdown, for the model card and docs."""
    lines = ["| " + " | ".join(QUALITY_HEADERS) + " |", "|" + "---|" * len(QUALITY_HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in quality_rows(report)]
    pk = report.get("passkey")
    if pk:
        lines += ["", "| passkey length | sparse accuracy | dense accuracy |", "|---|---|---|"]
        for n in pk["lengths"]:
            lines.append(f"| {n} | {pk['sparse']['accuracy_by_length'][str(n)]:.0%} | "
                         f"{pk['dense']['accuracy_by_length'][str(n)]:.0%} |")
    recall = report.get("selection_recall")
    if recall and recall.get("mean") is not None:
        lines += ["", f"SparseK selection recall (mean over layers): {recall['mean']:.3f}"]
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'sparsek[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], width: int) -> list[float]:
    if width <= 1 or len(values) <= width:
        return values
    t = torch.tensor(values, dtype=torch.float64)[None, None]
    kernel = torch.ones(1, 1, width, dtype=torch.float64) / width
    return torch.nn.functional.conv1d(t, kernel).flatten().tolist()


def write_plots(report: dict, folder: str | Path) -> list[Path]:
    """``loss_by_position.png`` (sparse vs dense, per tested length) and ``passkey.png``."""
    plt = _pyplot()
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    curves = report.get("loss_by_position") or []
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
        for ax, c in zip(axes[0], curves, strict=True):
            width = max(1, len(c["dense"]) // 64)
            x = list(range(width, len(c["dense"]) + 1)) if width > 1 else list(range(1, len(c["dense"]) + 1))
            ax.plot(x[: len(_smooth(c["dense"], width))], _smooth(c["dense"], width), label="dense")
            ax.plot(x[: len(_smooth(c["sparse"], width))], _smooth(c["sparse"], width), label="sparse")
            ax.set_title(f"loss by position, {c['seq_len']} tokens")
            ax.set_xlabel("position")
            ax.set_ylabel(f"NLL (nats, mean over {width} positions)")
            ax.legend()
        fig.tight_layout()
        written.append(_save(fig, folder / "loss_by_position.png", plt))
    pk = report.get("passkey")
    if pk:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), squeeze=False)
        for ax, which in zip(axes[0], ("sparse", "dense"), strict=True):
            grid = pk[which]["grid"]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(pk["depths"])), [f"{d:g}" for d in pk["depths"]])
            ax.set_yticks(range(len(pk["lengths"])), [str(n) for n in pk["lengths"]])
            ax.set_xlabel("depth")
            ax.set_ylabel("length (tokens)")
            ax.set_title(f"passkey accuracy, {which}")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="w" if v < 0.5 else "k")
        fig.colorbar(im, ax=axes[0].tolist())
        written.append(_save(fig, folder / "passkey.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
