"""Benchmark: the predictor's LightGBM configuration vs XGBoost `hist` (the reference
authors' library) at one reference model's dataset size, on this machine.

Measures, and writes to benchmarks/results/bench_train.json:
- fit time on 472,500 rows x 414 float32 features (synthetic, deterministic), 3 classes,
  class-balanced weights, matched rounds / leaves / learning rate / bins / threads;
  binning (dataset construction) and boosting timed apart;
- prediction rows/s of the fitted models on all rows;
- validation and unseen-concept macro-F1 of both with the same settings on a small
  synthetic dataset in the published schema (train.synthetic; no builder-made dataset
  exists yet, the JSON says so);
- the time of the 20-trial random search (train.model.fit_predictor): measured in
  full on the small synthetic dataset, and for the full size measured with 3 of the 20
  trials on a row subsample and extrapolated (the JSON says how).

XGBoost is a benchmark-only dependency and not in the package extras:
    .venv/bin/pip install xgboost
Run:  nice -n 10 .venv/bin/python benchmarks/bench_train.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.metrics import macro_f1  # noqa: E402
from train.model import class_weights, fit_predictor  # noqa: E402

ROWS, FEATURES, THREADS = 472_500, 414, 2
ROUNDS, LEAVES, LR, MAX_BIN = 50, 63, 0.1, 255


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


def lgb_params() -> dict:
    return {
        "objective": "multiclass",
        "num_class": 3,
        "num_leaves": LEAVES,
        "max_depth": -1,
        "learning_rate": LR,
        "max_bin": MAX_BIN,
        "min_data_in_leaf": 20,
        "lambda_l2": 1.0,
        "num_threads": THREADS,
        "verbosity": -1,
        "seed": 0,
        "deterministic": True,
        "force_row_wise": True,
    }


def xgb_params(policy: str) -> dict:
    p = {
        "objective": "multi:softprob",
        "num_class": 3,
        "tree_method": "hist",
        "eta": LR,
        "max_bin": MAX_BIN + 1,
        "min_child_weight": 1e-3,
        "lambda": 1.0,
        "nthread": THREADS,
        "seed": 0,
        "verbosity": 0,
    }
    if policy == "lossguide":  # leaf-wise like LightGBM: same number of leaves
        p |= {"grow_policy": "lossguide", "max_leaves": LEAVES, "max_depth": 0}
    else:  # XGBoost's default depth-wise growth, depth 6 = at most 64 leaves
        p |= {"grow_policy": "depthwise", "max_depth": 6}
    return p


def fit_lightgbm(x, y, w, rounds=ROUNDS):
    import lightgbm as lgb

    t0 = time.perf_counter()
    ds = lgb.Dataset(
        x, label=y, weight=w, params={"max_bin": MAX_BIN, "verbosity": -1, "num_threads": THREADS}
    ).construct()
    t1 = time.perf_counter()
    booster = lgb.train(lgb_params(), ds, num_boost_round=rounds)
    t2 = time.perf_counter()
    return booster, {"construct_s": t1 - t0, "train_s": t2 - t1, "fit_s": t2 - t0}


def fit_xgboost(xgb, x, y, w, policy, rounds=ROUNDS):
    t0 = time.perf_counter()
    dm = xgb.QuantileDMatrix(x, label=y, weight=w, max_bin=MAX_BIN + 1, nthread=THREADS)
    t1 = time.perf_counter()
    booster = xgb.train(xgb_params(policy), dm, num_boost_round=rounds)
    t2 = time.perf_counter()
    return booster, {"construct_s": t1 - t0, "train_s": t2 - t1, "fit_s": t2 - t0}


def rows_per_s(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    return len(x) / (time.perf_counter() - t0)


def quality(xgb) -> dict:
    """Validation / unseen macro-F1 of both libraries with the timing settings on a
    synthetic dataset in the published schema (train.synthetic)."""
    from train.data import load_dataset
    from train.splits import make_splits

    with tempfile.TemporaryDirectory() as tmp:
        from train.synthetic import write_dataset

        write_dataset(
            tmp,
            n_concepts=30,
            n_prompts=20,
            alphas=tuple(np.round(np.arange(1, 21) * 0.3, 2)),
            seed=1,
        )
        d = load_dataset(tmp)
    s = make_splits(d.frame, d.concepts)
    f = d.frame.assign(split=s.assign(d.frame))
    parts = {k: f[f["split"] == k] for k in ("train", "val", "unseen")}
    xs = {k: v[d.feature_names].to_numpy(np.float32) for k, v in parts.items()}
    ys = {k: v["label"].to_numpy() for k, v in parts.items()}
    w = class_weights(ys["train"])
    out = {
        "dataset": "train.synthetic.generate(n_concepts=30, n_prompts=20, 20 alphas, "
        "seed=1): synthetic, published schema; replace with a builder-made "
        "tiny world when one exists",
        "rows": {k: len(v) for k, v in parts.items()},
        "n_features": len(d.feature_names),
        "rounds": ROUNDS,
        "num_leaves": LEAVES,
        "learning_rate": LR,
    }
    lgbm, _ = fit_lightgbm(xs["train"], ys["train"], w)
    out["lightgbm"] = {k: macro_f1(ys[k], lgbm.predict(xs[k]).argmax(1)) for k in ("val", "unseen")}
    if xgb is not None:
        for policy in ("lossguide", "depthwise"):
            b, _ = fit_xgboost(xgb, xs["train"], ys["train"], w, policy)
            out[f"xgboost_{policy}"] = {
                k: macro_f1(ys[k], b.predict(xgb.DMatrix(xs[k])).argmax(1))
                for k in ("val", "unseen")
            }
    return out


def search_time(x, y, fraction: float, trials: int, target_trials: int = 20) -> dict:
    """The real random search (train.model.fit_predictor: default max_rounds and early
    stopping) measured on a row subsample with the first ``trials`` of the 20 seeded
    configurations, extrapolated linearly to 20 trials and to all rows."""
    rng = np.random.default_rng(1)
    n = int(len(x) * fraction)
    idx = rng.permutation(len(x))[:n]
    n_val = int(n * 0.2)
    xv, yv, xt, yt = x[idx[:n_val]], y[idx[:n_val]], x[idx[n_val:]], y[idx[n_val:]]
    t0 = time.perf_counter()
    p = fit_predictor(
        xt, yt, xv, yv, [f"f{i}" for i in range(x.shape[1])], n_trials=trials, num_threads=THREADS
    )
    secs = time.perf_counter() - t0
    row_scale, trial_scale = len(x) / n, target_trials / trials
    return {
        "measured_on_rows": n,
        "train_rows": n - n_val,
        "val_rows": n_val,
        "trials_measured": trials,
        "measured_s": secs,
        "extrapolated_20_trials_full_size_s": secs * row_scale * trial_scale,
        "extrapolation": f"measured_s x {trial_scale:.2f} (to {target_trials} trials: the "
        f"first {trials} of the seeded 20 were run) x {row_scale:.1f} (linear "
        "in rows; at full size early stopping may pick other round counts)",
        "trials": [
            {k: t[k] for k in ("params", "best_iteration", "seconds", "val_macro_f1")}
            for t in p.metadata["search"]["trials"]
        ],
    }


def tiny_search_time(trials: int = 20) -> dict:
    """The full 20-trial search, measured directly, on the small synthetic dataset."""
    from train.data import load_dataset
    from train.splits import make_splits
    from train.synthetic import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(
            tmp,
            n_concepts=30,
            n_prompts=20,
            alphas=tuple(np.round(np.arange(1, 21) * 0.3, 2)),
            seed=1,
        )
        d = load_dataset(tmp)
    s = make_splits(d.frame, d.concepts)
    f = d.frame.assign(split=s.assign(d.frame))
    tr, va = f[f["split"] == "train"], f[f["split"] == "val"]
    t0 = time.perf_counter()
    p = fit_predictor(
        tr[d.feature_names].to_numpy(np.float32),
        tr["label"].to_numpy(),
        va[d.feature_names].to_numpy(np.float32),
        va["label"].to_numpy(),
        d.feature_names,
        n_trials=trials,
        num_threads=THREADS,
    )
    return {
        "rows_train": len(tr),
        "rows_val": len(va),
        "trials": trials,
        "seconds": time.perf_counter() - t0,
        "selected_val_macro_f1": p.metadata["search"]["val_macro_f1"],
    }


def main() -> int:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=ROWS)
    ap.add_argument("--features", type=int, default=FEATURES)
    ap.add_argument("--search-fraction", type=float, default=0.05)
    ap.add_argument("--search-trials", type=int, default=3)
    ap.add_argument("--threads", type=int, default=THREADS, help="threads for both libraries")
    ap.add_argument(
        "--parts",
        default="fit,quality,search",
        help="comma-separated subset of fit, quality, search",
    )
    ap.add_argument(
        "--merge", action="store_true", help="update an existing --out JSON instead of replacing it"
    )
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

    res: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads_used": THREADS,
            "python": platform.python_version(),
            "lightgbm": lgb.__version__,
            "xgboost": getattr(xgb, "__version__", None),
            "note": "shared 2-core machine; another engineer's jobs may run "
            "concurrently; benchmark run under nice -n 10",
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
            "leaves": LEAVES,
            "learning_rate": LR,
            "max_bin": MAX_BIN,
            "threads": THREADS,
            "class_weights": "N/(3 n_c)",
        },
    }
    parts = set(a.parts.split(","))
    if a.merge and Path(a.out).is_file():
        res = json.loads(Path(a.out).read_text()) | {
            k: v for k, v in res.items() if k not in ("machine", "shape", "matched")
        }
    res.setdefault("runs", []).append(
        {"parts": sorted(parts), "threads": THREADS, "loadavg_start": os.getloadavg()}
    )
    t0 = time.perf_counter()
    x, y = make_matrix(a.rows, a.features)
    w = class_weights(y)
    print(f"data {x.shape} in {time.perf_counter() - t0:.1f}s", flush=True)

    if "fit" in parts:
        booster, t = fit_lightgbm(x, y, w)
        res["lightgbm"] = {
            "params": lgb_params(),
            **t,
            "predict_rows_per_s": rows_per_s(booster.predict, x),
        }
        print("lightgbm", res["lightgbm"], flush=True)
        del booster
        if xgb is not None:
            for policy in ("lossguide", "depthwise"):
                b, t = fit_xgboost(xgb, x, y, w, policy)
                res[f"xgboost_{policy}"] = {
                    "params": xgb_params(policy),
                    **t,
                    "predict_rows_per_s": rows_per_s(lambda m, b=b: b.inplace_predict(m), x),
                }
                print(f"xgboost {policy}", res[f"xgboost_{policy}"], flush=True)
                del b
            lg = res["lightgbm"]["fit_s"]
            res["fit_time_ratio_xgboost_over_lightgbm"] = {
                p: res[f"xgboost_{p}"]["fit_s"] / lg for p in ("lossguide", "depthwise")
            }
    if "quality" in parts:
        res["quality"] = quality(xgb)
        print("quality", res["quality"], flush=True)
    if "search" in parts:
        res["search_20_trials_tiny"] = tiny_search_time() | {"threads": THREADS}
        print("search tiny", res["search_20_trials_tiny"], flush=True)
        res["search_20_trials_full_size"] = search_time(
            x, y, a.search_fraction, a.search_trials
        ) | {"threads": THREADS}
        print("search full", res["search_20_trials_full_size"], flush=True)
    res["runs"][-1]["loadavg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
