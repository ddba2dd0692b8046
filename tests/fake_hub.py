"""A local HTTP server that stands in for the Hugging Face Hub in tests.

It implements exactly what `huggingface_hub.hf_hub_download` needs, and nothing else:

  HEAD/GET /{org}/{name}/resolve/{revision}/{filename}
    200 with `X-Repo-Commit` (40 hex), `ETag` (sha256 of the bytes, quoted) and `Content-Length`;
    404 `X-Error-Code: RepoNotFound` for an unknown repo, `RevisionNotFound` for an unknown
    revision, `EntryNotFound` (with `X-Repo-Commit`, as the Hub sends it, so the client can cache
    the absence) for a missing file; 401/403 `X-Error-Code: GatedRepo` for a gated repo without
    the right `Authorization: Bearer` token.

Every request is recorded (method, decoded path, headers) in `FakeHub.log`, so tests can assert
which files a command downloaded. Not handled: the `/api/...` JSON endpoints, Xet storage,
redirects to a CDN, range requests.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


def fake_commit(repo_id: str, revision: str) -> str:
    """A stable 40-hex "commit hash" for a repo revision."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


@dataclass
class FakeRepo:
    """One served repo: revisions (name -> commit), the folder each commit serves, an optional gate token."""

    repo_id: str
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag name -> commit hash
    folders: dict[str, Path] = field(default_factory=dict)  # commit hash -> folder of files
    token: str | None = None  # gated: requests must carry `Authorization: Bearer <token>`

    def add_revision(self, name: str, folder: Path) -> str:
        """Serve `folder` at branch/tag `name`; returns that revision's commit hash."""
        commit = fake_commit(self.repo_id, name)
        self.revisions[name] = commit
        self.folders[commit] = Path(folder)
        return commit

    def commit_for(self, revision: str) -> str | None:
        if revision in self.revisions:
            return self.revisions[revision]
        return revision if revision in self.folders else None


@dataclass
class Request:
    """One request the fake Hub received."""

    method: str
    path: str  # URL-decoded
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names

    @property
    def filename(self) -> str | None:
        """The repo file asked for (`.../resolve/<rev>/<filename>`), or None."""
        parts = self.path.split("/resolve/", 1)
        if len(parts) != 2 or "/" not in parts[1]:
            return None
        return parts[1].split("/", 1)[1]

    @property
    def revision(self) -> str | None:
        parts = self.path.split("/resolve/", 1)
        return parts[1].split("/", 1)[0] if len(parts) == 2 else None


class FakeHub:
    """A threaded Hub stand-in on 127.0.0.1 with an ephemeral port. Use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ setup

    def add_repo(self, repo_id: str, folder: Path, token: str | None = None) -> FakeRepo:
        """Serve `folder` as `repo_id` at revision "main" (add more with `FakeRepo.add_revision`)."""
        repo = FakeRepo(repo_id, token=token)
        repo.add_revision("main", folder)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it; keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ queries for tests

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def requested(self, method: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if method is None or r.method == method]

    def files_requested(self, method: str | None = None) -> set[str]:
        """Repo filenames asked for (any revision), e.g. {"config.json", "model-00002-of-00004.safetensors"}."""
        return {r.filename for r in self.requested(method) if r.filename is not None}

    # ------------------------------------------------------------------ serving

    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        with self._lock:
            self.log.append(Request(handler.command, path, {k.lower(): v for k, v in handler.headers.items()}))
        head, sep, tail = path.lstrip("/").partition("/resolve/")
        if not sep or "/" not in tail:
            self._error(handler, 404, None, "Not found")
            return
        repo = self.repos.get(head)
        if repo is None:
            self._error(handler, 404, "RepoNotFound", "Repository not found")
            return
        if repo.token is not None:
            auth = handler.headers.get("Authorization")
            if auth is None:
                self._error(handler, 401, "GatedRepo", f"Access to model {repo.repo_id} is restricted")
                return
            if auth != f"Bearer {repo.token}":
                self._error(handler, 403, "GatedRepo", f"Access to model {repo.repo_id} is restricted")
                return
        revision, _, filename = tail.partition("/")
        commit = repo.commit_for(revision)
        if commit is None:
            self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
            return
        file = repo.folders[commit] / filename
        if not filename or ".." in filename.split("/") or not file.is_file():
            self._error(handler, 404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
            return
        data = file.read_bytes()
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", commit)
        handler.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _error(
        handler: BaseHTTPRequestHandler,
        status: int,
        code: str | None,
        message: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        payload = f'{{"error": "{message}"}}'.encode()
        handler.send_response(status)
        if code is not None:
            handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(payload)
