"""Transfer: one pooled predictor over several models and both methods, tested on a
model or a method it never saw.

The paper says one predictor "generalises across three models and two steering
methods" but trains one per (model, method). This module tests the claim: it pools the
(model, method) pairs of a dataset, makes their features comparable, holds out one
model (or one method) entirely, and scores the pooled predictor on the held-out pairs'
held-out rows against two references trained on the held-out pair itself:

* ``per_pair``: the usual per-(model, method) predictor trained on the held-out pair's
  own training split (the in-domain upper reference a transferred predictor chases);
* ``alpha_only``: the same learner on alpha alone, trained on that pair's training split
  (the baseline every predictor must beat, `train.evaluate`).

Raw scales differ across models (vector norms, residual-stream magnitudes) and across
methods (a probe's alpha grid is ~3x smaller than DiffMean's), so the pooled predictor
does not see raw features; every transform it does see is listed in ``TRANSFORMS`` and
in the output. Per-pair standardisation uses only that pair's training-split feature
values (never labels, never the rows it is scored on); for a held-out pair that is
unlabelled data a user of a new model would have from a few probe rollouts.

Rows scored: the held-out pairs' ``test`` and ``unseen`` splits (`train.splits`: seen
concepts' held-out prompts and unseen concepts), the same rows for all three models,
pooled over the held-out pairs before macro-F1 (`train.metrics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from train.data import CLASS_NAMES, list_pairs, load_dataset
from train.evaluate import fit_alpha_only
from train.metrics import macro_f1
from train.model import fit_predictor
from train.splits import make_splits

EVAL_SPLITS = ("test", "unseen")
ALPHA_X_NORM = "alpha_x_norm"
Z_PREFIX = "z_"
# Every transform the pooled predictor's inputs go through, by name.
TRANSFORMS = {
    ALPHA_X_NORM: "alpha * vector_norm: the size of the added vector, comparable across "
    "models and methods whose unit vectors and alpha grids differ in scale (raw, not "
    "standardised)",
    "zscore_per_pair": "every other feature, alpha and vector_norm included, minus its "
    "mean and over its std within its (model, method), mean and std taken from that "
    "pair's training-split rows only (features, not labels); a constant column becomes 0. "
    f"Columns are renamed '{Z_PREFIX}<name>'",
}


class TransferError(ValueError):
    """A dataset on which transfer cannot be measured; the message says why."""


@dataclass
class Pooled:
    """All usable labelled rows of every (model, method) pair, one frame."""

    frame: pd.DataFrame  # with `model`, `method`, `label`, concept/prompt keys, features
    feature_names: list[str]  # raw feature columns common to every pair
    concepts: pd.DataFrame
    pairs: list[tuple[str, str]]
    reports: dict[str, dict]


def load_pooled(source) -> Pooled:
    """Load every pair (`train.data.load_dataset`) and check they share one feature set:
    a feature one pair lacks cannot be pooled, and silently dropping it would change
    what the per-pair reference sees, so it is an error naming the column and pair."""
    pairs = list_pairs(source)
    if len(pairs) < 2:
        raise TransferError(f"transfer needs at least two (model, method) pairs, found {pairs}")
    frames, reports, names, concepts = [], {}, None, None
    for model, method in pairs:
        d = load_dataset(source, model, method)
        if names is None:
            names, concepts = list(d.feature_names), d.concepts
        else:
            missing = sorted(set(names) - set(d.feature_names))
            extra = sorted(set(d.feature_names) - set(names))
            if missing or extra:
                raise TransferError(
                    f"({model}, {method}) features differ from ({pairs[0][0]}, "
                    f"{pairs[0][1]}): missing {missing[:10]}, extra {extra[:10]}"
                )
        frames.append(d.frame.assign(model=model, method=method))
        reports[f"{model}/{method}"] = d.report
    for need in ("alpha", "vector_norm"):
        if need not in names:
            raise TransferError(f"feature column {need!r} is required for {ALPHA_X_NORM}")
    frame = pd.concat(frames, ignore_index=True)
    return Pooled(frame, names, concepts, pairs, reports)


def split_frame(pooled: Pooled, seed: int) -> pd.Series:
    """Split name per row, one `train.splits.make_splits` draw per pair with ``seed``:
    the draw depends only on concepts, prompts and seed, so pairs sharing them get the
    same unseen concepts and prompt split."""
    out = pd.Series(index=pooled.frame.index, dtype=object, name="split")
    for _pair, rows in pooled.frame.groupby(["model", "method"], sort=False):
        s = make_splits(rows, pooled.concepts, seed=seed)
        out.loc[rows.index] = s.assign(rows).to_numpy()
    return out


def comparable_features(
    frame: pd.DataFrame, feature_names: list[str], split: pd.Series
) -> tuple[pd.DataFrame, list[str]]:
    """The pooled predictor's inputs (``TRANSFORMS``): ``alpha_x_norm`` plus every raw
    feature z-scored within its (model, method) on that pair's training rows."""
    raw = frame[feature_names].to_numpy(np.float64)
    z = np.empty_like(raw)
    for _, idx in frame.groupby(["model", "method"], sort=False).indices.items():
        fit_rows = idx[(split.to_numpy()[idx] == "train")]
        if len(fit_rows) == 0:
            raise TransferError("a (model, method) pair has no training rows to standardise on")
        mu = raw[fit_rows].mean(axis=0)
        sd = raw[fit_rows].std(axis=0)
        z[idx] = np.where(sd > 0, (raw[idx] - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    names = [ALPHA_X_NORM] + [Z_PREFIX + n for n in feature_names]
    out = pd.DataFrame(z.astype(np.float32), columns=names[1:], index=frame.index)
    out.insert(
        0, ALPHA_X_NORM, (frame["alpha"] * frame["vector_norm"]).to_numpy(np.float32)
    )
    return out, names


def holdout_mask(frame: pd.DataFrame, kind: str, value: str) -> np.ndarray:
    """Rows of the held-out model (``kind="model"``) or method (``kind="method"``): the
    pooled predictor never trains or early-stops on them; they alone are scored."""
    if kind not in ("model", "method"):
        raise TransferError(f"hold-out kind must be 'model' or 'method', got {kind!r}")
    mask = (frame[kind] == value).to_numpy()
    if not mask.any():
        raise TransferError(f"no rows with {kind}={value!r} to hold out")
    return mask


def _xy(x: pd.DataFrame, y: pd.Series, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.loc[mask].to_numpy(np.float32), y.loc[mask].to_numpy()


def _fit(x, y, split, train_mask, names, n_trials, seed, threads):
    tr = train_mask & (split == "train")
    va = train_mask & (split == "val")
    xt, yt = _xy(x, y, tr)
    xv, yv = _xy(x, y, va)
    return fit_predictor(
        xt, yt, xv, yv, names, n_trials=n_trials, seed=seed, num_threads=threads,
        max_rounds=500, early_stopping_rounds=30,
    )


def _summary(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "values": [round(float(v), 4) for v in values],
    }


def run_transfer(
    source,
    split_seeds: list[int] | tuple[int, ...] = tuple(range(10)),
    n_trials: int = 5,
    num_threads: int = 2,
    log=None,
    with_raw: bool = True,
) -> dict:
    """Leave-one-model-out and leave-one-method-out macro-F1 of the pooled predictor vs
    the held-out pairs' per-pair predictor and alpha-only baseline, per split seed.

    Per seed every pair's per-pair and alpha-only models are fitted once and reused by
    both protocols (they do not depend on what is held out). ``with_raw`` adds
    ``pooled_raw``, the same pooling on untransformed features (alpha, vector_norm and
    the raw feature columns), to show what the transforms are worth."""
    t0 = time.perf_counter()
    pooled = load_pooled(source)
    frame = pooled.frame
    models = sorted(frame["model"].unique())
    methods = sorted(frame["method"].unique())
    if len(models) < 2 and len(methods) < 2:
        raise TransferError("need two models or two methods to hold one out")
    holdouts = [("model", m) for m in models if len(models) > 1] + [
        ("method", m) for m in methods if len(methods) > 1
    ]
    y = frame["label"]
    variants = ["pooled", "per_pair", "alpha_only"] + (["pooled_raw"] if with_raw else [])
    scores: dict[tuple[str, str], dict[str, list[float]]] = {
        h: {v: [] for v in variants} for h in holdouts
    }
    per_pair_scores: dict[str, dict[str, list[float]]] = {}
    n_eval: dict[tuple[str, str], list[int]] = {h: [] for h in holdouts}
    n_train: dict[tuple[str, str], list[int]] = {h: [] for h in holdouts}
    names_used: list[str] = []
    for seed in split_seeds:
        split = split_frame(pooled, seed)
        x, names_used = comparable_features(frame, pooled.feature_names, split)
        split_arr = split.to_numpy()
        evaluated = np.isin(split_arr, EVAL_SPLITS)
        pair_pred: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        raw = frame[pooled.feature_names]
        for model, method in pooled.pairs:
            mask = ((frame["model"] == model) & (frame["method"] == method)).to_numpy()
            per = _fit(raw, y, split_arr, mask, pooled.feature_names, n_trials, seed,
                       num_threads)
            rows = frame[mask]
            tr = rows[split_arr[mask] == "train"]
            va = rows[split_arr[mask] == "val"]
            alpha = fit_alpha_only(tr, va, seed=seed, num_threads=num_threads)
            ev = mask & evaluated
            pair_pred[(model, method)] = (
                per.predict(raw.loc[ev]), alpha.predict(frame.loc[ev])
            )
            key = f"{model}/{method}"
            s = per_pair_scores.setdefault(key, {"per_pair": [], "alpha_only": []})
            yt = y.loc[ev].to_numpy()
            s["per_pair"].append(macro_f1(yt, pair_pred[(model, method)][0]))
            s["alpha_only"].append(macro_f1(yt, pair_pred[(model, method)][1]))
        for kind, value in holdouts:
            held = holdout_mask(frame, kind, value)
            pooled_model = _fit(x, y, split_arr, ~held, names_used, n_trials, seed,
                                num_threads)
            n_train[(kind, value)].append(int((~held & (split_arr == "train")).sum()))
            ev = held & evaluated
            y_true = y.loc[ev].to_numpy()
            pooled_pred = pooled_model.predict(x.loc[ev])
            # per-pair / alpha-only predictions in the same row order as `ev`
            per_pred = np.empty(len(y_true), dtype=np.int64)
            alpha_pred = np.empty(len(y_true), dtype=np.int64)
            ev_index = frame.index[ev]
            pos = pd.Series(np.arange(len(ev_index)), index=ev_index)
            for (model, method), (pp, ap) in pair_pred.items():
                m_ev = ((frame["model"] == model) & (frame["method"] == method)).to_numpy() & ev
                if not m_ev.any():
                    continue
                where = pos.loc[frame.index[m_ev]].to_numpy()
                per_pred[where], alpha_pred[where] = pp, ap
            sc = scores[(kind, value)]
            sc["pooled"].append(macro_f1(y_true, pooled_pred))
            sc["per_pair"].append(macro_f1(y_true, per_pred))
            sc["alpha_only"].append(macro_f1(y_true, alpha_pred))
            if with_raw:
                raw_model = _fit(raw, y, split_arr, ~held, pooled.feature_names, n_trials,
                                 seed, num_threads)
                sc["pooled_raw"].append(macro_f1(y_true, raw_model.predict(raw.loc[ev])))
            n_eval[(kind, value)].append(int(ev.sum()))
            if log:
                log(f"seed {seed} hold out {kind}={value}: "
                    + ", ".join(f"{k} {v[-1]:.3f}" for k, v in sc.items()))

    def block(kind: str) -> dict:
        out = {}
        for (k, value), sc in scores.items():
            if k != kind:
                continue
            held_pairs = [
                f"{a}/{b}" for a, b in pooled.pairs if (a if k == "model" else b) == value
            ]
            out[value] = {
                "held_out_pairs": held_pairs,
                "trained_on_pairs": [f"{a}/{b}" for a, b in pooled.pairs
                                     if f"{a}/{b}" not in held_pairs],
                "pooled_train_rows_per_seed": n_train[(k, value)],
                "eval_rows_per_seed": n_eval[(k, value)],
                **{name: _summary(v) for name, v in sc.items()},
                "pooled_minus_alpha_only_mean": float(
                    np.mean(sc["pooled"]) - np.mean(sc["alpha_only"])
                ),
                "pooled_minus_per_pair_mean": float(
                    np.mean(sc["pooled"]) - np.mean(sc["per_pair"])
                ),
            }
        return out

    shape = {
        f"{a}/{b}": {
            "rows": int(((frame["model"] == a) & (frame["method"] == b)).sum()),
            "label_counts": pooled.reports[f"{a}/{b}"]["label_counts"],
            "dropped_judge_status": pooled.reports[f"{a}/{b}"]["dropped_judge_status"],
        }
        for a, b in pooled.pairs
    }
    return {
        "what": "macro-F1 on held-out pairs' test+unseen rows; pooled predictor trained on "
        "the other pairs' train split (early-stopped on their val split) vs the held-out "
        "pair's own per-pair predictor and alpha-only baseline (its train/val split)",
        "source": str(source),
        "metric": "macro_f1",
        "eval_splits": list(EVAL_SPLITS),
        "split_seeds": [int(s) for s in split_seeds],
        "search_trials": n_trials,
        "transforms": TRANSFORMS,
        "pooled_features": {"count": len(names_used), "first": names_used[:5]},
        "raw_features": len(pooled.feature_names),
        "dataset": {
            "models": models,
            "methods": methods,
            "pairs": shape,
            "rows": len(frame),
            "label_counts": {
                CLASS_NAMES[k]: int(v)
                for k, v in frame["label"].value_counts().sort_index().items()
            },
        },
        "leave_one_model_out": block("model"),
        "leave_one_method_out": block("method"),
        "per_pair_in_domain": {k: {n: _summary(v) for n, v in s.items()}
                               for k, s in per_pair_scores.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def transfer_markdown(res: dict) -> str:
    """A self-contained report section: one table per protocol, then the transforms."""
    lines = [
        "## Transfer across models and methods",
        "",
        f"Macro-F1 on the held-out pairs' {' + '.join(res['eval_splits'])} rows, mean ± std "
        f"over {len(res['split_seeds'])} split seeds. *pooled*: one predictor trained on "
        "the other pairs; *per-pair*: the held-out pair's own predictor (in-domain "
        "reference); *alpha-only*: alpha alone, trained on the held-out pair; *pooled "
        "raw*: the pooled predictor without the transforms below.",
        "",
    ]
    for title, key in (("Leave one model out", "leave_one_model_out"),
                       ("Leave one method out", "leave_one_method_out")):
        if not res[key]:
            continue
        shown = [m for m in ("pooled", "per_pair", "alpha_only", "pooled_raw")
                 if m in next(iter(res[key].values()))]
        lines += [f"### {title}", "",
                  "| held out | " + " | ".join(m.replace("_", " ") for m in shown)
                  + " | pooled − alpha-only |",
                  "|---|" + "---|" * (len(shown) + 1)]
        for value, r in res[key].items():
            cells = [value] + [
                f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}" for m in shown
            ] + [f"{r['pooled_minus_alpha_only_mean']:+.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Transforms of the pooled predictor's inputs:", ""]
    lines += [f"- `{k}`: {v}" for k, v in res["transforms"].items()]
    return "\n".join(lines) + "\n"


def write_transfer(source, out, **kwargs) -> dict:
    """`asteer-train transfer`: run and write transfer.json + transfer.md into ``out``."""
    import json
    from pathlib import Path

    res = run_transfer(source, **kwargs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "transfer.md").write_text(transfer_markdown(res))
    return res


__all__ = [
    "TRANSFORMS", "TransferError", "Pooled", "load_pooled", "split_frame", "holdout_mask",
    "comparable_features", "run_transfer", "transfer_markdown", "write_transfer",
]
