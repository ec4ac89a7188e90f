"""`asteer-build publish RUN --repo ORG/NAME --follow`: publish a run while it builds.

A paper-scale build takes days; waiting for its end before the first byte leaves the
machine turns the upload into one more long step at the end, and a failure late in the
run into no dataset at all. Following the run instead polls its manifest and, as soon as
every shard of a data file's span is labelled (`boundaries`: the span is fixed by the
plan, not by bytes), writes that file into the dataset folder exactly as a publish of the
finished run would and commits it to the Hub, several files per commit. The concepts,
prompts, card and `build.json` depend on the whole run: they go up last, once every
planned shard is labelled.

Resuming is by checksum, never by a local record of what was sent: before a commit the
repo's paths-info says which files it already holds with the same bytes (the LFS sha256,
or the git blob id of a small file), and those are skipped. A follower killed at any point
(mid-upload, between upload and commit, after the commit) and started again uploads each
file once; the Hub's LFS batch answer covers an object uploaded but never committed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...pipeline.shards import MANIFEST, Manifest, open_store
from .assemble import assemble, default_folder
from .boundaries import run_complete
from .hub import check_no_secret, upload_token
from .layout import PublishError, PublishOptions
from .state import RunCache

log = logging.getLogger("asteer_build.publish")

#: files per commit: a few large commits rather than one per file (the Hub limits the
#: rate of commits per repo), small enough that a failed commit costs little to redo
COMMIT_MAX_FILES = 100
#: failed uploads in a row before following gives up (each retried a poll later): a Hub
#: or network blip costs a few polls, not the publish; a lasting fault still surfaces
MAX_FAILURES = 10
#: paths per paths-info request
_PATHS_PER_QUERY = 100
#: written last, so a reader of the repo never sees a card whose counts are not there yet
_LAST = ("README.md", MANIFEST)


@dataclass
class FollowResult:
    folder: str
    repo: str
    #: every planned shard was labelled, and the card and build.json went up too
    complete: bool = False
    dry_run: bool = False
    #: the files ready in the last pass (a dry run: what would be uploaded unless the
    #: repo already holds it), as `PublishResult.files` lists them
    files: list[dict[str, Any]] = field(default_factory=list)
    #: paths this call committed, and paths the repo already held with the same bytes
    uploaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    commits: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "repo": self.repo,
            "follow": True,
            "complete": self.complete,
            "dry_run": self.dry_run,
            "uploaded": self.uploaded,
            "present": self.present,
            "commits": self.commits,
            "bytes": sum(f["bytes"] for f in self.files),
            "files": self.files,
        }


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubRepo:
    """The dataset repo as the follower sees it: which files it holds with which bytes,
    and batched commits of the others."""

    def __init__(
        self, repo_id: str, *, token: str, private: bool, endpoint: str | None = None
    ) -> None:
        from huggingface_hub import HfApi

        self.api = HfApi(endpoint=endpoint, token=token)
        self.repo_id = repo_id
        # private=None without --private: an organisation's private default is kept
        self.api.create_repo(
            repo_id, repo_type="dataset", private=True if private else None, exist_ok=True
        )
        #: path -> sha256 of what the repo is known to hold (checked or committed here)
        self.known: dict[str, str] = {}

    def split(
        self, folder: Path, files: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(files to upload, files the repo already holds with these bytes)."""
        from huggingface_hub.hf_api import RepoFile

        ask = [f for f in files if self.known.get(f["path"]) != f["sha256"]]
        remote: dict[str, Any] = {}
        for i in range(0, len(ask), _PATHS_PER_QUERY):
            paths = [f["path"] for f in ask[i : i + _PATHS_PER_QUERY]]
            for r in self.api.get_paths_info(self.repo_id, paths, repo_type="dataset"):
                if isinstance(r, RepoFile):
                    remote[r.path] = r
        todo, there = [], []
        for f in ask:
            r = remote.get(f["path"])
            if r is not None and self._same(r, folder / f["path"], f):
                self.known[f["path"]] = f["sha256"]
                there.append(f)
            else:
                todo.append(f)
        return todo, there

    @staticmethod
    def _same(remote: Any, local: Path, f: dict[str, Any]) -> bool:
        if remote.size != f["bytes"]:
            return False
        if remote.lfs is not None:
            return remote.lfs.sha256 == f["sha256"]
        return remote.blob_id == _git_blob_id(local.read_bytes())

    def commit(self, folder: Path, files: list[dict[str, Any]], message: str) -> None:
        from huggingface_hub import CommitOperationAdd

        ops = [
            CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(folder / f["path"]))
            for f in files
        ]
        self.api.create_commit(self.repo_id, ops, commit_message=message, repo_type="dataset")
        for f in files:
            self.known[f["path"]] = f["sha256"]


