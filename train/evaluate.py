"""Evaluation of a predictor against baselines, and where its signal comes from.

A macro-F1 number alone says little: on a grid where success is a hump in alpha, alpha
by itself already separates under from over. So every table carries the majority-class
and an alpha-only model trained on the same rows; the predictor is only interesting by
its margin over the alpha-only model, especially on unseen concepts.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from train.data import CLASS_NAMES
from train.feature_names import parse_feature_name
from train.metrics import classification_report
from train.model import Predictor, fit_predictor

EVAL_SPLITS = {"seen_test": "test", "unseen": "unseen"}
ALPHA_ONLY_PARAMS = {"num_leaves": 7, "learning_rate": 0.1, "min_data_in_leaf": 5}


class MajorityBaseline:
    """Predicts the most frequent training class for every row."""

    def __init__(self, y_train: np.ndarray):
        self.cls = int(np.bincount(np.asarray(y_train, dtype=np.int64), minlength=3).argmax())

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        return np.full(len(rows), self.cls, dtype=np.int64)


def fit_alpha_only(
    train: pd.DataFrame, val: pd.DataFrame, seed: int = 42, num_threads: int = 2
) -> Predictor:
    """Same learner, class weights and early stopping as the predictor, alpha only."""
    return fit_predictor(
        train[["alpha"]].to_numpy(np.float32),
        train["label"].to_numpy(),
        val[["alpha"]].to_numpy(np.float32),
        val["label"].to_numpy(),
        ["alpha"],
        seed=seed,
        num_threads=num_threads,
        max_rounds=300,
        early_stopping_rounds=30,
        fixed_params=ALPHA_ONLY_PARAMS,
    )


def evaluate_models(models: dict, frame: pd.DataFrame) -> dict:
    """``{split: {model_name: classification_report}}`` for seen-test and unseen rows."""
    out: dict[str, dict] = {}
    for name, split in EVAL_SPLITS.items():
        rows = frame[frame["split"] == split]
        if rows.empty:
            continue
        y = rows["label"].to_numpy()
        out[name] = {
            m: classification_report(y, model.predict(rows)) for m, model in models.items()
        }
    return out


def metrics_markdown(results: dict) -> str:
    """One table: split x model with macro-F1, accuracy and per-class F1 / recall."""
    head = ["split", "model", "n", "macro-F1", "accuracy"] + [f"{c} F1 / R" for c in CLASS_NAMES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split, by_model in results.items():
        for model, r in by_model.items():
            cells = [split, model, str(r["n"]), f"{r['macro_f1']:.3f}", f"{r['accuracy']:.3f}"]
            cells += [
                f"{r['per_class'][c]['f1']:.3f} / {r['per_class'][c]['recall']:.3f}"
                for c in CLASS_NAMES
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def feature_importance(predictor: Predictor) -> dict:
    """Gain importance as fractions of the total, per feature and aggregated.

    Aggregates by group, by token and by layer offset are over the features that have
    that attribute (statistics pooled over all tokens have no token), plus a
    token x layer-offset matrix for the heatmap built from per-cell entries.
    """
    gain = np.asarray(predictor.booster.feature_importance(importance_type="gain"), float)
    total = gain.sum() or 1.0
    frac = gain / total
    by_group: dict[str, float] = defaultdict(float)
    by_token: dict[str, float] = defaultdict(float)
    by_offset: dict[str, float] = defaultdict(float)
    cells: dict[tuple[int, int], float] = defaultdict(float)
    for name, f in zip(predictor.feature_names, frac, strict=True):
        info = parse_feature_name(name)
        by_group[info.group] += f
        by_token["none" if info.token is None else str(info.token)] += f
        by_offset["none" if info.layer_offset is None else str(info.layer_offset)] += f
        if info.token is not None and info.layer_offset is not None:
            cells[(info.token, info.layer_offset)] += f
    tokens = sorted({t for t, _ in cells})
    offsets = sorted({k for _, k in cells})
    matrix = [[cells.get((t, k), 0.0) for k in offsets] for t in tokens]
    per_feature = sorted(
        zip(predictor.feature_names, frac.tolist(), strict=True), key=lambda kv: -kv[1]
    )

    def _sorted(d: dict) -> dict:
        return dict(sorted(d.items(), key=lambda kv: -kv[1]))

    return {
        "type": "gain",
        "by_group": _sorted(by_group),
        "by_token": _sorted(by_token),
        "by_layer_offset": _sorted(by_offset),
        "heatmap": {"tokens": tokens, "layer_offsets": offsets, "values": matrix},
        "top_features": per_feature[:30],
    }


def label_fraction_by_alpha(frame: pd.DataFrame) -> pd.DataFrame:
    """Fraction of under / success / over at each alpha (the reference's hump plot)."""
    counts = pd.crosstab(frame["alpha"], frame["label"]).reindex(columns=[0, 1, 2], fill_value=0)
    frac = counts.div(counts.sum(axis=1), axis=0)
    frac.columns = list(CLASS_NAMES)
    return frac
