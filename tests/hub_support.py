"""Loopback stand-ins for the Hugging Face Hub, shared by the upload tests.

`loopback_hub()`: records every request; repo creation and YAML validation succeed, the
rest answer 404 (so an upload is seen starting, against the right repo, with the right
token, and nothing more).

`accepting_hub()`: a Hub that takes uploads, in memory: the subset of the HTTP API that
`huggingface_hub`'s `create_commit` / `upload_folder` and `get_paths_info` use, with the
JSON shapes of the installed client (`_commit_api.py`, `lfs.py`, `hf_api.py`): repo
creation, YAML validation, preupload (upload mode and remote oid per file), the LFS batch
endpoint with the basic transfer, the upload PUT, the NDJSON commit, paths-info and repo
info. Clients must run with Xet off (`HF_HUB_DISABLE_XET=1`, or
`huggingface_hub.constants.HF_HUB_DISABLE_XET = True` in process): Xet transfers are not
served. It counts what reached it, so a test can tell a file that was sent twice from one
that was sent once: LFS uploads per object, commits that wrote each path. Closing
`commits_open` holds (then drops) commits: an upload killed after its LFS PUTs and before
the Hub took its commit; `fail_commits` fails the next ones (an outage).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field


class RecordingHub(http.server.BaseHTTPRequestHandler):
    log: list[dict] = []

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        self.log.append({"method": self.command, "path": self.path,
                         "auth": self.headers.get("Authorization"), "body": body})
        if self.command == "POST" and self.path == "/api/repos/create":
            out = json.dumps({"url": f"http://{self.headers['Host']}/datasets/asteer-org/x",
                              "name": "asteer-org/x"}).encode()
            self.send_response(200)
        elif self.path == "/api/validate-yaml":
            out = b'{"errors": [], "warnings": []}'
            self.send_response(200)
        else:
            out = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def loopback_hub() -> Iterator[tuple[str, list[dict]]]:
    """(endpoint URL, the request log) of a fresh stand-in Hub on 127.0.0.1."""
    log: list[dict] = []
    handler = type("Hub", (RecordingHub,), {"log": log})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", log
    finally:
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------ a Hub that accepts


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: str | None  # the LFS object's sha256, None for a regular (in-git) file


@dataclass
class LoopbackHub:
    """State of an accepting stand-in Hub; `endpoint` is its URL."""

    endpoint: str = ""
    #: every request: method, path, Authorization header, body size
    log: list[dict] = field(default_factory=list)
    #: repo id -> path -> file, as the last commit left it
    repos: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    #: LFS objects received (committed or not), by sha256
    objects: dict[str, bytes] = field(default_factory=dict)
    #: completed LFS upload PUTs per object sha256
    puts: Counter = field(default_factory=Counter)
    #: repo id -> path -> commits that wrote it
    writes: dict[str, Counter] = field(default_factory=dict)
    #: repo id -> commits, oldest first: {"oid", "summary", "paths"}
    commits: dict[str, list[dict]] = field(default_factory=dict)
    #: cleared: a commit that arrives is held until it is set again and then dropped,
    #: never applied (its sender was killed after uploading, before the Hub took it)
    commits_open: threading.Event = field(default_factory=threading.Event)
    #: commits held so far
    held: int = 0
    #: this many next commits fail with a 500, after their LFS uploads (a Hub outage)
    fail_commits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.commits_open.set()

    def files(self, repo: str) -> dict[str, bytes]:
        with self.lock:
            return {p: f.data for p, f in sorted(self.repos.get(repo, {}).items())}

    def uploads(self, repo: str) -> Counter:
        """path -> times its current bytes reached the Hub: LFS PUTs of its object, or the
        commits that carried a regular file's content."""
        with self.lock:
            out: Counter = Counter()
            for p, f in self.repos.get(repo, {}).items():
                out[p] = self.puts[f.lfs] if f.lfs else self.writes[repo][p]
            return out


_REPO_API = re.compile(r"^/api/datasets/([^/]+/[^/]+)/(preupload|paths-info|commit)/([^/?]+)$")
_REPO_INFO = re.compile(r"^/api/datasets/([^/]+/[^/]+)(?:/revision/[^/?]+)?$")
_LFS_BATCH = re.compile(r"^/datasets/([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/lfs-objects/([0-9a-f]{64})$")
#: what the Hub stores in LFS whatever the size (its default .gitattributes)
_LFS_SUFFIXES = (".parquet", ".safetensors", ".arrow", ".bin", ".npz")


