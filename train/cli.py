"""`asteer-train`: fit | evaluate | search | suggest | all | transfer.

Every subcommand writes JSON (and PNGs where there is something to look at) into
``--out``; errors about the data are printed as one line, not a traceback, because
they are the user's to fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.data import DatasetError
from train.model import SEARCH_ROWS, FeatureMismatchError, TrainingError
from train.search import DEFAULT_KS, DEFAULT_PROBE_TOKENS
from train.splits import DEFAULT_UNSEEN_FRACTION, PARTITION_SCHEMES, SplitError
from train.suggest import LiveSuggestError


def _csv(text: str | None, cast=str):
    return None if text is None else [cast(x) for x in text.split(",") if x.strip()]


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="dataset folder or Hub repo id; the authors' release "
        "(cache/features__*.npz) is detected and read too",
    )
    p.add_argument(
        "--lengths",
        help="with the authors' feature caches: a dataset folder or Hub id made by "
        "`asteer-build import` from their result files, whose response_tokens are joined "
        "on (model, method, concept, prompt, alpha) so the strength search can run",
    )
    p.add_argument(
        "--alpha-feature",
        choices=("alpha", "alpha_raw"),
        default="alpha",
        help="the strength the predictor reads: alpha (the config's units; norm units "
        "for an `alpha_units: norm` build) or alpha_raw (the multiple of v applied)",
    )
    p.add_argument("--model", help="model name (needed if the dataset has several)")
    p.add_argument("--method", help="diffmean | probe (needed if several)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="LightGBM threads; use 1 on a machine whose cores other jobs keep busy "
        "(OpenMP threads then stall each other, measured here at 10-30x slower)",
    )


def _add_fit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=20, help="random-search trials")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--unseen-fraction", type=float, default=DEFAULT_UNSEEN_FRACTION)
    p.add_argument("--unseen", help="comma-separated unseen concept ids (overrides fraction)")
    p.add_argument(
        "--use-partition-column",
        action="store_true",
        help="unseen = concepts whose `partition` is 'ood'",
    )
    p.add_argument(
        "--partition",
        choices=PARTITION_SCHEMES,
        default="stratified",
        help="unseen concepts: stratified = the authors' per-level draw (seed --seed); "
        "contiguous = their legacy static ranges (the last concepts in id order)",
    )
    p.add_argument("--groups", help="ablation: comma-separated feature groups to keep")
    p.add_argument("--tokens", help="ablation: comma-separated decode steps to keep")
    p.add_argument("--no-alpha", action="store_true", help="ablation: drop alpha")
    p.add_argument("--max-rounds", type=int, default=1000)
    p.add_argument("--early-stopping", type=int, default=50)
    p.add_argument(
        "--search-rows",
        type=int,
        default=SEARCH_ROWS,
        help="trials train on a stratified subsample of this many rows, the chosen "
        "configuration is then refit on all; 0 = every trial on all rows",
    )


def _add_option(p: argparse.ArgumentParser, several: bool) -> None:
    p.add_argument(
        "--predictor-option",
        default="default",
        help="search space: default (ours) or authors (the reference's XGBoost space "
        "mapped to LightGBM, a fixed number of trees per trial, capped by --max-rounds)"
        + ("; comma-separated to run and report both, e.g. default,authors" if several
           else ""),
    )


def _options(text: str) -> tuple[str, ...]:
    from train.model import PREDICTOR_OPTIONS

    opts = tuple(_csv(text))
    bad = [o for o in opts if o not in PREDICTOR_OPTIONS]
    if bad or not opts:
        raise ValueError(f"--predictor-option {text!r}: expected {', '.join(PREDICTOR_OPTIONS)}")
    return opts


def _add_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", default=",".join(map(str, DEFAULT_KS)), help="top-K values")
    p.add_argument("--probe-tokens", type=int, default=DEFAULT_PROBE_TOKENS)
    p.add_argument(
        "--length",
        choices=["mean", "actual"],
        default="mean",
        help="charge rollouts the mean response length or their own",
    )


def _fit_kwargs(a: argparse.Namespace) -> dict:
    return {
        "n_trials": a.trials,
        "seed": a.seed,
        "unseen_fraction": a.unseen_fraction,
        "unseen": _csv(a.unseen),
        "use_partition_column": a.use_partition_column,
        "partition": a.partition,
        "groups": _csv(a.groups),
        "tokens": _csv(a.tokens, int),
        "no_alpha": a.no_alpha,
        "num_threads": a.threads,
        "max_rounds": a.max_rounds,
        "early_stopping_rounds": a.early_stopping,
        "search_rows": a.search_rows or None,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="asteer-train", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fit", help="split, search hyperparameters, save the predictor")
    _add_data(p)
    _add_fit(p)
    _add_option(p, several=False)
    p = sub.add_parser("evaluate", help="metrics, baselines, importance, plots")
    _add_data(p)
    p.add_argument("--predictor", help="predictor folder (default OUT/predictor)")
    p = sub.add_parser("search", help="strength-search evaluation vs baselines")
    _add_data(p)
    _add_search(p)
    p.add_argument("--predictor", help="predictor folder (default OUT/predictor)")
    p = sub.add_parser("all", help="fit + evaluate + search + report")
    _add_data(p)
    _add_fit(p)
    _add_search(p)
    _add_option(p, several=True)
    p.add_argument(
        "--split-seeds",
        help="comma-separated split seeds; the report gives mean and std over them "
        "(default: --seed only)",
    )
    p.add_argument(
        "--transfer", action="store_true",
        help="also evaluate one pooled predictor over every (model, method) pair, "
        "leave-one-model-out and leave-one-method-out (a report section; transfer/)",
    )
    p = sub.add_parser(
        "transfer",
        help="pooled predictor over all (model, method) pairs, leave-one-model-out and "
        "leave-one-method-out vs per-pair and alpha-only (transfer.json + transfer.md)",
    )
    p.add_argument("--data", required=True, help="dataset folder or Hub repo id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", type=int, default=10, help="split seeds 0..N-1")
    p.add_argument("--trials", type=int, default=5, help="random-search trials per fit")
    p.add_argument("--threads", type=int, default=2, help="LightGBM threads")
    p = sub.add_parser("suggest", help="P(under/success/over) per alpha, suggested alpha")
    p.add_argument("--predictor", required=True)
    p.add_argument(
        "--features",
        help="Parquet/CSV of feature rows (an alpha column; "
        "optional prompt column groups several items)",
    )
    p.add_argument("--tau", type=float, default=0.0)
    p.add_argument(
        "--live", action="store_true", help="run probes on a live engine (needs asteer_build)"
    )
    p.add_argument("--model", help="live: model name")
    p.add_argument("--vector", help="live: .npy file with the steering vector")
    p.add_argument("--prompt", action="append", help="live: a prompt (repeatable)")
    p.add_argument("--alphas", help="live: comma-separated alpha grid")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--probe-tokens", type=int, default=DEFAULT_PROBE_TOKENS)
    # Probe as the training rollouts were sampled and replayed (the dataset's build.json
    # `sampling` per model and `config.capture.replay`), or the features drift.
    p.add_argument("--temperature", type=float, default=0.7, help="live: as build.json")
    p.add_argument("--top-k", type=int, default=0, help="live: build.json's top_k (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="live: build.json's top_p")
    p.add_argument("--replay", choices=("exact", "authors"), default="exact",
                   help="live: the replay the training features used (capture.replay)")
    p.add_argument("--out", help="write suggestions.json here (default: stdout only)")
    return ap


def _predictor_dir(a: argparse.Namespace) -> Path:
    from train.run import PREDICTOR_DIR

    return Path(a.predictor) if a.predictor else Path(a.out) / PREDICTOR_DIR


def _suggest(a: argparse.Namespace) -> dict:
    import numpy as np
    import pandas as pd

    from train.model import Predictor
    from train.suggest import suggest, suggest_live

    predictor = Predictor.load(a.predictor)
    if a.live:
        missing = [n for n in ("model", "vector", "prompt", "alphas") if not getattr(a, n)]
        if missing:
            raise ValueError(f"--live needs --{' --'.join(missing)}")
        res = suggest_live(
            predictor,
            a.model,
            np.load(a.vector),
            a.prompt,
            _csv(a.alphas, float),
            a.layer,
            a.probe_tokens,
            a.tau,
            sampling={"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p},
            replay=a.replay,
        )
        return {p: s.to_dict() for p, s in res.items()}
    if not a.features:
        raise ValueError("give --features FILE (precomputed rows) or --live")
    path = Path(a.features)
    rows = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    if "prompt" in rows.columns or "prompt_id" in rows.columns:
        key = "prompt_id" if "prompt_id" in rows.columns else "prompt"
        return {
            str(k): suggest(predictor, g, a.tau).to_dict() for k, g in rows.groupby(key, sort=False)
        }
    return {"item": suggest(predictor, rows, a.tau).to_dict()}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "suggest":
            result = _suggest(a)
            text = json.dumps(result, indent=2)
            if a.out:
                Path(a.out).mkdir(parents=True, exist_ok=True)
                (Path(a.out) / "suggestions.json").write_text(text)
            print(text)
            return 0
        if a.cmd == "transfer":
            from train.transfer import transfer_markdown, write_transfer

            # TransferError is a ValueError: reported as one line below
            res = write_transfer(
                a.data, a.out, split_seeds=tuple(range(a.seeds)), n_trials=a.trials,
                num_threads=a.threads,
                log=lambda m: print(m, file=sys.stderr, flush=True),
            )
            print(transfer_markdown(res))
            return 0
        from train import run
        from train.data import load_dataset, with_lengths
        from train.model import Predictor

        if a.cmd == "all":
            summary = run.run_all(
                a.data,
                a.out,
                a.model,
                a.method,
                ks=tuple(_csv(a.k, int)),
                probe_tokens=a.probe_tokens,
                length=a.length,
                predictors=_options(a.predictor_option),
                split_seeds=_csv(a.split_seeds, int),
                transfer=a.transfer,
                lengths=a.lengths,
                alpha_feature=a.alpha_feature,
                **_fit_kwargs(a),
            )
            print(json.dumps(summary, indent=2))
            return 0
        data = with_lengths(load_dataset(a.data, a.model, a.method, alpha=a.alpha_feature),
                            a.lengths)
        print(json.dumps(data.report), file=sys.stderr)
        if a.cmd == "fit":
            (option,) = _options(a.predictor_option) or ("default",)
            p = run.fit_data(data, a.out, option=option, **_fit_kwargs(a))
            print(
                json.dumps(
                    p.metadata["search"] | {"trials": len(p.metadata["search"]["trials"])}, indent=2
                )
            )
        elif a.cmd == "evaluate":
            res = run.evaluate_data(data, Predictor.load(_predictor_dir(a)), a.out, a.threads)
            from train.evaluate import metrics_markdown

            print(metrics_markdown(res["metrics"]))
        elif a.cmd == "search":
            res = run.search_data(
                data,
                Predictor.load(_predictor_dir(a)),
                a.out,
                tuple(_csv(a.k, int)),
                a.probe_tokens,
                a.length,
            )
            print((Path(a.out) / "search.md").read_text())
        return 0
    except (
        DatasetError,
        SplitError,
        TrainingError,
        FeatureMismatchError,
        LiveSuggestError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"asteer-train {a.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
