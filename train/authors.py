"""Read the reference authors' released feature caches as a training frame.

The authors publish their testbed (Hub dataset ``Fcr09/SteerBoost-data``) with one
feature matrix per (steering method, model, steered layer) under
``cache/features__{method}__{model}__L{layer}.npz`` (arrays ``X``, ``y``,
``concept_id``, ``alpha``, ``sample_id``) and a sidecar ``..._meta.json`` (``curr_layer``,
``k_list``, ``target_token_n_list``, ``label_map``, ``feature_dim``, ...; their
``xgb/feature_cache.py`` / ``xgb/build_feature_cache.py``). Reading it lets someone without
a GPU reproduce the paper's predictor with this package. Their columns carry absolute
layer names; ``asteer_build.engine.feature_names.authors_names`` is the one place that maps
them to ours, and every column must map (a missing or extra one is an error naming it),
so a silently shifted layer cannot train a predictor on the wrong features.

Their caches hold no response lengths and no judge status: ``response_tokens`` is NaN and
every row counts as judged ``ok`` (their failed judgments were stored as under-steer and
cannot be told apart; the report says so). `join_lengths` fills ``response_tokens`` from a
dataset that `asteer-build import` made of their result files (which do carry the
responses), so the strength search can run on the caches' rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from asteer_build.core import contract
from asteer_build.core.feature_names import authors_columns, authors_names

CACHE_DIR = "cache"
CACHE_GLOB = "features__*.npz"
#: what a Hub download of the authors' layout needs (not their ~9 GB of tarballs)
HUB_PATTERNS = ["cache/features__*"]
ARRAYS = ("X", "y", "concept_id", "alpha", "sample_id")
#: their judge's label strings (their `build_label_map`) -> our classes
LABEL_NAMES = {"understeer": 0, "success": 1, "over steer": 2, "oversteer": 2}
#: concept levels as id ranges (their `xgb/concept_partition.py`; the paper config's
#: `concepts.levels`)
LEVELS = contract.AUTHORS_LEVEL_RANGES
#: decimals alpha is compared at: the caches store it as float32, the import as float64
ALPHA_DECIMALS = 4
LENGTH_KEYS = ["model", "method", "concept_id", "prompt_id", "alpha"]
NOTE = (
    "authors' feature cache: no response lengths; failed judgments were stored by the "
    "authors as under-steer and cannot be told apart"
)


class AuthorsCacheError(ValueError):
    """An authors' cache file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class CacheFile:
    model: str
    method: str
    layer: int
    npz: Path
    meta: Path


def is_authors_layout(root: str | Path) -> bool:
    """True when ``root`` holds the authors' feature caches (``cache/features__*.npz``)."""
    folder = Path(root) / CACHE_DIR
    return folder.is_dir() and any(folder.glob(CACHE_GLOB))


def find_caches(root: str | Path) -> list[CacheFile]:
    """Every feature cache under ``root/cache``, parsed from its file name."""
    out = []
    for npz in sorted((Path(root) / CACHE_DIR).glob(CACHE_GLOB)):
        parts = npz.stem.split("__")
        if len(parts) != 4 or not parts[3].startswith("L") or not parts[3][1:].isdigit():
            raise AuthorsCacheError(
                f"{npz.name}: expected features__{{method}}__{{model}}__L{{layer}}.npz"
            )
        meta = npz.with_name(npz.stem + "_meta.json")
        if not meta.is_file():
            raise AuthorsCacheError(f"{npz.name}: sidecar {meta.name} is missing")
        out.append(CacheFile(parts[2], parts[1], int(parts[3][1:]), npz, meta))
    return out


def list_pairs(root: str | Path) -> list[tuple[str, str]]:
    return sorted({(c.model, c.method) for c in find_caches(root)})


def concept_level(cid: int) -> str:
    level = contract.authors_concept_level(cid)
    if level is not None:
        return level
    raise AuthorsCacheError(f"concept_id {cid} is outside the authors' level ranges 0-149")


