"""A small Hugging Face Hub-compatible server on 127.0.0.1, written for our tests.

It implements just the routes that ``huggingface_hub`` (1.x and 2.x) calls for
``create_repo`` / ``create_branch`` / ``upload_folder`` / ``create_pull_request`` /
``list_repo_tree`` / ``model_info`` / ``snapshot_download`` / ``hf_hub_download`` /
``whoami``: repo creation, README YAML validation, preupload (every file "regular", so no LFS or
Xet storage is needed), the NDJSON commit API (optionally opening a pull request), revision info,
the file tree, and resolve (HEAD with etag/size/commit headers, GET with ranges).

Auth: ``tokens`` maps a token to a user name; ``orgs`` maps a user to the organisations they
may write to. Private repos are invisible (404) to others, like on the Hub.

Fault injection for tests: ``hold_commits`` makes commit requests wait (without applying) until
``release()``; ``offline`` closes every connection without an answer.

Never binds anything but 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: dict[int, dict] = field(default_factory=dict)


class HubState:
    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.tokens = tokens
        self.orgs = orgs or {}
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.hold_commits = False
        self.commit_waiting = threading.Event()
        self._release = threading.Event()
        self.offline = False
        self.requests: list[tuple[str, str]] = []
        self._counter = 0

    def release(self) -> None:
        self.hold_commits = False
        self._release.set()

    def new_commit(self, repo: Repo, files: dict[str, bytes], message: str, parent: str | None) -> Commit:
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{self._counter}:{time.time_ns()}:{message}".encode()).hexdigest()
        commit = Commit(oid, files, message, parent)
        repo.commits[oid] = commit
        return commit

    def resolve(self, repo: Repo, revision: str) -> Commit | None:
        if revision in repo.commits:
            return repo.commits[revision]
        oid = repo.refs.get(revision)
        return repo.commits.get(oid) if oid else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # quiet
        pass

    # --- plumbing -------------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self.server.state

    def _base(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _body(self) -> bytes:
        return self._payload

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None, head=False):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, head=False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return self.state.tokens.get(auth[7:])
        return None

    def _auth_failed(self) -> bool:
        """A token was sent but is unknown: 401, like the Hub."""
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and self._user() is None

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.state.orgs.get(user, []))

    def _visible_repo(self, repo_id: str, head=False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._can_write(self._user(), repo.owner)):
            self._error(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound", head=head)
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        self.state.requests.append((method, self.path))
        # Read the whole body before any answer, errors included: on a kept-alive connection an
        # unread body would be parsed as the start of the client's next request.
        self._payload = self._read_body()
        if self.state.offline:
            self.close_connection = True
            return
        url = urlsplit(self.path)
        # keep %2F inside a segment (quoted revisions such as refs%2Fpr%2F1)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self._auth_failed():
            return self._error(401, "Invalid credentials in Authorization header", head=method == "HEAD")
        try:
            self._route(method, parts, query)
        except BrokenPipeError:
            pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # --- routes ---------------------------------------------------------------------------

    def _route(self, method: str, p: list[str], q: dict) -> None:
        if p[:2] == ["api", "whoami-v2"]:
            user = self._user()
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            orgs = [{"name": o, "type": "org"} for o in self.state.orgs.get(user, [])]
            return self._send(200, {"type": "user", "name": user, "orgs": orgs, "auth": {"type": "access_token"}})
        if p[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if p[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if len(p) >= 4 and p[:2] == ["api", "models"]:
            repo_id = f"{p[2]}/{p[3]}"
            rest = p[4:]
            if not rest and method == "GET":
                return self._model_info(repo_id, "main", q)
            if rest[:1] == ["revision"] and method == "GET":
                return self._model_info(repo_id, "/".join(rest[1:]), q)
            if rest[:1] == ["tree"] and method == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), q)
            if rest[:1] == ["preupload"] and method == "POST":
                return self._preupload(repo_id, "/".join(rest[1:]), q)
            if rest[:1] == ["commit"] and method == "POST":
                return self._commit(repo_id, "/".join(rest[1:]), q)
            if rest[:1] == ["branch"] and method == "POST":
                return self._create_branch(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["discussions"] and method == "POST" and len(rest) == 1:
                return self._create_pr(repo_id)
            if rest[:1] == ["discussions"] and method == "GET" and len(rest) == 2:
                return self._pr_details(repo_id, int(rest[1]))
        if len(p) >= 5 and p[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]), head=method == "HEAD")
        return self._error(404, f"no route {method} {self.path}")

    def _validate_yaml(self):
        import yaml

        content = json.loads(self._body() or b"{}").get("content", "")
        if not content.startswith("---"):
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(content.split("---")[1])
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
        errors = []
        if not isinstance(meta, dict):
            errors.append({"message": "metadata must be a mapping"})
        else:
            for key in ("tags", "datasets", "language"):
                if key in meta and not isinstance(meta[key], (list, str)):
                    errors.append({"message": f'"{key}" must be a list or a string'})
            if "license" in meta and not isinstance(meta["license"], str):
                errors.append({"message": '"license" must be a string'})
        return self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _create_repo(self):
        user = self._user()
        if user is None:
            return self._error(401, "You must be authenticated to create a repo")
        body = json.loads(self._body() or b"{}")
        if body.get("type", "model") != "model":
            return self._error(400, "only model repos in this test server")
        namespace = body.get("organization") or user
        repo_id = f"{namespace}/{body['name']}"
        if not self._can_write(user, namespace):
            return self._error(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"{self._base()}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            repo = Repo(repo_id, namespace, bool(body.get("private")) or body.get("visibility") == "private")
            commit = self.state.new_commit(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                                           "initial commit", None)
            repo.refs["main"] = commit.oid
            self.state.repos[repo_id] = repo
        self._send(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id})

    def _create_branch(self, repo_id: str, branch: str):
        repo = self._visible_repo(repo_id)
        if repo is None:
            return
        if not self._can_write(self._user(), repo.owner):
            return self._error(403, "You don't have write access to this repo")
        body = json.loads(self._body() or b"{}")
        with self.state.lock:
            if branch in repo.refs:
                return self._error(409, f"Reference {branch} already exists")
            start = body.get("startingPoint") or "main"
            commit = self.state.resolve(repo, start)
            if commit is None:
                return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
            repo.refs[branch] = commit.oid
        self._send(200, {})

    def _model_info(self, repo_id: str, revision: str, q: dict):
        repo = self._visible_repo(repo_id)
        if repo is None:
            return
        commit = self.state.resolve(repo, revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        self._send(200, {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": commit.oid,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "library_name": "transformers", "siblings": siblings,
            "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
        })

    def _tree(self, repo_id: str, revision: str, path: str, q: dict):
        repo = self._visible_repo(repo_id)
        if repo is None:
            return
        commit = self.state.resolve(repo, revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        recursive = q.get("recursive", "false").lower() in ("1", "true")
        entries, dirs = [], set()
        for name in sorted(commit.files):
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            if "/" in rel and not recursive:
                dirs.add(prefix + rel.split("/")[0])
                continue
            parts = name.split("/")
            for i in range(len(prefix.split("/")) if prefix else 1, len(parts)):
                dirs.add("/".join(parts[:i]))
            data = commit.files[name]
            entries.append({"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)})
        entries = [{"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
                   for d in sorted(dirs) if d] + entries
        if prefix and not entries:
            return self._error(404, f"{path} does not exist", "EntryNotFound")
        self._send(200, entries)

    def _writable_repo(self, repo_id: str) -> Repo | None:
        user = self._user()
        if user is None:
            self._error(401, "You must be authenticated to write to a repo")
            return None
        repo = self._visible_repo(repo_id)
        if repo is None:
            return None
        if not self._can_write(user, repo.owner):
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    def _preupload(self, repo_id: str, revision: str, q: dict):
        repo = self._writable_repo(repo_id)
        if repo is None:
            return
        body = json.loads(self._body() or b"{}")
        commit = self.state.resolve(repo, revision) or self.state.resolve(repo, "main")
        files = []
        for f in body.get("files", []):
            existing = commit.files.get(f["path"]) if commit else None
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha1(existing) if existing is not None else None})
        self._send(200, {"files": files, "commitOid": commit.oid if commit else None})

    def _commit(self, repo_id: str, revision: str, q: dict):
        repo = self._writable_repo(repo_id)
        if repo is None:
            return
        raw = self._body()
        if self.state.hold_commits:
            self.state.commit_waiting.set()
            self.state._release.wait(timeout=60)
            self.close_connection = True
            return  # never applied: the client was interrupted
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        with self.state.lock:
            create_pr = q.get("create_pr") in ("1", "true")
            base = self.state.resolve(repo, revision)
            if base is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = dict(base.files)
            for item in lines:
                key, value = item["key"], item.get("value", {})
                if key == "file":
                    if value.get("encoding") != "base64":
                        return self._error(400, "only base64 file content is supported")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {k: v for k, v in files.items() if not k.startswith(prefix)}
                elif key == "lfsFile":
                    return self._error(400, "LFS files are not supported by the test server")
            commit = self.state.new_commit(repo, files, header.get("summary", ""), base.oid)
            pr_url = None
            if create_pr:
                num = self._open_pr(repo, header.get("summary", ""))
                repo.refs[f"refs/pr/{num}"] = commit.oid
                pr_url = f"{self._base()}/{repo_id}/discussions/{num}"
            elif revision in repo.commits:
                return self._error(400, "cannot commit to a commit id")
            else:
                repo.refs[revision] = commit.oid
        self._send(200, {"commitUrl": f"{self._base()}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                         "pullRequestUrl": pr_url, "success": True})

    def _open_pr(self, repo: Repo, title: str) -> int:
        num = len(repo.prs) + 1
        repo.prs[num] = {"title": title or "Upload", "author": self._user()}
        repo.refs[f"refs/pr/{num}"] = repo.refs["main"]
        return num

    def _create_pr(self, repo_id: str):
        repo = self._visible_repo(repo_id)
        if repo is None:
            return
        if self._user() is None:
            return self._error(401, "You must be authenticated")
        body = json.loads(self._body() or b"{}")
        if not body.get("pullRequest"):
            return self._error(400, "only pull requests in this test server")
        with self.state.lock:
            num = self._open_pr(repo, body.get("title", ""))
        self._send(200, {"num": num, "pullRequest": True})

    def _pr_details(self, repo_id: str, num: int):
        repo = self._visible_repo(repo_id)
        if repo is None:
            return
        pr = repo.prs.get(num)
        if pr is None:
            return self._error(404, "Discussion not found")
        self._send(200, {
            "num": num, "title": pr["title"], "author": {"name": pr["author"]}, "createdAt": "2025-01-01T00:00:00.000Z",
            "status": "draft", "repo": {"name": repo_id, "type": "model"}, "isPullRequest": True, "events": [],
            "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [], "diff": "",
        })

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool):
        repo = self._visible_repo(repo_id, head=head)
        if repo is None:
            return
        commit = self.state.resolve(repo, revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
        data = commit.files.get(path)
        if data is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", head=head)
        etag = git_blob_sha1(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        if head:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        self._send(status, None, headers, body=data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class HubServer:
    """``with HubServer(tokens={"tok": "alice"}) as hub: hub.url`` - a Hub on a free local port."""

    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.state = HubState(tokens, orgs)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return dict(self.state.resolve(repo, revision).files)
