"""The predictor end to end on a synthetic dataset (published schema): it learns,
beats its baselines on unseen concepts, saves and reloads exactly, and refuses bad
input with errors that name the problem."""

import json
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest

from train.cli import main
from train.data import load_dataset
from train.model import (
    FeatureMismatchError,
    Predictor,
    TrainingError,
    class_weights,
    fit_predictor,
    search_subsample,
)
from train.run import fit_data, run_all, with_splits
from train.splits import Splits
from train.suggest import LiveSuggestError, suggest, suggest_live
from train.synthetic import generate, write_dataset

# One thread: modest CPU on a shared machine, and no OpenMP barrier stalls when the
# cores are oversubscribed by other jobs.
FAST = {"max_rounds": 300, "early_stopping_rounds": 30, "num_threads": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = run_all(dataset, out, n_trials=3, **FAST)
    return out, summary


@pytest.fixture(scope="module")
def small_predictor(dataset):
    d = load_dataset(dataset)
    f = d.frame
    tr, va = f[f["prompt_id"] < "p005"], f[f["prompt_id"] >= "p005"]
    names = d.feature_names
    p = fit_predictor(
        tr[names].to_numpy(np.float32),
        tr["label"].to_numpy(),
        va[names].to_numpy(np.float32),
        va["label"].to_numpy(),
        names,
        n_trials=2,
        max_rounds=100,
        early_stopping_rounds=20,
        num_threads=1,
    )
    return p, f


def test_unseen_macro_f1_beats_majority_and_alpha_only(full_run):
    _, s = full_run
    f1 = s["macro_f1"]
    print("\nmacro-F1 (synthetic data):", json.dumps(f1, indent=1))
    for split in ("unseen", "seen_test"):
        assert f1[split]["predictor"] > f1[split]["alpha_only"] + 0.05, split
        assert f1[split]["predictor"] > f1[split]["majority"] + 0.3, split
    assert s["dataset"]["dropped_judge_status"] == {"failed": 5, "pending": 3}


def test_outputs_written(full_run):
    out, s = full_run
    for name in ("confusion.png", "importance.png", "label_fraction_vs_alpha.png", "search.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    ev = json.loads((out / "evaluation.json").read_text())
    cm = np.asarray(ev["metrics"]["unseen"]["predictor"]["confusion_normalized"])
    assert np.allclose(cm.sum(axis=1), 1.0)
    imp = ev["importance"]
    # the synthetic signal sits in the early tokens: token 0 outranks token 5
    assert imp["by_token"]["0"] > imp["by_token"]["5"]
    assert imp["heatmap"]["tokens"] == [0, 1, 3, 5]
    se = json.loads((out / "search.json").read_text())
    table = {r["method"]: r for r in se["all"]["table"]}
    # IGS decodes every labelled alpha: 12 per item less the 8 dropped (failed/pending)
    # rows that fall on evaluated items
    n_items = se["all"]["items"]
    assert 12 - 8 / n_items <= table["IGS"]["mean_rollouts"] < 12.0
    # guided search is far cheaper than the full grid and nearly as successful
    assert table["ours@K=5"]["mean_tokens"] < 0.3 * table["IGS"]["mean_tokens"]
    assert table["ours@K=5"]["success_rate"] >= 0.9 * table["IGS"]["success_rate"]
    assert (out / "evaluation.md").read_text().count("| unseen |") == 3
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    # the report: our data carries response lengths, so the search is in it (no paper
    # row for a synthetic model: ours only, and the report says so)
    rep = json.loads((out / "report.json").read_text())
    rows = {(r["search_method"], r["metric"]): r for r in rep["search"]}
    assert rows[("IGS", "mean_tokens")]["ours"]["mean"] == pytest.approx(
        table["IGS"]["mean_tokens"])
    assert rows[("IGS", "mean_tokens")]["paper"] is None and rep["search_skipped"] == {}
    f1 = {(r["classifier"], r["split"]): r["ours"]["mean"] for r in rep["macro_f1"]}
    assert f1[("predictor", "unseen")] == s["macro_f1"]["unseen"]["predictor"]
    assert "the paper has no row" in rep["notes"][0]
    assert "## Strength search" in (out / "report.md").read_text()


def test_training_never_sees_evaluation_items(full_run, dataset):
    out, _ = full_run
    meta = json.loads((out / "predictor" / "predictor.json").read_text())
    splits = Splits.from_dict(meta["splits"])
    d = load_dataset(dataset)
    f = with_splits(d, splits)
    train_items = set(
        map(tuple, f.loc[f["split"] == "train", ["concept_id", "prompt_id"]].to_numpy())
    )
    other = set(map(tuple, f.loc[f["split"] != "train", ["concept_id", "prompt_id"]].to_numpy()))
    assert train_items and other and not train_items & other
    assert meta["rows_per_split"]["train"] == int((f["split"] == "train").sum())


def test_saved_predictor_reloads_with_identical_probabilities(small_predictor, tmp_path):
    p, frame = small_predictor
    p.save(tmp_path / "pred")
    q = Predictor.load(tmp_path / "pred")
    a, b = p.predict_proba(frame), q.predict_proba(frame)
    assert a.shape == (len(frame), 3)
    assert np.array_equal(a, b)
    assert q.feature_names == p.feature_names and q.params == p.params
    # column order of the input frame does not matter: columns are taken by name
    shuffled = frame[list(reversed(frame.columns))]
    assert np.array_equal(q.predict_proba(shuffled), a)


def test_missing_feature_at_prediction_is_named(small_predictor):
    p, frame = small_predictor
    with pytest.raises(FeatureMismatchError, match="missing: \\['DA_t1_k2'\\]"):
        p.predict_proba(frame.drop(columns=["DA_t1_k2"]))
    with pytest.raises(FeatureMismatchError, match="feature columns"):
        p.predict_proba(np.zeros((2, 5), np.float32))


def test_fewer_than_three_classes_is_refused():
    y = np.array([0, 0, 2, 2, 0, 2])
    with pytest.raises(TrainingError, match=r"classes \['under', 'over'\].*need all three"):
        class_weights(y)
    x = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    with pytest.raises(TrainingError, match="need all three"):
        fit_predictor(x, y, x, y, ["a", "b"], n_trials=1, num_threads=1)


def test_class_weights_balance_classes():
    y = np.array([0] * 6 + [1] * 2 + [2] * 4)
    w = class_weights(y)
    assert w[0] == 12 / 18 and w[6] == 12 / 6 and w[-1] == 12 / 12
    assert np.isclose(w[y == 0].sum(), w[y == 1].sum())


def test_search_subsample_is_stratified_sorted_and_only_when_needed():
    y = np.array([0] * 700 + [1] * 100 + [2] * 200)
    np.random.default_rng(3).shuffle(y)
    assert search_subsample(y, None, 0) is None and search_subsample(y, 1000, 0) is None
    idx = search_subsample(y, 250, 0)
    assert len(idx) == 250 and len(np.unique(idx)) == 250 and np.all(np.diff(idx) > 0)
    assert np.bincount(y[idx]).tolist() == [175, 25, 50]  # each class keeps its share
    assert np.array_equal(idx, search_subsample(y, 250, 0))  # seeded
    assert not np.array_equal(idx, search_subsample(y, 250, 1))


def test_large_training_sets_search_on_a_subsample_then_refit_on_all_rows(dataset):
    """Trials see ~search_rows rows; the selected configuration is refit on every
    training row, and that refit booster (not the trial's) is the predictor."""
    d = load_dataset(dataset)
    f, names = d.frame, d.feature_names
    tr, va = f[f["prompt_id"] < "p005"], f[f["prompt_id"] >= "p005"]
    args = (
        tr[names].to_numpy(np.float32),
        tr["label"].to_numpy(),
        va[names].to_numpy(np.float32),
        va["label"].to_numpy(),
        names,
    )
    kw = {"n_trials": 2, "max_rounds": 100, "early_stopping_rounds": 20, "num_threads": 1}
    p = fit_predictor(*args, search_rows=len(tr) // 4, **kw)
    s = p.metadata["search"]
    assert abs(s["search_rows"] - len(tr) // 4) <= 3 and s["train_rows"] == len(tr)
    assert s["refit"]["rows"] == len(tr)
    assert p.booster.best_iteration == s["refit"]["best_iteration"]
    assert s["val_macro_f1"] == s["refit"]["val_macro_f1"]
    from train.metrics import macro_f1

    assert macro_f1(args[3], p.predict(args[2])) == pytest.approx(s["val_macro_f1"])
    # the selected trial's parameters are the ones refit
    assert {k: p.params[k] for k in s["trials"][s["selected_trial"]]["params"]} == (
        s["trials"][s["selected_trial"]]["params"]
    )
    full = fit_predictor(*args, search_rows=None, **kw)
    assert "refit" not in full.metadata["search"]
    assert full.metadata["search"]["search_rows"] == len(tr)


def test_ablation_restricts_features(dataset, tmp_path):
    d = load_dataset(dataset)
    p = fit_data(d, tmp_path, n_trials=1, tokens=[0], no_alpha=True, **FAST)
    assert "alpha" not in p.feature_names and "vector_norm" in p.feature_names
    assert all(n == "vector_norm" or "_t0_" in n for n in p.feature_names)
    meta = json.loads((tmp_path / "predictor" / "predictor.json").read_text())
    assert meta["feature_selection"] == {"groups": None, "tokens": [0], "no_alpha": True}


def test_suggest_from_precomputed_rows(small_predictor):
    p, frame = small_predictor
    item = frame[(frame["concept_id"] == "c002") & (frame["prompt_id"] == "p001")]
    s = suggest(p, item.sample(frac=1.0, random_state=0))
    probs = p.predict_proba(item.sort_values("alpha"))
    assert s.alphas == sorted(item["alpha"].tolist())
    assert np.array_equal(s.probs, probs)
    assert s.suggested_alpha == s.alphas[int(np.argmax(probs[:, 1]))]
    assert suggest(p, item, tau=1.01).suggested_alpha is None
    by_alpha = {r["alpha"]: r for r in item.to_dict("records")}
    assert suggest(p, by_alpha).suggested_alpha == s.suggested_alpha


def test_live_suggest_errors_name_what_is_missing(small_predictor, monkeypatch):
    p, frame = small_predictor
    pkg = types.ModuleType("asteer_build")
    feats = types.ModuleType("asteer_build.rollouts")
    pkg.rollouts = feats
    monkeypatch.setitem(sys.modules, "asteer_build", pkg)
    monkeypatch.setitem(sys.modules, "asteer_build.rollouts", feats)
    with pytest.raises(LiveSuggestError, match="no callable `probe_feature_rows`"):
        suggest_live(p, "m", np.ones(4), ["hi"], [1.0, 2.0])

    item = frame[(frame["concept_id"] == "c002") & (frame["prompt_id"] == "p001")]

    seen = {}

    def probe_feature_rows(model, vector, prompts, alphas, layer, probe_tokens, **kw):
        seen.update(kw)
        return pd.concat([item.assign(prompt=q) for q in prompts])

    feats.probe_feature_rows = probe_feature_rows
    res = suggest_live(p, "m", np.ones(4), ["a", "b"], item["alpha"].tolist(),
                       sampling={"temperature": 0.7, "top_k": 20, "top_p": 0.95},
                       replay="authors")
    # the training data's sampling and replay reach the probes
    # and prompts are rendered as the dataset's were (its build.json, via the predictor)
    assert seen == {"temperature": 0.7, "top_k": 20, "top_p": 0.95, "replay": "authors",
                    "prompt_format": {"chat_template_kwargs": {"enable_thinking": False}}}
    assert set(res) == {"a", "b"}
    assert res["a"].suggested_alpha == suggest(p, item).suggested_alpha


def test_cli_reports_bad_data_as_one_line(tmp_path, capsys):
    write_dataset(tmp_path / "nolabels", generate(n_concepts=6, n_prompts=4, with_labels=False))
    rc = main(["fit", "--data", str(tmp_path / "nolabels"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "no labels" in err and "Traceback" not in err


def test_cli_suggest_with_feature_file(small_predictor, tmp_path, capsys):
    p, frame = small_predictor
    p.save(tmp_path / "pred")
    item = frame[frame["concept_id"] == "c003"].drop(columns=["concept_id"])
    item.to_parquet(tmp_path / "rows.parquet")
    rc = main(
        [
            "suggest",
            "--predictor",
            str(tmp_path / "pred"),
            "--features",
            str(tmp_path / "rows.parquet"),
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "s" / "suggestions.json").read_text())
    assert set(res) == set(item["prompt_id"])  # one suggestion per prompt
    assert len(res["p001"]["p_success"]) == int((item["prompt_id"] == "p001").sum())


def test_package_import_pulls_in_no_engine():
    # Of asteer_build, only the light core (the dataset contract, its torch-free
    # feature naming, and the prompt format train reads from build.json) may come along.
    light = (
        "{'asteer_build', 'asteer_build.core', 'asteer_build.core.contract', "
        "'asteer_build.core.feature_names', 'asteer_build.core.prompts'}"
    )
    code = (
        "import sys, train, train.cli, train.run, train.suggest, train.search, train.plots;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{{'vllm', 'ray', 'asteer_build', 'torch'}} and m not in {light});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_fit_evaluate_search(dataset, tmp_path, capsys):
    out = str(tmp_path / "o")
    common = ["--data", str(dataset), "--out", out, "--threads", "1"]
    fit = ["fit", *common, "--trials", "1", "--max-rounds", "60", "--groups", "SA,DA"]
    assert main(fit) == 0
    meta = json.loads((tmp_path / "o" / "predictor" / "predictor.json").read_text())
    assert {n.split("_")[0] for n in meta["feature_names"]} == {"SA", "DA", "alpha"}
    assert main(["evaluate", *common]) == 0
    assert "| unseen | alpha_only |" in capsys.readouterr().out
    assert main(["search", *common, "--k", "3,6", "--probe-tokens", "4"]) == 0
    se = json.loads((tmp_path / "o" / "search.json").read_text())
    assert [r["method"] for r in se["all"]["table"][:2]] == ["ours@K=3", "ours@K=6"]
    assert se["all"]["cost_model"]["probe_tokens"] == 4
