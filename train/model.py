"""The steerability predictor: LightGBM multiclass with class-balanced weights.

Success is the minority class over most of the alpha grid (10-23 % in the reference),
so training uses w_c = N / (3 n_c) and the search selects on validation macro-F1, not
on log-loss or accuracy. The model is stored as LightGBM's own text format (readable,
version-tolerant) next to a JSON file with everything needed to use it safely: feature
names in order, classes, the chosen parameters and the split it was trained on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from train.data import CLASS_NAMES
from train.metrics import macro_f1

MODEL_FILE = "model.txt"
META_FILE = "predictor.json"
FORMAT_VERSION = 1


class TrainingError(ValueError):
    """Training data that would give a meaningless predictor; the message says why."""


class FeatureMismatchError(ValueError):
    """Prediction input does not carry the features the predictor was trained on."""


def class_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights w_c = N / (3 n_c); refuses data lacking a class."""
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y, minlength=3)[:3]
    present = [CLASS_NAMES[c] for c in range(3) if counts[c] > 0]
    if (counts == 0).any() or len(np.unique(y)) > 3:
        raise TrainingError(
            f"training labels contain classes {present} (counts "
            f"{dict(zip(CLASS_NAMES, counts.tolist(), strict=True))}); need all three "
            "classes 0 under, 1 success, 2 over to fit a 3-class predictor"
        )
    w_c = len(y) / (3.0 * counts)
    return w_c[y]


def _matrix(frame: pd.DataFrame | np.ndarray, feature_names: list[str]) -> np.ndarray:
    if isinstance(frame, np.ndarray):
        if frame.ndim != 2 or frame.shape[1] != len(feature_names):
            raise FeatureMismatchError(
                f"expected a 2-D array with {len(feature_names)} feature columns, "
                f"got shape {frame.shape}"
            )
        return frame.astype(np.float32, copy=False)
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise FeatureMismatchError(
            f"{len(missing)} feature column(s) the predictor was trained on are missing: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    return frame[feature_names].to_numpy(dtype=np.float32)


@dataclass
class Predictor:
    """A fitted booster plus the metadata needed to apply it to new rows."""

    booster: lgb.Booster
    feature_names: list[str]
    params: dict
    metadata: dict = field(default_factory=dict)
    classes: tuple[str, ...] = CLASS_NAMES

    def predict_proba(self, rows: pd.DataFrame | np.ndarray) -> np.ndarray:
        """(n, 3) probabilities of under / success / over, columns by name for frames."""
        x = _matrix(rows, self.feature_names)
        return np.asarray(
            self.booster.predict(
                x,
                num_iteration=self.booster.best_iteration or None,
                num_threads=int(self.params.get("num_threads", 2)),
            )
        ).reshape(len(x), 3)

    def predict(self, rows: pd.DataFrame | np.ndarray) -> np.ndarray:
        return self.predict_proba(rows).argmax(axis=1)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(folder / MODEL_FILE))  # best iteration only
        meta = {
            "format_version": FORMAT_VERSION,
            "feature_names": self.feature_names,
            "classes": list(self.classes),
            "params": self.params,
            "best_iteration": int(self.booster.best_iteration or 0),
            **self.metadata,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=_jsonable))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Predictor:
        folder = Path(folder)
        if not (folder / MODEL_FILE).is_file() or not (folder / META_FILE).is_file():
            raise FileNotFoundError(f"{folder}: expected {MODEL_FILE} and {META_FILE}")
        meta = json.loads((folder / META_FILE).read_text())
        booster = lgb.Booster(model_file=str(folder / MODEL_FILE))
        booster.best_iteration = int(meta.get("best_iteration", 0))
        if list(booster.feature_name()) != list(meta["feature_names"]):
            raise FeatureMismatchError(f"{folder}: model and metadata feature names differ")
        extra = {
            k: v
            for k, v in meta.items()
            if k not in {"format_version", "feature_names", "classes", "params", "best_iteration"}
        }
        return cls(
            booster,
            list(meta["feature_names"]),
            dict(meta["params"]),
            extra,
            tuple(meta["classes"]),
        )


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


# The search space: wide enough to cover small tiny-world data and the 470k-row
# reference size; each trial is early-stopped on validation multi-logloss.
def sample_params(rng: np.random.Generator) -> dict:
    return {
        "num_leaves": int(rng.choice([15, 31, 63, 127])),
        "learning_rate": float(np.exp(rng.uniform(np.log(0.02), np.log(0.2)))),
        "min_data_in_leaf": int(rng.choice([10, 20, 50, 100])),
        "feature_fraction": float(rng.uniform(0.5, 1.0)),
        "bagging_fraction": float(rng.uniform(0.6, 1.0)),
        "bagging_freq": 1,
        "lambda_l2": float(np.exp(rng.uniform(np.log(1e-3), np.log(10.0)))),
        "min_gain_to_split": float(rng.choice([0.0, 0.01, 0.1])),
    }


