"""Planning a publish from the run's manifest: which input shard rows go to which output
file, and each config's schema and `datasets` features.

Packing uses manifest numbers only (shard sizes and checksums), so the same run always
plans the same files before any data is read; every file's key hashes its inputs and the
writer settings, which is what makes a re-publish skip what is already there.

Activations of models with different hidden sizes cannot share one Array3D declaration,
so they get one config per model (`activations-<model>`) when shapes differ, and a single
`activations` config when all models agree (always the case for one model).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ...core import contract
from ...pipeline.shards import Manifest, Store
from .layout import (
    CONCEPTS_SCHEMA,
    PROMPTS_SCHEMA,
    PUBLISH_FORMAT,
    ROLLOUTS_SCHEMA,
    SPLIT,
    PublishError,
    PublishOptions,
    partition_concepts,
)

_ACT_ORDER = ("steered", "replay", "steered_pre")


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one committed input shard file."""

    shard: str
    path: str
    sha256: str
    start: int
    stop: int


@dataclass
class OutFile:
    path: str  # relative to the folder
    config: str
    slices: list[Slice]
    key: str = ""


def stage_entries(manifest: Manifest, stage: str) -> list[tuple[str, dict[str, Any]]]:
    return sorted(manifest.entries(stage).items())


def rollout_inputs(manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    """Labelled shard where the judge has run, the unlabelled one otherwise (published
    with judge_status `pending`): a partly judged run still publishes every rollout."""
    labelled = manifest.entries("labelled")
    return [(name, labelled.get(name, e)) for name, e in stage_entries(manifest, "rollouts")]


def _pack(inputs: list[tuple[str, dict[str, Any]]], target: int) -> list[list[Slice]]:
    """Consecutive shards into files of about `target` compressed bytes; a shard larger
    than the target is cut into equal row ranges. Uses manifest numbers only, so the
    packing is known (and stable) before any data is read."""
    files: list[list[Slice]] = []
    cur: list[Slice] = []
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
            cur.append(Slice(name, e["path"], e["sha256"], a, b))
            cur_bytes += b_bytes
    if cur:
        files.append(cur)
    return files


def file_key(out: OutFile, extra: Any) -> str:
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


@dataclass
class RunInfo:
    store: Store
    manifest: Manifest
    shard_model: dict[str, str]
    concepts: pa.Table
    prompts: pa.Table


def scan_run(store: Store, manifest: Manifest, opts: PublishOptions) -> RunInfo:
    """One pass over the small key columns of every rollouts shard: which model each shard
    holds (activations rows carry only an id), and the concepts and prompts in the data."""
    shard_model: dict[str, str] = {}
    concepts: dict[str, tuple[str, str]] = {}
    prompts: dict[str, str] = {}
    cols = ["model", "concept_id", "concept", "concept_level", "prompt_id", "prompt"]
    for name, e in rollout_inputs(manifest):
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
    ids = contract.sort_ids(concepts)
    unseen = set(
        partition_concepts(
            {c: concepts[c][1] for c in ids}, opts.unseen_fraction, opts.partition_seed,
            opts.partition_scheme,
        )
    )
    ctab = pa.table(
        {
            "concept_id": ids,
            "concept": [concepts[c][0] for c in ids],
            "concept_level": [concepts[c][1] for c in ids],
            "partition": [contract.PARTITION_UNSEEN if c in unseen else contract.PARTITION_SEEN
                          for c in ids],
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
    return RunInfo(store, manifest, shard_model, ctab, ptab)


def _prompt_sources(config: dict[str, Any]) -> dict[str, str]:
    """Where each prompt came from, if the build's prompt source can still be read here
    (relative file paths may not resolve outside the build machine: then unknown)."""
    try:
        from ...inputs.sources import load_prompts

        return {p.prompt_id: p.source for p in load_prompts(config.get("prompts"))}
    except Exception:  # a missing file only costs the `source` column its values
        return {}


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
class ConfigPlan:
    name: str  # config name in the card
    folder: str  # data folder, relative
    schema: pa.Schema
    features: Any
    files: list[OutFile]
    table: pa.Table | None = None  # small configs built in memory


def _features_of(schema: pa.Schema) -> Any:
    import datasets

    return datasets.Features.from_arrow_schema(schema.remove_metadata())


def plan_configs(info: RunInfo, configs: tuple[str, ...], opts: PublishOptions) -> list[ConfigPlan]:
    m, store = info.manifest, info.store
    plans: list[ConfigPlan] = []

    def files_for(folder: str, config: str, inputs) -> list[OutFile]:
        return [
            OutFile(f"{folder}/{SPLIT}-{i:05d}.parquet", config, sl)
            for i, sl in enumerate(_pack(inputs, opts.target_file_bytes))
        ]

    def same_name_plan(name: str, schema, inputs) -> ConfigPlan:
        """A config whose folder is its name and whose features follow its schema."""
        return ConfigPlan(name, name, schema, _features_of(schema), files_for(name, name, inputs))

    def captured(stage: str, hint: str) -> list[tuple[str, dict[str, Any]]]:
        """The stage's shards. None is an error when the config was asked for by name,
        and a silent skip by default (a run built without capture)."""
        inputs = stage_entries(m, stage)
        if not inputs and opts.explicit:
            raise PublishError(
                f"{store.uri}: --configs asks for {stage}, but the run has "
                f"no committed {stage} shards ({hint})"
            )
        return inputs

    if "rollouts" in configs:
        inputs = rollout_inputs(m)
        if not inputs:
            raise PublishError(f"{store.uri}: no committed rollouts shards to publish")
        plans.append(same_name_plan("rollouts", ROLLOUTS_SCHEMA, inputs))
    if "features" in configs and (inputs := captured("features", "was capture on?")):
        schema = _features_schema(store, inputs, info.shard_model)
        plans.append(same_name_plan("features", schema, inputs))
    if "activations" in configs and (inputs := captured("activations", "capture.activations")):
        layout = _activations_layout(store, inputs, info.shard_model)
        one = len({json.dumps(v) for v in layout.values()}) == 1
        for model in sorted(layout):
            mine = [(n, e) for n, e in inputs if info.shard_model.get(n) == model]
            name = "activations" if one else f"activations-{model}"
            folder = f"activations/{model}"
            plans.append(
                ConfigPlan(
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
                ConfigPlan(
                    name,
                    name,
                    table.schema,
                    _features_of(table.schema),
                    [OutFile(f"{name}/{SPLIT}-00000.parquet", name, [])],
                    table,
                )
            )
    return plans