def _few(names: list[str], shown: int = 8) -> str:
    """A list for an error message: the first few names and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"


def column_map(meta: dict, layer: int, width: int, source: str) -> dict[str, str]:
    """Theirs -> ours for the cache's columns, in their column order.

    The column names are their ``feature_names`` if the meta lists them, else what their
    ``build_feature_names`` gives for the meta's layer, ``k_list`` and
    ``target_token_n_list`` (offset 0 and step 0 are implicit there)."""
    steps = sorted({0, *map(int, meta.get("target_token_n_list", [1, 3, 5]))})
    offsets = sorted({0, *map(int, meta.get("k_list", [1, 2, 3, 5, 10, 15]))})
    ours_to_theirs = authors_names(layer, steps, offsets)
    theirs_to_ours = {v: k for k, v in ours_to_theirs.items()}
    expected = authors_columns(layer, steps, offsets)
    names = [str(n) for n in meta.get("feature_names", expected)]
    extra = [n for n in names if n not in theirs_to_ours]
    missing = [n for n in expected if n not in set(names)]
    if extra or missing:
        raise AuthorsCacheError(
            f"{source}: columns do not match the authors' layout at L{layer}: "
            f"missing {_few(missing)}, extra {_few(extra)}"
        )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise AuthorsCacheError(f"{source}: duplicate columns {dup}")
    if len(names) != width or int(meta.get("feature_dim", width)) != width:
        raise AuthorsCacheError(
            f"{source}: X has {width} columns, the meta's layout has {len(names)} "
            f"(feature_dim {meta.get('feature_dim')})"
        )
    return {n: theirs_to_ours[n] for n in names}


def _label_codes(meta: dict, source: str) -> dict[int, int]:
    """Their stored code -> our class, from the meta's ``label_map`` (name -> code)."""
    raw = meta.get("label_map")
    if not raw:
        return {0: 0, 1: 1, 2: 2}
    codes = {}
    for name, code in raw.items():
        cls = LABEL_NAMES.get(str(name).strip().lower())
        if cls is not None:
            codes[int(code)] = cls
    if sorted(set(codes.values())) != [0, 1, 2]:
        raise AuthorsCacheError(f"{source}: label_map {raw} lacks one of {sorted(LABEL_NAMES)}")
    return codes


def load_cache(cache: CacheFile) -> tuple[pd.DataFrame, list[str], dict]:
    """One cache as train's frame: keys, ``label``, levels and our feature columns."""
    source = cache.npz.name
    try:
        meta = json.loads(cache.meta.read_text())
    except json.JSONDecodeError as exc:
        raise AuthorsCacheError(f"{cache.meta.name}: not JSON ({exc})") from exc
    with np.load(cache.npz) as raw:
        absent = [k for k in ARRAYS if k not in raw.files]
        if absent:
            raise AuthorsCacheError(f"{source}: arrays {absent} missing (has {raw.files})")
        arrays = {k: raw[k] for k in ARRAYS}
    X = arrays["X"]
    n = len(arrays["y"])
    if X.ndim != 2 or X.shape[0] != n or any(len(arrays[k]) != n for k in ARRAYS[2:]):
        raise AuthorsCacheError(f"{source}: arrays have different row counts")
    layer = int(meta.get("curr_layer", cache.layer))
    if layer != cache.layer:
        raise AuthorsCacheError(f"{source}: meta curr_layer {layer} != file name L{cache.layer}")
    mapping = column_map(meta, layer, X.shape[1], source)
    codes = _label_codes(meta, source)
    y = pd.Series(arrays["y"].astype(np.int64)).map(codes)
    features = pd.DataFrame(X.astype(np.float32), columns=list(mapping.values()))
    cids = arrays["concept_id"].astype(np.int64)
    levels = {int(c): concept_level(int(c)) for c in np.unique(cids)}
    keys = pd.DataFrame(
        {
            "model": cache.model,
            "method": cache.method,
            "concept_id": cids.astype(str),
            "concept": cids.astype(str),
            "concept_level": [levels[int(c)] for c in cids],
            "prompt_id": arrays["sample_id"].astype(np.int64).astype(str),
            "response_tokens": np.nan,
            "label": y,
        }
    )
    keys["id"] = (
        cache.model + "|" + cache.method + "|" + keys["concept_id"] + "|" + keys["prompt_id"]
        + "|" + pd.Series(arrays["alpha"].astype(float)).map(repr)
    )
    # alpha is both a key and a feature (their `Alpha` column); the key is the array
    features["alpha"] = arrays["alpha"].astype(np.float32)
    frame = pd.concat([keys, features], axis=1)
    unknown = int(frame["label"].isna().sum())
    frame = frame[frame["label"].notna()].copy()
    frame["label"] = frame["label"].astype(np.int64)
    if frame["id"].duplicated().any():
        dup = frame.loc[frame["id"].duplicated(), "id"].iloc[0]
        raise AuthorsCacheError(f"{source}: several rows for one (concept, prompt, alpha): {dup}")
    report = {
        "source_format": "authors-feature-cache",
        "cache_file": source,
        "layer": layer,
        "rows_total": n,
        "dropped_label_not_in_map": unknown,
        "note": NOTE,
    }
    return frame.reset_index(drop=True), list(mapping.values()), report


