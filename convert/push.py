"""``sparsek push``: upload a converted folder to the Hugging Face Hub and check what arrived.

Flow: check the folder (converted, weights and modeling code present) -> find the token (``--token``
or the usual ``huggingface_hub`` lookup) -> ``create_repo(exist_ok=True)`` (and the branch of
``--revision``) -> stage the folder with the generated model card in a temporary directory of
hard links / copies (the user's folder is never modified) -> ``upload_folder`` -> list the
remote tree at the new commit and compare every file's size and git/LFS hash with the local one.

Re-running after an interruption completes the upload: ``upload_folder`` asks the Hub which
files it already has (``preupload`` returns their oids) and skips the unchanged ones.

The token is passed to ``huggingface_hub`` only; it is never printed, logged or put in an error.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sparsek.runtime.errors import UserError
from sparsek.runtime.loading import require_converted

from .hub_card import CARD_MARKER, build_model_card, is_generated

IGNORED = (".git", ".cache", "__pycache__", ".DS_Store")


@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    files: int
    bytes: int


def _local_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(part in IGNORED or part.startswith(".") for part in rel.split("/")):
            continue
        if rel.endswith((".tmp", ".lock", ".incomplete")):
            continue
        files[rel] = path
    return files


def check_folder(folder: Path) -> dict:
    """A converted folder with weights and the remote code its ``auto_map`` names."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    cfg = require_converted(folder)
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} has no .safetensors weights")
    for ref in (cfg.get("auto_map") or {}).values():
        module = ref.split(".")[0] + ".py"
        if not (folder / module).is_file():
            raise UserError(f"{folder} lacks {module} (named in auto_map): plain transformers could not load it")
    if not cfg.get("auto_map"):
        raise UserError(f"{folder}/config.json has no auto_map: plain transformers could not load it")
    return cfg


def _stage(folder: Path, files: dict[str, Path], card_text: str | None, staging: Path) -> dict[str, Path]:
    """Hard links (or copies) of the files, plus the card, under ``staging``."""
    staged = {}
    for rel, src in files.items():
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        staged[rel] = dst
    if card_text is not None:
        (staging / "README.md").write_text(card_text, encoding="utf-8")
        staged["README.md"] = staging / "README.md"
    return staged


def _git_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_remote(api, repo_id: str, revision: str, local: dict[str, Path], token) -> None:
    """Every local file is on the Hub at ``revision`` with the same size and hash."""
    from huggingface_hub.hf_api import RepoFile

    remote = {
        f.path: f
        for f in api.list_repo_tree(repo_id, revision=revision, recursive=True, token=token)
        if isinstance(f, RepoFile)
    }
    problems = []
    for rel, path in local.items():
        entry = remote.get(rel)
        if entry is None:
            problems.append(f"{rel} missing")
            continue
        size = path.stat().st_size
        lfs = getattr(entry, "lfs", None)
        if lfs is not None:
            lfs_sha = getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)
            if getattr(lfs, "size", size) != size or lfs_sha != _sha256(path):
                problems.append(f"{rel} differs (LFS size/sha256)")
        elif entry.size != size or entry.blob_id != _git_sha1(path):
            problems.append(f"{rel} differs (size/git hash)")
    if problems:
        raise UserError(f"upload verification failed on {repo_id}@{revision[:12]}: {', '.join(problems[:5])}")


def _is_network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException", "RemoteProtocolError",
                         "ConnectionError", "OfflineModeIsEnabled"}) or isinstance(e, ConnectionError)


def _explain(e: BaseException, repo_id: str, endpoint: str) -> UserError:
    """One line for what went wrong talking to the Hub (never containing the token)."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if _is_network_error(e):
        return UserError(f"cannot reach the Hub at {endpoint} (network down?): {type(e).__name__}")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return UserError("the Hub rejected the token (401): it is invalid or expired; log in again or pass --token")
    if status == 403:
        return UserError(f"no write access to {repo_id} (403): the namespace belongs to another user or "
                         "organisation, or the token is read-only")
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return UserError(f"{repo_id} not found on the Hub, or not visible with this token")
    if isinstance(e, HfHubHTTPError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return UserError(f"the Hub refused the upload to {repo_id}: {first}")
    if isinstance(e, ValueError):
        return UserError(f"{repo_id}: {str(e).strip().splitlines()[0]}")
    return UserError(f"upload to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Upload ``folder`` to ``repo_id`` and verify it; raises :class:`UserError` with one line."""
    from huggingface_hub import HfApi, get_token

    folder = Path(folder).expanduser()
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"repository id must look like owner/name, got {repo_id!r}")
    if create_pr and revision not in (None, "main"):
        raise UserError("--create-pr opens a pull request against main; do not combine it with --revision")
    check_folder(folder)
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: run `hf auth login`, set HF_TOKEN or pass --token")
    api = HfApi(endpoint=endpoint, token=token)
    endpoint = api.endpoint

    files = _local_files(folder)
    card_text = None
    if "README.md" not in files or is_generated(folder) or _is_convert_card(folder):
        card_text = str(build_model_card(folder, repo_id))
        files.pop("README.md", None)
    try:
        api.whoami(token=token)
        if not _repo_visible(api, repo_id, token):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        with tempfile.TemporaryDirectory(prefix="sparsek-push-") as tmp:
            staged = _stage(folder, files, card_text, Path(tmp))
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision if not create_pr else None,
                create_pr=create_pr,
                commit_message=commit_message or f"Upload {folder.name} with sparsek",
                token=token,
            )
            verify_remote(api, repo_id, info.oid, staged, token)
            total = sum(p.stat().st_size for p in staged.values())
    except UserError:
        raise
    except Exception as e:  # huggingface_hub / httpx errors -> one line
        raise _explain(e, repo_id, endpoint) from None
    return PushResult(repo_id, info.commit_url, info.oid, getattr(info, "pr_url", None), len(staged), total)


def _repo_visible(api, repo_id: str, token) -> bool:
    """Whether the repo exists (and this token sees it): then there is nothing to create."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        api.repo_info(repo_id, repo_type="model", token=token)
        return True
    except RepositoryNotFoundError:
        return False


def _is_convert_card(folder: Path) -> bool:
    """The short card that ``sparsek convert`` writes is replaced by the full one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    return CARD_MARKER in text or "Converted by `sparsek`" in text
