"""Benchmark: the predictor's LightGBM configuration vs XGBoost `hist` (the reference
authors' library) at one reference model's dataset size, on this machine.

Measures, in one run, and writes to benchmarks/results/bench_train.json:
- fit time (binning and boosting timed apart) on 472,500 rows x 414 float32 features
  (synthetic, deterministic), 3 classes, class-balanced weights, with matched rounds,
  learning rate, threads and tree size, in two pairings: leaf-wise (LightGBM 63 leaves
  vs XGBoost lossguide 63 leaves) and depth-wise (LightGBM depth 6 / 64 leaves vs
  XGBoost depthwise depth 6). LightGBM runs the predictor's own dataset parameters
  (train.model.DATASET_PARAMS, BASE_PARAMS); XGBoost runs at its default 256 bins and,
  for the record, at the predictor's bin count too;
- prediction rows/s of every fitted model on all rows;
- validation (and unseen-concept) macro-F1 of the same configurations on a tiny-world
  dataset made by the project's own builder (benchmarks/configs/train_quality.yaml,
  built once into benchmarks/.work/ and reused);
- the time of the predictor's 20-trial random search (train.model.fit_predictor with
  its defaults), measured in full at the full size and on the tiny world.

XGBoost is a benchmark-only dependency and not in the package extras:
    .venv/bin/pip install xgboost
Run on an otherwise idle machine:  .venv/bin/python benchmarks/bench_train.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.metrics import macro_f1  # noqa: E402
from train.model import (  # noqa: E402
    BASE_PARAMS,
    DATASET_PARAMS,
    SEARCH_ROWS,
    class_weights,
    fit_predictor,
)

ROWS, FEATURES, THREADS = 472_500, 414, 2
ROUNDS, LR, LEAVES, DEPTH = 50, 0.1, 63, 6
QUALITY_CONFIG = ROOT / "benchmarks" / "configs" / "train_quality.yaml"
QUALITY_DIR = ROOT / "benchmarks" / ".work" / "train_quality"
SHAPES = {  # pairing -> (LightGBM tree shape, XGBoost grow policy)
    "leafwise": ({"num_leaves": LEAVES, "max_depth": -1}, "lossguide"),
    "depthwise": ({"num_leaves": 2**DEPTH, "max_depth": DEPTH}, "depthwise"),
}
XGB_DEFAULT_BINS = 256
# For the record only, not used by the predictor: LightGBM's quantized-gradient training
# (faster, but it fails under the bagging / feature subsampling the search uses).
QUANTIZED = {"use_quantized_grad": True, "num_grad_quant_bins": 4, "quant_train_renew_leaf": True}


def make_matrix(rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic float32 features; labels from a noisy nonlinear latent over the
    first 24 features, cut into ~35 % under / 20 % success / 45 % over."""
    rng = np.random.default_rng(seed)
    x = np.empty((rows, features), dtype=np.float32)
    for start in range(0, rows, 50_000):  # chunked to bound temporary float64 memory
        stop = min(start + 50_000, rows)
        x[start:stop] = rng.standard_normal((stop - start, features), dtype=np.float32)
    w = rng.normal(size=24).astype(np.float32)
    latent = x[:, :24] @ w + 0.8 * np.tanh(x[:, 24] * x[:, 25]) + rng.normal(0, 1.0, rows)
    q1, q2 = np.quantile(latent, [0.35, 0.55])
    y = np.where(latent < q1, 0, np.where(latent < q2, 1, 2)).astype(np.int64)
    return x, y


def lgb_dataset_params() -> dict:
    return {**DATASET_PARAMS, "num_threads": THREADS}


def lgb_params(shape: str) -> dict:
    """The predictor's base parameters with the matched rounds / learning rate / tree."""
    return {
        **BASE_PARAMS,
        **SHAPES[shape][0],
        "learning_rate": LR,
        "min_data_in_leaf": 20,
        "lambda_l2": 1.0,
        "num_threads": THREADS,
        "seed": 0,
    }