def load_pair(
    root: str | Path, model: str, method: str
) -> tuple[pd.DataFrame, list[str], dict, pd.DataFrame]:
    """Load the cache of one (model, method), chosen by `train.data.load_dataset`."""
    caches = find_caches(root)
    mine = [c for c in caches if (c.model, c.method) == (model, method)]
    if not mine:
        raise AuthorsCacheError(f"no cache for model={model!r} method={method!r}")
    if len(mine) > 1:
        raise AuthorsCacheError(
            f"({model}, {method}) has caches at several layers {[c.layer for c in mine]}"
        )
    frame, names, report = load_cache(mine[0])
    concepts = (
        frame[["concept_id", "concept", "concept_level"]]
        .drop_duplicates()
        .sort_values("concept_id", key=lambda s: s.astype(int))
        .reset_index(drop=True)
    )
    return frame, names, report, concepts



def cache_method(method: str) -> str:
    """A cache's method name as the import names it (their ``probe_l2-0.01`` -> ``probe``)."""
    from asteer_build.io.authors.importer import method_name

    try:
        return method_name(method)
    except ValueError:
        return method


def join_lengths(frame: pd.DataFrame, lengths: pd.DataFrame, source: str,
                 layer: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Fill ``response_tokens`` of one (model, method) cache frame from the ``rollouts`` of
    an imported dataset (``lengths``: `LENGTH_KEYS` + ``response_tokens``).

    The key is (model, method, concept_id, prompt_id, alpha), alpha rounded to
    `ALPHA_DECIMALS` on both sides because the cache holds float32; several rows of one
    key (their samples) give their mean. Rows left without a length stay NaN and are
    counted: the search excludes them rather than charging NaN tokens. A (model, method)
    that matches no row at all is an error naming it and what ``source`` holds, because a
    lengths folder of another model would otherwise silently run no search. ``layer`` (the
    cache's) keeps only the imported rows of that layer when they say theirs."""
    model, method = str(frame["model"].iloc[0]), str(frame["method"].iloc[0])
    want = cache_method(method)
    lengths = lengths[lengths["response_tokens"].notna()]
    if layer is not None and "layer" in lengths.columns:
        lengths = lengths[lengths["layer"].isna() | (lengths["layer"] == layer)]
    mine = lengths[(lengths["model"] == model) & (lengths["method"] == want)]
    if mine.empty:
        pairs = lengths[["model", "method"]].drop_duplicates().to_numpy().tolist()
        have = sorted(map(tuple, pairs))
        raise AuthorsCacheError(
            f"--lengths {source}: no response_tokens for model={model!r} method={want!r} "
            f"(cache method {method!r}); it has {have}"
        )
    key = ["concept_id", "prompt_id", "alpha_key"]
    table = (
        mine.assign(
            concept_id=mine["concept_id"].astype(str),
            prompt_id=mine["prompt_id"].astype(str),
            alpha_key=mine["alpha"].astype(float).round(ALPHA_DECIMALS),
        )
        .groupby(key, as_index=False)["response_tokens"]
        .mean()
    )
    out = frame.drop(columns=["response_tokens"]).assign(
        alpha_key=frame["alpha"].astype(float).round(ALPHA_DECIMALS)
    )
    out = out.merge(table, on=key, how="left", validate="many_to_one").drop(columns="alpha_key")
    out = out[frame.columns]
    matched = int(out["response_tokens"].notna().sum())
    report = {
        "source": source,
        "key": LENGTH_KEYS,
        "alpha_decimals": ALPHA_DECIMALS,
        "rows_matched": matched,
        "rows_without_length": len(out) - matched,
    }
    return out, report
