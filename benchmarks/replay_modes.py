"""Benchmark: the predictor's unseen-concept macro-F1 with the exact replay vs the
reference authors' replay, on the same tiny-world rollouts.

One steered pass: bench_train's tiny world (benchmarks/configs/train_quality.yaml: 12
concepts x 32 prompts x 12 alphas, DiffMean by default) runs through the builder's own
path (`run_with_capture`, exact replay, features computed in the engine, float32
activations kept). Two replays: the exact one of that pass, and the authors' one
(`replay_activations(..., replay="authors")`: bare prompt + response text re-tokenized
without the chat template), run afterwards over the same responses; its features are
`features.compute_batch` over the pass's own steered / before-addition states and the
authors' replay states. The same rules-judge labels, the same split seeds: `asteer-train`'s
fit + evaluate (`train.run`, 20-trial search) per replay and seed. Writes
benchmarks/results/replay_modes.json.

Run:  .venv/bin/python benchmarks/replay_modes.py [--methods diffmean,probe] [--seeds 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIG = ROOT / "benchmarks" / "configs" / "train_quality.yaml"
MODES = ("exact", "authors")
BASELINES = ("predictor", "alpha_only", "majority")


def rollouts(cfg, methods: list[str]) -> dict:
    """The steered pass and both replays' features, per method: rows + timings."""
    import torch

    from asteer_build.engine import SteeredEngine
    from asteer_build.engine.features import compute_batch
    from asteer_build.pipeline.plan import make_plan
    from asteer_build.pipeline.rollouts import replay_activations, run_with_capture
    from asteer_build.pipeline.work import (
        ModelContext,
        chat_prompt_ids,
        engine_kwargs,
        resolve_model_path,
        shard_requests,
    )
    from asteer_build.vectors.stage import build_vectors, load_vectors
    from judge.rules import rules_label

    cfg = replace(cfg, methods=tuple(methods), vectors=replace(cfg.vectors,
                                                              methods=tuple(methods)))
    plan = make_plan(cfg)
    model = cfg.models[0]
    path = resolve_model_path(model.path)
    settings = replace(cfg.capture, activations=True, activation_dtype="float32",
                       replay="exact")
    t = {}
    t0 = time.perf_counter()
    engine = SteeredEngine(path, steer_layers=[cfg.layer], **engine_kwargs(model))
    t["engine_start_s"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            build_vectors(path, plan.concepts, tmp, cfg.vectors, engine=engine)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        vecs, norms = load_vectors(files)
        engine.register_vectors(vecs)
        ctx = ModelContext(model, path, vecs, norms,
                           {p.prompt_id: chat_prompt_ids(path, p.prompt, cfg.prompt_format)
                            for p in plan.prompts},
                           plan.sampling[model.name])
        t["vectors_s"] = time.perf_counter() - t0
        rows = {m: [] for m in methods}
        t.update(steered_pass_with_exact_replay_s=0.0, authors_replay_s=0.0,
                 authors_features_s=0.0)
        check = 0.0
        for shard in plan.shards:
            reqs = shard_requests(cfg, ctx, shard)
            t0 = time.perf_counter()
            results = run_with_capture(engine, reqs, settings)
            t1 = time.perf_counter()
            again = replay_activations(engine, reqs, results, settings, replay="authors")
            t2 = time.perf_counter()
            names = list(results[0].features)
            steered = torch.stack([torch.from_numpy(r.activations["steered"]) for r in results])
            pre = torch.stack([torch.from_numpy(r.activations["steered_pre"][:, 0])
                               for r in results])
            authors = torch.stack([torch.from_numpy(s) for s, _ in again])
            exact = torch.stack([torch.from_numpy(r.activations["replay"]) for r in results])
            # a step either side lacks is zero rows on both sides, as in the engine
            for i, (r, (_, present)) in enumerate(zip(results, again, strict=True)):
                for j, step in enumerate(settings.steps):
                    if step in r.extra["steps_missing"] or step not in present:
                        steered[i, j] = 0
                        pre[i, j] = 0
                        authors[i, j] = 0
            v_c = torch.stack([vecs[q.vector] for q in reqs])
            alpha = torch.tensor([q.alpha for q in reqs])
            feats = {"authors": compute_batch(steered, authors, v_c, alpha, steered_pre=pre)}
            t["authors_features_s"] += time.perf_counter() - t2
            # honesty check: the same function on the exact replay's states reproduces the
            # engine's own features (only steps the authors' replay lacks were zeroed)
            same = torch.tensor([all(s in p for s in settings.steps) for _, p in again])
            mine = compute_batch(steered, exact, v_c, alpha, steered_pre=pre)
            engine_rows = torch.tensor([list(r.features.values()) for r in results])
            if same.any():
                check = max(check, float((mine[same] - engine_rows[same]).abs().max()))
            feats["exact"] = engine_rows
            t["steered_pass_with_exact_replay_s"] += t1 - t0
            t["authors_replay_s"] += t2 - t1
            for i, (it, r) in enumerate(zip(shard.items, results, strict=True)):
                base = {
                    "id": it.id, "model": it.model, "method": it.method,
                    "concept_id": it.concept_id, "concept": it.concept,
                    "concept_level": it.concept_level, "prompt_id": it.prompt_id,
                    "response_tokens": r.response_tokens,
                    "label": rules_label(it.concept, r.response).label,
                    "judge_status": "ok",
                    "authors_steps_missing": [s for s in settings.steps
                                              if s not in again[i][1]],
                }
                rows[it.method].append(
                    (base, {m: feats[m][i].numpy() for m in MODES}, names))
    finally:
        engine.shutdown()
    t["exact_features_recomputed_max_abs_diff"] = check
    return {"rows": rows, "timings": t, "concepts": plan.concepts, "items": plan.n_items}


def loaded(rows: list, concepts, mode: str, model: str, method: str):
    import pandas as pd

    from train.data import LoadedData

    names = rows[0][2]
    frame = pd.DataFrame([b for b, _, _ in rows]).drop(columns=["authors_steps_missing"])
    feats = pd.DataFrame(np.stack([f[mode] for _, f, _ in rows]).astype(np.float32),
                         columns=names)
    frame = pd.concat([frame, feats], axis=1)
    cdf = pd.DataFrame([{"concept_id": c.concept_id, "concept": c.concept,
                         "concept_level": c.concept_level} for c in concepts])
    return LoadedData(frame=frame, feature_names=names, model=model, method=method,
                      concepts=cdf, report={"source": f"replay_modes/{mode}"})


def evaluate(data, seeds: list[int], trials: int, threads: int) -> tuple[list[dict], float]:
    from train.run import evaluate_data, fit_data

    out = []
    t0 = time.perf_counter()
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            p = fit_data(data, tmp, n_trials=trials, seed=seed, num_threads=threads)
            r = evaluate_data(data, p, tmp, num_threads=threads)
        u = {m: r["metrics"]["unseen"][m]["macro_f1"] for m in BASELINES}
        out.append({"seed": seed, **u, "unseen_concepts": p.metadata["splits"]["unseen"]})
        print(data.report["source"], data.method, seed,
              {k: round(v, 3) for k, v in u.items()}, flush=True)
    return out, time.perf_counter() - t0


def summary(rows: list, names: list[str]) -> dict:
    """How the two replays' feature rows differ."""
    ex = np.stack([f["exact"] for _, f, _ in rows])
    au = np.stack([f["authors"] for _, f, _ in rows])
    col = {n: i for i, n in enumerate(names)}
    constant = [n for n in names if np.ptp(ex[:, col[n]]) == 0]
    differ = [n for n in names if not np.allclose(ex[:, col[n]], au[:, col[n]],
                                                  rtol=1e-5, atol=1e-6)]
    k0 = [f"dn_t{t}_k0" for t in (0, 1, 3, 5) if f"dn_t{t}_k0" in col]
    missing = [b["authors_steps_missing"] for b, _, _ in rows]
    return {
        "features": len(names),
        "columns_constant_with_exact_replay": constant,
        "columns_that_differ_between_replays": len(differ),
        "dn_k0_exact_max": float(ex[:, [col[n] for n in k0]].max()),
        "dn_k0_authors": {n: {"mean": float(au[:, col[n]].mean()),
                              "min": float(au[:, col[n]].min()),
                              "share_positive": float((au[:, col[n]] > 0).mean())}
                          for n in k0},
        "rollouts_where_authors_replay_lacks_a_step": int(sum(bool(m) for m in missing)),
    }


def main() -> int:
    from common import write

    from asteer_build.pipeline.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="diffmean", help="comma-separated methods")
    ap.add_argument("--seeds", type=int, default=10, help="split seeds 0..N-1")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="LightGBM threads (1: steady on a machine shared with other jobs)")
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    cfg = load_config(CONFIG)
    t0 = time.perf_counter()
    run = rollouts(cfg, methods)
    seeds = list(range(a.seeds))
    per_method = {}
    for method in methods:
        rows = run["rows"][method]
        names = rows[0][2]
        labels = np.array([b["label"] for b, _, _ in rows])
        res = {"rollouts": len(rows),
               "label_counts": {k: int((labels == i).sum())
                                for i, k in enumerate(("under", "success", "over"))},
               "features": summary(rows, names)}
        for mode in MODES:
            data = loaded(rows, run["concepts"], mode, cfg.models[0].name, method)
            per_seed, secs = evaluate(data, seeds, a.trials, a.threads)
            res[mode] = {
                "unseen_macro_f1_mean": {m: float(np.mean([r[m] for r in per_seed]))
                                         for m in BASELINES},
                "unseen_macro_f1_std": {m: float(np.std([r[m] for r in per_seed]))
                                        for m in BASELINES},
                "fit_evaluate_seconds": round(secs, 1),
                "per_seed": per_seed,
            }
        diffs = [e["predictor"] - u["predictor"]
                 for e, u in zip(res["exact"]["per_seed"], res["authors"]["per_seed"],
                                 strict=True)]
        res["predictor_exact_minus_authors"] = {
            "mean": float(np.mean(diffs)), "std": float(np.std(diffs)),
            "seeds_exact_higher": f"{sum(d > 0 for d in diffs)}/{len(diffs)}",
        }
        per_method[f"{cfg.models[0].name}/{method}"] = res
    write("replay_modes", {
        "what": "unseen-concept macro-F1 of asteer-train's predictor (fit + evaluate, "
                f"{a.trials}-trial search) with features against the exact replay vs the "
                "authors' replay, on one steered pass of the same tiny-world rollouts, "
                f"over split seeds {seeds[0]}..{seeds[-1]}",
        "config": str(CONFIG.relative_to(ROOT)),
        "layer": cfg.layer,
        "rollouts_planned": run["items"],
        "split_seeds": seeds,
        "trials": a.trials,
        "lightgbm_threads": a.threads,
        "results": per_method,
        "timings_s": {k: round(v, 3) if isinstance(v, float) else v
                      for k, v in run["timings"].items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "what_the_tiny_world_can_show": [
            "that one steered pass yields both replays' features through the builder's "
            "own code, and that the authors' replay turns the steered layer's columns, "
            "constant with the exact replay (dn = 0, ds = 1, dnr = 0 at k = 0), into "
            "varying ones",
            "whether the predictor's unseen-concept macro-F1 moves measurably on this toy "
            "when the replay changes, with the split-to-split spread to judge it by",
        ],
        "what_it_cannot_show": [
            "the size of the effect on the reference models: the tiny world's chat "
            "template is 4 short special tokens and its tokenizer adds no BOS to plain "
            "text, while real templates (system turns, BOS, role headers) shift contexts "
            "far more; the authors' replay is re-tokenized text, whose token boundaries "
            "differ from the sampled ids more on real tokenizers",
            "anything about the labels' meaning: the rules judge counts concept words; "
            "12 concepts leave 3 unseen per split, so per-seed scores are noisy",
            "the model dtype: the tiny world runs float32; bf16 models add rounding to "
            "both replays alike",
        ],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
