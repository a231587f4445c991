"""`sparsek adapt`: the scorer loss op, data rows, objectives, checkpoints/resume, FSDP2, bad input.

Tiny converted models are built here (runtime config classes + remote-code files), with a
character-level tokenizer so any text, including the embedded corpus, tokenizes densely. Torch
runs single-threaded in this file: on tiny shapes extra threads only add contention.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsek.convert.adapt_config import AdaptConfig, resolve_config
from sparsek.convert.adapt_data import TrainStream, collate, iter_pieces, iter_rows, list_files
from sparsek.convert.adapt_train import SimulatedKill, run_adapt, select_trainable
from sparsek.kernels.sparsek_recall import sparsek_selection_recall
from sparsek.kernels.sparsek_reference import topk_mask
from sparsek.kernels.sparsek_scorer_loss import sample_queries, sparsek_scorer_loss
from sparsek.runtime import register_auto_classes
from sparsek.runtime.errors import UserError

register_auto_classes()  # AutoModelForCausalLM knows the converted classes

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny(path: Path, method: str = "sparsek", init: float = 0.02, tie: bool = False) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from sparsek.runtime.configuration_sparsek import SparseKLlamaConfig
    from sparsek.runtime.modeling_sparsek import SparseKLlamaForCausalLM
    from sparsek.runtime.remote_code import REMOTE_CODE_FILES, auto_map

    path.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = SparseKLlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=100, head_dim=16, max_position_embeddings=256, tie_word_embeddings=tie, initializer_range=init,
        sparse_method=method, sparsek_topk=8, sparsek_window=8, cca_group=4, cca_window=8, bos_token_id=1, eos_token_id=2,
    )
    SparseKLlamaForCausalLM(cfg).save_pretrained(path)
    for f in REMOTE_CODE_FILES:
        shutil.copy(f, path / f.name)
    c = json.loads((path / "config.json").read_text())
    c["auto_map"], c["base_model_type"] = auto_map("llama"), "llama"
    (path / "config.json").write_text(json.dumps(c, indent=2))
    chars = ["<unk>", "<s>", "</s>"] + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(chars)}, [], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "sparsek")


@pytest.fixture(scope="module")
def tiny_cca(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "cca", method="cca")


def cfg_for(model: Path, out: Path, **kw) -> AdaptConfig:
    base = dict(model=str(model), out=str(out), steps=2, seq_len=64, batch_size=2, lr=1e-2, warmup=0,
                eval_every=1000, eval_batches=1, checkpoint_every=1000, progress=False, tensorboard=False)
    base.update(kw)
    return AdaptConfig(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# --- the scorer loss op (SPEC 1.6) --------------------------------------------------------------


def _naive_scorer_loss(q, k, u, topk, window, qidx):
    """Loop over (row, KV head, query): the literal definition."""
    b, h, L, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    total, n = 0.0, 0
    for bi in range(b):
        for hi in range(hkv):
            for i in qidx.tolist():
                cand = list(range(0, i - window + 1))
                if len(cand) <= topk:
                    continue
                logits = torch.einsum("gd,jd->gj", q[bi, hi * g : (hi + 1) * g, i].double(), k[bi, hi, : i + 1].double()) * d**-0.5
                mass = torch.softmax(logits, -1).sum(0)[cand]
                labels = topk_mask(mass.float(), torch.ones_like(mass, dtype=torch.bool), topk)
                uc = u[bi, hi, cand].double()
                theta = torch.sort(uc.detach(), descending=True).values[topk - 1]
                m = uc - theta
                w = mass[labels] / mass[labels].sum()  # positives weighted by their dense mass
                pos = (torch.nn.functional.softplus(-m)[labels] * w).sum()
                neg = torch.nn.functional.softplus(m)[~labels].mean()
                total = total + 0.5 * (pos + neg)
                n += 1
    return total / n, n


def test_scorer_loss_matches_literal_definition_and_chunks(monkeypatch):
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 37, 8), torch.randn(2, 2, 37, 8)
    u = torch.randn(2, 2, 37, requires_grad=True)
    qidx = torch.tensor([3, 20, 25, 36])
    loss, n = sparsek_scorer_loss(q, k, u, topk=5, window=4, query_index=qidx)
    ref, n_ref = _naive_scorer_loss(q, k, u, 5, 4, qidx)
    assert n == n_ref == 2 * 2 * 3  # query 3 has no more than k candidates
    assert torch.allclose(loss.double(), ref, atol=1e-5)
    (g,) = torch.autograd.grad(loss, u)
    (g_ref,) = torch.autograd.grad(ref, u)
    assert torch.allclose(g.double(), g_ref.double(), atol=1e-6)
    # chunking over queries (one query per chunk) gives the same value
    monkeypatch.setattr("sparsek.kernels.sparsek_scorer_loss._CHUNK_ELEMENTS", 1)
    loss_chunked, _ = sparsek_scorer_loss(q, k, u, topk=5, window=4, query_index=qidx)
    assert torch.allclose(loss_chunked, loss, atol=1e-6)


def test_scorer_loss_weights_positives_by_dense_mass():
    """A key holding most of the dense mass (an attention sink) pulls harder than a low-mass
    positive at the same margin: recall is mass-weighted, and uniform weights let the many
    low-mass positives (query-dependent noise to a query-independent scorer) drown the sink."""
    L, d, topk, window = 12, 4, 2, 2
    q = torch.zeros(1, 1, L, d)
    q[0, 0, -1, 0] = 1.0
    k = torch.zeros(1, 1, L, d)
    k[0, 0, 0, 0] = 6.0  # the sink: most of query 11's mass
    k[0, 0, 1, 0] = 1.0  # a weak second positive
    u = torch.zeros(1, 1, L)
    u[0, 0, 0] = u[0, 0, 1] = -1.0  # same margin below theta for both positives
    u[0, 0, 2:] = torch.linspace(0.0, 1.0, L - 2)
    u.requires_grad_(True)
    loss, n = sparsek_scorer_loss(q, k, u, topk, window, query_index=torch.tensor([L - 1]))
    assert n == 1
    (g,) = torch.autograd.grad(loss, u)
    mass = torch.softmax(q[0, 0, -1] @ k[0, 0].T * d**-0.5, -1)
    ratio = (g[0, 0, 0] / g[0, 0, 1]).item()
    assert g[0, 0, 0] < 0 and g[0, 0, 1] < 0  # both pushed up
    assert abs(ratio - (mass[0] / mass[1]).item()) < 1e-4 and ratio > 5


def test_scorer_loss_edges_padding_and_sampling():
    q, k = torch.randn(1, 2, 12, 4, requires_grad=True), torch.randn(1, 1, 12, 4, requires_grad=True)
    u = torch.randn(1, 1, 12, requires_grad=True)
    loss, n = sparsek_scorer_loss(q, k, u, topk=8, window=8)  # no query has more than k candidates
    assert n == 0 and loss.item() == 0 and loss.requires_grad
    loss, n = sparsek_scorer_loss(q, k, u, topk=2, window=2, seqlens=torch.tensor([6]))
    assert n == 6 - (2 + 2)  # queries 4, 5 only: padding queries/keys do not count
    loss.backward()
    assert q.grad is None and k.grad is None  # the dense side is only read
    assert u.grad[0, 0, 6:].abs().sum() == 0 and u.grad.abs().sum() > 0
    idx = sample_queries(100, 10, 8, 8, torch.Generator().manual_seed(0))
    assert idx.numel() == 10 and idx.min() >= 16 and len(set(idx.tolist())) == 10
    assert sample_queries(16, 10, 8, 8).numel() == 0


def test_scorer_loss_raises_recall_model_free():
    """Keys that all queries attend to (a shared direction): fitting u with the loss finds them."""
    torch.manual_seed(0)
    b, h, hkv, L, d, topk, window = 1, 4, 2, 96, 16, 6, 8
    direction = torch.randn(d)
    q = torch.randn(b, h, L, d) * 0.3 + direction * 0.8
    k = torch.randn(b, hkv, L, d) * 0.3
    important = torch.rand(b, hkv, L) < 0.1
    k = k + important[..., None] * direction * 1.5
    u = (torch.arange(L, dtype=torch.float32) / 16).expand(b, hkv, L).clone().requires_grad_(True)
    before = sparsek_selection_recall(q, k, u.detach(), topk, window)
    opt = torch.optim.Adam([u], lr=0.1)
    for _ in range(60):
        loss, _ = sparsek_scorer_loss(q, k, u, topk, window)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sparsek_selection_recall(q, k, u.detach(), topk, window)
    r0 = before[0][before[1]].mean().item()
    r1 = after[0][after[1]].mean().item()
    assert r1 > r0 + 0.3 and r1 > 0.6, (r0, r1)


# --- data ---------------------------------------------------------------------------------------


def test_rows_never_cross_documents(tiny, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    docs = [c * n for c, n in zip("abcdefg", (150, 10, 64, 63, 1, 200, 40), strict=True)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    files = list_files([str(tmp_path)])
    rows = list(iter_rows(tok, iter_pieces(files), 32))
    bos = tok.bos_token_id
    for row in rows:
        body = [t for t in row if t != bos]
        assert len(set(body)) == 1, tok.decode(row)  # one document per row
        assert len(row) <= 32
    extra = 1 if tok("a")["input_ids"][:1] == [bos] else 0  # BOS only where the tokenizer adds one
    assert sum(len(r) for r in rows) == sum(len(t) + extra for t in docs if len(t) + extra >= 2)  # only 1-token docs dropped
    # batches: right-padded rows, each row one document, padding masked
    stream = TrainStream(tok, files, 32, 3, seed=0, buffer=4)
    for _ in range(5):
        batch = stream.next()
        for ids, mask, n in zip(batch.input_ids, batch.attention_mask, batch.lengths, strict=True):
            assert mask[:n].all() and not mask[n:].any()
            assert len({t for t in ids[:n].tolist() if t != bos}) == 1


def test_padded_rows_see_only_their_own_document(tiny):
    """What the model computes for a row of a padded batch is what it computes for the row alone."""
    from sparsek.runtime.loading import load_model

    model = load_model(tiny, device="cpu", dtype="float32")
    torch.manual_seed(0)
    rows = [torch.randint(3, 99, (n,)).tolist() for n in (40, 17, 33)]
    batch = collate(rows, 64)
    with torch.no_grad():
        together = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for i, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r])).logits[0]
            assert torch.allclose(together[i, : len(r)], alone, atol=1e-5)


def test_stream_is_deterministic_and_skip_resumes(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    a = TrainStream(tok, None, 48, 2, seed=3, buffer=8)
    first = [a.next().input_ids for _ in range(6)]
    b = TrainStream(tok, None, 48, 2, seed=3, buffer=8)
    b.skip(4)
    assert all(torch.equal(x, y) for x, y in zip(first[4:], [b.next().input_ids for _ in range(2)], strict=True))


def test_yaml_config_and_flag_precedence(tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 50\nlr: 0.002\nseq-len: 512\ndata: [a.txt]\n")
    cfg = resolve_config({"model": "m", "out": "o", "lr": 0.1, "data": None}, str(tmp_path / "run.yaml"))
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.data) == (50, 0.1, 512, ["a.txt"])
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    with pytest.raises(UserError, match="unknown option 'stepz'"):
        resolve_config({"model": "m", "out": "o"}, str(tmp_path / "bad.yaml"))


# --- training -----------------------------------------------------------------------------------


def test_few_steps_lower_the_loss(tiny, tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "t.txt").write_text(text)
    cfg = cfg_for(tiny, tmp_path / "out", steps=8, objective="lm", train="all", data=[str(tmp_path / "t.txt")],
                  eval_fraction=0.0, lr=2e-2)
    result = run_adapt(cfg)
    assert sum(result.losses[-2:]) / 2 < sum(result.losses[:2]) / 2 - 0.3, result.losses
    assert result.evals[-1]["sparse_loss"] < result.evals[0]["sparse_loss"]


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "scorer")


@pytest.mark.parametrize(
    "objective,train,method",
    [("lm", "scorer", "sparsek"), ("distill", "scorer", "sparsek"), ("mix", "attention", "sparsek"),
     ("distill", "all", "sparsek"), ("lm", "attention", "cca")],
)
def test_each_choice_trains_exactly_what_it_names(tiny, tiny_cca, tmp_path, objective, train, method):
    src = tiny if method == "sparsek" else tiny_cca
    run_adapt(cfg_for(src, tmp_path / "out", objective=objective, train=train, eval_batches=0))
    before, after = weights(src), weights(tmp_path / "out")
    assert set(before) == set(after)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if train == "all":
        expected = set(before)
    else:
        names = ("scorer",) if train == "scorer" else _ATTN
        expected = {n for n in before if ".self_attn." in n and n.split(".self_attn.")[1].split(".")[0] in names}
    assert expected and changed == expected
    assert all(after[n].dtype == before[n].dtype for n in before)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_scorer_loss_gradient_reaches_the_scorer_exactly_once(tmp_path, checkpointing):
    """Through the model (the dense pass computes it, the sparse pass injects it), the scorer's
    gradient equals the scorer loss's own gradient: not lost, and not added twice when the
    layer is recomputed by activation checkpointing."""
    from sparsek.convert.adapt_objective import AdaptObjective
    from sparsek.runtime.capture import capture_dense_layers
    from sparsek.runtime.loading import load_model

    src = make_tiny(tmp_path / "src", init=0.3)
    model = load_model(src, device=torch.device("cpu"), dtype="float32")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.scorer.weight.normal_(0, 0.5)
    select_trainable(model, "scorer")
    if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # as adapt_train does
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, 100, (2, 48), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    qidx = torch.tensor([20, 30, 47])
    s = model.sparse_settings
    expected = {}

    def on_layer(module, hidden, positions, q, k):
        with torch.enable_grad():
            u = module.scorer(hidden.detach(), positions)
            loss, _ = sparsek_scorer_loss(q, k, u, s.topk, s.window, getattr(module, "scaling", None), None, qidx)
            expected[module.layer_idx] = torch.autograd.grad(loss * 0.5, [module.scorer.weight, module.scorer.bias])

    with torch.no_grad(), capture_dense_layers(model, on_layer):
        model.model(input_ids=ids, use_cache=False)
    objective = AdaptObjective(model, "lm", 0.0, 1.0, autocast=False)
    loss, _ = objective(ids, mask, loss_scale=0.0, scorer_scale=0.5, query_index=qidx)  # LM part weighted 0
    loss.backward()
    for layer in model.model.layers:
        gw, gb = expected[layer.self_attn.layer_idx]
        assert gw.abs().sum() > 0
        torch.testing.assert_close(layer.self_attn.scorer.weight.grad, gw, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(layer.self_attn.scorer.bias.grad, gb, rtol=1e-4, atol=1e-7)


def test_scorer_loss_raises_recall_on_a_tiny_model(tmp_path):
    src = make_tiny(tmp_path / "src", init=0.3)
    cfg = cfg_for(src, tmp_path / "out", steps=12, seq_len=96, objective="lm", train="scorer", scorer_loss=5.0, lr=0.2,
                  schedule="constant", eval_batches=2)
    result = run_adapt(cfg)
    assert result.evals[-1]["recall"] > result.evals[0]["recall"] + 0.005, result.evals


def test_kill_and_resume_gives_the_same_run(tiny, tmp_path):
    kw = dict(steps=6, objective="mix", train="attention", scorer_loss=1.0, checkpoint_every=2, eval_every=3,
              eval_batches=1, warmup=2)
    full = run_adapt(cfg_for(tiny, tmp_path / "full", **kw))
    cfg = cfg_for(tiny, tmp_path / "resumed", **kw)
    with pytest.raises(SimulatedKill):
        run_adapt(cfg, abort_after_step=5)  # checkpoints at 2 and 4; step 5 is lost
    ckpt = tmp_path / "resumed.adapt-run" / "checkpoints" / "step-000004"
    opt_keys = {k.split("|")[0] for k in load_file(str(ckpt / "optimizer.safetensors"))}
    assert opt_keys == set(load_file(str(ckpt / "trainable.safetensors")))  # frozen params: no state
    assert all(".self_attn." in k for k in opt_keys)
    with pytest.raises(UserError, match="--resume"):
        run_adapt(cfg)
    resumed = run_adapt(AdaptConfig(**{**cfg.to_dict(), "resume": True}))
    assert resumed.start_step == 4
    assert resumed.losses == pytest.approx(full.losses[4:], rel=1e-6, abs=1e-7)
    log = [json.loads(x) for x in (tmp_path / "resumed" / "adapt_metrics.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in log if r["kind"] == "train"]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 7))
    assert curve == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_output_is_a_converted_folder(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run_adapt(cfg_for(tiny, tmp_path / "out", steps=1, eval_batches=0))
    out = tmp_path / "out"
    src_cfg, out_cfg = json.loads((tiny / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert out_cfg == src_cfg  # auto_map and everything else untouched
    assert (out / "modeling_sparsek.py").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "adapt_config.json").read_text())["versions"]["torch"] == torch.__version__
    assert not (tmp_path / "out.adapt-run" / "checkpoints").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    m = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.isfinite(m(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.slow
def test_two_processes_fsdp2_gloo_match_one_process(tiny, tmp_path):
    args = ["adapt", str(tiny), "--steps", "3", "--seq-len", "64", "--lr", "0.01", "--warmup", "0", "--objective", "mix",
            "--train", "attention", "--scorer-loss", "1", "--eval-batches", "1", "--eval-every", "100", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
         "-m", "sparsek.cli", *args, "-o", str(tmp_path / "two"), "--batch-size", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    one = run_adapt(cfg_for(tiny, tmp_path / "one", steps=3, objective="mix", train="attention", scorer_loss=1.0,
                            batch_size=2, eval_batches=1, eval_every=100))
    log = [json.loads(x) for x in (tmp_path / "two" / "adapt_metrics.jsonl").read_text().splitlines()]
    two_losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert two_losses == pytest.approx(one.losses, rel=1e-4)

    assert json.loads((tmp_path / "two" / "config.json").read_text()) == json.loads((tiny / "config.json").read_text())
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert all(torch.allclose(a[n], b[n], atol=1e-4) for n in a)
    # plain transformers, in a process where sparsek cannot be imported
    code = (
        "import sys, torch; sys.modules['sparsek'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'two')!r}, trust_remote_code=True)\n"
        "print(type(m).__name__, tuple(m(torch.tensor([[5, 6, 7]])).logits.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": ""},
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SparseKLlamaForCausalLM (1, 3, 100)" in res.stdout


# --- bad input ----------------------------------------------------------------------------------


def _cli(argv, capsys):
    from sparsek.cli.main import run

    with pytest.raises(SystemExit) as exc:
        run(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def test_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "exists").mkdir()
    base = ["adapt", str(tiny), "--steps", "1", "--seq-len", "32", "-q"]
    cases = [
        (["--data", str(tmp_path / "empty"), "-o", str(tmp_path / "o1")], "no data"),
        (["--data", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o2")], "data not found"),
        (["--data", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o3")], "not valid JSON"),
        (["--seq-len", "300", "-o", str(tmp_path / "o4")], "larger than the model supports"),
        (["--steps", "0", "-o", str(tmp_path / "o5")], "--steps must be >= 1"),
        (["-o", str(tmp_path / "exists")], "already exists"),
    ]
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("x")
        locked.chmod(0)
        cases.append((["--data", str(locked), "-o", str(tmp_path / "o7")], "cannot read"))
    for extra, message in cases:
        code, err = _cli(base + extra, capsys)
        assert code == 2, (extra, err)
        assert len(err.splitlines()) == 1 and message in err, (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == []  # nothing written
    assert (tmp_path / "exists").is_dir() and not any((tmp_path / "exists").iterdir())


def test_cca_rejects_scorer_options(tiny_cca, tmp_path, capsys):
    for extra, message in ((["--scorer-loss", "1", "--train", "all"], "SparseK models only"),
                           (["--train", "scorer"], "needs a SparseK model")):
        code, err = _cli(["adapt", str(tiny_cca), "-o", str(tmp_path / "o"), "--steps", "1", "-q", *extra], capsys)
        assert code == 2 and message in err, err


# --- the distillation teacher --------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True])
def test_distill_teacher_stays_the_starting_weights(tiny, autocast):
    """With --train attention, the teacher (dense pass) keeps the starting attention weights: the
    objective's KL and eval dense loss equal those computed with an untouched copy of the model,
    the trained weights are back in place after each pass, and (bf16 autocast) no pass reuses the
    other's cached bf16 weights."""
    from sparsek.convert.adapt_objective import AdaptObjective, token_losses
    from sparsek.runtime.dense_switch import dense_attention
    from sparsek.runtime.loading import load_model

    model, original = load_model(tiny, device="cpu", dtype="float32"), load_model(tiny, device="cpu", dtype="float32")
    select_trainable(model, "attention")
    objective = AdaptObjective(model, "distill", 0.5, 1.0, autocast)
    assert objective.freeze_teacher() > 0
    with torch.no_grad():  # "training" moved the attention weights
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(-1.5)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

    loss, stats = objective(ids, mask)
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        with amp, dense_attention(original):
            h_t = original.model(input_ids=ids).last_hidden_state
        with amp:
            h_s = model.model(input_ids=ids).last_hidden_state
            expected = token_losses(model.lm_head, h_s, h_t, ids, mask)
    torch.testing.assert_close(stats[:2], expected, rtol=1e-5, atol=1e-5)

    _, ev = objective(ids, mask, mode="eval")
    with torch.no_grad():
        with amp, dense_attention(original):
            dense = token_losses(original.lm_head, original.model(input_ids=ids).last_hidden_state, None, ids, mask)[0]
        with amp, dense_attention(model):
            drifted = token_losses(model.lm_head, model.model(input_ids=ids).last_hidden_state, None, ids, mask)[0]
    torch.testing.assert_close(ev[1], dense, rtol=1e-5, atol=1e-5)
    assert abs(ev[1] - drifted) > 1e-2  # the check can tell the teacher from the moved weights
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())
