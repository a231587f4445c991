"""Scale-out check of issue 6: `sparsek adapt` on 2 GPUs with FSDP2 against 1 GPU, same global batch.

Losses in ``sparsek adapt`` are normalised by the target tokens of the whole *global* step, so one
process with ``--batch-size 2`` and two processes (torchrun, FSDP2) with ``--batch-size 1`` compute
the same gradient. This script checks that on real hardware, entirely offline:

1. builds, in a work folder, a random-weight Llama-shaped model (hidden 768, 12 layers, 12 heads,
   4 KV heads, head_dim 64, MLP 2560: ~100M parameters with the ~9K-token vocabulary that a
   byte-level BPE reaches on the pydoc topics; asked for: 16384) with that tokenizer trained on
   the training text, saves it as a plain Hugging Face folder (safetensors, float32) and runs
   ``sparsek convert`` on it (SparseK, k=128, window=128);
2. training text: ``--data`` (what ``sparsek adapt --data`` takes), by default the first 90% of
   Python's help topics (``pydoc_data.topics``, one JSONL line per topic so rows never mix topics);
   the last 10% is held out (``--eval-data`` of both runs, and the reload check);
3. run A: one process on GPU 0, ``--batch-size 2``; run B: ``torchrun --nproc-per-node 2``,
   ``--batch-size 1``; the same objective (mix), ``--train attention``, ``--scorer-loss 1``, seed,
   evaluation and a checkpoint half-way (so saving under FSDP2 is exercised). Per-step training
   losses of both ``adapt_metrics.jsonl`` files are compared; the verdict "MATCH" needs a max
   relative difference below 2e-2 over all steps and final losses within 1% (bf16 autocast and
   NCCL reductions are not bit-exact, so equality is not expected);
4. reload: in a fresh process where ``sparsek`` cannot be imported (``sys.modules['sparsek'] =
   None``), both adapted folders (and the unadapted one, for scale) are loaded with plain
   ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` and their LM loss on the
   held-out text is measured; the saved weights of both runs are compared tensor by tensor;
5. writes a markdown report (``--out``, default ``$OUT/scaleout.md`` or ``./scaleout.md``), prints
   it, and copies both metrics files next to it (``<report stem>-one-metrics.jsonl``, ``-two-``).

``--eval-batches`` counts batches of ``--batch-size`` rows per process, and every process evaluates
the same batches: run B gets twice run A's value so both evaluate the same held-out rows.

``--device cpu`` is a smoke test: a tiny model (hidden 64, 2 layers), 3 steps of 64 tokens, two
gloo processes, no GPU used (``CUDA_VISIBLE_DEVICES`` is emptied for every child process).

Exit status: 0 when the losses match and the reload check passes, 3 when a check fails, 1 when a
step (build, convert, a run, the reload) fails (its log tail is printed), 2 for bad arguments.

    python3 benchmarks/adapt_scaleout.py --out $OUT/scaleout.md            # 2 GPUs, ~100M model
    python3 benchmarks/adapt_scaleout.py --device cpu --work /tmp/so       # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_TITLE = "# `sparsek adapt` scale-out check: 1 process vs 2 processes (FSDP2), same global batch"
MAX_REL_DIFF, FINAL_REL_DIFF = 2e-2, 1e-2  # the MATCH criterion (stated in the report)
RELOAD_REL_DIFF = 2e-2  # held-out loss of the two reloaded models
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# model shape, tokenizer size, run length, SparseK budget per mode
PRESETS = {
    "cuda": dict(hidden=768, layers=12, heads=12, kv_heads=4, head_dim=64, mlp=2560, vocab=16384, max_pos=4096,
                 steps=40, seq_len=1024, k=128, window=128, eval_batches=2, reload_seqs=4, lr=1e-3),
    "cpu": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=512, max_pos=256,
                steps=3, seq_len=64, k=16, window=16, eval_batches=1, reload_seqs=2, lr=1e-2),
}


class StepFailed(Exception):
    """A child command failed; the message holds its log tail."""


def _fail_args(msg: str) -> None:
    print(f"adapt_scaleout: {msg}", file=sys.stderr)
    raise SystemExit(2)


# --- data, tokenizer, model ---------------------------------------------------------------------


def write_pydoc_split(data_dir: Path) -> tuple[Path, Path, int, int]:
    """First 90% of the help topics (sorted by name) -> train.jsonl, the rest -> heldout.jsonl."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * 0.9)
    data_dir.mkdir(parents=True, exist_ok=True)
    train, held = data_dir / "train.jsonl", data_dir / "heldout.jsonl"
    for path, part in ((train, names[:cut]), (held, names[cut:])):
        path.write_text("".join(json.dumps(topics[n]) + "\n" for n in part))
    return train, held, cut, len(names) - cut


