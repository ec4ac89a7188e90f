"""The judge stage's own state (its judgment cache and Batch API state) kept in the run
folder, so a driver resubmitted on another machine picks it up.

In a local run folder the state already lives there (`.staging/`). A remote run folder
(s3://, gs://) cannot hold an append log or a state folder that is rewritten in place,
so the judge works on a local copy (under $ASTEER_CACHE, by plan hash) and this mirror
keeps `judge-state/` in the run folder up to date:

- the cache as append-only segments (`judge-state/cache/<seq>-<id>.jsonl`), each the
  lines added since the last push;
- the Batch API state folder file by file (`judge-state/batches/...`), pushed on every
  state write, before the step it records is acted on: the run folder is never behind
  by more than the one step the Batch API resume logic already looks up on the server
  (a file being uploaded, a batch being created).

`pull` (a judge stage starting) brings the run folder's copy down, merged with whatever
the local copy holds that was never pushed; `sync` pushes, cache first, so the pushed
state never claims answers the pushed cache lacks.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ..core import atomic
from .shards import Store

__all__ = ["StateMirror", "REMOTE_DIR"]

REMOTE_DIR = "judge-state"


class StateMirror:
    """One judge stage's local state folder and its copy in a remote run folder."""

    def __init__(self, store: Store, local_dir: str | Path) -> None:
        self.store = store
        self.dir = Path(local_dir)
        self.cache = self.dir / "judge-cache.jsonl"
        #: bytes of the local cache already pushed
        self._pushed_bytes = 0
        #: local state file -> (size, mtime_ns) when last pushed or pulled
        self._pushed: dict[str, tuple[int, int]] = {}
        self._segments = 0

    # -- down -----------------------------------------------------------------------

    def pull(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        infos = sorted(self.store.list_files(REMOTE_DIR), key=lambda i: i.path)
        prefix = f"{self.store.root}/{REMOTE_DIR}/"
        remote_lines: list[bytes] = []
        for info in infos:
            rel = info.path[len(prefix):]
            data = self.store.read_bytes(f"{REMOTE_DIR}/{rel}")
            if rel.startswith("cache/"):
                self._segments += 1
                end = data.rfind(b"\n") + 1
                remote_lines.extend(data[:end].splitlines(keepends=True))
            elif rel.startswith("batches/"):
                dest = self.dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_bytes(dest, data)
                st = dest.stat()
                self._pushed[str(dest)] = (st.st_size, st.st_mtime_ns)
        local = self.cache.read_bytes() if self.cache.exists() else b""
        local_lines = local[: local.rfind(b"\n") + 1].splitlines(keepends=True)
        seen = set(remote_lines)
        only_here = [x for x in local_lines if x not in seen]
        atomic.write_bytes(self.cache, b"".join(remote_lines) + b"".join(only_here))
        self._pushed_bytes = sum(len(x) for x in remote_lines)
        self.sync()  # what only this machine had goes up now

    # -- up -------------------------------------------------------------------------

    def sync(self) -> None:
        self._push_cache()
        batches = self.dir / "batches"
        if not batches.is_dir():
            return
        for root, _, names in os.walk(batches):
            for n in sorted(names):
                if atomic.is_temp(n):
                    continue
                p = Path(root) / n
                st = p.stat()
                key = (st.st_size, st.st_mtime_ns)
                if self._pushed.get(str(p)) == key:
                    continue
                rel = p.relative_to(self.dir).as_posix()
                self.store.write_bytes_atomic(f"{REMOTE_DIR}/{rel}", p.read_bytes())
                self._pushed[str(p)] = key

    def _push_cache(self) -> None:
        if not self.cache.exists():
            return
        with open(self.cache, "rb") as f:
            f.seek(self._pushed_bytes)
            tail = f.read()
        tail = tail[: tail.rfind(b"\n") + 1]  # whole lines only
        if not tail:
            return
        name = f"{REMOTE_DIR}/cache/{self._segments:08d}-{uuid.uuid4().hex[:8]}.jsonl"
        self.store.write_bytes_atomic(name, tail)
        self._segments += 1
        self._pushed_bytes += len(tail)
