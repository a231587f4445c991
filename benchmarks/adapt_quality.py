"""The adaptation quality run of issue 6 (GPU): convert the embedded default, adapt, validate.

For each method (SparseK k=256, w=256; CCA s=256, g=16) on the embedded default model
(SmolLM2-135M-Instruct):

1. ``sparsek convert -o WORK/<method>``;
2. ``sparsek validate`` of the unadapted model (baseline), when the command is installed;
3. ``sparsek adapt`` for ``--steps`` steps at ``--seq-len`` tokens (SparseK: ``--scorer-loss``);
4. ``sparsek validate`` of the adapted model.

Training text defaults to the Python standard library's own source files (real text that ships
with every Python; written to ``WORK/data`` as .txt documents), *not* the pydoc topics that
``validate`` measures perplexity on, so the evaluation text is never trained on. ``--data``
overrides it.

Every step is skipped when its output exists, and an interrupted ``adapt`` resumes from its
last checkpoint, so the run can be split across calls (``--methods sparsek`` then
``--methods cca``). The end prints a markdown table (loss/perplexity sparse vs dense on the
held-out split before and after, selection recall, and the training-loss curve); ``--out FILE``
writes it there. Full logs: ``WORK/<method>-*.log``.

    python benchmarks/adapt_quality.py --work /tmp/aq --steps 1000 --out docs/adapt_quality.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

METHODS = {
    "sparsek": ["--method", "sparsek", "--k", "256", "--window", "256"],
    "cca": ["--method", "cca", "--group", "16", "--window", "256"],
}


def sparsek_cmd() -> list[str]:
    exe = shutil.which("sparsek")
    return [exe] if exe else [sys.executable, "-m", "sparsek.cli"]


def run(cmd: list[str], log: Path) -> int:
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode


def stdlib_corpus(dest: Path, max_chars: int) -> Path:
    """The standard library's .py files (no tests), one document each, up to ``max_chars``."""
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for i, path in enumerate(sorted(lib.rglob("*.py"))):
        rel = path.relative_to(lib)
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        (dest / f"{i:05d}_{path.stem}.txt").write_text(text)
        total += len(text)
        if total >= max_chars:
            break
    return dest


def validate(model: Path, json_out: Path, args, log: Path) -> str:
    if json_out.is_file():
        return "done"
    cmd = sparsek_cmd() + ["validate", str(model), "--json", str(json_out)]
    for length in args.validate_lengths:
        cmd += ["--seq-len", str(length)]
    code = run(cmd, log)
    return "done" if code == 0 else f"exit {code} (see {log})"


def summarize(method: str, out: Path, status: dict) -> list[str]:
    metrics = out / "adapt_metrics.jsonl"
    if not metrics.is_file():
        metrics = Path(str(out) + ".adapt-run") / "metrics.jsonl"
    if not metrics.is_file():
        return [f"| {method} | no metrics ({status}) | | | | | |"]
    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    evals = [r for r in recs if r["kind"] == "eval"]
    rows = []
    for r in evals:
        gap = r["sparse_ppl"] / r["dense_ppl"] - 1
        recall = f"{r['recall']:.3f}" if "recall" in r else "n/a"
        rows.append(f"| {method} | {r['step']} | {r['sparse_loss']:.4f} | {r['dense_loss']:.4f} | {r['sparse_ppl']:.2f} | "
                    f"{r['dense_ppl']:.2f} ({gap:+.1%}) | {recall} |")
    return rows


def curve(method: str, out: Path, every: int) -> list[str]:
    metrics = out / "adapt_metrics.jsonl"
    if not metrics.is_file():
        metrics = Path(str(out) + ".adapt-run") / "metrics.jsonl"
    if not metrics.is_file():
        return []
    train = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [r for r in train if r["kind"] == "train"]
    rows = []
    for r in train:
        if r["step"] == 1 or r["step"] % every == 0 or r["step"] == train[-1]["step"]:
            window = [t["loss"] for t in train if r["step"] - every < t["step"] <= r["step"]]
            rows.append(f"| {method} | {r['step']} | {r['loss']:.4f} | {sum(window) / len(window):.4f} | "
                        f"{r.get('scorer_loss', float('nan')):.4f} | {r['tokens_per_s']:,.0f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="adapt-quality", help="working folder (kept: models, logs, metrics)")
    p.add_argument("--methods", nargs="+", default=["sparsek", "cca"], choices=list(METHODS))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--objective", default="mix")
    p.add_argument("--train", default="attention")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--scorer-lr", type=float, default=1e-3)
    p.add_argument("--scorer-loss", type=float, default=1.0, help="SparseK only")
    p.add_argument("--data", nargs="+", help="training text (default: the stdlib sources)")
    p.add_argument("--data-chars", type=int, default=40_000_000, help="size of the default corpus")
    p.add_argument("--validate-lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--no-validate", action="store_true")
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = args.data or [str(stdlib_corpus(work / "data", args.data_chars))]
    status: dict[str, dict] = {}
    for method in args.methods:
        st = status.setdefault(method, {})
        log = work / f"{method}.log"
        conv, adapted = work / method, work / f"{method}-adapted"
        if not conv.is_dir():
            code = run(sparsek_cmd() + ["convert", "-o", str(conv), *METHODS[method], "-q"], log)
            if code:
                st["convert"] = f"exit {code}"
                continue
        if not args.no_validate:
            st["validate_before"] = validate(conv, work / f"{method}-before.json", args, log)
        if not adapted.is_dir():
            cmd = sparsek_cmd() + [
                "adapt", str(conv), "-o", str(adapted), "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                "--batch-size", str(args.batch_size), "--objective", args.objective, "--train", args.train,
                "--lr", str(args.lr), "--scorer-lr", str(args.scorer_lr), "--eval-every", str(max(1, args.steps // 10)),
                "--checkpoint-every", str(max(1, args.steps // 5)), "--warmup", str(max(1, args.steps // 50)), "-q",
            ]
            for d in data:
                cmd += ["--data", d]
            if method == "sparsek" and args.scorer_loss > 0:
                cmd += ["--scorer-loss", str(args.scorer_loss)]
            if (Path(str(adapted) + ".adapt-run") / "checkpoints").is_dir():
                cmd.append("--resume")
            code = run(cmd, log)
            st["adapt"] = "done" if code == 0 else f"exit {code}"
        if adapted.is_dir() and not args.no_validate:
            st["validate_after"] = validate(adapted, work / f"{method}-after.json", args, log)

    lines = [f"Adaptation of the embedded default model: {args.steps} steps, seq-len {args.seq_len}, batch "
             f"{args.batch_size}, --objective {args.objective} --train {args.train} --lr {args.lr} --scorer-lr "
             f"{args.scorer_lr} (SparseK: --scorer-loss {args.scorer_loss}). Held-out split of the training text.", "",
             "| method | step | sparse loss | dense loss | sparse ppl | dense ppl (sparse vs dense) | recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method in args.methods:
        lines += summarize(method, work / f"{method}-adapted", status.get(method, {}))
    lines += ["", "Training loss (step, loss at that step, mean over the preceding interval, scorer loss, tokens/s):", "",
              "| method | step | loss | mean loss | scorer loss | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    every = max(1, args.steps // 10)
    for method in args.methods:
        lines += curve(method, work / f"{method}-adapted", every)
    lines += ["", "Validation (sparsek validate, before/after JSON in the work folder): "
              + "; ".join(f"{m}: {s}" for m, s in status.items())]
    md = "\n".join(lines)
    print("\n" + md)
    if args.out:
        Path(args.out).write_text(md + "\n")


if __name__ == "__main__":
    main()