def read_texts(files: list[Path], limit_chars: int = 5_000_000) -> list[str]:
    """The text the tokenizer learns from: documents of ``files`` (as ``adapt`` reads them), capped."""
    from sparsek.convert.adapt_data import iter_pieces

    out, total = [], 0
    for text, _ in iter_pieces(files):
        out.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return out


def build_tokenizer(texts: list[str], vocab: int, folder: Path):
    """Byte-level BPE trained on ``texts``, saved as a folder ``AutoTokenizer`` loads (with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def build_model(folder: Path, p: dict, vocab: int, seed: int) -> int:
    """A random Llama (float32 safetensors) in ``folder``; returns its parameter count."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["mlp"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"],
                      max_position_embeddings=p["max_pos"], tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(str(folder))
    return sum(t.numel() for t in model.parameters())


# --- child processes ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(name: str, cmd: list[str], env: dict, log: Path, timings: dict, timeout: float,
               cwd: Path | None = None) -> str:
    """Run ``cmd`` with its output in ``log``; record the wall time; raise StepFailed with the tail.

    The child gets its own process group, so a timeout ends torchrun's workers too, not only torchrun.
    """
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=20)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            code = f"killed: timeout after {timeout:.0f} s"
        except BaseException:  # Ctrl-C: leave no workers behind
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    timings[name] = time.perf_counter() - t0
    status = f"exit {code}" if isinstance(code, int) else code
    print(f"[{name}] {status} after {timings[name]:.1f} s (log {log})", flush=True)
    text = log.read_text(errors="replace")
    if code != 0:
        raise StepFailed(f"{name} failed ({status}); last lines of {log}:\n" + "\n".join(text.splitlines()[-40:]))
    return text


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of an adapted folder's ``adapt_metrics.jsonl``."""
    recs = [json.loads(x) for x in (out / "adapt_metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] == "eval"]


RELOAD_CODE = r'''
import json, sys
sys.modules["sparsek"] = None  # only the folders' own remote code can serve the model
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.load(open(sys.argv[1]))
try:
    import sparsek  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
dev = torch.device(spec["device"])
tok = AutoTokenizer.from_pretrained(spec["models"][0][1])
text = "".join(json.loads(line) + "\n\n" for line in open(spec["text"]) if line.strip())
ids = tok(text, add_special_tokens=False)["input_ids"]
S = spec["seq_len"]
n = max(1, min(spec["n_seqs"], len(ids) // S))
rows = [ids[i * S:(i + 1) * S] for i in range(n)]
result = {"sparsek_blocked": blocked, "rows": len(rows), "models": {}}
for name, folder in spec["models"]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).to(dev).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            x = torch.tensor([r], device=dev)
            logits = model(x).logits[0, :-1].float()
            total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(r) - 1
    result["models"][name] = {"class": type(model).__name__, "module": type(model).__module__,
                              "loss": total / count, "tokens": count}
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
json.dump(result, open(spec["out"], "w"), indent=1)
'''


def weight_differences(one: Path, two: Path, before: Path) -> dict:
    """max |w_two - w_one| over all tensors, and how large that is next to what training changed."""
    from safetensors.torch import load_file

    a, b, c = (load_file(str(f / "model.safetensors")) for f in (one, two, before))
    if set(a) != set(b):
        return {"same_names": False}
    max_diff, max_name, diff_sq, update_sq, max_update = 0.0, "", 0.0, 0.0, 0.0
    for name in a:
        d = (a[name].double() - b[name].double())
        u = (a[name].double() - c[name].double())
        m = d.abs().max().item() if d.numel() else 0.0
        if m > max_diff:
            max_diff, max_name = m, name
        diff_sq += float((d * d).sum())
        update_sq += float((u * u).sum())
        max_update = max(max_update, u.abs().max().item() if u.numel() else 0.0)
    changed = sum(1 for n in a if not bool((a[n] == c[n]).all()))
    return {"same_names": True, "tensors": len(a), "changed_by_training": changed, "max_abs_diff": max_diff,
            "max_abs_diff_tensor": max_name, "max_abs_update": max_update,
            "diff_over_update": math.sqrt(diff_sq) / math.sqrt(update_sq) if update_sq > 0 else float("nan")}


# --- report -------------------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def compare_losses(one: list[dict], two: list[dict]) -> dict:
    la, lb = [r["loss"] for r in one], [r["loss"] for r in two]
    if len(la) != len(lb) or not la:
        return {"ok": False, "why": f"step counts differ ({len(la)} vs {len(lb)})"}
    rel = [_rel(x, y) for x, y in zip(la, lb)]
    final = rel[-1]
    ok = max(rel) < MAX_REL_DIFF and final < FINAL_REL_DIFF
    return {"ok": ok, "max_rel": max(rel), "max_rel_step": one[rel.index(max(rel))]["step"],
            "mean_rel": sum(rel) / len(rel), "final_rel": final, "final_one": la[-1], "final_two": lb[-1],
            "first_one": la[0], "first_two": lb[0], "rel": rel}


def throughput(train: list[dict]) -> tuple[float, float]:
    """(tokens/s over all steps, tokens/s without step 1, which pays for kernel compilation)."""
    def rate(rs):
        secs = sum(r["seconds"] for r in rs)
        return sum(r["tokens"] for r in rs) / secs if secs > 0 else float("nan")

    return rate(train), rate(train[1:]) if len(train) > 1 else float("nan")


def environment(mode: str) -> list[str]:
    import torch
    import transformers

    lines = []
    if mode == "cuda":
        for i in range(torch.cuda.device_count()):
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}")
    else:
        lines.append(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (gloo)")
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    lines.append(f"torch {torch.__version__}, transformers {transformers.__version__}, triton {tv}, "
                 f"Python {platform.python_version()}")
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        lines.append(f"commit {commit or 'unknown'}{' (with uncommitted changes)' if dirty else ''}")
    except (OSError, subprocess.SubprocessError):
        lines.append("commit unknown")
    return lines


def render(ctx: dict) -> str:
    p, L = ctx["preset"], []
    L += [REPORT_TITLE, "", f"Date: {time.strftime('%Y-%m-%d %H:%M:%S')}. Mode: `--device {ctx['mode']}`.", ""]
    L += [f"- {x}" for x in ctx["env"]] + [""]
    L += ["## Set-up", "",
          f"- Model: random-weight Llama, {ctx.get('params', 0) / 1e6:.1f}M parameters (hidden {p['hidden']}, "
          f"{p['layers']} layers, {p['heads']} heads, {p['kv_heads']} KV heads, head_dim {p['head_dim']}, MLP "
          f"{p['mlp']}, vocab {ctx.get('vocab', '?')} from a byte-level BPE trained on the training text), "
          f"float32 safetensors, converted with `sparsek convert --method sparsek --k {p['k']} --window {p['window']}`.",
          f"- Data: {ctx.get('data_desc', '?')}", f"- Work folder: `{ctx['work']}`", ""]
    L += ["## Commands", "", "```"] + [" ".join(c) for c in ctx["commands"]] + ["```", ""]
    L += ["## Wall times", "", "| phase | seconds |", "|---|---:|"]
    L += [f"| {k} | {v:.1f} |" for k, v in ctx["timings"].items()] + [""]
    if ctx.get("error"):
        L += ["## FAILED", "", "```", ctx["error"][-6000:], "```", ""]
    cmp_ = ctx.get("compare")
    if cmp_ is not None:
        one, two = ctx["train_one"], ctx["train_two"]
        L += ["## Training-loss comparison", "",
              f"Criterion: **MATCH** when the per-step training loss (`loss` of `adapt_metrics.jsonl`: the mix "
              f"objective, without the scorer loss) of the 2-process run differs from the 1-process run by a "
              f"relative {MAX_REL_DIFF:g} at most over every step, and the final losses by less than "
              f"{FINAL_REL_DIFF:.0%}. Not bit-equal by design: bf16 autocast, NCCL reduction order, and the "
              f"scorer-loss queries/normalisation are drawn per process.", ""]
        if "max_rel" in cmp_:
            L += [f"- max relative difference {cmp_['max_rel']:.3e} (step {cmp_['max_rel_step']}), mean "
                  f"{cmp_['mean_rel']:.3e}",
                  f"- loss step 1: {cmp_['first_one']:.5f} (1 proc) vs {cmp_['first_two']:.5f} (2 procs); final: "
                  f"{cmp_['final_one']:.5f} vs {cmp_['final_two']:.5f} (relative {cmp_['final_rel']:.3e})"]
        else:
            L += [f"- {cmp_['why']}"]
        L += [f"- verdict: **{'MATCH' if cmp_['ok'] else 'MISMATCH'}**", ""]
        for name, rs in (("1 process", one), ("2 processes", two)):
            all_, warm = throughput(rs)
            L.append(f"- throughput, {name}: {all_:,.0f} tokens/s over all steps, {warm:,.0f} tokens/s without "
                     "step 1 (kernel compilation)")
        L += ["", "### Loss curves", "",
              "| step | loss 1 proc | loss 2 procs | rel. diff | lm loss 1 | lm loss 2 | grad norm 1 | grad norm 2 "
              "| scorer loss 1 | scorer loss 2 | tokens |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        every = max(1, len(one) // 40)
        for i, (a, b) in enumerate(zip(one, two)):
            if i % every and i != len(one) - 1:
                continue
            sa, sb = a.get("scorer_loss"), b.get("scorer_loss")
            L.append(f"| {a['step']} | {a['loss']:.5f} | {b['loss']:.5f} | {_rel(a['loss'], b['loss']):.2e} | "
                     f"{a['lm_loss']:.5f} | {b['lm_loss']:.5f} | {a['grad_norm']:.4f} | {b['grad_norm']:.4f} | "
                     f"{'-' if sa is None else f'{sa:.4f}'} | {'-' if sb is None else f'{sb:.4f}'} | "
                     f"{a['tokens']}{'' if a['tokens'] == b['tokens'] else ' vs ' + str(b['tokens'])} |")
        L.append("")
        ev1, ev2 = ctx.get("eval_one", []), ctx.get("eval_two", [])
        if ev1 or ev2:
            L += ["### Held-out evaluation during training (`--eval-data`, same rows in both runs)", "",
                  "| step | sparse loss 1 | sparse loss 2 | dense loss 1 | dense loss 2 | recall 1 | recall 2 | tokens |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for a, b in zip(ev1, ev2):
                ra, rb = a.get("recall"), b.get("recall")
                L.append(f"| {a['step']} | {a['sparse_loss']:.5f} | {b['sparse_loss']:.5f} | {a['dense_loss']:.5f} | "
                         f"{b['dense_loss']:.5f} | {'-' if ra is None else f'{ra:.4f}'} | "
                         f"{'-' if rb is None else f'{rb:.4f}'} | {a['tokens']} / {b['tokens']} |")
            L.append("")
    rl = ctx.get("reload")
    if rl is not None:
        L += ["## Reload with plain transformers (`sys.modules['sparsek'] = None`)", "",
              f"Held-out text: {rl['rows']} sequence(s) of {p['seq_len']} tokens from the held-out topics, LM loss "
              f"in float32 on {ctx['reload_device']}. `import sparsek` in that process: "
              f"{'blocked' if rl['sparsek_blocked'] else 'NOT blocked'}.", "",
              "| model | class (module) | held-out LM loss | tokens |", "|---|---|---:|---:|"]
        for name, r in rl["models"].items():
            L.append(f"| {name} | {r['class']} (`{r['module']}`) | {r['loss']:.5f} | {r['tokens']} |")
        L.append("")
        w = ctx.get("weights", {})
        if w.get("same_names"):
            L += [f"- saved weights, 2 procs vs 1 proc: max |difference| {w['max_abs_diff']:.3e} "
                  f"(`{w['max_abs_diff_tensor']}`); largest change made by training {w['max_abs_update']:.3e}; "
                  f"‖w2 − w1‖ / ‖w1 − w_before‖ = {w['diff_over_update']:.3e}; "
                  f"{w['changed_by_training']} of {w['tensors']} tensors changed by training"]
        elif w:
            L.append("- saved weights: the two folders hold different tensor names")
        L += [f"- reload criterion: both folders load through their remote code without `sparsek`, finite "
              f"held-out losses within a relative {RELOAD_REL_DIFF:g} of each other: "
              f"**{'reload OK' if ctx.get('reload_ok') else 'reload FAILED'}**", ""]
    return "\n".join(L) + "\n"


def write_report(path: Path, text: str) -> None:
    """Atomic write (temp file + rename): an interrupted run never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda: 2 GPUs, NCCL; cpu: smoke test")
    ap.add_argument("--data", action="append", default=None,
                    help="training text as `sparsek adapt --data` takes it (repeatable) [pydoc topics, first 90%%]")
    ap.add_argument("--work", default=None, help="work folder (must not exist or be empty) [a new temp folder]")
    ap.add_argument("--out", default=None, help="markdown report [$OUT/scaleout.md, else ./scaleout.md]")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps [40; cpu 3]")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row [1024; cpu 64]")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate [1e-3; cpu 1e-2]")
    ap.add_argument("--seed", type=int, default=0)
    for name in ("hidden", "layers", "heads", "kv_heads", "head_dim", "mlp", "vocab", "k", "window",
                 "eval_batches", "reload_seqs"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the preset's {name}")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed for each child command")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.device])
    for name in list(p):
        if getattr(args, name, None) is not None:
            p[name] = getattr(args, name)
    for name in ("steps", "seq_len", "lr"):
        if getattr(args, name) is not None:
            p[name] = getattr(args, name)
    if p["steps"] < 2 or p["seq_len"] < 8:
        _fail_args("--steps must be >= 2 and --seq-len >= 8")
    if p["seq_len"] > p["max_pos"]:
        p["max_pos"] = p["seq_len"]
    if p["hidden"] != p["heads"] * p["head_dim"] and args.head_dim is None:
        p["head_dim"] = p["hidden"] // p["heads"]
    if p["heads"] % p["kv_heads"]:
        _fail_args(f"--heads {p['heads']} must be a multiple of --kv-heads {p['kv_heads']}")
    args.preset = p
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    p, mode = args.preset, args.device
    out_path = Path(args.out) if args.out else Path(os.environ["OUT"]) / "scaleout.md" if os.environ.get("OUT") \
        else Path("scaleout.md")
    if out_path.exists() and not out_path.read_text(errors="replace").startswith(REPORT_TITLE):
        _fail_args(f"--out {out_path} exists and is not a report of this script; not overwriting it")
    data_files: list[Path] = []
    if args.data:
        from sparsek.convert.adapt_data import list_files
        from sparsek.runtime.errors import UserError

        try:
            data_files = list_files(args.data)
        except UserError as e:
            _fail_args(str(e))
    if args.work:
        work = Path(args.work).expanduser().resolve()
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            _fail_args(f"work folder {work} exists and is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="sparsek-scaleout-")).resolve()

    import torch

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if mode == "cuda":
        if torch.cuda.device_count() < 2:
            _fail_args(f"--device cuda needs 2 CUDA devices, found {torch.cuda.device_count()} "
                       "(use --device cpu for the smoke test)")
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or ["0", "1"]
        env_one = {**env, "CUDA_VISIBLE_DEVICES": visible[0]}
        env_two = {**env, "CUDA_VISIBLE_DEVICES": ",".join(visible[:2])}
        reload_device = "cuda:0"
        env_reload = env_one
    else:
        env_one = env_two = env_reload = {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        reload_device = "cpu"

    ctx: dict = {"mode": mode, "preset": p, "work": str(work), "env": environment(mode), "timings": {},
                 "commands": [], "reload_device": reload_device}
    timings, logs = ctx["timings"], work / "logs"
    logs.mkdir()
    py = sys.executable
    status = 0
    print(f"adapt_scaleout: work folder {work}, report {out_path}", flush=True)
    try:
        # 1-2. data, tokenizer, dense model, conversion
        t0 = time.perf_counter()
        train_file, held_file, n_train, n_held = write_pydoc_split(work / "data")
        if args.data:
            data_args = [str(Path(d).expanduser().resolve()) for d in args.data]
            train_file.unlink()
            ctx["data_desc"] = (f"`--data {' '.join(data_args)}`; held-out: the last {n_held} of Python's help "
                                "topics (`pydoc_data.topics`)")
        else:
            data_files, data_args = [train_file], [str(train_file)]
            ctx["data_desc"] = (f"the first {n_train} of Python's help topics (`pydoc_data.topics`, sorted by "
                                f"name, one JSONL document each); held-out: the last {n_held} (`{held_file.name}`)")
        dense, conv = work / "dense", work / "sparsek"
        tok = build_tokenizer(read_texts(data_files), p["vocab"], dense)
        ctx["vocab"] = len(tok)
        ctx["params"] = build_model(dense, p, len(tok), args.seed)
        timings["build tokenizer + model"] = time.perf_counter() - t0
        print(f"[build] {ctx['params'] / 1e6:.1f}M parameters, vocab {len(tok)}, "
              f"{timings['build tokenizer + model']:.1f} s", flush=True)
        cmd = [py, "-m", "sparsek.cli", "convert", str(dense), "-o", str(conv), "--method", "sparsek",
               "--k", str(p["k"]), "--window", str(p["window"]), "-q"]
        ctx["commands"].append(cmd)
        run_logged("convert", cmd, env, logs / "convert.log", timings, args.timeout)

        # 3. the two runs
        half = max(1, p["steps"] // 2)
        common = ["--steps", str(p["steps"]), "--seq-len", str(p["seq_len"]), "--objective", "mix",
                  "--train", "attention", "--scorer-loss", "1", "--lr", str(p["lr"]),
                  "--warmup", str(max(1, p["steps"] // 10)), "--seed", str(args.seed), "--eval-every", str(half),
                  "--checkpoint-every", str(half), "--eval-data", str(held_file), "-q"]
        for d in data_args:
            common += ["--data", d]
        one, two = work / "one", work / "two"
        cmd_one = [py, "-m", "sparsek.cli", "adapt", str(conv), "-o", str(one), *common, "--batch-size", "2",
                   "--eval-batches", str(p["eval_batches"])]
        cmd_two = [py, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port()), "-m", "sparsek.cli", "adapt", str(conv), "-o", str(two),
                   *common, "--batch-size", "1", "--eval-batches", str(2 * p["eval_batches"])]
        for name, cmd, e, log in (("run A: 1 process", cmd_one, env_one, "one.log"),
                                  ("run B: 2 processes", cmd_two, env_two, "two.log")):
            ctx["commands"].append(cmd)
            tail = run_logged(name, cmd, e, logs / log, timings, args.timeout, cwd=work)
            print("\n".join("    " + x for x in tail.splitlines()[-4:]), flush=True)
        ctx["train_one"], ctx["eval_one"] = read_metrics(one)
        ctx["train_two"], ctx["eval_two"] = read_metrics(two)
        ctx["compare"] = compare_losses(ctx["train_one"], ctx["train_two"])

        # 4. reload without sparsek, held-out loss, weight differences
        spec = {"device": reload_device, "text": str(held_file), "seq_len": p["seq_len"], "n_seqs": p["reload_seqs"],
                "models": [["2 processes (`two`)", str(two)], ["1 process (`one`)", str(one)],
                           ["before adapt (`sparsek`)", str(conv)]],
                "out": str(work / "reload.json")}
        (work / "reload_spec.json").write_text(json.dumps(spec))
        (work / "reload_check.py").write_text(RELOAD_CODE)
        cmd = [py, str(work / "reload_check.py"), str(work / "reload_spec.json")]
        ctx["commands"].append(cmd)
        run_logged("reload (plain transformers)", cmd, env_reload, logs / "reload.log", timings, args.timeout,
                   cwd=work)
        rl = json.loads((work / "reload.json").read_text())
        ctx["reload"] = rl
        t0 = time.perf_counter()
        ctx["weights"] = weight_differences(one, two, conv)
        timings["weight comparison"] = time.perf_counter() - t0
        print(f"[weight comparison] {timings['weight comparison']:.1f} s", flush=True)
        m = rl["models"]
        la, lb = m["2 processes (`two`)"]["loss"], m["1 process (`one`)"]["loss"]
        ctx["reload_ok"] = (rl["sparsek_blocked"] and all(math.isfinite(r["loss"]) for r in m.values())
                            and all(r["module"].startswith("transformers_modules") for r in m.values())
                            and _rel(lb, la) < RELOAD_REL_DIFF and ctx["weights"].get("same_names", False))
        if not (ctx["compare"]["ok"] and ctx["reload_ok"]):
            status = 3
    except StepFailed as e:
        ctx["error"] = str(e)
        print(e, file=sys.stderr, flush=True)
        status = 1
    timings["total (the whole script)"] = time.perf_counter() - t_start
    report = render(ctx)
    write_report(out_path, report)
    for tag in ("one", "two"):
        metrics = work / tag / "adapt_metrics.jsonl"
        if metrics.is_file():
            shutil.copy(metrics, out_path.parent / f"{out_path.stem}-{tag}-metrics.jsonl")
    print(report, flush=True)
    print(f"adapt_scaleout: report written to {out_path}; exit {status}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
