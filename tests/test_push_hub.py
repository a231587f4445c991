"""``sparsek push`` and Hub loading against a local Hub-compatible server (tests/hub_server.py).

Nothing here talks to anything but 127.0.0.1: pushes pass ``--endpoint`` and subprocesses get
``HF_ENDPOINT`` pointing at the test server and an empty ``HF_HOME``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from .helpers_models import make_tiny_model
from .hub_server import HubServer
from .test_validate import run_cli

ALICE, BOB = "tok-alice-secret", "tok-bob-secret"


@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={ALICE: "alice", BOB: "bob"}, orgs={"alice": ["team"]}) as server:
        yield server


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny Llama converted with ``sparsek convert`` (SparseK k=8, w=8)."""
    root = tmp_path_factory.mktemp("push")
    src = make_tiny_model("llama", root / "src")
    out = root / "converted"
    code, _, err = run_cli(["convert", str(src), "-o", str(out), "--method", "sparsek", "--k", "8", "--window", "8", "-q"])
    assert code == 0, err
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def push(hub, folder: Path, repo: str, *extra: str, token: str | None = ALICE) -> tuple[int, str, str]:
    args = ["push", str(folder), repo, "--endpoint", hub.url, *extra]
    if token is not None:
        args += ["--token", token]
    return run_cli(args)


def hub_env(hub, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1", **extra)
    return env


LOGITS_PLAIN = textwrap.dedent("""
    import sys
    sys.modules["sparsek"] = None  # the package must not be needed
    import json, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, revision=sys.argv[2])
    ids = torch.arange(3, 43)[None] % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    print(json.dumps({"cls": type(model).__module__, "logits": logits[0].tolist()}))
""")

LOGITS_SPARSEK = textwrap.dedent("""
    import sys, json, torch
    from sparsek.runtime.loading import load_model
    model = load_model(sys.argv[1], device="cpu", revision=sys.argv[2] if len(sys.argv) > 2 else None)
    ids = torch.arange(3, 43)[None] % model.config.vocab_size
    with torch.no_grad():
        print(json.dumps({"logits": model(input_ids=ids).logits[0].tolist()}))
""")


def local_logits(folder: Path) -> torch.Tensor:
    from sparsek.runtime.loading import load_model

    model = load_model(folder, device="cpu")
    ids = torch.arange(3, 43)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def run_py(code: str, args: list[str], env: dict, cwd: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_end_to_end_convert_validate_push_load(hub, converted, tmp_path):
    # validate (saves validation.json into the folder for the card)
    code, _, err = run_cli(["validate", str(converted), "--seq-len", "64", "--num-sequences", "1", "--no-passkey",
                            "--no-speed", "--device", "cpu", "--no-progress"])
    assert code == 0, err
    before = snapshot(converted)
    code, out, err = push(hub, converted, "alice/tiny-sparsek")
    assert code == 0, err
    assert snapshot(converted) == before  # nothing local modified
    assert ALICE not in out + err
    commit_line = next(line for line in out.splitlines() if line.startswith("commit: "))
    oid = commit_line.rsplit("/", 1)[1]
    assert commit_line.startswith(f"commit: {hub.url}/alice/tiny-sparsek/commit/")
    remote = hub.files("alice/tiny-sparsek")
    local = {p: (converted / p).read_bytes() for p in before if p != "README.md"}
    assert all(remote[p] == data for p, data in local.items())
    card = remote["README.md"].decode()
    assert "| seq len |" in card and "trust_remote_code=True" in card and "sparsek chat alice/tiny-sparsek" in card

    # plain transformers, sparsek not importable, cwd outside the repo, pinned to the pushed commit
    home = tmp_path / "hf"
    env = hub_env(hub, home)
    plain = run_py(LOGITS_PLAIN, ["alice/tiny-sparsek", oid], env, tmp_path)
    assert not plain["cls"].startswith("sparsek")
    expected = local_logits(converted)
    assert torch.allclose(torch.tensor(plain["logits"]), expected, atol=1e-5, rtol=0)

    # sparsek generate by repo id
    cmd_generate = Path(__file__).resolve().parents[1] / "cli" / "cmd_generate.py"
    if cmd_generate.exists():
        (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "prompt": "the sky is"}) + "\n")
        r = subprocess.run([sys.executable, "-m", "sparsek.cli", "generate", "alice/tiny-sparsek", "-i",
                            str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "-n", "4"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        row = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
        assert row["id"] == "a" and row["completion_tokens"] >= 1

    # offline reload from the cache: the server would drop every connection
    hub.state.offline = True
    seen = len(hub.state.requests)
    try:
        offline = run_py(LOGITS_SPARSEK, ["alice/tiny-sparsek"], hub_env(hub, home, HF_HUB_OFFLINE="1"), tmp_path)
    finally:
        hub.state.offline = False
    assert len(hub.state.requests) == seen
    assert torch.allclose(torch.tensor(offline["logits"]), expected, atol=1e-5, rtol=0)


def test_model_card_round_trips(converted, tmp_path):
    from huggingface_hub import ModelCard

    from sparsek.convert.hub_card import build_model_card

    folder = tmp_path / "m"
    folder.mkdir()
    for p in converted.iterdir():
        if p.is_file() and p.name not in ("README.md", "validation.json"):
            (folder / p.name).write_bytes(p.read_bytes())
    (folder / "README.md").write_text("---\nlicense: mit\nbase_model: org/base-model\nlanguage:\n- en\n---\n# base\n")
    card = build_model_card(folder, "alice/round-trip")
    card.save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "mit"
    assert data["base_model"] == "org/base-model" and data["language"] == ["en"]
    assert {"sparsek", "sparse-attention", "sparsek-attention"} <= set(data["tags"])
    text = (tmp_path / "README.md").read_text()
    assert "No validation was run" in text and "| top-k (`sparsek_topk`) | 8 |" in text


def test_push_options_private_branch_pr(hub, converted):
    code, out, err = push(hub, converted, "alice/options", "--private", "--revision", "dev",
                          "--commit-message", "first upload")
    assert code == 0, err
    repo = hub.state.repos["alice/options"]
    assert repo.private and "model.safetensors" in hub.files("alice/options", "dev")
    assert "model.safetensors" not in hub.files("alice/options", "main")
    assert hub.state.repos["alice/options"].commits[repo.refs["dev"]].message == "first upload"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):  # private: invisible to bob
        HfApi(endpoint=hub.url).model_info("alice/options", token=BOB)
    code, out, err = push(hub, converted, "alice/options", "--create-pr")
    assert code == 0, err
    assert "pull request: " in out and "model.safetensors" not in hub.files("alice/options", "main")
    assert "model.safetensors" in hub.files("alice/options", "refs/pr/1")
    code, out, err = push(hub, converted, "team/shared")  # an organisation alice belongs to
    assert code == 0, err


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_token", "no Hugging Face token"),
        ("bad_token", "rejected the token (401)"),
        ("other_namespace", "no write access to bob/mine (403)"),
        ("taken_by_other", "no write access to bob/taken (403)"),
        ("network_down", "cannot reach the Hub"),
        ("not_converted", "not a converted sparsek model"),
    ],
)
def test_push_errors(hub, converted, tmp_path, monkeypatch, case, message):
    folder, repo, token = converted, "alice/errors", ALICE
    if case == "no_token":
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
        token = None
    elif case == "bad_token":
        token = "tok-wrong-secret"
    elif case == "other_namespace":
        repo = "bob/mine"
    elif case == "taken_by_other":
        from huggingface_hub import HfApi

        HfApi(endpoint=hub.url).create_repo("bob/taken", token=BOB, exist_ok=True)
        repo = "bob/taken"
    elif case == "not_converted":
        folder = make_tiny_model("llama", tmp_path / "dense", tokenizer=False)
    before = snapshot(folder)
    if case == "network_down":
        code, out, err = run_cli(["push", str(folder), repo, "--endpoint", "http://127.0.0.1:9", "--token", token])
    else:
        code, out, err = push(hub, folder, repo, token=token)
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("sparsek: error: ") and message in last, err
    assert "Traceback" not in err and token is None or token not in out + err
    assert snapshot(folder) == before
    if case == "taken_by_other":
        assert "model.safetensors" not in hub.files("bob/taken")


