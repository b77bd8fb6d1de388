"""A small in-memory Hugging Face Hub stand-in for offline tests.

The real ``huggingface_hub`` client (2.4.x) talks to it over HTTP on 127.0.0.1.
Only the Python standard library is used (PyYAML is used opportunistically to
parse model-card front matter when it is importable).

Typical use::

    with HubServer() as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("user/lora")
        ...
        assert hub.repo_files("user/lora")["README.md"].startswith(b"---")

Uploads must not go through Xet (the server has no CAS): set
``HF_HUB_DISABLE_XET=1`` before importing ``huggingface_hub`` or patch
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` (the pytest fixture in
``hub_fixtures.py`` does the latter).

Endpoint names used by the request counters (``hub.count(name)``):
``whoami``, ``create_repo``, ``delete_repo``, ``repo_info``, ``preupload``,
``paths_info``, ``validate_yaml``, ``lfs_batch``, ``lfs_upload``, ``lfs_verify``,
``commit``, ``resolve`` (GET), ``resolve_head`` (HEAD), ``branch_create``,
``branch_delete``, ``refs``, ``tree``, ``commits``, ``xet_token``, ``unknown``.
"""

from __future__ import annotations

import base64
import collections
import datetime as _dt
import fnmatch
import functools
import hashlib
import http.server
import itertools
import json
import os
import re
import secrets
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["HubServer", "DEFAULT_TOKEN", "DEFAULT_USER", "git_blob_sha1", "LOG_ENV_VAR"]

DEFAULT_TOKEN = "hf_lorareg_test_token_0123456789abcdef"
DEFAULT_USER = "lorareg-tester"
LOG_ENV_VAR = "LORAREG_HUB_SERVER_LOG"

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Written for this server; mirrors the idea (not the text) of the Hub's default file.
_INITIAL_GITATTRIBUTES = (
    "".join(
        f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
        for pattern in (
            "*.bin",
            "*.ckpt",
            "*.gguf",
            "*.h5",
            "*.msgpack",
            "*.npy",
            "*.npz",
            "*.onnx",
            "*.pt",
            "*.pth",
            "*.safetensors",
            "*.tar.gz",
            "*.zip",
        )
    )
).encode()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------- storage


@dataclass(eq=False)
class _Blob:
    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (
            "version https://git-lfs.github.com/spec/v1\n"
            f"oid sha256:{self.sha256}\nsize {self.size}\n"
        ).encode()

    @functools.cached_property
    def blob_id(self) -> str:
        """Git blob id: of the content for regular files, of the pointer for LFS files."""
        return git_blob_sha1(self.pointer if self.lfs else self.data)


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    tree: dict[str, _Blob]
    date: str
    author: str


@dataclass
class _PullRequest:
    num: int
    title: str
    description: str
    target_branch: str
    status: str = "open"

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch name or refs/pr/N -> commit oid
    prs: list[_PullRequest] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)


class _HttpError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict | None = None, body=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


# --------------------------------------------------------------------------- server


