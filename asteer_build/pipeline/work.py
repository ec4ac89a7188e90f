"""One shard's work, shared by the local and Ray executors: requests in, shard files out.

Both executors must produce byte-identical shards for the same items (the Ray test
compares them), so everything between "a planned shard" and "files renamed into place"
lives here and nowhere else: prompt tokenization, request fields, row schema, writing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..core import contract, testseam
from ..core.prompts import PromptFormat, prompt_ids
from .config import BuildConfig, ModelConfig
from .plan import Item, Shard
from .rollouts import RolloutRequest, RolloutResult
from .shards import ShardFile, Store

__all__ = [
    "ROLLOUT_SCHEMA", "ModelContext", "resolve_model_path", "model_context", "shard_requests",
    "write_shard", "engine_kwargs", "vector_files",
]

#: a rollouts shard as written here: the contract's rollout columns, judgment pending
ROLLOUT_SCHEMA = contract.ROLLOUTS_SHARD_SCHEMA


def resolve_model_path(path: str) -> str:
    from ..inputs.tinyworld import resolve_model_path as resolve

    return resolve(path)


def vector_files(model_path: str, concepts: list[Any], settings: Any,
                 engine: Any = None) -> dict[str, bytes]:
    """Run the vectors stage (`asteer_build.vectors.build_vectors` with `settings`, a
    `VectorSettings`) into a scratch folder and return its files (name -> bytes), so the
    caller can store them anywhere (and a Ray task can ship them back). `engine`: a
    running `SteeredEngine` of the same model to pool on (the local build's rollout
    engine), else the stage starts its own."""
    import tempfile
    from pathlib import Path

    from ..vectors.stage import build_vectors

    with tempfile.TemporaryDirectory(prefix="asteer-vectors-") as tmp:
        build_vectors(resolve_model_path(model_path), concepts, tmp, settings, engine=engine)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def engine_kwargs(m: ModelConfig) -> dict[str, Any]:
    kw = dict(m.engine_args)
    if m.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = m.tensor_parallel_size
    return kw


@dataclass
class ModelContext:
    """What an engine host needs per model: vectors, their norms, tokenized prompts."""

    model: ModelConfig
    path: str
    vectors: dict[str, Any]
    norms: dict[str, float]
    prompt_ids: dict[str, list[int]]
    #: the model's effective sampling (`asteer_build.pipeline.sampling`), as build.json records it;
    #: required, so no request is ever built without the recorded values
    sampling: Any
    #: `alpha_units: norm`: the banks' mean residual norm m at the layer (None: raw)
    residual_norm: float | None = None

    def raw_alpha(self, method: str, concept_id: str, alpha: float) -> float:
        """The multiple of the stored vector the engine adds: alpha itself in raw units,
        alpha x m / ||v|| in norm units (so the added vector has norm alpha x m)."""
        if self.residual_norm is None:
            return float(alpha)
        return float(alpha) * self.residual_norm / self.norms[f"{method}/{concept_id}"]


def chat_prompt_ids(path: str, prompt: str, fmt: PromptFormat | None = None) -> list[int]:
    """One user turn of the model at `path`, rendered as the build renders it
    (`asteer_build.core.prompts`; `fmt` the config's `prompt_format`)."""
    return prompt_ids(path, prompt, fmt)


def model_context(store: Store, cfg: BuildConfig, model: ModelConfig, prompts,
                  sampling: Any) -> ModelContext:
    """`sampling` is the plan's resolved `EffectiveSampling` for this model, passed in
    (not resolved again on an engine host) so every host samples with the recorded
    values."""
    from ..vectors.stage import RESIDUAL_NORM_FILE, load_residual_norm, load_vectors

    path = resolve_model_path(model.path)
    files = {}
    names = ["index.json", *[f"{m}.safetensors" for m in cfg.methods]]
    if cfg.alpha_units == "norm":
        names.append(RESIDUAL_NORM_FILE)
    for name in names:
        files[name] = store.read_bytes(f"vectors/{model.name}/{name}")
    vecs, norms = load_vectors(files)
    m_norm = load_residual_norm(files)
    pids = {p.prompt_id: chat_prompt_ids(path, p.prompt, cfg.prompt_format) for p in prompts}
    if sampling is None or not sampling.resolved:
        raise RuntimeError(f"rollouts: {model.name}: no resolved sampling "
                           f"({getattr(sampling, 'error', None) or 'none given'})")
    return ModelContext(model, path, vecs, norms, pids, sampling, m_norm)


@functools.lru_cache(maxsize=2)
def _bench_lengths(path: str) -> dict[str, int]:
    """The `bench_lengths` hook's file (`core.testseam`; benchmarks only): read once, as
    every shard of a build asks for it."""
    import json
    from pathlib import Path

    return {str(k): int(v) for k, v in json.loads(Path(path).read_text()).items()}


def shard_requests(cfg: BuildConfig, ctx: ModelContext, shard: Shard) -> list[RolloutRequest]:
    s, eff = cfg.sampling, ctx.sampling
    bench = testseam.hook("bench_lengths")
    lengths = _bench_lengths(bench) if bench else {}
    return [
        RolloutRequest(
            id=it.id, prompt_token_ids=ctx.prompt_ids[it.prompt_id],
            vector=f"{it.method}/{it.concept_id}",
            alpha=ctx.raw_alpha(it.method, it.concept_id, it.alpha), layer=it.layer,
            positions=cfg.positions, seed=it.seed,
            max_tokens=lengths.get(it.id, s.max_tokens), ignore_eos=it.id in lengths,
            temperature=eff.temperature, top_k=eff.top_k, top_p=eff.top_p, prompt=it.prompt,
        )
        for it in shard.items
    ]


def _rollout_table(items: list[Item], results: list[RolloutResult],
                   norms: dict[str, float], raw_alpha: RawAlpha | None) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in ROLLOUT_SCHEMA}
    for it, r in zip(items, results, strict=True):
        if r.id != it.id:
            raise RuntimeError(f"result {r.id} out of order (expected {it.id})")
        row = {
            "id": it.id, "model": it.model, "method": it.method, "concept_id": it.concept_id,
            "concept": it.concept, "concept_level": it.concept_level,
            "prompt_id": it.prompt_id, "prompt": it.prompt, "layer": it.layer,
            "alpha": it.alpha, "vector_norm": norms[f"{it.method}/{it.concept_id}"],
            "alpha_raw": (raw_alpha(it.method, it.concept_id, it.alpha) if raw_alpha
                          else float(it.alpha)),
            "seed": it.seed, "response": r.response, "response_tokens": r.response_tokens,
            "finish_reason": r.finish_reason, "label": None, "judge_model": None,
            "judge_status": "pending", "judge_explanation": None,
        }
        for k, v in row.items():
            cols[k].append(v)
    return pa.table(cols, schema=ROLLOUT_SCHEMA)


