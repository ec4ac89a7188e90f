"""A synthetic ASTEER dataset in the exact published schema, for tests and benchmarks.

Each (concept, prompt) item has a latent success window [c - w/2, c + w/2] in alpha;
the label is under / success / over by where alpha falls (plus a little label noise),
and every feature is a noisy function of the normalized position z = (alpha - c) / w,
weakest at late tokens. The window centre varies by concept and prompt, so alpha alone
cannot place it but the (simulated) hidden-state features can — which is the premise
of the real predictor, and what lets tests check that learning happened at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from asteer_build.core import contract
from asteer_build.core.contract import ROW_STATS, STATS

GROUPS = ("DN", "DS", "DA", "SA")
TOKENS = (0, 1, 3, 5)
OFFSETS = (0, 1, 2, 3)
LEVELS = ("low", "mid", "high")


def feature_columns(groups=GROUPS, tokens=TOKENS, offsets=OFFSETS) -> list[str]:
    """Column names in the builder's scheme (`asteer_build.core.contract.group_names`)."""
    cols = []
    for g in groups:
        cols += contract.group_names(g, tokens, offsets)
    return cols + ["vector_norm"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _row_id(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def generate(
    n_concepts: int = 12,
    n_prompts: int = 8,
    alphas: tuple[float, ...] = tuple(np.round(np.arange(1, 13) * 0.5, 2)),
    pairs: tuple[tuple[str, str], ...] = (("tiny-model", "diffmean"),),
    seed: int = 0,
    label_noise: float = 0.06,
    n_failed: int = 5,
    n_pending: int = 3,
    with_labels: bool = True,
) -> dict[str, pa.Table]:
    """Tables for the `rollouts`, `features`, `concepts` and `prompts` configs."""
    rng = np.random.default_rng(seed)
    alphas_arr = np.asarray(alphas, dtype=np.float64)
    lo, hi = float(alphas_arr.min()), float(alphas_arr.max())
    concept_ids = [f"c{i:03d}" for i in range(n_concepts)]
    levels = [LEVELS[i % 3] for i in range(n_concepts)]
    prompt_ids = [f"p{j:03d}" for j in range(n_prompts)]
    concepts = pa.table(
        {
            "concept_id": concept_ids,
            "concept": [f"concept number {i}" for i in range(n_concepts)],
            "concept_level": levels,
            "partition": [
                contract.PARTITION_UNSEEN if i >= n_concepts - 3 else contract.PARTITION_SEEN
                for i in range(n_concepts)
            ],
        },
        schema=contract.CONCEPTS_SCHEMA,
    )
    prompts = pa.table(
        {
            "prompt_id": prompt_ids,
            "prompt": [f"Please answer question {j}." for j in range(n_prompts)],
            "source": ["synthetic"] * n_prompts,
        },
        schema=contract.PROMPTS_SCHEMA,
    )
    cols = feature_columns()
    roll_parts, feat_parts = [], []
    for model, method in pairs:
        span = hi - lo
        centre_c = rng.uniform(lo + 0.25 * span, lo + 0.7 * span, n_concepts)
        norm_c = rng.uniform(3.0, 8.0, n_concepts)
        nuisance_c = rng.normal(0.0, 0.15, n_concepts)
        ci, pj, ak = np.meshgrid(
            np.arange(n_concepts),
            np.arange(n_prompts),
            np.arange(len(alphas_arr)),
            indexing="ij",
        )
        ci, pj, ak = ci.ravel(), pj.ravel(), ak.ravel()
        n = len(ci)
        centre = centre_c[:, None] + rng.normal(0.0, 0.12 * span, (n_concepts, n_prompts))
        width = rng.uniform(0.15 * span, 0.35 * span, (n_concepts, n_prompts))
        a = alphas_arr[ak]
        z = (a - centre[ci, pj]) / width[ci, pj]
        label = np.where(z < -0.5, 0, np.where(z <= 0.5, 1, 2))
        flip = rng.random(n) < label_noise
        label = np.where(flip, rng.integers(0, 3, n), label).astype(np.int8)

        # cells[g][row, t, k]; signal fades with the decode step t.
        t_arr = np.asarray(TOKENS, dtype=float)[None, :, None]
        k_arr = np.asarray(OFFSETS, dtype=float)[None, None, :]
        zz = z[:, None, None]
        fade = np.exp(-0.35 * t_arr)
        noise_sd = 0.7 + 0.2 * t_arr
        shape = (n, len(TOKENS), len(OFFSETS))
        base = {
            "SA": _sigmoid(2.0 * zz) * fade * (1.0 + 0.1 * k_arr),
            "DA": np.tanh(zz) * fade,
            "DN": (a * norm_c[ci])[:, None, None] * (1.0 + 0.05 * k_arr) / 10.0
            + 0.5 * _sigmoid(3.0 * zz) * fade,
            "DS": 1.0 - 0.5 * _sigmoid(2.0 * zz) * fade,
        }
        feats: dict[str, np.ndarray] = {}
        for g in GROUPS:
            m = base[g] + nuisance_c[ci][:, None, None] + rng.normal(0.0, 1.0, shape) * noise_sd
            for ti, t in enumerate(TOKENS):
                for ki, k in enumerate(OFFSETS):
                    feats[f"{g}_t{t}_k{k}"] = m[:, ti, ki]
            flat = m.reshape(n, -1)
            for s, fn in zip(STATS, (np.mean, np.std, np.max, np.min), strict=True):
                feats[f"{g}_{s}"] = fn(flat, axis=1)
            for ti, t in enumerate(TOKENS):
                for s, fn in zip(ROW_STATS, (np.mean, np.std, np.max), strict=True):
                    feats[f"{g}_t{t}_{s}"] = fn(m[:, ti, :], axis=1)
            for ki, k in enumerate(OFFSETS):
                for s, fn in zip(ROW_STATS, (np.mean, np.std, np.max), strict=True):
                    feats[f"{g}_k{k}_{s}"] = fn(m[:, :, ki], axis=1)
        feats["vector_norm"] = norm_c[ci]

        ids = [
            _row_id(model, method, concept_ids[c], prompt_ids[p], 10, alphas_arr[k], 0)
            for c, p, k in zip(ci, pj, ak, strict=True)
        ]
        length = np.where(label == 0, 180, np.where(label == 1, 240, 400)) + rng.integers(0, 60, n)
        status = np.array(["ok"] * n, dtype=object)
        bad = rng.choice(n, n_failed + n_pending, replace=False)
        status[bad[:n_failed]] = "failed"
        status[bad[n_failed:]] = "pending"
        label_col = [
            None if (not with_labels or s != "ok") else int(v)
            for v, s in zip(label, status, strict=True)
        ]
        if not with_labels:
            status[:] = "pending"
        # the key columns both tables start with, in the contract's order
        keys = {"id": ids, "model": [model] * n, "method": [method] * n,
                "concept_id": [concept_ids[c] for c in ci]}
        roll_parts.append(
            pa.table(
                {
                    **keys,
                    "concept": [f"concept number {c}" for c in ci],
                    "concept_level": [levels[c] for c in ci],
                    "prompt_id": [prompt_ids[p] for p in pj],
                    "prompt": [f"Please answer question {p}." for p in pj],
                    "layer": pa.array(np.full(n, 10), pa.int32()),
                    "alpha": a,
                    "vector_norm": norm_c[ci],
                    "alpha_raw": a,
                    "seed": pa.array(np.arange(n), pa.int64()),
                    "response": ["..."] * n,
                    "response_tokens": pa.array(length, pa.int32()),
                    "finish_reason": ["stop"] * n,
                    "label": pa.array(label_col, pa.int8()),
                    "judge_model": ["synthetic"] * n,
                    "judge_status": status.tolist(),
                    "judge_explanation": [""] * n,
                    "judge_error": [
                        "synthetic failure" if s == "failed" else None for s in status
                    ],
                    "judge_rubric": ["synthetic" if s != "pending" else None
                                     for s in status],
                },
                schema=contract.ROLLOUTS_SCHEMA,
            )
        )
        feat_parts.append(
            pa.table(
                {
                    **keys,
                    "prompt_id": [prompt_ids[p] for p in pj],
                    "alpha": a,
                    **{c: pa.array(feats[c].astype(np.float32)) for c in cols},
                },
                schema=contract.features_schema(cols),
            )
        )
    return {
        "rollouts": pa.concat_tables(roll_parts),
        "features": pa.concat_tables(feat_parts),
        "concepts": concepts,
        "prompts": prompts,
    }


def write_dataset(folder: str | Path, tables: dict[str, pa.Table] | None = None, **kwargs) -> Path:
    """Write the configs as ``<folder>/<config>/train-00000.parquet``."""
    folder = Path(folder)
    tables = tables if tables is not None else generate(**kwargs)
    for name, table in tables.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / name / "train-00000.parquet")
    return folder
