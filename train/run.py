"""The three stages (fit, evaluate, search) as functions over a dataset folder / Hub id.

Each stage writes JSON (+ markdown and PNGs) into an output folder and returns the
same content as a dict, so the CLI, tests and the pipeline's end-to-end check all run
the same code. The split travels inside the saved predictor's metadata: evaluate and
search re-derive nothing, so they cannot evaluate on rows the model trained on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from train import authors, plots
from train.data import LoadedData, load_dataset, with_lengths
from train.evaluate import (
    MajorityBaseline,
    evaluate_models,
    feature_importance,
    fit_alpha_only,
    label_fraction_by_alpha,
    metrics_markdown,
)
from train.feature_names import select_features
from train.model import SEARCH_ROWS, Predictor, fit_predictor
from train.search import DEFAULT_KS, DEFAULT_PROBE_TOKENS, evaluate_search, search_markdown
from train.splits import DEFAULT_UNSEEN_FRACTION, Splits, make_splits

PREDICTOR_DIR = "predictor"


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_default))


def _default(o):
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def with_splits(data: LoadedData, splits: Splits) -> pd.DataFrame:
    return data.frame.assign(split=splits.assign(data.frame))


def fit_data(
    data: LoadedData,
    out_dir: str | Path,
    n_trials: int = 20,
    seed: int = 42,
    unseen_fraction: float = DEFAULT_UNSEEN_FRACTION,
    unseen: list[str] | None = None,
    use_partition_column: bool = False,
    partition: str = "stratified",
    groups: list[str] | None = None,
    tokens: list[int] | None = None,
    no_alpha: bool = False,
    num_threads: int = 2,
    max_rounds: int = 1000,
    early_stopping_rounds: int = 50,
    search_rows: int | None = SEARCH_ROWS,
    option: str = "default",
) -> Predictor:
    """Split, search, save ``out_dir/predictor`` (model.txt + predictor.json).

    ``option`` (the predictor option) picks the search space: ``default`` (ours) or ``authors`` (the
    reference's XGBoost space mapped to LightGBM, ``train.model.AUTHORS_SPACE``)."""
    splits = make_splits(
        data.frame, data.concepts, unseen_fraction, seed, unseen, use_partition_column,
        partition,
    )
    frame = with_splits(data, splits)
    names = select_features(data.feature_names, groups, tokens, no_alpha)
    tr, va = frame[frame["split"] == "train"], frame[frame["split"] == "val"]
    t0 = time.perf_counter()
    predictor = fit_predictor(
        tr[names].to_numpy(np.float32),
        tr["label"].to_numpy(),
        va[names].to_numpy(np.float32),
        va["label"].to_numpy(),
        names,
        n_trials=n_trials,
        seed=seed,
        num_threads=num_threads,
        max_rounds=max_rounds,
        early_stopping_rounds=early_stopping_rounds,
        search_rows=search_rows,
        space=option,
    )
    predictor.metadata.update(
        {
            "model": data.model,
            "method": data.method,
            "predictor_option": option,
            "dataset": data.report,
            "splits": splits.to_dict(),
            "feature_selection": {"groups": groups, "tokens": tokens, "no_alpha": no_alpha},
            "rows_per_split": {k: int(v) for k, v in frame["split"].value_counts().items()},
            "fit_seconds": round(time.perf_counter() - t0, 3),
        }
    )
    predictor.save(Path(out_dir) / PREDICTOR_DIR)
    return predictor


def evaluate_data(
    data: LoadedData, predictor: Predictor, out_dir: str | Path, num_threads: int = 2
) -> dict:
    """Metrics + baselines for seen-test and unseen, importance, plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = Splits.from_dict(predictor.metadata["splits"])
    frame = with_splits(data, splits)
    tr, va = frame[frame["split"] == "train"], frame[frame["split"] == "val"]
    models = {
        "predictor": predictor,
        "majority": MajorityBaseline(tr["label"].to_numpy()),
        "alpha_only": fit_alpha_only(tr, va, seed=splits.seed, num_threads=num_threads),
    }
    metrics = evaluate_models(models, frame)
    importance = feature_importance(predictor)
    frac = label_fraction_by_alpha(frame)
    result = {
        "model": data.model,
        "method": data.method,
        "dataset": data.report,
        "n_features": len(predictor.feature_names),
        "feature_selection": predictor.metadata.get("feature_selection"),
        "selected_params": predictor.params,
        "val_macro_f1": predictor.metadata.get("search", {}).get("val_macro_f1"),
        "metrics": metrics,
        "importance": importance,
        "label_fraction_by_alpha": {str(a): row.to_dict() for a, row in frac.iterrows()},
    }
    _write_json(out / "evaluation.json", result)
    (out / "evaluation.md").write_text(
        f"# {data.model} / {data.method}\n\n" + metrics_markdown(metrics)
    )
    plots.confusion_plot(metrics, out / "confusion.png")
    plots.importance_heatmap(importance, out / "importance.png")
    plots.label_fraction_plot(frac, out / "label_fraction_vs_alpha.png")
    return result


def search_data(
    data: LoadedData,
    predictor: Predictor,
    out_dir: str | Path,
    ks: tuple[int, ...] = DEFAULT_KS,
    probe_tokens: int = DEFAULT_PROBE_TOKENS,
    length: str = "mean",
) -> dict:
    """Strength search on seen-test and unseen items, together and apart.

    One mean length (over all evaluated rows) is used for every table so the token
    costs of the parts add up to the whole. Items (concept, prompt) with a row that has no
    length (authors' caches whose lengths were joined only in part) are left out and
    counted, so no rollout is charged NaN tokens and every item keeps its whole alpha grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = Splits.from_dict(predictor.metadata["splits"])
    frame = with_splits(data, splits)
    evaluated = frame[frame["split"].isin(["test", "unseen"])].copy()
    no_len = (
        evaluated["response_tokens"].isna()
        .groupby([evaluated["concept_id"], evaluated["prompt_id"]]).transform("any")
        .astype(bool)
    )
    excluded = {"rows": int(no_len.sum()), "items": int(
        evaluated.loc[no_len, ["concept_id", "prompt_id"]].drop_duplicates().shape[0])}
    evaluated = evaluated[~no_len]
    if evaluated.empty:
        raise ValueError(f"{data.model}/{data.method}: no evaluated row has a response length "
                         f"({excluded['rows']} rows without one)")
    evaluated["p_success"] = predictor.predict_proba(evaluated)[:, 1]
    calibration = frame[frame["split"].isin(["train", "unseen"])]
    mean_len = float(evaluated["response_tokens"].mean())
    result = {"model": data.model, "method": data.method, "excluded_no_length": excluded}
    for name, part in (
        ("all", evaluated),
        ("seen_test", evaluated[evaluated["split"] == "test"]),
        ("unseen", evaluated[evaluated["split"] == "unseen"]),
    ):
        if part.empty:
            continue
        result[name] = evaluate_search(
            part,
            calibration,
            ks,
            None,
            probe_tokens,
            length,
            mean_len if length == "mean" else None,
        )
    _write_json(out / "search.json", result)
    md = [f"# strength search: {data.model} / {data.method}\n"]
    for name in ("all", "seen_test", "unseen"):
        if name in result:
            md.append(
                f"\n## {name} ({result[name]['items']} items)\n\n" + search_markdown(result[name])
            )
    (out / "search.md").write_text("".join(md))
    plots.search_plot(
        result["all"], out / "search.png", f"{data.model} / {data.method}: seen-test + unseen"
    )
    return result


def run_all(
    dataset_folder: str | Path,
    out_dir: str | Path,
    model: str | None = None,
    method: str | None = None,
    n_trials: int = 20,
    seed: int = 42,
    num_threads: int = 2,
    ks: tuple[int, ...] = DEFAULT_KS,
    probe_tokens: int = DEFAULT_PROBE_TOKENS,
    length: str = "mean",
    predictors: tuple[str, ...] = ("default",),
    split_seeds: list[int] | None = None,
    report: bool = True,
    transfer: bool = False,
    lengths: str | Path | None = None,
    alpha_feature: str = "alpha",
    **fit_kwargs,
) -> dict:
    """Fit + evaluate + search in one call; returns the headline numbers and writes
    ``report.md`` / ``report.json`` (``train.report``) into ``out_dir``.

    One run per predictor option x split seed (``split_seeds``, default ``[seed]``); with
    one of each, the run's files sit in ``out_dir`` itself (the pipeline's end-to-end
    check reads them there), otherwise in ``out_dir/{predictor}/seed{seed}``. The
    authors' release holds several (model, method) pairs: each gets ``out_dir/{model}__
    {method}`` and the report covers them all. ``transfer`` adds the pooled predictor's
    leave-one-model-out / leave-one-method-out section (``train.transfer``) over every
    pair of the dataset, at the same split seeds. ``lengths`` (an imported dataset of
    the authors' result files) gives their feature caches response lengths, so the
    strength search runs on them (`train.data.with_lengths`)."""
    from train.data import list_pairs, resolve_source
    from train.report import write_report

    seeds = list(split_seeds) if split_seeds else [seed]
    root = resolve_source(dataset_folder)
    if (model is None or method is None) and authors.is_authors_layout(root):
        pairs = [
            p for p in list_pairs(root)
            if (model is None or p[0] == model) and (method is None or p[1] == method)
        ]
        if len(pairs) > 1:  # the authors' release: one predictor per (model, method)
            out = Path(out_dir)
            per_pair = {
                f"{m}__{me}": run_all(
                    root, out / f"{m}__{me}", m, me, n_trials, seed, num_threads, ks,
                    probe_tokens, length, predictors, seeds, False, lengths=lengths,
                    alpha_feature=alpha_feature, **fit_kwargs,
                )
                for m, me in pairs
            }
            summary = {"dataset": str(dataset_folder), "pairs": per_pair, "out_dir": str(out)}
            _write_json(out / "summary.json", summary)
            if report:
                write_report(out, summary, _transfer_sections(
                    root, out, transfer, seeds, n_trials, num_threads))
            return summary
        dataset_folder = root
    data = with_lengths(load_dataset(dataset_folder, model, method, alpha=alpha_feature),
                        lengths)
    single = len(predictors) == 1 and len(seeds) == 1
    runs = [
        _run_one(
            data, Path(out_dir) if single else Path(out_dir) / option / f"seed{s}",
            option, s, n_trials, num_threads, ks, probe_tokens, length, fit_kwargs,
        )
        for option in predictors
        for s in seeds
    ]
    first = runs[0]
    summary = {
        "model": data.model,
        "method": data.method,
        "dataset": data.report,
        "val_macro_f1": first["val_macro_f1"],
        "macro_f1": first["macro_f1"],
        "search": first["search"],
        "runs": runs,
        "out_dir": str(out_dir),
    }
    _write_json(Path(out_dir) / "summary.json", summary)
    if report:
        write_report(out_dir, summary, _transfer_sections(
            root, Path(out_dir), transfer, seeds, n_trials, num_threads))
    return summary


def _transfer_sections(source, out: Path, transfer: bool, seeds: list[int], n_trials: int,
                       num_threads: int) -> list[dict]:
    """The transfer evaluation as a report section (also written as transfer.json/md)."""
    if not transfer:
        return []
    from train.transfer import transfer_markdown, write_transfer

    res = write_transfer(source, out / "transfer", split_seeds=tuple(seeds),
                         n_trials=n_trials, num_threads=num_threads)
    return [{"title": "Transfer across models and methods",
             "markdown": transfer_markdown(res), "data": res}]


def _run_one(
    data: LoadedData,
    out_dir: Path,
    option: str,
    seed: int,
    n_trials: int,
    num_threads: int,
    ks: tuple[int, ...],
    probe_tokens: int,
    length: str,
    fit_kwargs: dict,
) -> dict:
    """One predictor option at one split seed: fit, evaluate, search (where lengths are
    known); the run's headline numbers."""
    predictor = fit_data(
        data, out_dir, n_trials=n_trials, seed=seed, num_threads=num_threads,
        option=option, **fit_kwargs,
    )
    ev = evaluate_data(data, predictor, out_dir, num_threads=num_threads)
    # The authors' feature caches carry no response lengths: the strength search charges
    # tokens, so it is skipped there, and the summary says why.
    if data.frame["response_tokens"].notna().any():
        se = search_data(
            data, predictor, out_dir, ks=ks, probe_tokens=probe_tokens, length=length
        )
        search = {
            r["method"]: {"success_rate": r["success_rate"], "mean_tokens": r["mean_tokens"]}
            for r in se["all"]["table"]
        }
        excluded = se["excluded_no_length"]
    else:
        search = {"skipped": "the data has no response lengths (authors' feature caches)"}
        excluded = None
    return {
        "predictor": option,
        "seed": seed,
        "val_macro_f1": ev["val_macro_f1"],
        "macro_f1": {
            split: {m: r["macro_f1"] for m, r in by.items()} for split, by in ev["metrics"].items()
        },
        "search": search,
        "search_excluded_no_length": excluded,
        "out_dir": str(out_dir),
    }