def test_refused_request_leaves_the_connection_usable(hub):
    """A request the server refuses before looking at its body (403 here) must not leave that body
    on a kept-alive connection, where it would be read as the start of the next request: the
    in-process Hub client pools connections across pushes (a refused push, then any later one)."""
    import http.client

    from huggingface_hub import HfApi

    HfApi(endpoint=hub.url).create_repo("bob/pooled", token=BOB, exist_ok=True)
    conn = http.client.HTTPConnection("127.0.0.1", int(hub.url.rsplit(":", 1)[1]), timeout=30)
    try:
        body = json.dumps({"files": [{"path": "README.md", "sample": "eA==", "size": 1}]})
        conn.request("POST", "/api/models/bob/pooled/preupload/main", body=body,
                     headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
        refused = conn.getresponse()
        refused.read()
        assert refused.status == 403
        conn.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {ALICE}"})
        again = conn.getresponse()
        assert again.status == 200 and json.loads(again.read())["name"] == "alice"
    finally:
        conn.close()


@pytest.mark.slow
def test_rerun_completes_an_interrupted_upload(hub, converted, tmp_path):
    env = hub_env(hub, tmp_path / "hf")
    hub.state.commit_waiting.clear()
    hub.state._release.clear()
    hub.state.hold_commits = True
    proc = subprocess.Popen([sys.executable, "-m", "sparsek.cli", "push", str(converted), "alice/resume",
                             "--endpoint", hub.url, "--token", ALICE], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.state.commit_waiting.wait(timeout=240), "the push never reached its commit"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        hub.state.release()
    assert "model.safetensors" not in hub.files("alice/resume")  # interrupted before its commit
    code, out, err = push(hub, converted, "alice/resume")
    assert code == 0, err
    assert "uploaded and verified" in out
    assert hub.files("alice/resume")["model.safetensors"] == (converted / "model.safetensors").read_bytes()
