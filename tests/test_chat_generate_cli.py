"""``sparsek chat`` through its real terminal interface (a subprocess with scripted stdin, and a
real SIGINT), and ``sparsek generate`` end to end, including resume and a malformed line."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from sparsek.runtime.configuration_sparsek import CONFIG_CLASSES
from sparsek.runtime.modeling_sparsek import MODEL_CLASSES

WORDS = "the a of to and in is it you that he was for on are with as I his they be at one have this from".split()
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tokenizer(with_eos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["user", "assistant", "system"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    extra = {"eos_token": "<|im_end|>"} if with_eos else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", **extra)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    return tok, len(vocab)


def make_folder(path, method: str, with_eos: bool = True):
    tok, vocab = make_tokenizer(with_eos)
    torch.manual_seed(0)
    cfg = CONFIG_CLASSES["qwen3"](
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96,
        vocab_size=vocab, head_dim=16, max_position_embeddings=4096, sparse_method=method, sparsek_topk=6,
        sparsek_window=4, cca_group=3, cca_window=5, base_model_type="qwen3", pad_token_id=1,
        eos_token_id=3 if with_eos else None, bos_token_id=None,
    )
    model = MODEL_CLASSES["qwen3"](cfg)
    for mod in model.modules():
        if hasattr(mod, "scorer"):
            torch.nn.init.normal_(mod.scorer.weight, std=0.5)
    if not with_eos:
        model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "sparsek": make_folder(root / "sk", "sparsek"),
        "cca": make_folder(root / "cca", "cca"),
        "endless": make_folder(root / "endless", "sparsek", with_eos=False),
    }


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _chat(folder, script: str, *args: str, timeout: int = 120):
    return subprocess.run(
        [sys.executable, "-m", "sparsek.cli", "chat", str(folder), "--device", "cpu", *args],
        input=script, capture_output=True, text=True, timeout=timeout, env=_env(),
    )


@pytest.mark.slow  # a subprocess: imports torch and transformers
def test_chat_scripted_session(folders):
    from sparsek.runtime.generation import ChatSession, Generator
    from sparsek.runtime.loading import load_model, load_tokenizer
    from sparsek.runtime.sampling import SamplingConfig

    folder = folders["cca"]
    script = "the a of\n/stats\n/reset\n/stats\n/bogus\nto and in\n/exit\nnever read\n"
    r = _chat(folder, script, "--temperature", "0", "--max-new-tokens", "6", "--system", "be brief")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[conversation reset]" in out and "unknown command /bogus" in out
    assert "never read" not in out
    first_stats = out.split("context_tokens:")[1]
    assert "decode_tokens_per_s" in first_stats and "cache_kv_entries_per_head" in first_stats
    # after /reset the second /stats shows an empty conversation
    assert "context_tokens: 0" in out
    # the streamed answer is exactly what the session API produces
    model, tok = load_model(folder, device="cpu"), load_tokenizer(folder)
    gen = Generator(model, tok)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0, stop_token_ids=gen.default_stop_ids())
    want = ChatSession(gen, cfg, system="be brief").reply("the a of").text
    assert out.splitlines()[0] == want


def test_chat_second_turn_continues_the_cache(folders):
    """A second turn feeds only the new tokens and answers as a fresh rebuild would."""
    from sparsek.runtime.generation import ChatSession, Generator
    from sparsek.runtime.loading import load_model, load_tokenizer
    from sparsek.runtime.sampling import SamplingConfig

    folder = folders["sparsek"]
    model, tok = load_model(folder, device="cpu"), load_tokenizer(folder)
    gen = Generator(model, tok, prefill_chunk=5)
    cfg = SamplingConfig(max_new_tokens=5, temperature=0, stop_token_ids=gen.default_stop_ids())
    s = ChatSession(gen, cfg)
    s.reply("the a of to")
    held = s.context_tokens
    before = s.cache.layers[0].count.clone()
    assert held > 0
    second = s.reply("and in is")
    assert 0 < s.last_fed < held  # only the new turn was fed
    assert int(before) == held
    # the continued cache answers exactly like a fresh cache fed the same tokens from scratch
    fresh = gen.generate_ids([s.fed_ids[: held + s.last_fed]], cfg)[0][0]
    assert fresh.token_ids == second.token_ids
def test_chat_stopped_answer_keeps_a_consistent_cache(folders):
    """An answer stopped through ``should_stop`` (what Ctrl-C sets) ends after the token it was on,
    is kept in the conversation, and the next turn continues its cache exactly like a rebuild."""
    from sparsek.runtime.generation import ChatSession, Generator
    from sparsek.runtime.loading import load_model, load_tokenizer
    from sparsek.runtime.sampling import SamplingConfig

    folder = folders["endless"]
    model, tok = load_model(folder, device="cpu"), load_tokenizer(folder)
    gen = Generator(model, tok, prefill_chunk=5)
    cfg = SamplingConfig(max_new_tokens=50, temperature=0, stop_token_ids=gen.default_stop_ids())
    s = ChatSession(gen, cfg)
    checks = iter(range(cfg.max_new_tokens))  # the loop asks after every token: stop at the third
    first = s.reply("the a of to", should_stop=lambda: next(checks) >= 2)
    assert first.finish_reason == "interrupted" and len(first.token_ids) == 3
    assert s.messages[-1] == {"role": "assistant", "content": first.text}
    held = s.context_tokens
    assert s.cache is not None and held == len(s.fed_ids)
    second = s.reply("and in is")
    fresh = gen.generate_ids([s.fed_ids[: held + s.last_fed]], cfg)[0][0]
    assert fresh.token_ids == second.token_ids


@pytest.mark.slow  # a subprocess: imports torch and transformers
def test_chat_ctrl_c_stops_only_the_answer(folders):
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsek.cli", "chat", str(folders["endless"]), "--device", "cpu",
         "--temperature", "0", "--max-new-tokens", "1000000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        proc.stdin.write("the a of\n")
        proc.stdin.flush()
        deadline = time.time() + 90
        while len("".join(chunks).strip()) < 20 and time.time() < deadline:  # an answer is streaming
            time.sleep(0.2)
        assert len("".join(chunks).strip()) >= 20, "no streamed output"
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        while "[interrupted]" not in "".join(chunks) and time.time() < deadline:
            time.sleep(0.2)
        proc.stdin.write("/stats\n/exit\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    out = "".join(chunks)
    assert proc.returncode == 0, proc.stderr.read()
    assert "[interrupted]" in out and "context_tokens" in out


def _generate(args, capsys):
    from sparsek.cli.main import run

    with pytest.raises(SystemExit) as e:
        run(["generate", *args])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_generate_end_to_end_resume_and_malformed_line(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt": "the a of to and"}),
        "{not json",
        json.dumps({"id": 2, "messages": [{"role": "user", "content": "in is it"}]}),
        json.dumps({"prompt": "no id"}),
        json.dumps({"id": "c", "prompt": "you that he was for on are with as I his they be at one"}),
        "",
        json.dumps({"id": "a", "prompt": "duplicate"}),
    ]
    inp.write_text("\n".join(lines) + "\n")
    args = [str(folders["sparsek"]), "-i", str(inp), "-o", str(out), "--max-new-tokens", "5", "--device", "cpu", "-q"]
    code, stdout, err = _generate([*args, "--batch-size", "2"], capsys)
    assert code == 0, err
    assert "line 2: not valid JSON" in err and "line 4: missing or invalid 'id'" in err and "line 7: duplicate id" in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "2", "c"]
    for r in rows:
        assert set(r) >= {"text", "prompt_tokens", "completion_tokens", "finish_reason", "time_to_first_token_s", "total_s"}
        assert 1 <= r["completion_tokens"] <= 5 and r["prompt_tokens"] > 0
    # batch of 2 with different lengths gives the same greedy answers as batch 1
    out1 = tmp_path / "out1.jsonl"
    code, _, _ = _generate([str(folders["sparsek"]), "-i", str(inp), "-o", str(out1), "--max-new-tokens", "5",
                            "--device", "cpu", "-q"], capsys)
    assert [json.loads(x)["text"] for x in out1.read_text().splitlines()] == [r["text"] for r in rows]

    # resume: simulate an interrupted run (last line lost, half a line written), then re-run
    kept = out.read_text().splitlines()[:2]
    out.write_text("\n".join(kept) + "\n" + '{"id": "c", "te')
    code, stdout, err = _generate(args, capsys)
    assert code == 0, err
    assert "1 generated, 2 already in" in stdout
    final = []
    for x in out.read_text().splitlines():
        try:
            final.append(json.loads(x))
        except json.JSONDecodeError:
            assert x == '{"id": "c", "te'  # the interrupted half line stays, on its own line
    assert len(out.read_text().splitlines()) == 4
    assert [r["id"] for r in final] == ["a", "2", "c"]
    assert final[2]["text"] == rows[2]["text"]
    # a third run generates nothing
    code, stdout, _ = _generate(args, capsys)
    assert "0 generated, 3 already in" in stdout


def test_generate_bad_input_is_a_one_line_error(tmp_path, capsys, folders):
    code, _, err = _generate([str(folders["sparsek"]), "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and err.strip().startswith("sparsek: error: input file not found") and len(err.strip().splitlines()) == 1
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prompt": "the"}\n')
    code, _, err = _generate([str(folders["sparsek"]), "-i", str(tmp_path / "p.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                              "--top-p", "0"], capsys)
    assert code == 2 and "top_p" in err


def test_help_teaches_with_examples():
    from typer.testing import CliRunner

    from sparsek.cli.main import app

    for cmd in ("chat", "generate"):
        res = CliRunner().invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Examples" in res.output and f"sparsek {cmd}" in res.output