def xgb_params(shape: str, max_bin: int) -> dict:
    p = {
        "objective": "multi:softprob",
        "num_class": 3,
        "tree_method": "hist",
        "eta": LR,
        "max_bin": max_bin,
        "min_child_weight": 1e-3,
        "lambda": 1.0,
        "nthread": THREADS,
        "seed": 0,
        "verbosity": 0,
    }
    if SHAPES[shape][1] == "lossguide":  # leaf-wise like LightGBM: same number of leaves
        p |= {"grow_policy": "lossguide", "max_leaves": LEAVES, "max_depth": 0}
    else:  # XGBoost's default depth-wise growth
        p |= {"grow_policy": "depthwise", "max_depth": DEPTH}
    return p


def fit_lightgbm(x, y, w, shape: str, extra: dict | None = None):
    import lightgbm as lgb

    t0 = time.perf_counter()
    ds = lgb.Dataset(x, label=y, weight=w, params=lgb_dataset_params()).construct()
    t1 = time.perf_counter()
    booster = lgb.train(lgb_params(shape) | (extra or {}), ds, num_boost_round=ROUNDS)
    t2 = time.perf_counter()
    return booster, {"construct_s": t1 - t0, "train_s": t2 - t1, "fit_s": t2 - t0}


def fit_xgboost(xgb, x, y, w, shape: str, max_bin: int):
    t0 = time.perf_counter()
    dm = xgb.QuantileDMatrix(x, label=y, weight=w, max_bin=max_bin, nthread=THREADS)
    t1 = time.perf_counter()
    booster = xgb.train(xgb_params(shape, max_bin), dm, num_boost_round=ROUNDS)
    t2 = time.perf_counter()
    return booster, {"construct_s": t1 - t0, "train_s": t2 - t1, "fit_s": t2 - t0}


def _lgb_predict(booster, x):
    return np.asarray(booster.predict(x, num_threads=THREADS)).reshape(len(x), 3)