# The reference's search space (their `xgb/train_weighted_search.py`, XGBoost), as
# (XGBoost name, how it is drawn). Drawn in their order from one numpy Generator seeded
# like theirs, so trial i gets their trial i's values.
AUTHORS_SPACE = (
    ("n_estimators", "integers", (500, 750)),
    ("learning_rate", "choice", [0.02, 0.03, 0.05, 0.08]),
    ("max_depth", "integers", (6, 10)),
    ("min_child_weight", "choice", [2, 4, 6, 8, 10, 12]),
    ("subsample", "choice", [0.65, 0.75, 0.85, 0.95, 1.0]),
    ("colsample_bytree", "choice", [0.65, 0.75, 0.85, 0.95, 1.0]),
    ("reg_alpha", "choice", [0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0]),
    ("reg_lambda", "choice", [1.0, 2.0, 5.0, 10.0, 20.0]),
    ("gamma", "choice", [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]),
    ("max_delta_step", "choice", [0, 1, 2]),
)
#: XGBoost parameter -> its LightGBM equivalent (README, "predictor option").
#: max_depth also caps num_leaves at 2**depth, as a depth-wise XGBoost tree has at most
#: that many leaves (LightGBM grows leaf-wise, so the cap is needed to match capacity);
#: XGBoost has no minimum row count per leaf, so min_data_in_leaf is 1 and only the
#: hessian sum (min_child_weight) limits leaves, as in theirs.
XGB_TO_LIGHTGBM = {
    "n_estimators": "num_iterations",
    "learning_rate": "learning_rate",
    "max_depth": "max_depth",
    "min_child_weight": "min_sum_hessian_in_leaf",
    "subsample": "bagging_fraction",
    "colsample_bytree": "feature_fraction",
    "reg_alpha": "lambda_l1",
    "reg_lambda": "lambda_l2",
    "gamma": "min_gain_to_split",
    "max_delta_step": "max_delta_step",
}
PREDICTOR_OPTIONS = ("default", "authors")


def sample_authors_xgb(rng: np.random.Generator) -> dict:
    """One draw of the reference's XGBoost parameters, in their names and order."""
    out = {}
    for name, how, arg in AUTHORS_SPACE:
        if how == "integers":
            out[name] = int(rng.integers(*arg))
        else:
            v = rng.choice(arg)
            out[name] = int(v) if name == "max_delta_step" else float(v)
    return out


def authors_to_lightgbm(xgb_params: dict) -> dict:
    """Their XGBoost parameters as LightGBM's (see XGB_TO_LIGHTGBM)."""
    unknown = sorted(set(xgb_params) - set(XGB_TO_LIGHTGBM))
    if unknown:
        raise ValueError(f"no LightGBM equivalent for XGBoost parameter(s) {unknown}")
    out = {XGB_TO_LIGHTGBM[k]: v for k, v in xgb_params.items()}
    out["num_leaves"] = 2 ** int(xgb_params["max_depth"])
    out["min_data_in_leaf"] = 1
    out["bagging_freq"] = 1  # XGBoost's subsample draws rows for every tree
    return out


def sample_authors_params(rng: np.random.Generator) -> dict:
    """A trial of the "authors" predictor option: their draw, mapped to LightGBM."""
    return authors_to_lightgbm(sample_authors_xgb(rng))


# Not `use_quantized_grad`: it is ~30 % faster at the reference size, but LightGBM
# 4.x's CPU quantized training aborts ("Check failed: best_split_info.right_count > 0")
# or trains a degraded model under bagging and feature subsampling, which this search
# space uses (LightGBM issues 5994 / 5982 and the open fix PR 7397); it failed here too.
BASE_PARAMS = {
    "objective": "multiclass",
    "num_class": 3,
    "metric": "multi_logloss",
    "verbosity": -1,
    "deterministic": True,
    "force_row_wise": True,
}
# 63 bins per feature (LightGBM's own advice for speed) and bin boundaries from 50k
# sampled rows instead of the 200k default: at the reference size (472,500 x 414, 2
# threads) a 50-round fit drops from 61 s to 45 s (bench_train.py), and the quality
# comparison on the builder-made tiny world shows no loss of macro-F1.
DATASET_PARAMS = {
    "feature_pre_filter": False,
    "verbosity": -1,
    "max_bin": 63,
    "bin_construct_sample_cnt": 50_000,
}
# Trials of the random search see at most this many training rows (see fit_predictor).
SEARCH_ROWS = 100_000