class AcceptingHub(http.server.BaseHTTPRequestHandler):
    hub: LoopbackHub

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, obj: object, error_code: str | None = None) -> None:
        out = json.dumps(obj).encode()
        try:
            self.send_response(status)
            if error_code:
                self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a client killed mid-request (a held commit's sender)

    def _handle(self) -> None:
        body = self._body()
        path = urllib.parse.urlsplit(self.path).path
        hub = self.hub
        with hub.lock:
            hub.log.append({"method": self.command, "path": self.path,
                            "auth": self.headers.get("Authorization"), "bytes": len(body)})
        base = f"http://{self.headers['Host']}"
        if self.command == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body), base)
        if self.command == "POST" and path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if self.command == "PUT" and (m := _LFS_PUT.match(path)):
            return self._put(m.group(1), body)
        if self.command == "POST" and (m := _LFS_BATCH.match(path)):
            return self._lfs_batch(m.group(1), json.loads(body), base)
        if self.command == "POST" and (m := _REPO_API.match(path)):
            repo, what = m.group(1), m.group(2)
            if repo not in hub.repos:
                return self._send(404, {"error": "Repository not found"}, "RepoNotFound")
            if what == "preupload":
                return self._preupload(repo, json.loads(body))
            if what == "paths-info":
                return self._paths_info(repo, urllib.parse.parse_qs(body.decode()))
            return self._commit(repo, body, base)
        if self.command == "GET" and (m := _REPO_INFO.match(path)) and m.group(1) in hub.repos:
            return self._repo_info(m.group(1))
        return self._send(404, {"error": "Repository not found"}, "RepoNotFound")

    do_GET = do_POST = do_PUT = _handle

    def _create(self, req: dict, base: str) -> None:
        repo = f"{req['organization']}/{req['name']}"
        url = f"{base}/datasets/{repo}"
        with self.hub.lock:
            if repo in self.hub.repos:
                return self._send(409, {"error": "You already created this dataset repo",
                                        "url": url})
            self.hub.repos[repo] = {}
            self.hub.writes[repo] = Counter()
            self.hub.commits[repo] = []
        self._send(200, {"url": url, "name": repo})

    def _preupload(self, repo: str, req: dict) -> None:
        out = []
        with self.hub.lock:
            stored = self.hub.repos[repo]
            for f in req["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = (f["path"].endswith(_LFS_SUFFIXES) or f["size"] > 10 << 20
                       or b"\0" in sample)
                old = stored.get(f["path"])
                oid = None if old is None else (old.lfs or git_blob_id(old.data))
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": out, "commitOid": None})

    def _lfs_batch(self, repo: str, req: dict, base: str) -> None:
        objects = []
        with self.hub.lock:
            if repo not in self.hub.repos:
                return self._send(404, {"error": "Repository not found"}, "RepoNotFound")
            for o in req["objects"]:
                entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in self.hub.objects:  # already there: no actions, no PUT
                    entry["actions"] = {"upload": {"href": f"{base}/lfs-objects/{o['oid']}"}}
                objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._send(400, {"error": "content does not match its oid"})
        with self.hub.lock:
            self.hub.objects[oid] = body
            self.hub.puts[oid] += 1
        self._send(200, {})

    def _commit(self, repo: str, body: bytes, base: str) -> None:
        if not self.hub.commits_open.is_set():
            with self.hub.lock:
                self.hub.held += 1
            self.hub.commits_open.wait()
            return self._send(503, {"error": "commit dropped"})
        with self.hub.lock:
            fail, self.hub.fail_commits = self.hub.fail_commits > 0, self.hub.fail_commits - 1
        if fail:
            return self._send(500, {"error": "Internal Error"})
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        with self.hub.lock:
            files = dict(self.hub.repos[repo])
            paths = []
            header = {}
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "header":
                    header = v
                elif key == "file":
                    files[v["path"]] = StoredFile(base64.b64decode(v["content"]), None)
                    paths.append(v["path"])
                elif key == "lfsFile":
                    if v["oid"] not in self.hub.objects:
                        return self._send(422, {"error": f"{v['path']}: LFS object "
                                                f"{v['oid']} was never uploaded"})
                    files[v["path"]] = StoredFile(self.hub.objects[v["oid"]], v["oid"])
                    paths.append(v["path"])
                elif key == "deletedFile":
                    files.pop(v["path"], None)
                else:
                    return self._send(400, {"error": f"unsupported commit operation {key}"})
            oid = hashlib.sha1(body + str(len(self.hub.commits[repo])).encode()).hexdigest()
            self.hub.repos[repo] = files
            self.hub.writes[repo].update(paths)
            self.hub.commits[repo].append(
                {"oid": oid, "summary": header.get("summary"), "paths": paths})
        self._send(200, {"commitUrl": f"{base}/datasets/{repo}/commit/{oid}",
                         "commitOid": oid, "pullRequestUrl": None})

    def _paths_info(self, repo: str, form: dict[str, list[str]]) -> None:
        out = []
        with self.hub.lock:
            stored = self.hub.repos[repo]
            for p in form.get("paths", []):
                f = stored.get(p)
                if f is not None:
                    entry = {"type": "file", "path": p, "size": len(f.data),
                             "oid": git_blob_id(f.data if f.lfs is None else f.lfs.encode())}
                    if f.lfs:
                        entry["lfs"] = {"oid": f.lfs, "size": len(f.data), "pointerSize": 134}
                    out.append(entry)
                elif any(q.startswith(p.rstrip("/") + "/") for q in stored):
                    out.append({"type": "directory", "path": p,
                                "oid": hashlib.sha1(p.encode()).hexdigest()})
        self._send(200, out)

    def _repo_info(self, repo: str) -> None:
        with self.hub.lock:
            commits = self.hub.commits[repo]
            sha = commits[-1]["oid"] if commits else "0" * 40
            siblings = [{"rfilename": p} for p in sorted(self.hub.repos[repo])]
        self._send(200, {"id": repo, "sha": sha, "private": False, "siblings": siblings})

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def accepting_hub() -> Iterator[LoopbackHub]:
    """A fresh accepting stand-in Hub on 127.0.0.1, its state readable while it runs."""
    hub = LoopbackHub()
    handler = type("Hub", (AcceptingHub,), {"hub": hub})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hub.endpoint = f"http://127.0.0.1:{srv.server_port}"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield hub
    finally:
        srv.shutdown()
        srv.server_close()
