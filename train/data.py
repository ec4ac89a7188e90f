"""Load an ASTEER dataset (features + rollouts + concepts) for one (model, method).

The predictor is trained per (model, method) because steering windows are model- and
vector-specific; mixing them would let the model learn the pair instead of the state.
Rows whose judgment is not ``ok`` are dropped *and counted*: the reference code silently
recorded failed judgments as under-steer, which biases the label distribution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from asteer_build.core import contract
from asteer_build.core.prompts import PromptFormat
from train import authors
from train.authors import HUB_PATTERNS as AUTHORS_PATTERNS

# Key columns of the `features` config; everything else in it is a feature column.
# `alpha` is a key *and* a feature (the reference predictor uses it).
FEATURE_KEYS = contract.FEATURE_KEYS
# The columns of the contract's `rollouts` config that training reads.
ROLLOUT_COLUMNS = (
    "id",
    "model",
    "method",
    "concept_id",
    "concept",
    "concept_level",
    "prompt_id",
    "alpha",
    "alpha_raw",
    "vector_norm",
    "response_tokens",
    "label",
    "judge_status",
)
CLASS_NAMES = contract.LABEL_NAMES
# Only what training reads: the optional `activations` config can be hundreds of GB.
HUB_PATTERNS = ["features/**", "rollouts/**", "concepts/**", "*.json", "*.md"]


class DatasetError(ValueError):
    """The dataset cannot be used for training or evaluation; the message says why."""


@dataclass
class LoadedData:
    """One (model, method) slice, joined on ``id``, with only usable labelled rows."""

    frame: pd.DataFrame
    feature_names: list[str]
    model: str
    method: str
    concepts: pd.DataFrame
    report: dict = field(default_factory=dict)


def resolve_source(source: str | Path) -> Path:
    """Local folder as is; anything else is treated as a Hub dataset repo id, of which
    only the configs the trainer reads are downloaded (``HUB_PATTERNS``)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise DatasetError(f"dataset source {source!s} is a file, expected a folder")
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise DatasetError(
            f"dataset source {text!r} is neither an existing folder nor a Hub repo id "
            "of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download  # lazy: only for Hub sources

    try:
        # The authors' release (`train.authors`) first, with only its feature caches:
        # our patterns' `*.json` would also pull their judgments and banks.
        local = snapshot_download(
            repo_id=text, repo_type="dataset", allow_patterns=AUTHORS_PATTERNS
        )
        if authors.is_authors_layout(local):
            return Path(local)
        local = snapshot_download(
            repo_id=text,
            repo_type="dataset",
            allow_patterns=HUB_PATTERNS,
        )
    except Exception as exc:  # network, auth, missing repo: all mean "cannot load"
        raise DatasetError(f"could not download Hub dataset {text!r}: {exc}") from exc
    return Path(local)


def _parquet_files(root: Path, config: str) -> list[Path]:
    folder = root / config
    if not folder.is_dir():
        return []
    return sorted(folder.rglob("*.parquet"))


def _read_config(
    root: Path, config: str, filters: list | None = None, columns: list[str] | None = None
) -> pa.Table | None:
    files = _parquet_files(root, config)
    if not files:
        return None
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        cols = None if columns is None else [c for c in columns if c in names]
        flt = filters if filters and all(c[0] in names for c in filters) else None
        tables.append(pq.read_table(f, columns=cols, filters=flt))
    return pa.concat_tables(tables, promote_options="default")


def list_pairs(source: str | Path) -> list[tuple[str, str]]:
    """All (model, method) pairs present in the rollouts config."""
    root = resolve_source(source)
    if authors.is_authors_layout(root):
        return authors.list_pairs(root)
    table = _read_config(root, "rollouts", columns=["model", "method"])
    if table is None:
        raise DatasetError(f"{root}: no rollouts/*.parquet found")
    df = table.to_pandas().drop_duplicates()
    return sorted((str(a), str(b)) for a, b in zip(df["model"], df["method"], strict=True))


def load_dataset(
    source: str | Path, model: str | None = None, method: str | None = None,
    alpha: str = "alpha",
) -> LoadedData:
    """Join features and labelled rollouts of one (model, method).

    If the dataset holds several pairs, ``model``/``method`` must pick one; a single
    pair is selected automatically so the tiny world needs no flags. ``alpha``: the
    column the ``alpha`` feature (and the strength search's grid) reads, ``alpha`` (the
    config's units) or ``alpha_raw`` (the multiple of v applied; they differ only for an
    ``alpha_units: norm`` build).
    """
    if alpha not in ("alpha", "alpha_raw"):
        raise DatasetError(f"alpha: expected alpha or alpha_raw (got {alpha!r})")
    root = resolve_source(source)
    if authors.is_authors_layout(root) and not _parquet_files(root, "rollouts"):
        model, method = _choose_pair(authors.list_pairs(root), model, method)
        return _load_authors(root, source, model, method)
    if not _parquet_files(root, "rollouts"):
        raise DatasetError(
            f"{root}: no rollouts/*.parquet found; the rollouts config carries the labels "
            "and is required"
        )
    if not _parquet_files(root, "features"):
        raise DatasetError(f"{root}: no features/*.parquet found; run the features stage first")

    model, method = _choose_pair(list_pairs(root), model, method)
    filters = [("model", "=", model), ("method", "=", method)]

    rollouts = _read_config(root, "rollouts", filters, list(ROLLOUT_COLUMNS)).to_pandas()
    if "label" not in rollouts.columns or rollouts["label"].isna().all():
        raise DatasetError(
            f"{root}: rollouts for ({model}, {method}) have no labels (column 'label' "
            "missing or all null); run the judge stage before training"
        )
    n_total = len(rollouts)
    status = (
        rollouts["judge_status"].fillna("missing").astype(str)
        if "judge_status" in rollouts.columns
        else pd.Series(np.where(rollouts["label"].isna(), "missing", "ok"), index=rollouts.index)
    )
    not_ok = status != "ok"
    dropped_by_status = {k: int(v) for k, v in status[not_ok].value_counts().items()}
    rollouts = rollouts[~not_ok]
    unlabelled_ok = int(rollouts["label"].isna().sum())
    rollouts = rollouts[rollouts["label"].notna()].copy()
    rollouts["label"] = rollouts["label"].astype(np.int64)
    bad = sorted(set(rollouts["label"].unique()) - {0, 1, 2})
    if bad:
        raise DatasetError(f"labels must be 0 under, 1 success, 2 over; found {bad}")

    features = _read_config(root, "features", filters).to_pandas()
    if "id" not in features.columns:
        raise DatasetError(f"{root}: features config has no 'id' column to join on")
    feature_cols = [
        c
        for c in features.columns
        if c not in FEATURE_KEYS and pd.api.types.is_numeric_dtype(features[c])
    ]
    for meta in contract.META_FEATURES:  # the reference uses alpha and ||v|| as features
        if meta not in feature_cols and meta in rollouts.columns:
            feature_cols.append(meta)
    features = features.drop(
        columns=[c for c in features.columns if c in rollouts.columns and c != "id"]
    )
    frame = rollouts.merge(features, on="id", how="inner", validate="one_to_one")
    if alpha == "alpha_raw":
        if "alpha_raw" not in frame.columns or frame["alpha_raw"].isna().any():
            raise DatasetError(f"{root}: --alpha-feature alpha_raw: the rollouts of "
                               f"({model}, {method}) have no alpha_raw column (a dataset "
                               "built before it was recorded)")
        frame["alpha"] = frame["alpha_raw"]
    missing_features = len(rollouts) - len(frame)
    if frame.empty:
        raise DatasetError(f"no labelled rollout of ({model}, {method}) has a feature row")
    for c in feature_cols:
        if frame[c].dtype != np.float32:
            frame[c] = frame[c].astype(np.float32)

    concepts_table = _read_config(root, "concepts")
    if concepts_table is not None:
        concepts = concepts_table.to_pandas()
    else:  # derive from the rollouts; no `partition` column then
        concepts = frame[["concept_id", "concept", "concept_level"]].drop_duplicates()
    concepts = concepts[concepts["concept_id"].isin(frame["concept_id"])].reset_index(drop=True)

    report = {
        "source": str(source),
        "model": model,
        "method": method,
        "rows_total": n_total,
        "dropped_judge_status": dropped_by_status,
        "dropped_unlabelled_ok": unlabelled_ok,
        "dropped_missing_features": int(missing_features),
        "rows_used": len(frame),
        "n_features": len(feature_cols),
        "alpha_feature": alpha,
        "label_counts": {
            CLASS_NAMES[k]: int(v) for k, v in frame["label"].value_counts().sort_index().items()
        },
        # how the rollouts' prompts were rendered: `suggest --live` probes the same way
        "prompt_format": _prompt_format(root),
    }
    return LoadedData(
        frame=frame.reset_index(drop=True),
        feature_names=feature_cols,
        model=model,
        method=method,
        concepts=concepts,
        report=report,
    )


def _prompt_format(root: Path) -> dict:
    """The dataset's prompt format from its build.json (`asteer_build.core.prompts`);
    a folder without one (written by hand, or before the record) gets the default, the
    only format builds used then."""
    path = root / "build.json"
    try:
        build = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable: {exc}") from exc
    try:
        return PromptFormat.from_build(build).as_dict()
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from exc


def _choose_pair(
    pairs: list[tuple[str, str]], model: str | None, method: str | None
) -> tuple[str, str]:
    """The one (model, method) that `model`/`method` select, for our datasets and the
    authors' caches alike; a single pair needs no flags."""
    chosen = [p for p in pairs if (model is None or p[0] == model)]
    chosen = [p for p in chosen if (method is None or p[1] == method)]
    if not chosen:
        raise DatasetError(f"no rows for model={model!r} method={method!r}; available: {pairs}")
    if len(chosen) > 1:
        raise DatasetError(
            f"dataset holds several (model, method) pairs {chosen}; pick one with "
            "--model/--method (one predictor per pair)"
        )
    return chosen[0]


def _load_authors(root: Path, source: str | Path, model: str, method: str) -> LoadedData:
    """The authors' feature caches (`train.authors`) as one (model, method) slice."""
    try:
        frame, names, extra, concepts = authors.load_pair(root, model, method)
    except authors.AuthorsCacheError as exc:
        raise DatasetError(str(exc)) from exc
    report = {
        "source": str(source),
        "model": model,
        "method": method,
        "rows_total": extra["rows_total"],
        "dropped_judge_status": {},
        "dropped_unlabelled_ok": 0,
        "dropped_label_not_in_map": extra["dropped_label_not_in_map"],
        "dropped_missing_features": 0,
        "rows_used": len(frame),
        "n_features": len(names),
        "label_counts": {
            CLASS_NAMES[k]: int(v) for k, v in frame["label"].value_counts().sort_index().items()
        },
        **{k: extra[k] for k in ("source_format", "cache_file", "layer", "note")},
    }
    return LoadedData(frame, names, model, method, concepts, report)


def with_lengths(data: LoadedData, source: str | Path | None) -> LoadedData:
    """``data`` (the authors' feature caches) with ``response_tokens`` joined from the
    ``rollouts`` config of an imported dataset (``asteer-build import``, a folder or Hub
    id); ``None`` returns ``data`` as is. Only the caches lack lengths, so any other
    source is an error rather than a silent overwrite of lengths it already has."""
    if source is None:
        return data
    if data.report.get("source_format") != "authors-feature-cache":
        raise DatasetError(
            f"--lengths {source}: only the authors' feature caches need lengths joined; "
            f"{data.report.get('source')} carries its own response_tokens"
        )
    table = _read_config(resolve_source(source), "rollouts",
                         columns=[*authors.LENGTH_KEYS, "layer", "response_tokens"])
    if table is None:
        raise DatasetError(f"--lengths {source}: no rollouts/*.parquet found")
    missing = [c for c in (*authors.LENGTH_KEYS, "response_tokens")
               if c not in table.column_names]
    if missing:
        raise DatasetError(f"--lengths {source}: rollouts lack the column(s) {missing} "
                           "(expected an `asteer-build import` folder)")
    try:
        frame, rep = authors.join_lengths(data.frame, table.to_pandas(), str(source),
                                          layer=data.report.get("layer"))
    except authors.AuthorsCacheError as exc:
        raise DatasetError(str(exc)) from exc
    report = data.report | {
        "lengths": rep,
        "note": "authors' feature cache with response lengths joined from "
        f"{source}; failed judgments were stored by the authors as under-steer and cannot "
        "be told apart",
    }
    return LoadedData(frame, data.feature_names, data.model, data.method, data.concepts, report)
