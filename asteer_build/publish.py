"""`asteer-build publish`: turn a run folder into a Hugging Face dataset repository.

The run folder is organised for building (one small file per shard and stage, a manifest
that is rewritten after every commit); the Hub wants the opposite: a few hundred MB per
Parquet file, row groups the dataset viewer can page through, a card that declares every
config, and bytes that do not change when nothing changed. This module bridges the two:

    RUN_DIR (build.json + shards)  ──assemble──>  FOLDER  ──one call──>  Hub dataset repo

Folder layout (each config one folder; `train/` reads `<config>/**/*.parquet`)::

    README.md                         dataset card (YAML: configs, features, counts)
    build.json                        config, hashes, software, shard manifest, file list
    rollouts/train-00000.parquet      labelled rollouts (the default config)
    features/train-00000.parquet
    activations/<model>/train-00000.parquet   Array3D float16 columns (optional config)
    concepts/train-00000.parquet      concept_id, concept, concept_level, partition
    prompts/train-00000.parquet       prompt_id, prompt, source
    vectors/<model>/<method>.safetensors, vectors/<model>/index.json

Why it is idempotent and resumable: which input shard rows go to which output file is
decided from the manifest alone (shard sizes and checksums), before any data is read, so
the same run always plans the same files. Every output file has a key (a hash of its
input checksums, row ranges and writer settings); a file whose key and sha256 match the
folder's state file is skipped, any other is written under a dot-prefixed temp name and
renamed. Parquet is written with fixed settings and no timestamps, rows in plan order
(model, method, concept, prompt, alpha, sample, as the shards hold them), so publishing
the same run twice produces identical bytes, and a killed publish picks up where it died.

Activations of models with different hidden sizes cannot share one Array3D declaration,
so they get one config per model (`activations-<model>`) when shapes differ, and a single
`activations` config when all models agree (always the case for one model).

The Hub token is read only inside `hub_upload` (from `HF_TOKEN` or the login cache) and
is never written, logged or put in `build.json`; every file is scanned for it before the
upload as a last guard.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import atomic
from .shards import MANIFEST, Manifest, Store, open_store, software_versions

__all__ = [
    "PUBLISH_FORMAT",
    "CONFIGS",
    "DEFAULT_CONFIGS",
    "ROLLOUTS_SCHEMA",
    "PublishOptions",
    "PublishResult",
    "PublishError",
    "publish",
    "assemble",
    "hub_upload",
    "partition_concepts",
    "add_publish_command",
    "resolve_dataset",
]

log = logging.getLogger("asteer_build.publish")

#: bump when the folder layout or Parquet writing changes: invalidates every file key
PUBLISH_FORMAT = 1
CONFIGS = ("rollouts", "features", "activations", "concepts", "prompts", "vectors")
#: activations can be hundreds of GB: published only when asked for
DEFAULT_CONFIGS = ("rollouts", "features", "concepts", "prompts", "vectors")
STATE_FILE = ".asteer-publish.json"
SPLIT = "train"
#: what the Hub upload skips: the state file and temp files of an interrupted publish
UPLOAD_IGNORE = [".*", "**/.*"]
UNSEEN_FRACTION = 0.2
PARTITION_SEED = 42

# The rollouts contract (ARCHITECTURE.md) plus the judge's `judge_error`, which says why
# a failed row has no label; a test keeps it in step with asteer_build.work.ROLLOUT_SCHEMA.
ROLLOUTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("concept_id", pa.string()),
        ("concept", pa.string()),
        ("concept_level", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("layer", pa.int32()),
        ("alpha", pa.float64()),
        ("vector_norm", pa.float32()),
        ("seed", pa.int64()),
        ("response", pa.string()),
        ("response_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("label", pa.int8()),
        ("judge_model", pa.string()),
        ("judge_status", pa.string()),
        ("judge_explanation", pa.string()),
        ("judge_error", pa.string()),
    ]
)
CONCEPTS_SCHEMA = pa.schema(
    [
        ("concept_id", pa.string()),
        ("concept", pa.string()),
        ("concept_level", pa.string()),
        ("partition", pa.string()),
    ]
)
PROMPTS_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("prompt", pa.string()), ("source", pa.string())]
)
_ACT_ORDER = ("steered", "replay", "steered_pre")
_SECRET_KEYS = re.compile(r"(token|secret|password|api_key)$", re.I)


class PublishError(ValueError):
    """The run folder cannot be published as asked; the message says why."""


@dataclass
class PublishOptions:
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    #: configs were asked for by name: a missing stage is an error, not a silent skip
    #: (by default a run built without capture simply publishes no `features`)
    explicit: bool = False
    folder: str | None = None
    #: output Parquet size target, estimated from the input shards' compressed bytes
    target_file_bytes: int = 256 << 20
    #: uncompressed bytes per row group (the dataset viewer pages by row group)
    row_group_bytes: int = 100 << 20
    row_group_max_rows: int = 100_000
    unseen_fraction: float = UNSEEN_FRACTION
    partition_seed: int = PARTITION_SEED
    #: called with each file's folder path right after it is committed (tests interrupt
    #: a publish from here; a progress bar could hook in too)
    on_file: Callable[[str], None] | None = None


@dataclass
class PublishResult:
    folder: str
    repo: str | None
    files: list[dict[str, Any]]
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    uploaded: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "repo": self.repo,
            "uploaded": self.uploaded,
            "counts": self.counts,
            "written": len(self.written),
            "skipped": len(self.skipped),
            "removed": self.removed,
            "bytes": sum(f["bytes"] for f in self.files),
            "files": self.files,
        }


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Slice:
    """Rows [start, stop) of one committed input shard file."""

    shard: str
    path: str
    sha256: str
    start: int
    stop: int


@dataclass
class _OutFile:
    path: str  # relative to the folder
    config: str
    slices: list[_Slice]
    key: str = ""


def _entries(manifest: Manifest, stage: str) -> list[tuple[str, dict[str, Any]]]:
    return sorted(manifest.entries(stage).items())


def _rollout_inputs(manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    """Labelled shard where the judge has run, the unlabelled one otherwise (published
    with judge_status `pending`): a partly judged run still publishes every rollout."""
    labelled = manifest.entries("labelled")
    return [(name, labelled.get(name, e)) for name, e in _entries(manifest, "rollouts")]


def _pack(inputs: list[tuple[str, dict[str, Any]]], target: int) -> list[list[_Slice]]:
    """Consecutive shards into files of about `target` compressed bytes; a shard larger
    than the target is cut into equal row ranges. Uses manifest numbers only, so the
    packing is known (and stable) before any data is read."""
    files: list[list[_Slice]] = []
    cur: list[_Slice] = []
    cur_bytes = 0
    for name, e in inputs:
        rows, size = int(e["rows"]), max(int(e["bytes"]), 1)
        if rows == 0:
            continue
        parts = max(1, math.ceil(size / target))
        bounds = [round(i * rows / parts) for i in range(parts + 1)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            if b <= a:
                continue
            b_bytes = size * (b - a) / rows
            if cur and cur_bytes + b_bytes > target:
                files.append(cur)
                cur, cur_bytes = [], 0
            cur.append(_Slice(name, e["path"], e["sha256"], a, b))
            cur_bytes += b_bytes
    if cur:
        files.append(cur)
    return files


def _file_key(out: _OutFile, extra: Any) -> str:
    blob = json.dumps(
        {
            "format": PUBLISH_FORMAT,
            "path": out.path,
            "extra": extra,
            "slices": [(s.path, s.sha256, s.start, s.stop) for s in out.slices],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# -------------------------------------------------------------------------- state, io


class _State:
    """`.asteer-publish.json` in the folder: key and checksum of every finished file."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STATE_FILE
        try:
            self.files: dict[str, dict[str, Any]] = json.loads(self.path.read_text())["files"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            self.files = {}

    def done(self, rel: str, key: str, folder: Path) -> dict[str, Any] | None:
        """The recorded entry if the file is there with this key and its bytes check out."""
        e = self.files.get(rel)
        p = folder / rel
        if e is None or e.get("key") != key or not p.is_file():
            return None
        if p.stat().st_size != e["bytes"] or _sha256_file(p) != e["sha256"]:
            return None
        return e

    def record(self, rel: str, entry: dict[str, Any]) -> None:
        self.files[rel] = entry
        self.save()

    def forget(self, rel: str) -> None:
        if self.files.pop(rel, None) is not None:
            self.save()

    def save(self) -> None:
        atomic.write_bytes(
            self.path,
            json.dumps(
                {"format": PUBLISH_FORMAT, "files": self.files}, indent=1, sort_keys=True
            ).encode(),
        )


def _sha256_file(p: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------- parquet out


def _hf_metadata(schema: pa.Schema, features: Any | None) -> pa.Schema:
    """Embed the `datasets` features so `load_dataset("parquet", data_files=...)` gets
    the declared types even without the card (e.g. Array3D for activations)."""
    if features is None:
        return schema.remove_metadata()
    meta = {"huggingface": json.dumps({"info": {"features": features.to_dict()}}, sort_keys=True)}
    return schema.remove_metadata().with_metadata(meta)


class _ParquetOut:
    """Writes one output file in fixed-size row groups regardless of input boundaries."""

    def __init__(self, dest: Path, schema: pa.Schema, rows_per_group: int) -> None:
        self.dest = dest
        self.tmp = atomic.temp_path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_group = max(1, rows_per_group)
        self.writer = pq.ParquetWriter(
            str(self.tmp),
            schema,
            compression="zstd",
            compression_level=3,
            use_dictionary=True,
            write_statistics=True,
            store_schema=True,
        )
        self.buf: list[pa.Table] = []
        self.buffered = 0
        self.rows = 0
        self.nbytes = 0

    def add(self, table: pa.Table) -> None:
        self.buf.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self.buf)
        head, rest = t.slice(0, n), t.slice(n)
        head = head.combine_chunks()
        self.writer.write_table(head, row_group_size=n)
        self.rows += head.num_rows
        self.nbytes += head.nbytes
        self.buf = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows

    def close(self) -> tuple[int, int]:
        if self.buffered:
            self._flush(self.buffered)
        self.writer.close()
        atomic.commit(self.tmp, self.dest)
        return self.rows, self.nbytes

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns of `schema` in its order and types; a column the shard lacks (e.g. the
    judge columns of a not yet labelled shard, or features of an offset another model
    dropped) becomes nulls."""
    cols = []
    for f in schema:
        if f.name in t.column_names:
            col = t.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _rows_per_group(schema: pa.Schema, sample: pa.Table, opts: PublishOptions) -> int:
    per_row = max(1.0, sample.nbytes / max(sample.num_rows, 1))
    return int(max(1, min(opts.row_group_max_rows, opts.row_group_bytes // per_row)))


# ---------------------------------------------------------------------- the assembly


@dataclass
class _RunInfo:
    store: Store
    manifest: Manifest
    shard_model: dict[str, str]
    concepts: pa.Table
    prompts: pa.Table


def _scan_rollouts(store: Store, manifest: Manifest, opts: PublishOptions) -> _RunInfo:
    """One pass over the small key columns of every rollouts shard: which model each shard
    holds (activations rows carry only an id), and the concepts and prompts in the data."""
    shard_model: dict[str, str] = {}
    concepts: dict[str, tuple[str, str]] = {}
    prompts: dict[str, str] = {}
    cols = ["model", "concept_id", "concept", "concept_level", "prompt_id", "prompt"]
    for name, e in _rollout_inputs(manifest):
        t = pq.read_table(store.path(e["path"]), columns=cols, filesystem=store.fs)
        if t.num_rows == 0:
            continue
        shard_model[name] = t.column("model")[0].as_py()
        u = t.group_by(["concept_id", "concept", "concept_level"]).aggregate([])
        for cid, c, lvl in zip(
            *(u.column(k).to_pylist() for k in ("concept_id", "concept", "concept_level")),
            strict=True,
        ):
            concepts[cid] = (c, lvl)
        u = t.group_by(["prompt_id", "prompt"]).aggregate([])
        prompts.update(
            zip(u.column("prompt_id").to_pylist(), u.column("prompt").to_pylist(), strict=True)
        )
    sources = _prompt_sources(manifest.data.get("config", {}))
    ids = sorted(concepts)
    unseen = set(
        partition_concepts(
            {c: concepts[c][1] for c in ids}, opts.unseen_fraction, opts.partition_seed
        )
    )
    ctab = pa.table(
        {
            "concept_id": ids,
            "concept": [concepts[c][0] for c in ids],
            "concept_level": [concepts[c][1] for c in ids],
            "partition": ["ood" if c in unseen else "id" for c in ids],
        },
        schema=CONCEPTS_SCHEMA,
    )
    pids = sorted(prompts)
    ptab = pa.table(
        {
            "prompt_id": pids,
            "prompt": [prompts[p] for p in pids],
            "source": [sources.get(p) for p in pids],
        },
        schema=PROMPTS_SCHEMA,
    )
    return _RunInfo(store, manifest, shard_model, ctab, ptab)


def _prompt_sources(config: dict[str, Any]) -> dict[str, str]:
    """Where each prompt came from, if the build's prompt source can still be read here
    (relative file paths may not resolve outside the build machine: then unknown)."""
    try:
        from .sources import load_prompts

        return {p.prompt_id: p.source for p in load_prompts(config.get("prompts"))}
    except Exception:  # a missing file only costs the `source` column its values
        return {}


def partition_concepts(
    levels: dict[str, str], unseen_fraction: float = UNSEEN_FRACTION, seed: int = PARTITION_SEED
) -> list[str]:
    """Unseen concept ids: per level, a seeded draw of `unseen_fraction` (at least one
    per level of two or more, never all of a level).

    The same draw as `train.splits.partition_concepts`' default, so a trainer that uses
    the published `partition` column and one that draws its own split agree (a test
    holds the two together); reimplemented so publishing does not need pandas.
    """
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    by_level: dict[str, list[str]] = {}
    for cid, lvl in levels.items():
        by_level.setdefault(str(lvl), []).append(str(cid))
    for lvl in sorted(by_level):
        members = sorted(by_level[lvl])
        n = int(round(unseen_fraction * len(members)))
        if unseen_fraction > 0 and len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        chosen += rng.permutation(members)[:n].tolist()
    return sorted(chosen)


def _read_slice(store: Store, s: _Slice) -> pa.Table:
    t = pq.read_table(store.path(s.path), filesystem=store.fs)
    if s.start or s.stop != t.num_rows:
        t = t.slice(s.start, s.stop - s.start)
    return t


def _first_schema(store: Store, inputs: Iterable[tuple[str, dict[str, Any]]]) -> list[pa.Schema]:
    return [pq.read_schema(store.path(e["path"]), filesystem=store.fs) for _, e in inputs]


def _features_schema(
    store: Store, inputs: list[tuple[str, dict[str, Any]]], shard_model: dict[str, str]
) -> pa.Schema:
    """Union of the feature columns over models (their kept layer offsets may differ);
    one footer read per model."""
    first: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, e in inputs:
        first.setdefault(shard_model.get(name, "?"), (name, e))
    schemas = _first_schema(store, [first[m] for m in sorted(first)])
    names: list[str] = []
    types: dict[str, pa.DataType] = {}
    for s in schemas:
        for f in s:
            if f.name not in types:
                names.append(f.name)
                types[f.name] = f.type
    return pa.schema([(n, types[n]) for n in names])


def _activation_shape(t: pa.DataType) -> tuple[tuple[int, ...], pa.DataType]:
    shape = []
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    return tuple(shape), t


def _activations_layout(
    store: Store, inputs: list[tuple[str, dict[str, Any]]], shard_model: dict[str, str]
) -> dict[str, dict[str, tuple[int, ...]]]:
    """{model: {array column: shape}} from one footer per model."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, e in inputs:
        m = shard_model.get(name)
        if m is None:
            raise PublishError(f"activations/{name}: no rollouts shard to tell its model")
        if m in out:
            continue
        schema = pq.read_schema(store.path(e["path"]), filesystem=store.fs)
        cols = {}
        for f in schema:
            if f.name == "id":
                continue
            shape, leaf = _activation_shape(f.type)
            if len(shape) != 3:
                raise PublishError(
                    f"{e['path']}: column {f.name!r} is not a fixed-shape "
                    f"[positions, layers, hidden] array ({f.type})"
                )
            cols[f.name] = shape
        out[m] = dict(
            sorted(
                cols.items(),
                key=lambda kv: (
                    _ACT_ORDER.index(kv[0]) if kv[0] in _ACT_ORDER else len(_ACT_ORDER),
                    kv[0],
                ),
            )
        )
    return out


def _activations_features(shapes: dict[str, tuple[int, ...]]) -> Any:
    import datasets

    feats: dict[str, Any] = {"id": datasets.Value("string")}
    for col, shape in shapes.items():
        feats[col] = datasets.Array3D(shape=shape, dtype="float16")
    return datasets.Features(feats)


def _activation_schema(shapes: dict[str, tuple[int, ...]]) -> pa.Schema:
    fields = [("id", pa.string())]
    for col, (t, k, h) in shapes.items():
        fields.append((col, pa.list_(pa.list_(pa.list_(pa.float16(), h), k), t)))
    return pa.schema(fields)


@dataclass
class _ConfigPlan:
    name: str  # config name in the card
    folder: str  # data folder, relative
    schema: pa.Schema
    features: Any
    files: list[_OutFile]
    table: pa.Table | None = None  # small configs built in memory


def _features_of(schema: pa.Schema) -> Any:
    import datasets

    return datasets.Features.from_arrow_schema(schema.remove_metadata())


def _plan(info: _RunInfo, configs: tuple[str, ...], opts: PublishOptions) -> list[_ConfigPlan]:
    m, store = info.manifest, info.store
    plans: list[_ConfigPlan] = []

    def files_for(folder: str, config: str, inputs) -> list[_OutFile]:
        return [
            _OutFile(f"{folder}/{SPLIT}-{i:05d}.parquet", config, sl)
            for i, sl in enumerate(_pack(inputs, opts.target_file_bytes))
        ]

    def same_name_plan(name: str, schema, inputs) -> _ConfigPlan:
        """A config whose folder is its name and whose features follow its schema."""
        return _ConfigPlan(name, name, schema, _features_of(schema), files_for(name, name, inputs))

    if "rollouts" in configs:
        inputs = _rollout_inputs(m)
        if not inputs:
            raise PublishError(f"{store.uri}: no committed rollouts shards to publish")
        plans.append(same_name_plan("rollouts", ROLLOUTS_SCHEMA, inputs))
    if "features" in configs and (opts.explicit or _entries(m, "features")):
        inputs = _entries(m, "features")
        if not inputs:
            raise PublishError(
                f"{store.uri}: --configs asks for features, but the run has "
                "no committed features shards (was capture on?)"
            )
        schema = _features_schema(store, inputs, info.shard_model)
        plans.append(same_name_plan("features", schema, inputs))
    if "activations" in configs and (opts.explicit or _entries(m, "activations")):
        inputs = _entries(m, "activations")
        if not inputs:
            raise PublishError(
                f"{store.uri}: --configs asks for activations, but the run "
                "has no committed activations shards (capture.activations)"
            )
        layout = _activations_layout(store, inputs, info.shard_model)
        one = len({json.dumps(v) for v in layout.values()}) == 1
        for model in sorted(layout):
            mine = [(n, e) for n, e in inputs if info.shard_model.get(n) == model]
            name = "activations" if one else f"activations-{model}"
            folder = f"activations/{model}"
            plans.append(
                _ConfigPlan(
                    name,
                    "activations" if one else folder,
                    _activation_schema(layout[model]),
                    _activations_features(layout[model]),
                    files_for(folder, name, mine),
                )
            )
    for name, table in (("concepts", info.concepts), ("prompts", info.prompts)):
        if name in configs:
            plans.append(
                _ConfigPlan(
                    name,
                    name,
                    table.schema,
                    _features_of(table.schema),
                    [_OutFile(f"{name}/{SPLIT}-00000.parquet", name, [])],
                    table,
                )
            )
    return plans


def _write_file(
    info: _RunInfo, cp: _ConfigPlan, out: _OutFile, folder: Path, opts: PublishOptions
) -> tuple[int, int]:
    schema = _hf_metadata(cp.schema, cp.features)
    dest = folder / out.path
    if cp.table is not None:
        t = _conform(cp.table, schema)
        w = _ParquetOut(dest, schema, _rows_per_group(schema, t, opts))
        try:
            w.add(t)
            return w.close()
        except BaseException:
            w.abort()
            raise
    w: _ParquetOut | None = None
    try:
        for s in out.slices:
            t = _conform(_read_slice(info.store, s), schema)
            if w is None:
                w = _ParquetOut(dest, schema, _rows_per_group(schema, t, opts))
            w.add(t)
        if w is None:
            raise PublishError(f"{out.path}: planned with no rows")
        return w.close()
    except BaseException:
        if w is not None:
            w.abort()
        raise


def _copy_vectors(
    info: _RunInfo, folder: Path, state: _State, opts: PublishOptions
) -> tuple[list[str], list[str], list[str]]:
    """Vector files as the vectors stage committed them, checked against the manifest."""
    planned, written, skipped = [], [], []
    for model, e in _entries(info.manifest, "vectors"):
        parts = e.get("parts") or {}
        if not parts:
            raise PublishError(f"build.json: vectors entry {model!r} lists no files")
        for rel, sha in sorted(parts.items()):
            planned.append(rel)
            key = hashlib.sha256(f"{PUBLISH_FORMAT}|{rel}|{sha}".encode()).hexdigest()
            if state.done(rel, key, folder):
                skipped.append(rel)
                continue
            data = info.store.read_bytes(rel)
            if hashlib.sha256(data).hexdigest() != sha:
                raise PublishError(f"{rel}: contents do not match build.json's checksum")
            atomic.write_bytes(folder / rel, data)
            state.record(
                rel,
                {
                    "key": key,
                    "sha256": sha,
                    "bytes": len(data),
                    "rows": None,
                    "nbytes": len(data),
                    "config": "vectors",
                },
            )
            written.append(rel)
            if opts.on_file:
                opts.on_file(rel)
    return planned, written, skipped


# ------------------------------------------------------------- build.json and the card


def _scrub(obj: Any) -> Any:
    """Drop anything that looks like a credential from the published config. The build
    config names environment variables (`api_key_env`) rather than holding keys, but a
    hand-edited manifest should not be able to leak one to the Hub."""
    if isinstance(obj, dict):
        return {
            k: _scrub(v)
            for k, v in obj.items()
            if not (_SECRET_KEYS.search(str(k)) and not str(k).endswith("_env"))
        }
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _build_json(
    info: _RunInfo, files: list[dict[str, Any]], configs: list[str], opts: PublishOptions
) -> bytes:
    d = info.manifest.data
    stages = {}
    for stage, ents in sorted(d.get("stages", {}).items()):
        stages[stage] = {
            n: {
                k: e[k]
                for k in (
                    "path",
                    "rows",
                    "sha256",
                    "bytes",
                    "config_hash",
                    "ok",
                    "failed",
                    "pending",
                    "judge_model",
                    "parts",
                )
                if k in e
            }
            for n, e in sorted(ents.items())
        }
    out = {
        "format": d.get("format"),
        "publish_format": PUBLISH_FORMAT,
        "name": d.get("config", {}).get("name"),
        "config": _scrub(d.get("config", {})),
        "config_hash": d.get("config_hash"),
        "plan_hash": d.get("plan_hash"),
        "items": d.get("items"),
        "shards": d.get("shards"),
        "created": d.get("created"),
        "software": {"build": d.get("software", {}), "publish": _publish_versions()},
        "configs": configs,
        "partition": {
            "unseen_fraction": opts.unseen_fraction,
            "seed": opts.partition_seed,
            "stratified_by": "concept_level",
        },
        "stages": stages,
        "files": files,
    }
    return (json.dumps(out, indent=1, sort_keys=True, default=str) + "\n").encode()


def _publish_versions() -> dict[str, str]:
    from importlib.metadata import version

    out = dict(software_versions())
    for mod in ("datasets", "huggingface_hub", "safetensors", "numpy"):
        try:
            out[mod] = version(mod)
        except Exception:
            continue
    return dict(sorted(out.items()))


def _size_category(n: int) -> str:
    for hi, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ):
        if n < hi:
            return label
    return "n>1T" if n >= 10**12 else "1B<n<10B"