def _features_table(items: list[Item], results: list[RolloutResult]) -> pa.Table | None:
    if not results or results[0].features is None:
        return None
    names = list(results[0].features)
    cols: dict[str, Any] = {
        "id": pa.array([it.id for it in items], pa.string()),
        "model": pa.array([it.model for it in items], pa.string()),
        "method": pa.array([it.method for it in items], pa.string()),
        "concept_id": pa.array([it.concept_id for it in items], pa.string()),
        "prompt_id": pa.array([it.prompt_id for it in items], pa.string()),
        # the key and the `alpha` feature: the config's strength (in norm units with
        # `alpha_units: norm`; the worker computed with the raw multiple, in `alpha_raw`)
        "alpha": pa.array([it.alpha for it in items], pa.float32()),
    }
    for n in names:
        if n != "alpha":
            cols[n] = pa.array(np.asarray([r.features[n] for r in results], np.float32))
    return pa.table(cols, schema=contract.features_schema(names))


def _nested(arr: np.ndarray) -> pa.Array:
    """[rows, *shape] float16 as nested fixed-size lists (loads back as numpy arrays)."""
    a = pa.array(arr.reshape(-1).astype(np.float16))
    for dim in reversed(arr.shape[1:]):
        a = pa.FixedSizeListArray.from_arrays(a, int(dim))
    return a


def _activations_table(items: list[Item], results: list[RolloutResult]) -> pa.Table | None:
    if not results or not results[0].activations:
        return None
    cols: dict[str, Any] = {"id": pa.array([it.id for it in items], pa.string())}
    for n in results[0].activations:
        cols[n] = _nested(np.stack([np.asarray(r.activations[n]) for r in results]))
    return pa.table(cols)


#: (method, concept_id, alpha in the config's units) -> the multiple of v applied
RawAlpha = Callable[[str, str, float], float]


def write_shard(store: Store, shard: Shard, results: list[RolloutResult],
                norms: dict[str, float], raw_alpha: RawAlpha | None = None
                ) -> list[ShardFile]:
    """Write the shard's files (rollouts, then features / activations when captured);
    each is renamed into place; the caller records them in the manifest. `raw_alpha`:
    `ModelContext.raw_alpha` (None: strengths are raw, `alpha_raw` = `alpha`)."""
    files = []
    feats = _features_table(shard.items, results)
    if feats is not None:
        files.append(store.write_table("features", shard.name, feats))
    acts = _activations_table(shard.items, results)
    if acts is not None:
        files.append(store.write_table("activations", shard.name, acts))
    files.append(store.write_table("rollouts", shard.name,
                                   _rollout_table(shard.items, results, norms, raw_alpha)))
    return files