class HubServer:
    """In-memory Hub. Start with ``start()``/``stop()`` or use as a context manager."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        orgs: Iterable[str] = (),
        read_only_tokens: Iterable[str] = (),
        anonymous_reads: bool = True,
        writable_namespaces: Iterable[str] | None = None,
        lfs_threshold: int = 1024 * 1024,
        lfs_patterns: Iterable[str] = ("*.safetensors",),
        lfs_verify: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.token = token
        self.user = user
        self.orgs = list(orgs)
        self.read_only_tokens = set(read_only_tokens)
        self.anonymous_reads = anonymous_reads
        # None: any namespace may be written with a valid token.
        self.writable_namespaces = None if writable_namespaces is None else set(writable_namespaces)
        self.lfs_threshold = lfs_threshold
        self.lfs_patterns = list(lfs_patterns)
        self.lfs_verify = lfs_verify
        self._host = host

        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._commit_counter = itertools.count(1)
        self._pending_uploads: dict[str, tuple[tuple[str, str], str, int]] = {}
        self._faults: dict[str, list[int]] = collections.defaultdict(list)
        self._missing: set[tuple[str, str]] = set()
        self.request_counts: collections.Counter[str] = collections.Counter()
        self.requests: list[dict[str, Any]] = []  # method, endpoint, path, status (never headers)
        self.log_lines: list[str] = []
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        httpd = _QuietServer((self._host, 0), handler)
        httpd.hub = self
        httpd.daemon_threads = True
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (still answered after ``stop()``, for offline-cache tests)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def endpoint(self) -> str:
        return f"http://{self._host}:{self.port}"

    # ------------------------------------------------------------------ knobs
    def fail_next(self, endpoint: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` requests to ``endpoint`` (a counter name, e.g. ``"commit"``)
        with ``status``; the request body is read and nothing changes."""
        with self._lock:
            self._faults[endpoint].extend([status] * times)

    def fail_next_commit(self, status: int = 500, times: int = 1) -> None:
        self.fail_next("commit", status, times)

    def make_404(self, repo_id: str, path: str, repo_type: str = "model") -> None:
        """Make ``resolve``/``paths-info``/``tree`` act as if ``path`` were absent (at every revision)."""
        with self._lock:
            self._missing.add((self._key(repo_type, repo_id), path))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._missing.clear()

    def count(self, endpoint: str) -> int:
        with self._lock:
            return self.request_counts[endpoint]

    def reset_counts(self) -> None:
        with self._lock:
            self.request_counts.clear()
            self.requests.clear()

    # ------------------------------------------------------------------ seeding
    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> None:
        """Create a repo directly (initial commit holds ``.gitattributes``, as on the Hub)."""
        with self._lock:
            key = self._key(repo_type, repo_id)
            if key in self._repos:
                raise ValueError(f"repo exists: {repo_id}")
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            self._repos[key] = repo
            tree = {".gitattributes": _Blob(_INITIAL_GITATTRIBUTES, lfs=False)}
            commit = self._new_commit(repo, None, "initial commit", "", tree)
            repo.refs["main"] = commit.oid

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes] | None = None,
        *,
        delete: Iterable[str] = (),
        revision: str = "main",
        title: str = "seed",
        message: str = "",
        repo_type: str = "model",
        lfs: bool | None = None,
        create: bool = True,
        private: bool = False,
    ) -> str:
        """Commit ``files`` directly (creating the repo/branch if needed); returns the commit oid.
        ``lfs=None`` applies the server's LFS rule per file."""
        with self._lock:
            key = self._key(repo_type, repo_id)
            if key not in self._repos:
                if not create:
                    raise KeyError(repo_id)
                self.create_repo(repo_id, repo_type=repo_type, private=private)
            repo = self._repos[key]
            head = repo.refs.get(revision) or repo.refs["main"]
            tree = dict(repo.commits[head].tree)
            for path in delete:
                tree.pop(path, None)
            for path, data in (files or {}).items():
                is_lfs = self._is_lfs(path, len(data)) if lfs is None else lfs
                tree[path] = _Blob(bytes(data), lfs=is_lfs and len(data) > 0)
                if tree[path].lfs:
                    repo.lfs_objects[tree[path].sha256] = bytes(data)
            commit = self._new_commit(repo, head, title, message, tree)
            repo.refs[revision] = commit.oid
            return commit.oid

    # ------------------------------------------------------------------ inspection
    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._key(repo_type, repo_id) in self._repos

    def repo_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return {p: b.data for p, b in self._commit_at(repo, revision).tree.items()}

    def lfs_paths(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> set[str]:
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return {p for p, b in self._commit_at(repo, revision).tree.items() if b.lfs}

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._commit_at(self._repo_or_raise(repo_type, repo_id), revision).oid

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """Commits reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return [self._commit_dict(c) for c in self._history(repo, self._commit_at(repo, revision).oid)]

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return {k: v for k, v in repo.refs.items() if not k.startswith("refs/")}

    def prs(self, repo_id: str, repo_type: str = "model") -> list[dict[str, Any]]:
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return [
                {
                    "num": pr.num,
                    "ref": pr.ref,
                    "title": pr.title,
                    "description": pr.description,
                    "target_branch": pr.target_branch,
                    "status": pr.status,
                    "head": repo.refs[pr.ref],
                }
                for pr in repo.prs
            ]

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _key(repo_type: str, repo_id: str) -> tuple[str, str]:
        return (repo_type or "model", repo_id)

    def _repo_or_raise(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get(self._key(repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no such repo: {repo_type} {repo_id}")
        return repo

    def _commit_at(self, repo: _Repo, revision: str) -> _Commit:
        oid = self._resolve_rev(repo, revision)
        if oid is None:
            raise KeyError(f"no such revision: {revision}")
        return repo.commits[oid]

    @staticmethod
    def _commit_dict(c: _Commit) -> dict[str, Any]:
        return {"oid": c.oid, "title": c.title, "message": c.message, "parent": c.parent, "date": c.date}

    @staticmethod
    def _history(repo: _Repo, oid: str | None) -> list[_Commit]:
        out = []
        while oid is not None:
            c = repo.commits[oid]
            out.append(c)
            oid = c.parent
        return out

    @staticmethod
    def _resolve_rev(repo: _Repo, rev: str) -> str | None:
        if rev in repo.refs:
            return repo.refs[rev]
        if rev.startswith("refs/heads/") and rev[len("refs/heads/"):] in repo.refs:
            return repo.refs[rev[len("refs/heads/"):]]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None

    def _is_lfs(self, path: str, size: int) -> bool:
        if size == 0:
            return False
        if size > self.lfs_threshold:
            return True
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in self.lfs_patterns)

    def _new_commit(self, repo: _Repo, parent: str | None, title: str, message: str, tree: dict[str, _Blob]) -> _Commit:
        digest = hashlib.sha1()
        digest.update(f"commit #{next(self._commit_counter)}\nparent {parent}\n{title}\n\n{message}\n".encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{tree[path].blob_id}\n".encode())
        commit = _Commit(
            oid=digest.hexdigest(),
            parent=parent,
            title=title,
            message=message,
            tree=tree,
            date=_now_iso(),
            author=self.user,
        )
        repo.commits[commit.oid] = commit
        return commit

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _log(self, line: str) -> None:
        with self._lock:
            self.log_lines.append(line)
        if os.environ.get(LOG_ENV_VAR):
            print(f"[hub_server] {line}", file=sys.stderr)


# --------------------------------------------------------------------------- request handling


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # e.g. a client closing a kept-alive connection; never print tracebacks to stderr.
        exc = sys.exc_info()[1]
        self.hub._log(f"connection error: {type(exc).__name__}: {exc}")


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: HubServer  # set on the bound subclass
    protocol_version = "HTTP/1.1"
    server_version = "lorareg-test-hub/1"
    timeout = 60

    # Quiet by default; lines never include headers (so never a token).
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ------------------------------------------------------------------ plumbing
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        self._status = status
        self.send_response(status)
        hdrs = {"Content-Type": content_type, "Content-Length": str(len(body))}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _handle(self, method: str) -> None:
        hub = self.hub
        self._status = 0
        split = urlsplit(self.path)
        self._query = {k: v for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        raw_path = split.path
        segments = [s for s in raw_path.split("/")][1:]  # still percent-encoded
        try:
            body = self._read_body()
        except Exception:  # pragma: no cover - broken client
            self.close_connection = True
            return
        endpoint, route = self._route(method, segments)
        with hub._lock:
            hub.request_counts[endpoint] += 1
            fault = hub._faults[endpoint].pop(0) if hub._faults.get(endpoint) else None
        try:
            if fault is not None:
                raise _HttpError(fault, f"Injected failure ({fault}) for {endpoint}")
            if route is None:
                raise _HttpError(404, f"Not found: {method} {raw_path}")
            route(body)
        except json.JSONDecodeError as exc:
            self._json(400, {"error": f"Invalid JSON body: {exc}"}, {"X-Error-Message": "Invalid JSON body"})
        except _HttpError as err:
            headers = dict(err.headers)
            headers["X-Error-Message"] = err.message
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, err.body if err.body is not None else {"error": err.message}, headers)
        except Exception as exc:  # bug in the server: report it as a 500, keep serving
            self._json(500, {"error": f"test hub server error: {type(exc).__name__}: {exc}"})
        with hub._lock:
            hub.requests.append({"method": method, "endpoint": endpoint, "path": raw_path, "status": self._status})
        hub._log(f"{method} {raw_path} -> {self._status} ({endpoint})")

    def _q(self, name: str, default: str | None = None) -> str | None:
        vals = self._query.get(name)
        return vals[0] if vals else default

    def _qbool(self, name: str) -> bool:
        return (self._q(name, "") or "").lower() in ("1", "true", "yes")

    # ------------------------------------------------------------------ routing
    def _route(self, method: str, seg: list[str]):
        """Return (endpoint name, handler(body) or None)."""
        u = [unquote(s) for s in seg]
        if len(u) >= 2 and u[0] == "api":
            if u[1] == "whoami-v2" and method == "GET":
                return "whoami", self._whoami
            if u[1] == "validate-yaml" and method == "POST":
                return "validate_yaml", self._validate_yaml
            if u[1:3] == ["repos", "create"] and method == "POST":
                return "create_repo", self._create_repo
            if u[1:3] == ["repos", "delete"] and method == "DELETE":
                return "delete_repo", self._delete_repo
            if u[1] in _REPO_TYPES and len(u) >= 4:
                repo_type = _REPO_TYPES[u[1]]
                repo_id = f"{u[2]}/{u[3]}"
                rest = u[4:]
                self._repo_type, self._repo_id = repo_type, repo_id
                if not rest and method == "GET":
                    self._rev = None
                    return "repo_info", self._repo_info
                action = rest[0] if rest else ""
                arg = rest[1] if len(rest) > 1 else None
                self._rev = arg
                self._subpath = "/".join(rest[2:])
                if action == "revision" and arg and method == "GET":
                    return "repo_info", self._repo_info
                if action == "preupload" and arg and method == "POST":
                    return "preupload", self._preupload
                if action == "paths-info" and arg and method == "POST":
                    return "paths_info", self._paths_info
                if action == "commit" and arg and method == "POST":
                    return "commit", self._commit
                if action == "branch" and arg and method == "POST":
                    return "branch_create", self._branch_create
                if action == "branch" and arg and method == "DELETE":
                    return "branch_delete", self._branch_delete
                if action == "refs" and method == "GET":
                    return "refs", self._refs
                if action == "tree" and arg and method == "GET":
                    return "tree", self._tree
                if action == "commits" and arg and method == "GET":
                    return "commits", self._commits
                if action.startswith("xet-") and action.endswith("-token"):
                    return "xet_token", self._xet_token
            return "unknown", None
        if u and u[0] == "__lfs" and len(u) == 2 and method == "PUT":
            self._nonce = u[1]
            return "lfs_upload", self._lfs_upload
        # Repo-scoped git / resolve URLs: [type/]ns/name...
        repo_type = "model"
        if u and u[0] in _REPO_TYPES and u[0] != "models":
            repo_type, u = _REPO_TYPES[u[0]], u[1:]
        if len(u) >= 2 and u[1].endswith(".git"):
            self._repo_type, self._repo_id = repo_type, f"{u[0]}/{u[1][:-4]}"
            if u[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
                return "lfs_batch", self._lfs_batch
            if u[2:] == ["info", "lfs", "objects", "verify"] and method == "POST":
                return "lfs_verify", self._lfs_verify
            return "unknown", None
        if len(u) >= 5 and u[2] == "resolve" and method in ("GET", "HEAD"):
            self._repo_type, self._repo_id = repo_type, f"{u[0]}/{u[1]}"
            self._rev = u[3]
            self._subpath = "/".join(u[4:])
            return ("resolve_head" if method == "HEAD" else "resolve"), self._resolve
        return "unknown", None

    # ------------------------------------------------------------------ auth helpers
    def _auth(self) -> str | None:
        """Return 'write', 'read' or None (anonymous). Raise 401 on a bad token."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        if value == self.hub.token:
            return "write"
        if value in self.hub.read_only_tokens:
            return "read"
        raise _HttpError(401, "Invalid credentials in Authorization header")

    def _repo_for_read(self) -> _Repo:
        level = self._auth()
        repo = self.hub._repos.get((self._repo_type, self._repo_id))
        if repo is None or (repo.private and level is None) or (level is None and not self.hub.anonymous_reads):
            raise _HttpError(
                401 if level is None else 404, "Repository not found", code="RepoNotFound"
            )
        return repo

    def _repo_for_write(self) -> _Repo:
        level = self._auth()
        if level is None:
            raise _HttpError(401, "You must be authenticated to access this resource.")
        repo = self.hub._repos.get((self._repo_type, self._repo_id))
        if repo is None:
            raise _HttpError(404, "Repository not found", code="RepoNotFound")
        self._check_write(level, self._repo_id.split("/")[0])
        return repo

    def _check_write(self, level: str, namespace: str) -> None:
        if level != "write":
            raise _HttpError(403, "You don't have the rights to write to this repository (read-only token)")
        allowed = self.hub.writable_namespaces
        if allowed is not None and namespace not in allowed:
            raise _HttpError(403, f"You don't have the rights to create or write to repositories in {namespace}")

    def _rev_oid(self, repo: _Repo, rev: str | None) -> str:
        rev = rev or "main"
        oid = HubServer._resolve_rev(repo, rev)
        if oid is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return oid

    # ------------------------------------------------------------------ endpoints
    def _whoami(self, body: bytes) -> None:
        level = self._auth()
        if level is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        hub = self.hub
        self._json(
            200,
            {
                "type": "user",
                "id": "0" * 24,
                "name": hub.user,
                "fullname": hub.user,
                "email": f"{hub.user}@example.invalid",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "admin"} for o in hub.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "lorareg-test", "role": level, "createdAt": "2024-01-01T00:00:00.000Z"},
                },
            },
        )

    def _validate_yaml(self, body: bytes) -> None:
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            raise _HttpError(400, "Invalid JSON body", body={"errors": [{"message": "Invalid JSON body"}], "warnings": []})
        content = payload.get("content") or ""
        meta, error = _parse_front_matter(content)
        if error:
            raise _HttpError(400, error, body={"errors": [{"message": error}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _create_repo(self, body: bytes) -> None:
        level = self._auth()
        if level is None:
            raise _HttpError(401, "You must be authenticated to access this resource.")
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise _HttpError(400, f"Invalid repo name: {name!r}")
        namespace = payload.get("organization") or self.hub.user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HttpError(400, f"Invalid repo type: {repo_type}")
        self._check_write(level, namespace)
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub._repos:
                raise _HttpError(409, f"You already created this {repo_type} repo", body={"error": f"You already created this {repo_type} repo", "url": url})
            self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
        self._json(200, {"url": url, "name": repo_id, "id": "0" * 24})

    def _delete_repo(self, body: bytes) -> None:
        level = self._auth()
        if level is None:
            raise _HttpError(401, "You must be authenticated to access this resource.")
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload.get('name')}"
        self._check_write(level, repo_id.split("/")[0])
        with self.hub._lock:
            if self.hub._repos.pop((repo_type, repo_id), None) is None:
                raise _HttpError(404, "Repository not found", code="RepoNotFound")
        self._json(200, {})

    def _repo_info(self, body: bytes) -> None:
        with self.hub._lock:
            repo = self._repo_for_read()
            oid = self._rev_oid(repo, self._rev)
            commit = repo.commits[oid]
            full = self._qbool("blobs")
            siblings = []
            for path in sorted(commit.tree):
                blob = commit.tree[path]
                sib: dict[str, Any] = {"rfilename": path}
                if full:
                    sib["size"] = blob.size
                    sib["blobId"] = blob.blob_id
                    if blob.lfs:
                        sib["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
                siblings.append(sib)
            card_data = None
            readme = commit.tree.get("README.md")
            if readme is not None:
                card_data, _ = _parse_front_matter(readme.data.decode("utf-8", "replace"))
            info: dict[str, Any] = {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": list((card_data or {}).get("tags") or []) if isinstance(card_data, dict) else [],
                "siblings": siblings,
            }
            if repo.repo_type == "model":
                info["modelId"] = repo.repo_id
            if isinstance(card_data, dict):
                info["cardData"] = card_data
                for k in ("library_name", "pipeline_tag"):
                    if k in card_data:
                        info[k] = card_data[k]
            if full:
                info["usedStorage"] = sum(b.size for b in commit.tree.values())
        self._json(200, info)

    def _preupload(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        with self.hub._lock:
            repo = self._repo_for_write()
            oid = self._rev_oid(repo, self._rev)
            tree = repo.commits[oid].tree
            ignore = payload.get("gitIgnore")
            if ignore is None and ".gitignore" in tree:
                ignore = tree[".gitignore"].data.decode("utf-8", "replace")
            patterns = [
                ln.strip() for ln in (ignore or "").splitlines() if ln.strip() and not ln.strip().startswith("#")
            ]
            files = []
            for f in payload.get("files") or []:
                path, size = f["path"], int(f.get("size") or 0)
                existing = tree.get(path)
                remote_oid = None
                if existing is not None:
                    remote_oid = existing.sha256 if existing.lfs else git_blob_sha1(existing.data)
                name = path.rsplit("/", 1)[-1]
                should_ignore = any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)
                files.append(
                    {
                        "path": path,
                        "uploadMode": "lfs" if self.hub._is_lfs(path, size) else "regular",
                        "shouldIgnore": should_ignore,
                        "oid": remote_oid,
                    }
                )
        self._json(200, {"files": files, "commitOid": oid})

    def _tree_entry(self, path: str, blob: _Blob, commit: _Commit) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        return entry

    @staticmethod
    def _dir_entry(path: str) -> dict[str, Any]:
        return {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "size": 0, "path": path}

    def _visible_tree(self, repo: _Repo, commit: _Commit) -> dict[str, _Blob]:
        key = (repo.repo_type, repo.repo_id)
        return {p: b for p, b in commit.tree.items() if (key, p) not in self.hub._missing}

    def _paths_info(self, body: bytes) -> None:
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            payload = json.loads(body or b"{}")
            paths = payload.get("paths") or []
            paths = [paths] if isinstance(paths, str) else paths
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
        with self.hub._lock:
            repo = self._repo_for_read()
            commit = repo.commits[self._rev_oid(repo, self._rev)]
            tree = self._visible_tree(repo, commit)
            out = []
            for p in paths:
                p = p.strip("/")
                if p in tree:
                    out.append(self._tree_entry(p, tree[p], commit))
                elif p == "" or any(k.startswith(p + "/") for k in tree):
                    out.append(self._dir_entry(p))
        self._json(200, out)

    def _tree(self, body: bytes) -> None:
        recursive = self._qbool("recursive")
        with self.hub._lock:
            repo = self._repo_for_read()
            commit = repo.commits[self._rev_oid(repo, self._rev)]
            tree = self._visible_tree(repo, commit)
            base = self._subpath.strip("/")
            prefix = base + "/" if base else ""
            if base and base in tree:
                raise _HttpError(400, f"{base} is a file, not a directory")
            if base and not any(p.startswith(prefix) for p in tree):
                raise _HttpError(404, f"{base} does not exist on {self._rev}", code="EntryNotFound",
                                 headers={"X-Repo-Commit": commit.oid})
            entries: dict[str, dict[str, Any]] = {}
            for path in sorted(tree):
                if not path.startswith(prefix):
                    continue
                rel_parts = path[len(prefix):].split("/")
                for depth in range(1, len(rel_parts)):
                    d = prefix + "/".join(rel_parts[:depth])
                    if depth == 1 or recursive:
                        entries.setdefault(d, self._dir_entry(d))
                if len(rel_parts) == 1 or recursive:
                    entries[path] = self._tree_entry(path, tree[path], commit)
            out = [entries[k] for k in sorted(entries)]
        self._json(200, out)

    def _commits(self, body: bytes) -> None:
        with self.hub._lock:
            repo = self._repo_for_read()
            oid = self._rev_oid(repo, self._rev)
            out = [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": ""}],
                    "date": c.date,
                    "formatted": {"title": c.title, "message": c.message},
                }
                for c in HubServer._history(repo, oid)
            ]
        self._json(200, out)

    def _refs(self, body: bytes) -> None:
        with self.hub._lock:
            repo = self._repo_for_read()
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.refs.items() if not n.startswith("refs/")
            ]
            prs = [{"name": pr.ref, "ref": pr.ref, "targetCommit": repo.refs[pr.ref]} for pr in repo.prs]
        out = {"branches": branches, "converts": [], "tags": []}
        if self._qbool("include_prs"):
            out["pullRequests"] = prs
        self._json(200, out)

    def _branch_create(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        with self.hub._lock:
            repo = self._repo_for_write()
            name = self._rev or ""
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", name) or name.startswith("refs/"):
                raise _HttpError(400, f"Invalid branch name: {name}")
            if name in repo.refs:
                raise _HttpError(409, "Reference already exists")
            start = payload.get("startingPoint")
            repo.refs[name] = self._rev_oid(repo, start)
        self._json(200, {})

    def _branch_delete(self, body: bytes) -> None:
        with self.hub._lock:
            repo = self._repo_for_write()
            name = self._rev or ""
            if name == "main":
                raise _HttpError(403, "Cannot delete the default branch")
            if name not in repo.refs or name.startswith("refs/"):
                raise _HttpError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
            del repo.refs[name]
        self._json(200, {})

    def _xet_token(self, body: bytes) -> None:
        raise _HttpError(
            501,
            "The lorareg test Hub server does not implement Xet storage: set HF_HUB_DISABLE_XET=1 "
            "(or huggingface_hub.constants.HF_HUB_DISABLE_XET = True) so uploads use plain LFS.",
        )

    # -------------------------------------------------------------- LFS
    def _lfs_batch(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        hub = self.hub
        with hub._lock:
            if payload.get("operation") != "upload":
                repo = self._repo_for_read()
            else:
                repo = self._repo_for_write()
            objects = []
            for obj in payload.get("objects") or []:
                oid, size = obj.get("oid"), obj.get("size")
                if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                    objects.append({"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "Invalid object"}})
                    continue
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if payload.get("operation") == "upload":
                    if oid not in repo.lfs_objects:
                        nonce = secrets.token_hex(16)
                        hub._pending_uploads[nonce] = ((repo.repo_type, repo.repo_id), oid, size)
                        actions: dict[str, Any] = {"upload": {"href": f"{hub.endpoint}/__lfs/{nonce}"}}
                        if hub.lfs_verify:
                            actions["verify"] = {
                                "href": f"{hub.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects/verify"
                            }
                        entry["actions"] = actions
                else:
                    if oid not in repo.lfs_objects:
                        entry["error"] = {"code": 404, "message": "Object does not exist"}
                objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, body: bytes) -> None:
        hub = self.hub
        with hub._lock:
            pending = hub._pending_uploads.get(self._nonce)
            if pending is None:
                raise _HttpError(403, "Unknown or expired upload URL")
            key, oid, size = pending
            if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                raise _HttpError(400, "Uploaded content does not match the announced oid/size")
            repo = hub._repos.get(key)
            if repo is None:
                raise _HttpError(404, "Repository not found", code="RepoNotFound")
            repo.lfs_objects[oid] = body
            del hub._pending_uploads[self._nonce]
        self._send(200, b"", {"ETag": f'"{oid[:32]}"'}, content_type="text/plain")

    def _lfs_verify(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        with self.hub._lock:
            repo = self._repo_for_write()
            data = repo.lfs_objects.get(payload.get("oid"))
            if data is None or len(data) != payload.get("size"):
                raise _HttpError(404, "Object not found or size mismatch")
        self._json(200, {"success": True})

    # -------------------------------------------------------------- commit
    def _commit(self, body: bytes) -> None:
        hub = self.hub
        lines = [json.loads(ln) for ln in body.splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "First line of the commit payload must be the header")
        header = lines[0].get("value") or {}
        title = header.get("summary") or ""
        if not title:
            raise _HttpError(400, "Commit summary is required")
        description = header.get("description") or ""
        parent_commit = header.get("parentCommit")
        create_pr = self._qbool("create_pr")
        with hub._lock:
            repo = self._repo_for_write()
            rev = self._rev or "main"
            if create_pr and rev.startswith("refs/"):
                raise _HttpError(400, "Cannot create a pull request from a pull request ref")
            if rev not in repo.refs and not (rev.startswith("refs/heads/") and rev[11:] in repo.refs):
                raise _HttpError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
            rev = rev[11:] if rev.startswith("refs/heads/") else rev
            head = repo.refs[rev]
            base = head
            if parent_commit:
                parent_oid = HubServer._resolve_rev(repo, parent_commit) if re.fullmatch(r"[0-9a-fA-F]{5,40}", parent_commit) else None
                if create_pr:
                    if parent_oid is None:
                        raise _HttpError(404, f"Invalid parent commit: {parent_commit}", code="RevisionNotFound")
                    base = parent_oid
                elif parent_oid != head:
                    raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[base].tree)
            for item in lines[1:]:
                key, value = item.get("key"), item.get("value") or {}
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _HttpError(400, f"Unsupported encoding for {path}")
                    data = base64.b64decode(value.get("content") or "")
                    tree[path] = _Blob(data, lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    data = repo.lfs_objects.get(oid)
                    if data is None:
                        raise _HttpError(400, f"LFS object {oid} for {path} was not uploaded to this repository")
                    if "size" in value and value["size"] != len(data):
                        raise _HttpError(400, f"Size mismatch for LFS file {path}")
                    tree[path] = _Blob(data, lfs=True)
                elif key == "deletedFile":
                    if path not in tree:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise _HttpError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                    for p in doomed:
                        del tree[p]
                else:
                    raise _HttpError(400, f"Unknown commit operation: {key}")
            commit = hub._new_commit(repo, base, title, description, tree)
            base_url = hub._repo_url(repo)
            pr_url = None
            if create_pr:
                num = max([pr.num for pr in repo.prs], default=0) + 1
                pr = _PullRequest(num=num, title=title, description=description, target_branch=rev)
                repo.prs.append(pr)
                repo.refs[pr.ref] = commit.oid
                pr_url = f"{base_url}/discussions/{num}"
            else:
                repo.refs[rev] = commit.oid
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{base_url}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
        )

    # -------------------------------------------------------------- downloads
    def _resolve(self, body: bytes) -> None:
        with self.hub._lock:
            repo = self._repo_for_read()
            oid = self._rev_oid(repo, self._rev)
            commit = repo.commits[oid]
            path = self._subpath
            blob = self._visible_tree(repo, commit).get(path)
            if blob is None:
                raise _HttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        data = blob.data
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{blob.sha256 if blob.lfs else blob.blob_id}"',
            "Accept-Ranges": "bytes",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        status = 200
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else len(data) - 1
                else:  # suffix range
                    start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
                end = min(end, len(data) - 1)
                if start >= len(data) or start > end:
                    raise _HttpError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data = data[start : end + 1]
                status = 206
        self._send(status, data, headers, content_type="application/octet-stream")


def _parse_front_matter(content: str) -> tuple[dict | None, str | None]:
    """Return (metadata, error) for a model card's YAML block."""
    text = content.lstrip("\ufeff")
    if not text.startswith("---"):
        return None, None
    m = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if m is None:
        m = re.match(r"^---[ \t]*\r?\n---[ \t]*(\r?\n|$)", text)
        if m is None:
            return None, "Unterminated YAML front matter"
        return {}, None
    try:
        import yaml  # optional; only used to validate and expose cardData
    except ImportError:
        return None, None
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError as exc:
        return None, f"Invalid YAML in model card metadata: {exc}"
    if meta is None:
        return {}, None
    if not isinstance(meta, dict):
        return None, "Model card metadata must be a YAML mapping"
    return json.loads(json.dumps(meta, default=str)), None


def url_for(hub: HubServer, repo_id: str, revision: str, path: str) -> str:
    """Resolve URL of a file (handy for raw HTTP tests)."""
    return f"{hub.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"