def _feature_doc() -> str:
    """The feature families as `asteer_build.engine.features` defines them (its docstring), read
    without importing the module, which would pull in torch."""
    spec = importlib.util.find_spec("asteer_build.engine.features")
    if spec is None or not spec.origin:
        return ""
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def _label_table(folder: Path, files: list[str]) -> list[dict[str, Any]]:
    tables = [
        pq.read_table(
            folder / f, columns=["model", "method", "label", "judge_status", "judge_model", "alpha"]
        )
        for f in files
    ]
    t = pa.concat_tables(tables)
    rows = []
    keys = (
        t.group_by(["model", "method"])
        .aggregate([])
        .sort_by([("model", "ascending"), ("method", "ascending")])
    )
    for model, method in zip(
        keys.column("model").to_pylist(), keys.column("method").to_pylist(), strict=True
    ):
        sub = t.filter(pc.and_(pc.equal(t["model"], model), pc.equal(t["method"], method)))
        status = sub.column("judge_status").to_pylist()
        labels = sub.column("label").to_pylist()
        ok = [lab for lab, s in zip(labels, status, strict=True) if s == "ok" and lab is not None]
        alphas = sorted(set(sub.column("alpha").to_pylist()))
        judges = sorted({j for j in sub.column("judge_model").to_pylist() if j})
        rows.append(
            {
                "model": model,
                "method": method,
                "rows": sub.num_rows,
                "under": ok.count(0),
                "success": ok.count(1),
                "over": ok.count(2),
                "failed": status.count("failed"),
                "pending": status.count("pending"),
                "alphas": len(alphas),
                "alpha_min": alphas[0],
                "alpha_max": alphas[-1],
                "judge_models": judges,
            }
        )
    return rows


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=100)