def search_subsample(y: np.ndarray, max_rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted row indices of a class-stratified subsample of about ``max_rows`` rows,
    or None when all rows fit. Every class keeps its share (and at least one row), so
    the class-balanced weights of the full set stay balanced on the subsample."""
    y = np.asarray(y)
    if max_rows is None or len(y) <= max_rows:
        return None
    rng = np.random.default_rng(seed)
    frac = max_rows / len(y)
    keep = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = max(1, int(round(len(rows) * frac)))
        keep.append(rng.choice(rows, size=min(k, len(rows)), replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int32)


def _train(
    params: dict,
    dtrain: lgb.Dataset,
    dval: lgb.Dataset,
    x_val,
    y_val,
    max_rounds: int,
    early_stopping_rounds: int,
) -> tuple[lgb.Booster, float]:
    params = dict(params)
    fixed = params.pop("num_iterations", None)
    if fixed is not None:
        # the authors' option: a fixed number of trees (theirs trains n_estimators trees
        # with no early stopping), capped by max_rounds so tests can keep it small
        booster = lgb.train(params, dtrain, num_boost_round=min(int(fixed), max_rounds))
    else:
        booster = lgb.train(
            params,
            dtrain,
            num_boost_round=max_rounds,
            valid_sets=[dval],
            callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False)],
        )
    pred = np.asarray(booster.predict(x_val, num_iteration=booster.best_iteration))
    return booster, macro_f1(y_val, pred.reshape(len(y_val), 3).argmax(axis=1))


def fit_predictor(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    feature_names: list[str],
    n_trials: int = 20,
    seed: int = 42,
    num_threads: int = 2,
    max_rounds: int = 1000,
    early_stopping_rounds: int = 50,
    fixed_params: dict | None = None,
    search_rows: int | None = SEARCH_ROWS,
    space: str = "default",
) -> Predictor:
    """Random search: sample ``n_trials`` configurations, early-stop each on validation
    loss, keep the one with the best validation macro-F1 (ties: earlier trial).

    At the reference size (~380k training rows x 414) one full-data trial takes minutes
    on a small machine and 20 of them hours, so when there are more than
    ``search_rows`` training rows the trials run on a seeded class-stratified subsample
    of that many (a ``Dataset.subset`` of the one binned training set: no re-binning),
    and only the selected configuration is refit on all rows, early-stopped on the same
    validation set. ``search_rows=None`` runs every trial on all rows.

    ``fixed_params`` skips the search and fits that one configuration on all rows
    (benchmarks, baselines).

    ``space="authors"`` draws the trials from the reference's XGBoost search space
    mapped to LightGBM (``AUTHORS_SPACE``, ``XGB_TO_LIGHTGBM``): a fixed number of
    trees per trial, no early stopping, selection on validation macro-F1 as theirs."""
    if space not in PREDICTOR_OPTIONS:
        raise ValueError(f"predictor option {space!r}: expected one of {PREDICTOR_OPTIONS}")
    sampler = sample_authors_params if space == "authors" else sample_params
    w_train = class_weights(y_train)
    if len(np.unique(y_val)) < 2:
        raise TrainingError("validation split has fewer than two classes; cannot select")
    w_val = np.bincount(y_val, minlength=3)
    w_val = (len(y_val) / (3.0 * np.maximum(w_val, 1)))[y_val]
    ds_params = {**DATASET_PARAMS, "num_threads": num_threads}
    dtrain = lgb.Dataset(
        x_train,
        label=y_train,
        weight=w_train,
        feature_name=feature_names,
        params=ds_params,
        free_raw_data=False,
    ).construct()

    def val_set(reference: lgb.Dataset) -> lgb.Dataset:
        return lgb.Dataset(x_val, label=y_val, weight=w_val, reference=reference, params=ds_params)

    dval = val_set(dtrain)
    rng = np.random.default_rng(seed)
    configs = (
        [fixed_params]
        if fixed_params is not None
        else [sampler(rng) for _ in range(n_trials)]
    )
    sub = None if fixed_params is not None else search_subsample(y_train, search_rows, seed)
    if sub is None:
        dsearch, dval_search = dtrain, dval
    else:
        dsearch = dtrain.subset(sub, params=ds_params).construct()
        dval_search = val_set(dsearch)
    trials, best = [], None
    for i, cfg in enumerate(configs):
        params = {**BASE_PARAMS, **cfg, "seed": seed + i, "num_threads": num_threads}
        t0 = time.perf_counter()
        booster, score = _train(
            params, dsearch, dval_search, x_val, y_val, max_rounds, early_stopping_rounds
        )
        trials.append(
            {
                "trial": i,
                "params": cfg,
                "val_macro_f1": score,
                "best_iteration": int(booster.best_iteration),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        if best is None or score > best[0]:
            best = (score, booster, params, i)
    score, booster, params, idx = best
    search = {
        "space": space,
        "n_trials": len(configs),
        "selected_trial": idx,
        "val_macro_f1": score,
        "search_rows": len(y_train) if sub is None else len(sub),
        "train_rows": len(y_train),
        "trials": trials,
    }
    if sub is not None:
        t0 = time.perf_counter()
        booster, score = _train(
            params, dtrain, dval, x_val, y_val, max_rounds, early_stopping_rounds
        )
        search["refit"] = {
            "rows": len(y_train),
            "best_iteration": int(booster.best_iteration),
            "val_macro_f1": score,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        search["val_macro_f1"] = score
    return Predictor(
        booster=booster,
        feature_names=list(feature_names),
        params=params,
        metadata={"search": search},
    )