def _rows_per_s(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return len(x) / (time.perf_counter() - t0)


def variants(xgb) -> list[tuple[str, str, int | None]]:
    """(name, shape, xgboost bins or None for LightGBM) in a fixed run order."""
    lgb_bins = int(DATASET_PARAMS.get("max_bin", 255))
    out = []
    for shape in SHAPES:
        out.append((f"lightgbm_{shape}", shape, None))
        out.append((f"lightgbm_{shape}_quantized", shape, None))
        if xgb is not None:
            out.append((f"xgboost_{shape}", shape, XGB_DEFAULT_BINS))
            if lgb_bins + 1 != XGB_DEFAULT_BINS:  # XGBoost counts the missing bin
                out.append((f"xgboost_{shape}_bins{lgb_bins + 1}", shape, lgb_bins + 1))
    return out


def fit_variant(xgb, name: str, shape: str, bins: int | None, x, y, w):
    """Fit one of `variants`; returns (predict: rows -> (n, 3) probabilities, timings,
    parameters), so the timing and the quality parts fit exactly the same thing."""
    if bins is None:
        extra = QUANTIZED if name.endswith("_quantized") else {}
        lg, t = fit_lightgbm(x, y, w, shape, extra)
        params = {"dataset": lgb_dataset_params(), "train": lgb_params(shape) | extra}
        return (lambda m: _lgb_predict(lg, m)), t, params
    xg, t = fit_xgboost(xgb, x, y, w, shape, bins)
    return (lambda m: np.asarray(xg.inplace_predict(m))), t, xgb_params(shape, bins)


def fit_part(xgb, x, y, w) -> dict:
    res: dict = {}
    for name, shape, bins in variants(xgb):
        predict, t, params = fit_variant(xgb, name, shape, bins, x, y, w)
        rps = _rows_per_s(predict, x)
        res[name] = {"params": params, **t, "predict_rows_per_s": rps}
        print(name, {k: round(v, 1) for k, v in res[name].items() if k != "params"}, flush=True)
        del predict
    ratios = {}
    for name, shape, bins in variants(xgb):
        if bins is not None:
            for lg in (f"lightgbm_{shape}", f"lightgbm_{shape}_quantized"):
                ratios[f"{name}_over_{lg}"] = res[name]["fit_s"] / res[lg]["fit_s"]
    res["fit_time_ratios"] = ratios
    return res


def tiny_world_dataset() -> Path:
    """The builder's own tiny-world dataset for the quality comparison (built once)."""
    folder = QUALITY_DIR / "dataset"
    if (folder / "build.json").is_file() or (folder / "README.md").is_file():
        return folder
    from asteer_build.io.publish import assemble
    from asteer_build.pipeline.build import RunOptions, run_build
    from asteer_build.pipeline.config import load_config

    t0 = time.perf_counter()
    cfg = load_config(QUALITY_CONFIG)
    build = run_build(cfg, RunOptions(out=str(QUALITY_DIR / "build")))
    assemble(build["run"], str(folder), repo="local/asteer-train-quality")
    print(f"built tiny-world dataset in {time.perf_counter() - t0:.0f}s", flush=True)
    return folder


def _split_arrays(d, seed: int) -> tuple[dict, dict]:
    from train.splits import make_splits

    s = make_splits(d.frame, d.concepts, seed=seed)
    f = d.frame.assign(split=s.assign(d.frame))
    parts = {k: f[f["split"] == k] for k in ("train", "val", "unseen")}
    xs = {k: v[d.feature_names].to_numpy(np.float32) for k, v in parts.items()}
    return xs, {k: v["label"].to_numpy() for k, v in parts.items()}


def quality_part(xgb, split_seeds: int = 10) -> dict:
    """Validation / unseen macro-F1 of the timed configurations per method on the
    builder-made tiny world, averaged over ``split_seeds`` seeded splits (train.splits:
    a different unseen-concept partition and prompt split each): one split's validation
    set is a few hundred rows, too few to rank two learners on. Plus the predictor's
    20-trial search time and scores on the default split (seed 42)."""
    from train.data import list_pairs, load_dataset

    folder = tiny_world_dataset()
    out: dict = {
        "dataset": f"{folder.relative_to(ROOT)} (asteer-build run + publish assemble of "
        f"{QUALITY_CONFIG.relative_to(ROOT)})",
        "rounds": ROUNDS,
        "learning_rate": LR,
        "split_seeds": list(range(split_seeds)),
        "methods": {},
    }
    names = [name for name, _, _ in variants(xgb)]
    for model, method in list_pairs(folder):
        d = load_dataset(folder, model=model, method=method)
        per_seed: dict = {name: [] for name in names}
        rows = None
        for seed in range(split_seeds):
            xs, ys = _split_arrays(d, seed)
            rows = rows or {k: len(v) for k, v in ys.items()}
            w = class_weights(ys["train"])
            for name, shape, bins in variants(xgb):
                predict, _, _ = fit_variant(xgb, name, shape, bins, xs["train"], ys["train"], w)
                per_seed[name].append(
                    {k: macro_f1(ys[k], predict(xs[k]).argmax(1)) for k in ("val", "unseen")}
                )
        m: dict = {"rows_seed0": rows, "features": len(d.feature_names)}
        for name in names:
            m[name] = {
                f"{k}_macro_f1_mean": float(np.mean([r[k] for r in per_seed[name]]))
                for k in ("val", "unseen")
            } | {"val_macro_f1_per_seed": [r["val"] for r in per_seed[name]]}
        xs, ys = _split_arrays(d, 42)
        t0 = time.perf_counter()
        p = fit_predictor(
            xs["train"],
            ys["train"],
            xs["val"],
            ys["val"],
            d.feature_names,
            n_trials=20,
            num_threads=THREADS,
        )
        m["search_20_trials_seed42"] = {
            "seconds": time.perf_counter() - t0,
            "train_rows": len(ys["train"]),
            "selected_val_macro_f1": p.metadata["search"]["val_macro_f1"],
            "unseen_macro_f1": macro_f1(ys["unseen"], p.predict(xs["unseen"])),
        }
        out["methods"][f"{model}/{method}"] = m
        print("quality", method, json.dumps(m, default=float), flush=True)
    out["val_macro_f1_mean_over_methods"] = {
        name: float(np.mean([m[name]["val_macro_f1_mean"] for m in out["methods"].values()]))
        for name in names
    }
    print("quality mean", out["val_macro_f1_mean_over_methods"], flush=True)
    return out


def search_part(x, y) -> dict:
    """The predictor's 20-trial search at the full size, measured in full: 80 % of the
    rows train, 20 % validate (seeded row split)."""
    idx = np.random.default_rng(1).permutation(len(x))
    n_val = len(x) // 5
    va, tr = np.sort(idx[:n_val]), np.sort(idx[n_val:])
    t0 = time.perf_counter()
    p = fit_predictor(
        x[tr],
        y[tr],
        x[va],
        y[va],
        [f"f{i}" for i in range(x.shape[1])],
        n_trials=20,
        num_threads=THREADS,
    )
    secs = time.perf_counter() - t0
    s = p.metadata["search"]
    return {
        "train_rows": len(tr),
        "val_rows": len(va),
        "search_rows": s["search_rows"],
        "search_rows_default": SEARCH_ROWS,
        "seconds": secs,
        "trial_seconds": sum(t["seconds"] for t in s["trials"]),
        "refit": s.get("refit"),
        "selected_trial": s["selected_trial"],
        "selected_val_macro_f1": s["val_macro_f1"],
        "trials": [
            {k: t[k] for k in ("params", "best_iteration", "seconds", "val_macro_f1")}
            for t in s["trials"]
        ],
    }


def main() -> int:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--features", type=int, default=FEATURES)
    ap.add_argument("--threads", type=int, default=THREADS, help="threads for both libraries")
    ap.add_argument("--parts", default="fit,quality,search", help="subset of fit,quality,search")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_train.json"))
    a = ap.parse_args()
    THREADS = a.threads
    try:
        import xgboost as xgb
    except ImportError:
        xgb = None
        print(
            "bench_train: xgboost is not installed, so the LightGBM vs XGBoost comparison "
            "is skipped. It is a benchmark-only dependency: "
            "`.venv/bin/pip install xgboost`, then rerun.",
            file=sys.stderr,
        )
    import lightgbm as lgb

    parts = a.parts.split(",")
    res: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads_used": THREADS,
            "python": platform.python_version(),
            "lightgbm": lgb.__version__,
            "xgboost": getattr(xgb, "__version__", None),
            "loadavg_start": os.getloadavg(),
        },
        "shape": {
            "rows": a.rows,
            "features": a.features,
            "dtype": "float32",
            "data": "synthetic, numpy default_rng(0) standard normal; labels from a "
            "noisy nonlinear latent (35/20/45 %)",
        },
        "matched": {
            "rounds": ROUNDS,
            "learning_rate": LR,
            "threads": THREADS,
            "leafwise": f"{LEAVES} leaves, no depth limit (XGBoost lossguide)",
            "depthwise": f"depth {DEPTH} = at most {2**DEPTH} leaves (XGBoost depthwise)",
            "class_weights": "N/(3 n_c)",
        },
        "parts": parts,
    }
    t0 = time.perf_counter()
    x, y = make_matrix(a.rows, a.features)
    w = class_weights(y)
    print(f"data {x.shape} in {time.perf_counter() - t0:.1f}s", flush=True)
    if "fit" in parts:
        res["fit"] = fit_part(xgb, x, y, w)
    if "quality" in parts:
        res["quality"] = quality_part(xgb)
    if "search" in parts:
        res["search_20_trials_full_size"] = search_part(x, y)
        print("search", json.dumps(res["search_20_trials_full_size"], default=float)[:400])
    res["machine"]["loadavg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