_FAMILY = re.compile(r"^(dn|ds|da|sa|dnr|dsd|dad)_")


def _schema_md(features: Any) -> str:
    """Column table; feature columns (hundreds) are summarised per family, since the
    YAML header already lists each one with its type."""
    lines = ["| column | type |", "|---|---|"]
    families: dict[str, list[str]] = {}
    for name, f in features.items():
        m = _FAMILY.match(name)
        if m:
            families.setdefault(m.group(1), []).append(name)
        else:
            lines.append(f"| `{name}` | `{f!r}` |")
    if families:
        lines += ["", "| family | columns | examples |", "|---|---|---|"]
        for fam, cols in families.items():
            ex = ", ".join(f"`{c}`" for c in cols[:2] + cols[-1:])
            lines.append(f"| `{fam}` | {len(cols)} float32 | {ex} |")
        total = sum(len(c) for c in families.values())
        lines += [
            "",
            f"{total} family columns"
            + (" plus `alpha` and `vector_norm`." if "vector_norm" in features else "."),
        ]
    return "\n".join(lines)


def _card(
    repo: str | None,
    info: _RunInfo,
    plans: list[_ConfigPlan],
    counts: dict[str, dict[str, int]],
    labels: list[dict[str, Any]] | None,
    has_vectors: bool,
    opts: PublishOptions,
) -> str:
    d = info.manifest.data
    cfg = _scrub(d.get("config", {}))
    n_rollouts = counts.get("rollouts", {}).get("rows", 0)
    meta: dict[str, Any] = {
        "license": "apache-2.0",
        "language": ["en"],
        "pretty_name": f"ASTEER steerability dataset ({cfg.get('name', 'build')})",
        "task_categories": ["text-classification", "tabular-classification"],
        "tags": [
            "activation-steering",
            "steering-vectors",
            "interpretability",
            "steerability",
            "llm",
        ],
        "size_categories": [_size_category(n_rollouts)],
        "configs": [],
        "dataset_info": [],
    }
    for cp in plans:
        entry: dict[str, Any] = {
            "config_name": cp.name,
            "data_files": [
                {
                    "split": SPLIT,
                    "path": f"{cp.folder}/**/*.parquet"
                    if cp.folder == "activations"
                    else f"{cp.folder}/*.parquet",
                }
            ],
        }
        if cp.name == "rollouts":
            entry["default"] = True
        meta["configs"].append(entry)
        c = counts[cp.name]
        meta["dataset_info"].append(
            {
                "config_name": cp.name,
                "features": cp.features._to_yaml_list(),
                "splits": [{"name": SPLIT, "num_bytes": c["nbytes"], "num_examples": c["rows"]}],
                "download_size": c["bytes"],
                "dataset_size": c["nbytes"],
            }
        )
    repo_id = repo or "ORG/NAME"
    judge_cfg = cfg.get("judge", {}) or {}
    if judge_cfg.get("kind", "llm") == "rules":
        from judge.rules import RULES_VERSION

        judge_desc = (
            f"the deterministic rules judge `{RULES_VERSION}` (tiny world only: it "
            "counts concept words and checks coherence; not an LLM)"
        )
        rubric = RULES_VERSION
    else:
        from judge.rubric import RUBRIC_VERSION

        judge_desc = f"LLM judge `{judge_cfg.get('model', '?')}` through an OpenAI-compatible API"
        rubric = RUBRIC_VERSION
    names = {cp.name for cp in plans}
    out = ["---", _yaml(meta).rstrip(), "---", ""]
    out += [f"# ASTEER steerability dataset: `{cfg.get('name', 'build')}`", ""]
    out += [
        "Each row of the default config is one **steered generation**: a language model, a "
        "concept steering vector (DiffMean or LinearProbe) added with strength `alpha` to "
        "the residual stream at the output of decoder block `layer` at every position, one "
        "prompt, the full response, and a judge's label of whether the steering worked: "
        "`0` under-steer, `1` success, `2` over-steer. The `features` config holds "
        "statistics of the early residual stream of the steered run against an exact "
        "unsteered replay of the same tokens, from which a predictor (gradient-boosted "
        "trees) can tell, after a few decode steps, whether a strength will succeed.",
        "",
        "This follows the ASTEER testbed of *When is Your LLM Steerable?* (Fan, Cheng, Li, "
        "Feizi, Zhou, 2026), generated with the `asteer` builder on vLLM (per-request "
        "steering inside the engine, hidden-state capture, exact replay with the chat "
        "template, failed judgments kept as `failed`, never as a label).",
        "",
        "## Loading",
        "",
        "```python",
        "import numpy as np",
        "from datasets import load_dataset",
        "",
        f'rollouts = load_dataset("{repo_id}", split="train")            # default config',
    ]
    if "features" in names:
        out.append(f'features = load_dataset("{repo_id}", "features", split="train")')
    if "concepts" in names:
        out.append(f'concepts = load_dataset("{repo_id}", "concepts", split="train")')
    acts = [cp for cp in plans if cp.name.startswith("activations")]
    if acts:
        out += [
            f'acts = load_dataset("{repo_id}", "{acts[0].name}", split="train")',
            'acts = acts.with_format("numpy", dtype=np.float16)  # numpy defaults to float32',
            'acts[0]["steered"].shape                              # (positions, layers, hidden)',
        ]
    out += [
        "```",
        "",
        "The training package of `asteer` reads the same repository id or a local copy: "
        f"`asteer-train fit --data {repo_id} --model MODEL --method diffmean --out DIR` "
        "(it downloads only `rollouts`, `features` and `concepts`; add "
        "`--use-partition-column` to hold out the `ood` concepts of this card). "
        "Join configs on `id`.",
        "",
        "## Counts",
        "",
        "| config | rows | Parquet files | bytes on disk |",
        "|---|---|---|---|",
    ]
    for cp in plans:
        c = counts[cp.name]
        out.append(f"| `{cp.name}` | {c['rows']:,} | {c['files']} | {c['bytes']:,} |")
    if has_vectors:
        c = counts.get("vectors", {})
        out.append(f"| `vectors/` | {c.get('rows', 0)} files | - | {c.get('bytes', 0):,} |")
    levels = (
        info.concepts.group_by(["concept_level", "partition"])
        .aggregate([("concept_id", "count")])
        .sort_by([("concept_level", "ascending"), ("partition", "ascending")])
        .to_pylist()
    )
    per_level = ", ".join(
        f"{r['concept_level']}/{r['partition']}: {r['concept_id_count']}" for r in levels
    )
    out += [
        "",
        f"Concepts: {info.concepts.num_rows} ({per_level}; `ood` = unseen); "
        f"prompts: {info.prompts.num_rows}.",
        "",
    ]
    if labels is not None:
        out += [
            "## Labels",
            "",
            "| label | name | meaning |",
            "|---|---|---|",
            "| 0 | under-steer | coherent and on-topic, but the concept is missing |",
            "| 1 | success | the concept is present and the response is still coherent and "
            "relevant to the prompt |",
            "| 2 | over-steer | does not answer the prompt: nonsensical, repetitive, "
            "off-topic, empty (gibberish is always 2) |",
            "",
            f"Judge: {judge_desc}; rubric version `{rubric}`. The judge sees the prompt, the "
            "concept and the steered response only. `judge_status` is `ok` (label set), "
            "`failed` (no label; `judge_error` says why) or `pending` (not judged yet). "
            "A failed judgment is never recorded as under-steer: drop or re-judge those rows.",
            "",
            "Label distribution per model and method (rows with `judge_status == ok`):",
            "",
            "| model | method | rows | alphas | under (0) | success (1) | over (2) | failed "
            "| pending | judge |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in labels:
            out.append(
                f"| {r['model']} | {r['method']} | {r['rows']:,} | {r['alphas']} "
                f"({r['alpha_min']:g}..{r['alpha_max']:g}) | {r['under']:,} | "
                f"{r['success']:,} | {r['over']:,} | {r['failed']:,} | {r['pending']:,} | "
                f"{', '.join(r['judge_models']) or '-'} |"
            )
        out.append("")
    out += ["## Configs and schema", ""]
    notes = {
        "rollouts": "One row per steered generation. `id` is a hash of model, method, "
        "concept, prompt, layer, alpha and sample index; `seed` is the sampling "
        "seed; `vector_norm` is the unscaled vector's L2 norm; `response_tokens` "
        "counts generated tokens.",
        "features": "One row per rollout `id` (plus its keys). Every other column is a "
        "float32 feature named `{family}_t{step}_k{offset}` (one matrix entry), "
        "`{family}_{mean|std|max|min}` (whole matrix), `{family}_t{step}_{stat}` "
        "(one decode step over layers) or `{family}_k{offset}_{stat}` (one layer "
        "over steps); see the definitions below.",
        "concepts": f"`partition`: `ood` = unseen concept (held out of training), `id` = "
        f"seen. Drawn per `concept_level`, {opts.unseen_fraction:.0%} unseen, "
        f"seed {opts.partition_seed} (the same draw as `asteer-train`'s default "
        "split; `asteer-train --use-partition-column` reads this column).",
        "prompts": "`source`: where the prompt came from (e.g. `alpaca_eval`), when known.",
    }
    for cp in plans:
        out += [f"### `{cp.name}`", ""]
        if cp.name.startswith("activations"):
            out.append(
                "Raw residual stream, float16, declared as `Array3D` "
                "`[positions, layers, hidden]`: `steered` and `replay` at decode steps "
                "`t` and layers `L + k` (k = 0 is the steered layer, after the addition for "
                "`steered`), `steered_pre` the steered layer before the addition "
                "`[positions, 1, hidden]`. Join to `rollouts` on `id`."
            )
        else:
            out.append(notes.get(cp.name, ""))
        out += ["", _schema_md(cp.features), ""]
    if has_vectors:
        out += [
            "### `vectors/`",
            "",
            "`vectors/<model>/<method>.safetensors`: one float32 tensor per `concept_id` "
            "(not normalized); `vectors/<model>/index.json`: per method and concept the "
            "norm, layer, contrast-bank size and probe accuracy.",
            "",
        ]
    doc = _feature_doc()
    if doc and "features" in names:
        out += [
            "## Feature definitions",
            "",
            "From `asteer_build.engine.features`:",
            "",
            "```text",
            doc.strip(),
            "```",
            "",
        ]
    out += [
        "## Build",
        "",
        f"Config hash `{d.get('config_hash')}`, plan hash `{d.get('plan_hash')}`, "
        f"{d.get('items', 0):,} planned items in {d.get('shards', 0):,} shards. "
        "`build.json` holds the full config, software versions and the checksum of every "
        "input shard and published file.",
        "",
        "Software (build):",
        "",
        "```json",
        json.dumps(d.get("software", {}), indent=1, sort_keys=True),
        "```",
        "",
        "Config:",
        "",
        "```yaml",
        _yaml(cfg).rstrip(),
        "```",
        "",
        "## License",
        "",
        "Apache-2.0. Prompts and concepts keep the terms of their sources.",
        "",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------- top level


def default_folder(repo: str | None, run_dir: str) -> str:
    root = Path(os.environ.get("ASTEER_CACHE") or Path.home() / ".cache" / "asteer")
    name = (repo or Path(run_dir.rstrip("/")).name or "dataset").replace("/", "--")
    return str(root / "publish" / name)


def assemble(
    run_dir: str, folder: str, *, repo: str | None = None, opts: PublishOptions | None = None
) -> PublishResult:
    """Build (or bring up to date) the dataset folder from a run folder; no network."""
    opts = opts or PublishOptions()
    unknown = [c for c in opts.configs if c not in CONFIGS]
    if unknown:
        raise PublishError(f"--configs: unknown config(s) {unknown} (known: {', '.join(CONFIGS)})")
    if "rollouts" not in opts.configs:
        raise PublishError("--configs: `rollouts` is the default config and always published")
    store = open_store(run_dir)
    manifest = Manifest.load(store)
    if manifest is None:
        raise FileNotFoundError(f"{store.uri}: not a run folder (no {MANIFEST})")
    out = Path(folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_temps(out)
    state = _State(out)
    info = _scan_rollouts(store, manifest, opts)
    plans = _plan(info, opts.configs, opts)
    result = PublishResult(str(out), repo, [])
    planned: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    for cp in plans:
        c = counts.setdefault(cp.name, {"rows": 0, "files": 0, "bytes": 0, "nbytes": 0})
        extra = {
            "schema": cp.schema.to_string(),
            "features": cp.features.to_dict(),
            "row_group_bytes": opts.row_group_bytes,
            "row_group_max_rows": opts.row_group_max_rows,
        }
        if cp.table is not None:
            extra["table"] = hashlib.sha256(
                json.dumps(cp.table.to_pylist(), sort_keys=True).encode()
            ).hexdigest()
        for f in cp.files:
            f.key = _file_key(f, extra)
            planned.append(f.path)
            e = state.done(f.path, f.key, out)
            if e is None:
                rows, nbytes = _write_file(info, cp, f, out, opts)
                p = out / f.path
                e = {
                    "key": f.key,
                    "sha256": _sha256_file(p),
                    "bytes": p.stat().st_size,
                    "rows": rows,
                    "nbytes": nbytes,
                    "config": cp.name,
                }
                state.record(f.path, e)
                result.written.append(f.path)
                log.info("wrote %s (%d rows, %.1f MB)", f.path, rows, e["bytes"] / 1e6)
                if opts.on_file:
                    opts.on_file(f.path)
            else:
                result.skipped.append(f.path)
            c["rows"] += e["rows"]
            c["files"] += 1
            c["bytes"] += e["bytes"]
            c["nbytes"] += e["nbytes"]
    has_vectors = "vectors" in opts.configs and bool(manifest.entries("vectors"))
    if has_vectors:
        vplanned, vw, vs = _copy_vectors(info, out, state, opts)
        planned += vplanned
        result.written += vw
        result.skipped += vs
        counts["vectors"] = {
            "rows": len(vplanned),
            "files": len(vplanned),
            "bytes": sum(state.files[p]["bytes"] for p in vplanned),
            "nbytes": 0,
        }
    # Files of an earlier publish that this one does not produce (a config left out, a
    # run that shrank) would otherwise be matched by the card's globs and uploaded.
    keep = set(planned) | {"README.md", MANIFEST}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith(".") and rel not in keep and "/." not in rel:
            p.unlink()
            state.forget(rel)
            result.removed.append(rel)
    for rel in list(state.files):
        if rel not in keep:
            state.forget(rel)
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    files = [
        {
            "path": p,
            "config": state.files[p]["config"],
            "rows": state.files[p]["rows"],
            "bytes": state.files[p]["bytes"],
            "sha256": state.files[p]["sha256"],
        }
        for p in sorted(planned)
    ]
    rollout_files = [f.path for cp in plans if cp.name == "rollouts" for f in cp.files]
    labels = _label_table(out, rollout_files)
    _write_if_changed(
        out / MANIFEST,
        _build_json(
            info, files, [cp.name for cp in plans] + (["vectors"] if has_vectors else []), opts
        ),
    )
    _write_if_changed(
        out / "README.md", _card(repo, info, plans, counts, labels, has_vectors, opts).encode()
    )
    result.files = files + [
        _file_entry(out, MANIFEST, "build.json"),
        _file_entry(out, "README.md", "card"),
    ]
    result.counts = {k: v["rows"] for k, v in counts.items()}
    return result


def _write_if_changed(p: Path, data: bytes) -> None:
    if p.is_file() and p.read_bytes() == data:
        return
    atomic.write_bytes(p, data)


def _file_entry(folder: Path, rel: str, config: str) -> dict[str, Any]:
    p = folder / rel
    return {
        "path": rel,
        "config": config,
        "rows": None,
        "bytes": p.stat().st_size,
        "sha256": _sha256_file(p),
    }


def check_no_secret(folder: str | Path, secret: str | None) -> None:
    """Refuse to upload a folder that contains the token anywhere (a config or response
    that echoed it): the last guard before bytes leave the machine."""
    if not secret or len(secret) < 8:
        return
    needle = secret.encode()
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file() or p.name == STATE_FILE:
            continue
        tail = b""
        with open(p, "rb") as f:
            while block := f.read(8 << 20):
                if needle in tail + block:
                    raise PublishError(
                        f"{p.relative_to(folder)}: contains the Hub token; refusing to upload"
                    )
                tail = block[-(len(needle) - 1) :]


def hub_upload(
    folder: str, repo_id: str, *, private: bool, token: str, endpoint: str | None = None
) -> str:
    """The only network step: create the dataset repo if needed, then one resumable,
    multi-commit folder upload. Re-running it after an interruption skips what is there.

    `upload_large_folder` is that uploader up to huggingface_hub 1.x; from 2.0 it is gone
    and `upload_folder` itself streams, commits in parts and resumes (Xet)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    # private=None (not False) without --private: an organisation whose default is
    # private keeps it; the flag is ignored for a repo that already exists.
    url = api.create_repo(
        repo_id, repo_type="dataset", private=True if private else None, exist_ok=True
    )
    large = getattr(api, "upload_large_folder", None)
    if large is not None:
        large(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="dataset",
            private=private,
            ignore_patterns=UPLOAD_IGNORE,
        )
    else:
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="dataset",
            ignore_patterns=list(UPLOAD_IGNORE),
            commit_message="Publish ASTEER dataset",
        )
    return str(url)


def _hub_token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def publish(
    run_dir: str,
    repo: str,
    *,
    opts: PublishOptions | None = None,
    private: bool = False,
    dry_run: bool = False,
    upload: Callable[..., str] = hub_upload,
) -> PublishResult:
    """Assemble the folder, then (unless `dry_run`) upload it with `upload`."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", repo or ""):
        raise PublishError(f"--repo: expected ORG/NAME (got {repo!r})")
    opts = opts or PublishOptions()
    folder = opts.folder or default_folder(repo, run_dir)
    token = None
    if not dry_run:
        # Before the (long) assembly: a missing token should not cost an hour of writing.
        token = _hub_token()
        if not token:
            raise PublishError(
                "no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)"
            )
    result = assemble(run_dir, folder, repo=repo, opts=opts)
    if dry_run:
        return result
    check_no_secret(folder, token)
    log.info("uploading %s to %s (%d files)", folder, repo, len(result.files))
    upload(folder, repo, private=private, token=token)
    result.uploaded = True
    return result


def resolve_dataset(source: str) -> str:
    """A published dataset as a local folder: an existing folder as is, an `ORG/NAME`
    Hub id downloaded (cached) with `snapshot_download`. For asteer-build readers of a
    published dataset; `train.data.resolve_source` is the trainer's equivalent."""
    if os.path.isdir(source):
        return source
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", source):
        raise PublishError(f"{source!r} is neither a folder nor a Hub dataset id ORG/NAME")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=source, repo_type="dataset")


# ------------------------------------------------------------------------------- CLI


def _configs_arg(s: str) -> tuple[str, ...]:
    vals = tuple(x.strip() for x in s.split(",") if x.strip())
    if vals == ("all",):
        return CONFIGS
    return tuple(dict.fromkeys(("rollouts", *vals)))


def cmd_publish(args: argparse.Namespace) -> dict[str, Any]:
    opts = PublishOptions(
        configs=args.configs or DEFAULT_CONFIGS,
        explicit=args.configs is not None,
        folder=args.folder,
    )
    res = publish(args.run_dir, args.repo, opts=opts, private=args.private, dry_run=args.dry_run)
    width = max((len(f["path"]) for f in res.files), default=10)
    print(
        f"{res.folder}: {len(res.files)} files, "
        f"{sum(f['bytes'] for f in res.files) / 1e6:,.1f} MB "
        f"({len(res.written)} written, {len(res.skipped)} unchanged)",
        file=sys.stderr,
    )
    for f in res.files:
        print(
            f"  {f['path']:<{width}} {f['bytes']:>14,} B"
            + (f" {f['rows']:>10,} rows" if f["rows"] is not None else ""),
            file=sys.stderr,
        )
    print(
        f"{'dry run: nothing uploaded' if args.dry_run else f'uploaded to {args.repo}'}",
        file=sys.stderr,
    )
    return res.as_dict()


def add_publish_command(sub: Any) -> None:
    """Register `asteer-build publish` on the CLI's subparsers."""
    sp = sub.add_parser("publish", help="assemble a run folder as a HF dataset and upload it")
    sp.add_argument("run_dir")
    sp.add_argument("--repo", required=True, help="Hub dataset repo id, ORG/NAME")
    sp.add_argument("--private", action="store_true")
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="assemble the folder and list its files; no token, no upload",
    )
    sp.add_argument(
        "--configs",
        type=_configs_arg,
        default=None,
        help=f"comma-separated subset of {','.join(CONFIGS)} or `all` "
        f"(default: {','.join(DEFAULT_CONFIGS)}; rollouts always)",
    )
    sp.add_argument("--folder", help="local dataset folder (default: under ~/.cache/asteer)")
    sp.set_defaults(fn=cmd_publish)
