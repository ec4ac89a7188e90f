"""Planning a publish from the run's manifest: which input shard rows go to which output
file, and each config's schema and `datasets` features.

Each data file is a fixed range of planned shards (`boundaries`), so the same run always
plans the same files, before any data is read and before the run has finished; every
file's key hashes its inputs and the writer settings, which is what makes a re-publish
skip what is already there.

Activations of models with different hidden sizes cannot share one Array3D declaration,
so they get one config per model (`activations-<model>`) when shapes differ, and a single
`activations` config when all models agree (always the case for one model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ...core import contract
from ...pipeline.shards import Manifest, Store
from .boundaries import (
    Slice,
    file_rule,
    pack,
    planned_shards,
    rollout_row_bytes,
    schema_row_bytes,
    shard_rows,
)
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
from .state import RunCache, ShardKeys

_ACT_ORDER = ("steered", "replay", "steered_pre")


@dataclass
class OutFile:
    path: str  # relative to the folder
    config: str
    slices: list[Slice]
    key: str = ""
    #: the planned shard indices [a, b) the file covers (None: a table built in memory)
    span: tuple[int, int] | None = None


def stage_entries(manifest: Manifest, stage: str) -> list[tuple[str, dict[str, Any]]]:
    return sorted(manifest.entries(stage).items())


def rollout_inputs(manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    """Labelled shard where the judge has run, the unlabelled one otherwise (published
    with judge_status `pending`): a partly judged run still publishes every rollout."""
    labelled = manifest.entries("labelled")
    return [(name, labelled.get(name, e)) for name, e in stage_entries(manifest, "rollouts")]


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


def _shard_keys(store: Store, path: str) -> ShardKeys:
    cols = ["model", "concept_id", "concept", "concept_level", "prompt_id", "prompt"]
    t = pq.read_table(store.path(path), columns=cols, filesystem=store.fs)
    if t.num_rows == 0:
        return None, {}, {}
    u = t.group_by(["concept_id", "concept", "concept_level"]).aggregate([])
    concepts = {
        cid: (c, lvl)
        for cid, c, lvl in zip(
            *(u.column(k).to_pylist() for k in ("concept_id", "concept", "concept_level")),
            strict=True,
        )
    }
    u = t.group_by(["prompt_id", "prompt"]).aggregate([])
    prompts = dict(
        zip(u.column("prompt_id").to_pylist(), u.column("prompt").to_pylist(), strict=True)
    )
    return t.column("model")[0].as_py(), concepts, prompts


def scan_run(
    store: Store,
    manifest: Manifest,
    opts: PublishOptions,
    cache: RunCache | None = None,
) -> RunInfo:
    """One pass over the small key columns of every rollouts shard: which model each shard
    holds (activations rows carry only an id), and the concepts and prompts in the data.
    `cache` spares `follow` re-reading every shard per poll."""
    shard_model: dict[str, str] = {}
    concepts: dict[str, tuple[str, str]] = {}
    prompts: dict[str, str] = {}
    cache = cache or RunCache()
    for name, e in rollout_inputs(manifest):
        key = (e["path"], e["sha256"])
        if key not in cache.shards:
            cache.shards[key] = _shard_keys(store, e["path"])
        model, c, p = cache.shards[key]
        if model is None:
            continue
        shard_model[name] = model
        concepts.update(c)
        prompts.update(p)
    if cache.sources is None:
        cache.sources = _prompt_sources(manifest.data.get("config", {}))
    sources = cache.sources
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
    #: the stage whose commits make a file final (every shard of its span committed)
    stage: str | None = None
    #: schema and features can no longer change (every planned model has a shard in
    #: the stage): only then may files be published before the run ends
    final: bool = False


def _features_of(schema: pa.Schema) -> Any:
    import datasets

    return datasets.Features.from_arrow_schema(schema.remove_metadata())


def plan_configs(info: RunInfo, configs: tuple[str, ...], opts: PublishOptions) -> list[ConfigPlan]:
    m, store = info.manifest, info.store
    plans: list[ConfigPlan] = []

    planned = planned_shards(m, sorted(m.entries("rollouts")))
    rows = shard_rows(m)

    def files_for(folder: str, config: str, inputs, row_bytes: int) -> list[OutFile]:
        rule = file_rule(rows * row_bytes, opts.target_file_bytes)
        return [
            OutFile(f"{folder}/{SPLIT}-{n:05d}.parquet", config, sl, span=span)
            for n, span, sl in pack(inputs, rule, planned)
        ]

    def final(inputs) -> bool:
        """Every model the config plans has a shard here: the union schema (features) and
        the one-or-per-model layout (activations) are what the finished run will have."""
        models = {x.get("name") for x in (m.data.get("config") or {}).get("models") or []}
        return bool(models) and models <= {info.shard_model.get(n) for n, _ in inputs}

    def captured(stage: str, hint: str) -> list[tuple[str, dict[str, Any]]]:
        """The stage's shards. None is an error when the config was asked for by name,
        and a silent skip by default (a run built without capture)."""
        # A shard's rollouts file commits last (pipeline.work.write_shard): until it has,
        # its features and activations are not part of the run yet (and have no model).
        rollouts = m.entries("rollouts")
        inputs = [(n, e) for n, e in stage_entries(m, stage) if n in rollouts]
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
        files = files_for("rollouts", "rollouts", inputs, rollout_row_bytes(m))
        plans.append(
            ConfigPlan("rollouts", "rollouts", ROLLOUTS_SCHEMA, _features_of(ROLLOUTS_SCHEMA),
                       files, stage="labelled", final=True)
        )
    if "features" in configs and (inputs := captured("features", "was capture on?")):
        schema = _features_schema(store, inputs, info.shard_model)
        files = files_for("features", "features", inputs, schema_row_bytes(schema))
        plans.append(
            ConfigPlan("features", "features", schema, _features_of(schema), files,
                       stage="features", final=final(inputs))
        )
    if "activations" in configs and (inputs := captured("activations", "capture.activations")):
        layout = _activations_layout(store, inputs, info.shard_model)
        one = len({json.dumps(v) for v in layout.values()}) == 1
        for model in sorted(layout):
            mine = [(n, e) for n, e in inputs if info.shard_model.get(n) == model]
            name = "activations" if one else f"activations-{model}"
            folder = f"activations/{model}"
            schema = _activation_schema(layout[model])
            plans.append(
                ConfigPlan(
                    name,
                    "activations" if one else folder,
                    schema,
                    _activations_features(layout[model]),
                    files_for(folder, name, mine, schema_row_bytes(schema)),
                    stage="activations",
                    final=final(inputs),
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
