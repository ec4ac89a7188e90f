"""Unseen-concept macro-F1 of the predictor vs its baselines over many seeded splits.

The tiny world has 12 concepts, so one split holds out 3 of them and one unlucky
choice of 3 moves macro-F1 by several points; this script repeats `asteer-train`'s own
fit + evaluate (train.run, default 20-trial search) over split seeds and reports, per
dataset and method, every seed's numbers, their means and how often the predictor beats
both baselines. Datasets are builder-made tiny worlds: by default bench_train's
(benchmarks/configs/train_quality.yaml, built once if missing) and, if present, the
folder `make demo` writes.

Run:  .venv/bin/python benchmarks/predictor_vs_baselines.py [--data DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train.data import list_pairs, load_dataset  # noqa: E402
from train.run import evaluate_data, fit_data  # noqa: E402

MODELS = ("predictor", "alpha_only", "majority")


def one_dataset(folder: Path, seeds: list[int], trials: int) -> dict:
    out: dict = {}
    for model, method in list_pairs(folder):
        d = load_dataset(folder, model=model, method=method)
        rows = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                p = fit_data(d, tmp, n_trials=trials, seed=seed)
                r = evaluate_data(d, p, tmp)
            u = {m: r["metrics"]["unseen"][m]["macro_f1"] for m in MODELS}
            rows.append({"seed": seed, **u})
            print(folder.name, method, seed, {k: round(v, 3) for k, v in u.items()}, flush=True)
        mean = {m: float(np.mean([r[m] for r in rows])) for m in MODELS}
        wins = sum(r["predictor"] > max(r["alpha_only"], r["majority"]) for r in rows)
        out[f"{model}/{method}"] = {
            "rows": len(d.frame),
            "unseen_macro_f1_mean": mean,
            "predictor_minus_alpha_only_mean": mean["predictor"] - mean["alpha_only"],
            "seeds_where_predictor_beats_both": f"{wins}/{len(rows)}",
            "per_seed": rows,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", help="dataset folder (repeatable)")
    ap.add_argument("--seeds", type=int, default=10, help="split seeds 0..N-1")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/predictor_vs_baselines.json"))
    a = ap.parse_args()
    if a.data:
        folders = [Path(p) for p in a.data]
    else:
        from bench_train import tiny_world_dataset

        folders = [tiny_world_dataset()]
        if (ROOT / "demo_out" / "dataset").is_dir():
            folders.append(ROOT / "demo_out" / "dataset")
    t0 = time.perf_counter()
    res = {
        "what": "unseen-concept macro-F1, asteer-train fit + evaluate per split seed",
        "trials": a.trials,
        "split_seeds": list(range(a.seeds)),
        "datasets": {
            str(f.resolve().relative_to(ROOT) if f.resolve().is_relative_to(ROOT) else f): (
                one_dataset(f, list(range(a.seeds)), a.trials)
            )
            for f in folders
        },
    }
    res["seconds"] = time.perf_counter() - t0
    Path(a.out).write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
