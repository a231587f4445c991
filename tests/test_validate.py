"""``sparsek validate`` on tiny converted models: report fields, thresholds, plots, data loading.

The tiny model is a random 2-layer Llama converted to SparseK. With ``k + w >= L`` the sparse path
is exactly dense, so it passes a tight perplexity threshold; with ``k = w = 1`` and random scorer
weights (scores that select nothing useful) the same weights fail it: exit code 1.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from sparsek.runtime import evaluation, text_data
from sparsek.runtime.errors import UserError

TINY_VOCAB = 320


def build_tokenizer(folder: Path):
    """A byte-level BPE (vocab 300) trained on the embedded corpus: no unknown tokens, digits work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text_data.embedded_corpus()[:20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_converted(folder: Path, method: str = "sparsek", scorer_std: float = 0.0, **sparse) -> Path:
    """A converted tiny Llama folder (weights, config with auto_map, remote code, tokenizer)."""
    from sparsek.runtime.configuration_sparsek import SparseKLlamaConfig
    from sparsek.runtime.modeling_sparsek import SparseKLlamaForCausalLM
    from sparsek.runtime.remote_code import REMOTE_CODE_FILES, auto_map

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    fields = dict(sparse_method=method, sparsek_topk=8, sparsek_window=8, cca_group=4, cca_window=8)
    fields.update(sparse)
    cfg = SparseKLlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                             intermediate_size=128, vocab_size=TINY_VOCAB, head_dim=16, max_position_embeddings=512,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **fields)
    torch.manual_seed(0)
    model = SparseKLlamaForCausalLM(cfg)
    if scorer_std:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.scorer.weight.normal_(0.0, scorer_std)
    model.save_pretrained(folder)
    for f in REMOTE_CODE_FILES:
        shutil.copy(f, folder / f.name)
    c = json.loads((folder / "config.json").read_text())
    c.update(base_model_type="llama", auto_map=auto_map("llama"))
    (folder / "config.json").write_text(json.dumps(c, indent=2))
    return folder


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from sparsek.cli.main import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(args)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


FAST = ["--seq-len", "96", "--num-sequences", "1", "--passkey-lengths", "256", "--passkey-depths", "0.5",
        "--passkey-trials", "1", "--decode-steps", "2", "--device", "cpu", "--no-progress"]