def _upload(
    hub: HubRepo,
    folder: Path,
    files: list[dict[str, Any]],
    token: str | None,
    result: FollowResult,
    on_commit: Callable[[list[str]], None] | None,
) -> int:
    """Commit the files the repo lacks, in batches, card and build.json last; the number
    of files committed."""
    todo, there = hub.split(folder, files)
    result.present += [f["path"] for f in there]
    if not todo:
        return 0
    check_no_secret(folder, token, [f["path"] for f in todo])
    todo.sort(key=lambda f: f["path"] in _LAST)
    for i in range(0, len(todo), COMMIT_MAX_FILES):
        batch = todo[i : i + COMMIT_MAX_FILES]
        paths = [f["path"] for f in batch]
        final = any(p in _LAST for p in paths)
        hub.commit(
            folder,
            batch,
            f"asteer-build publish --follow: {len(batch)} file(s)"
            + (", card and build.json (run complete)" if final else ""),
        )
        result.uploaded += paths
        result.commits += 1
        log.info("committed %d file(s) to %s: %s", len(batch), hub.repo_id, ", ".join(paths))
        if on_commit:
            on_commit(paths)
    return len(todo)


def follow(
    run_uri: str,
    repo: str,
    *,
    opts: PublishOptions | None = None,
    private: bool = False,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
    commit_every_s: float = 300.0,
    stop: threading.Event | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
    on_commit: Callable[[list[str]], None] | None = None,
) -> FollowResult:
    """Publish the run at `run_uri` to the dataset repo `repo` as its shards are labelled,
    until the run is complete (then the card and build.json too), `timeout_s` has passed,
    or `stop` is set; whichever ends it, the files ready by then are committed first.

    For `asteer-build run --publish REPO`, on a thread beside the build: start it once
    the run folder has its build.json, and set `stop` when the build ends without
    completing the run (a finished build completes it by itself). `poll_s`: seconds
    between reads of the manifest; `commit_every_s`: the least time between two commits
    (ready files wait for the next one; the final commit never waits). `dry_run`: one
    pass, no token, no network: `files` lists what is ready to upload. The token comes
    from `HF_TOKEN` (or the login cache), checked before anything else."""
    token = upload_token(repo, dry_run=dry_run)
    opts = opts or PublishOptions()
    folder = Path(opts.folder or default_folder(repo, run_uri))
    store = open_store(run_uri)
    if Manifest.load(store) is None:
        raise FileNotFoundError(f"{store.uri}: not a run folder (no {MANIFEST})")
    result = FollowResult(str(folder.resolve()), repo, dry_run=dry_run)
    hub = None
    if not dry_run:
        assert token is not None
        hub = HubRepo(repo, token=token, private=private, endpoint=endpoint)
    cache = RunCache()
    stop = stop or threading.Event()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_commit, failures = -math.inf, 0
    while True:
        last = stop.is_set() or (deadline is not None and time.monotonic() >= deadline)
        manifest = Manifest.load(store)
        assert manifest is not None  # a run folder's build.json is never removed
        complete = run_complete(manifest)
        res = assemble(run_uri, str(folder), repo=repo, opts=opts, ready_only=not complete,
                       manifest=manifest, cache=cache)
        result.files = res.files
        if hub is None:
            result.complete = complete
            return result
        if complete or last or time.monotonic() - last_commit >= commit_every_s:
            try:
                if _upload(hub, folder, res.files, token, result, on_commit):
                    last_commit = time.monotonic()
                failures = 0
            except PublishError:
                raise
            except Exception as e:  # the Hub or the network: the next poll tries again
                failures += 1
                if last or failures >= MAX_FAILURES:
                    raise
                log.warning("upload to %s failed (%s: %s); trying again in %.0fs (%d/%d)",
                            repo, type(e).__name__, (str(e).splitlines() or [""])[0][:300], poll_s,
                            failures, MAX_FAILURES)
                stop.wait(poll_s)
                continue
        if complete:
            result.complete = True
            return result
        if last:
            return result
        left = math.inf if deadline is None else deadline - time.monotonic()
        stop.wait(max(0.0, min(poll_s, left)))