def is_png(path: Path) -> bool:
    """PNG signature, then every chunk's CRC, up to IEND."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos, seen_end = 8, False
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            return False
        pos += 12 + length
        seen_end = kind == b"IEND"
    return seen_end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_converted(tmp_path_factory.mktemp("models") / "tiny")


def test_report_has_every_field_and_plots(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    report_path, plots = tmp_path / "report.json", tmp_path / "plots"
    code, out, err = run_cli(["validate", str(tiny), *FAST, "--json", str(report_path), "--plot", str(plots),
                              "--max-ppl-increase", "0.5"])
    assert code == 0, err
    assert "Perplexity" in out and "Passkey" in out and "consistency" in out and "recall" in out
    r = json.loads(report_path.read_text())
    for key in ("model", "dense_reference", "device", "dtype", "data", "perplexity", "loss_by_position", "passkey",
                "consistency", "speed", "selection_recall", "checks", "passed", "timings_s", "environment"):
        assert key in r, key
    row = r["perplexity"][0]
    for key in ("seq_len", "ppl_sparse", "ppl_dense", "ppl_increase", "mean_kl", "top1_agreement", "tokens"):
        assert key in row
    assert row["seq_len"] == 96 and row["tokens"] == 95
    assert row["mean_kl"] >= 0 and 0 <= row["top1_agreement"] <= 1
    assert abs(row["ppl_increase"] - (row["ppl_sparse"] / row["ppl_dense"] - 1)) < 1e-12
    assert len(r["loss_by_position"][0]["sparse"]) == 95
    assert r["passkey"]["sparse"]["grid"] and r["passkey"]["dense"]["grid"]
    assert r["consistency"]["max_logit_diff"] < 1e-3  # prefill and decode through the bounded cache agree
    assert r["consistency"]["cache"] == "SparseKCache"
    speed = r["speed"][0]
    assert speed["sparse"]["prefill_tokens_per_s"] > 0 and speed["dense"]["decode_tokens_per_s"] > 0
    assert speed["kv_bytes"]["sparse"] < speed["kv_bytes"]["dense"]
    assert len(r["selection_recall"]["per_layer"]) == 2
    assert all(0 <= x <= 1 for x in r["selection_recall"]["per_layer"] if x is not None)
    env = r["environment"]
    assert env["versions"]["torch"] and env["versions"]["transformers"] and env["hardware"]["device"] == "cpu"
    assert r["checks"][0]["passed"] and r["passed"]
    # saved into the model folder for push
    assert json.loads((tiny / "validation.json").read_text())["perplexity"] == r["perplexity"]
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["loss_by_position.png", "passkey.png"]
    assert all(is_png(plots / p) for p in pngs)


def test_broken_sparse_model_fails_threshold(tmp_path):
    """Same random weights: exact (k + w >= L) passes, k = w = 1 with random scores fails -> exit 1."""
    common = ["--seq-len", "96", "--num-sequences", "1", "--no-passkey", "--no-consistency", "--no-speed",
              "--no-recall", "--device", "cpu", "--no-progress", "--max-ppl-increase", "0.005", "--no-save"]
    exact = build_converted(tmp_path / "exact", sparsek_topk=64, sparsek_window=64)
    code, out, err = run_cli(["validate", str(exact), *common, "--json", str(tmp_path / "ok.json")])
    assert code == 0, err
    assert abs(json.loads((tmp_path / "ok.json").read_text())["perplexity"][0]["ppl_increase"]) < 1e-5
    broken = build_converted(tmp_path / "broken", sparsek_topk=1, sparsek_window=1, scorer_std=1.0)
    code, out, err = run_cli(["validate", str(broken), *common, "--json", str(tmp_path / "bad.json")])
    assert code == 1, (out, err)
    assert err.strip().splitlines()[-1].startswith("sparsek: error: validation failed: perplexity increase")
    bad = json.loads((tmp_path / "bad.json").read_text())  # the report is still written
    assert bad["passed"] is False and bad["perplexity"][0]["ppl_increase"] > 0.005
    assert bad["perplexity"][0]["mean_kl"] > 1e-3
    assert not (broken / "validation.json").exists()  # --no-save


def test_min_passkey_fails_and_cca_runs(tmp_path):
    """A random model cannot retrieve a passkey: --min-passkey 0.5 exits 1. CCA has no recall."""
    cca = build_converted(tmp_path / "cca", method="cca")
    code, out, err = run_cli(["validate", str(cca), *FAST, "--no-speed", "--min-passkey", "0.5",
                              "--json", str(tmp_path / "r.json")])
    assert code == 1, err
    assert "passkey accuracy" in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["selection_recall"] is None and r["model"]["sparse_method"] == "cca"
    assert r["consistency"]["cache"] == "CCACache" and r["consistency"]["max_logit_diff"] < 1e-3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "100000"], "longer than the model's context"),
        (["--seq-len", "abc"], "not a length"),
        (["--min-passkey", "2"], "--min-passkey must be between 0 and 1"),
        (["--passkey-depths", "1.5"], "passkey depths"),
        (["--dtype", "int3"], "unknown dtype"),
        (["--data", "/nonexistent/file.txt"], "data not found"),
    ],
)
def test_usage_errors_exit_2(tiny, args, message):
    code, out, err = run_cli(["validate", str(tiny), "--device", "cpu", "--no-progress", *args])
    assert code == 2, err
    assert message in err.strip().splitlines()[-1]


def test_not_a_converted_folder_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run_cli(["validate", str(tmp_path), "--device", "cpu"])
    assert code == 2 and "not a converted sparsek model" in err


def test_text_data_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second doc"}) + "\n\n" + json.dumps({"id": 1, "body": "third"}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("fourth")
    assert text_data.load_texts([tmp_path]) == ["hello world", "second doc", "third", "fourth"]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        text_data.load_texts([tmp_path / "bad.jsonl"])
    with pytest.raises(UserError, match="unsupported"):
        (tmp_path / "x.csv").write_text("a")
        text_data.load_texts([tmp_path / "x.csv"])
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "d.parquet")
    assert text_data.load_texts([tmp_path / "d.parquet"]) == ["p1", "p2"]


def test_perplexity_matches_model_loss(tiny):
    """The chunked perplexity equals exp(cross-entropy) from the model's own logits."""
    from sparsek.runtime.loading import load_model, load_tokenizer

    model, tok = load_model(tiny, device="cpu"), load_tokenizer(tiny)
    batches = text_data.token_batches(tok, text_data.embedded_corpus()[:5], 40, 2, batch_size=2)
    old = evaluation.LOGIT_CHUNK
    evaluation.LOGIT_CHUNK = 7  # several chunks, the last one ragged
    try:
        res = evaluation.perplexity(model, batches)
    finally:
        evaluation.LOGIT_CHUNK = old
    with torch.no_grad():
        loss = model(input_ids=batches[0], labels=batches[0]).loss
    assert res.tokens == 2 * 39
    assert abs(res.loss - float(loss)) < 1e-5
