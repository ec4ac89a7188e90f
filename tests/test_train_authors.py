"""`asteer-train` on the authors' released feature caches.

The folder is written in their exact layout (their `xgb/feature_cache.py`
`save_feature_cache`: `cache/features__{method}__{model}__L{layer}.npz` with arrays
X, y, concept_id, alpha, sample_id, and `..._meta.json` as their
`xgb/build_feature_cache.py` writes it), with synthetic values that carry signal.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asteer_build.core.feature_names import authors_columns, feature_names
from train.authors import concept_level
from train.cli import main
from train.data import DatasetError, list_pairs, load_dataset

MODEL = "Qwen3-1.7B"
PAIRS = ((MODEL, "diffmean", 10), (MODEL, "probe", 12))
ALPHAS = (10.0, 30.0, 50.0, 70.0, 90.0)
N_PROMPTS = 3
# their build_label_map for the judge's strings
LABEL_MAP = {"over steer": 2, "success": 1, "understeer": 0}


def _meta(method: str, layer: int, n: int) -> dict:
    return {
        "steering_method": method,
        "llm": MODEL,
        "curr_layer": layer,
        "k_list": [1, 2, 3, 5, 10, 15],
        "target_token_n_list": [1, 3, 5],
        "alpha_min": 10,
        "alpha_max": 90,
        "feature_groups": ["BeforeSteering", "CrossToken", "AfterSteering", "SteerProj"],
        "id_ood_partition": "stratified_shuffle",
        "seed": 42,
        "label_map": LABEL_MAP,
        "num_rows": n,
        "feature_dim": 414,
        "format_version": 1,
    }


def write_cache(root: Path, method: str, layer: int, seed: int, meta_extra=None) -> Path:
    """One cache: 150 concepts x 3 prompts x 5 alphas; the label follows alpha against a
    per-concept window, and two columns see that window (with noise)."""
    rng = np.random.default_rng(seed)
    cols = authors_columns(layer)
    cid, sid, alpha = (a.ravel() for a in np.meshgrid(
        np.arange(150), np.arange(N_PROMPTS), np.array(ALPHAS), indexing="ij"))
    lo = 20 + (cid % 5) * 8 + rng.normal(0, 3, len(cid))
    y = np.where(alpha < lo, 0, np.where(alpha < lo + 35, 1, 2))
    X = rng.normal(0, 1, (len(cid), len(cols))).astype(np.float32)
    X[:, cols.index(f"MagDiff_T1_L{layer + 1}")] = (alpha - lo) / 10 + rng.normal(0, 0.2, len(cid))
    X[:, cols.index(f"SteerProj_T0_L{layer}")] = (alpha - lo - 35) / 10
    X[:, cols.index("InterventionMag")] = 3.0
    X[:, cols.index("Alpha")] = alpha
    # their codes from their label map (here the identity, as theirs is)
    folder = root / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"features__{method}__{MODEL}__L{layer}.npz"
    np.savez_compressed(
        npz, X=X, y=y.astype(np.int64), concept_id=cid.astype(np.int32),
        alpha=alpha.astype(np.float32), sample_id=sid.astype(np.int32),
    )
    meta = _meta(method, layer, len(y)) | (meta_extra or {})
    (folder / f"features__{method}__{MODEL}__L{layer}_meta.json").write_text(
        json.dumps(meta, indent=2))
    return npz


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("authors")
    for i, (_, method, layer) in enumerate(PAIRS):
        write_cache(root, method, layer, seed=i)
    return root


def test_all_414_columns_map_to_ours(release):
    assert list_pairs(release) == [(MODEL, "diffmean"), (MODEL, "probe")]
    d = load_dataset(release, method="diffmean")
    assert len(d.feature_names) == 414
    assert set(d.feature_names) == set(feature_names())
    with np.load(release / "cache" / f"features__diffmean__{MODEL}__L10.npz") as raw:
        X, y, cid, sid = raw["X"], raw["y"], raw["concept_id"], raw["sample_id"]
    cols = authors_columns(10)
    # theirs at absolute layer 11 is our offset 1 at L = 10; the scalars by name
    for ours, theirs in (("dn_t1_k1", "MagDiff_T1_L11"), ("sa_t0_k0", "SteerProj_T0_L10"),
                         ("vector_norm", "InterventionMag"), ("alpha", "Alpha"),
                         ("dad_k15_max", "SteerAlignDelta_Max_L25_AllNonZeroTokens")):
        np.testing.assert_array_equal(d.frame[ours].to_numpy(), X[:, cols.index(theirs)])
    np.testing.assert_array_equal(d.frame["label"].to_numpy(), y)
    assert list(d.frame["prompt_id"][:N_PROMPTS * len(ALPHAS):len(ALPHAS)]) == ["0", "1", "2"]
    np.testing.assert_array_equal(d.frame["concept_id"].astype(int).to_numpy(), cid)
    np.testing.assert_array_equal(d.frame["prompt_id"].astype(int).to_numpy(), sid)
    levels = d.concepts.set_index("concept_id")["concept_level"]
    assert (levels["0"], levels["39"], levels["120"]) == ("low", "low", "low")
    assert (levels["40"], levels["135"], levels["80"], levels["149"]) == ("mid", "mid", "high",
                                                                          "high")
    assert d.report["rows_used"] == 150 * N_PROMPTS * len(ALPHAS)
    assert d.report["source_format"] == "authors-feature-cache"


def test_missing_extra_or_shifted_columns_are_named(tmp_path):
    cols = authors_columns(10)
    write_cache(tmp_path / "a", "diffmean", 10, 0, {"feature_names": cols[:5] + cols[6:]
                                                     + ["Bogus_T0_L10"]})
    with pytest.raises(DatasetError, match=rf"missing \['{cols[5]}'\], extra \['Bogus_T0_L10'\]"):
        load_dataset(tmp_path / "a")
    # names of a cache at layer 12 under a file saying L10: every layered name is off
    write_cache(tmp_path / "b", "diffmean", 10, 0, {"feature_names": authors_columns(12)})
    with pytest.raises(DatasetError, match="extra .*MagDiff_T0_L27"):
        load_dataset(tmp_path / "b")
    write_cache(tmp_path / "c", "diffmean", 10, 0, {"feature_names": cols[:-1]})
    with pytest.raises(DatasetError, match=r"missing \['Alpha'\], extra \[\]"):
        load_dataset(tmp_path / "c")
    # no names in the meta (their format): the width must be their 414
    npz = write_cache(tmp_path / "d", "diffmean", 10, 0)
    with np.load(npz) as raw:
        arrays = {k: raw[k] for k in raw.files}
    np.savez_compressed(npz, **(arrays | {"X": arrays["X"][:, :400]}))
    with pytest.raises(DatasetError, match="X has 400 columns, the meta's layout has 414"):
        load_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match="concept_id 150"):
        concept_level(150)


@pytest.mark.slow  # trains and searches every pair (~20-40 s)
def test_cli_all_trains_evaluates_and_reports_each_pair(release, tmp_path):
    """Both predictor options at two split seeds per pair; the report puts the paper's
    numbers for each pair beside ours (mean, std) with ours - paper."""
    from train.paper_numbers import MACRO_F1

    out = tmp_path / "out"
    rc = main(["all", "--data", str(release), "--out", str(out), "--trials", "2",
               "--max-rounds", "30", "--threads", "1", "--search-rows", "0",
               "--predictor-option", "default,authors", "--split-seeds", "1,2",
               "--transfer"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["pairs"]) == {f"{MODEL}__diffmean", f"{MODEL}__probe"}
    for key, res in summary["pairs"].items():
        assert (out / key / "summary.json").is_file()
        assert res["dataset"]["n_features"] == 414
        assert [(r["predictor"], r["seed"]) for r in res["runs"]] == [
            ("default", 1), ("default", 2), ("authors", 1), ("authors", 2)]
        for r in res["runs"]:
            # the signal columns let the predictor beat chance on unseen concepts
            assert r["macro_f1"]["unseen"]["predictor"] > 0.6, (key, r)
            assert "skipped" in r["search"]
            meta = json.loads((out / key / r["predictor"] / f"seed{r['seed']}" / "predictor"
                               / "predictor.json").read_text())
            assert meta["predictor_option"] == r["predictor"]
            assert meta["search"]["space"] == r["predictor"]
            assert meta["splits"]["seed"] == r["seed"]
        authors_params = [json.loads((out / key / "authors" / f"seed{s}" / "predictor"
                                      / "predictor.json").read_text())["params"] for s in (1, 2)]
        for p in authors_params:  # their space, mapped; trees capped by --max-rounds
            assert p["num_leaves"] == 2 ** p["max_depth"] and 6 <= p["max_depth"] <= 9
            assert 500 <= p["num_iterations"] < 750 and p["min_data_in_leaf"] == 1
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    rows = {(r["method"], r["predictor_option"], r["classifier"], r["split"]): r
            for r in report["macro_f1"]}
    assert len(rows) == len(report["macro_f1"]) == 2 * 2 * 2 * 2
    for method, paper_method in (("diffmean", "DiffMean"), ("probe", "LinearProbe")):
        key = f"{MODEL}__{method}"
        runs = summary["pairs"][key]["runs"]
        for option in ("default", "authors"):
            for split, ours_split in (("seen", "seen_test"), ("unseen", "unseen")):
                r = rows[(method, option, "predictor", split)]
                vals = [x["macro_f1"][ours_split]["predictor"] for x in runs
                        if x["predictor"] == option]
                assert r["ours"]["values"] == pytest.approx(vals)
                assert r["ours"]["mean"] == pytest.approx(np.mean(vals))
                assert r["ours"]["std"] == pytest.approx(np.std(vals))
                assert 0 <= r["ours"]["mean"] <= 1 and r["ours"]["n_seeds"] == 2
                assert r["paper_row"] == ["Qwen3-1.7B", paper_method]
                assert r["paper"] == MACRO_F1[("Qwen3-1.7B", paper_method)][split]
                assert r["difference"] == pytest.approx(r["ours"]["mean"] - r["paper"])
                assert (f"| {key} | {option} | predictor | {split} | {r['ours']['mean']:.3f} ± "
                        f"{r['ours']['std']:.3f} | {r['paper']:.2f} | "
                        f"{r['difference']:+.3f} | 2 |") in md
                base = rows[(method, option, "alpha_only", split)]
                assert base["paper"] is None and 0 <= base["ours"]["mean"] <= 1
    assert report["search"] == []
    assert set(report["search_skipped"]) == set(summary["pairs"])
    assert any("under-steer" in n and "cannot be told apart" in n for n in report["notes"])
    assert any("no response lengths" in n for n in report["notes"])
    # --transfer: the pooled predictor's section (one model here: leave-one-method-out)
    (section,) = report["sections"]
    xfer = json.loads((out / "transfer" / "transfer.json").read_text())
    assert section["data"] == xfer and xfer["split_seeds"] == [1, 2]
    assert xfer["leave_one_model_out"] == {}
    assert set(xfer["leave_one_method_out"]) == {"diffmean", "probe"}
    for held, other in (("diffmean", "probe"), ("probe", "diffmean")):
        b = xfer["leave_one_method_out"][held]
        assert b["held_out_pairs"] == [f"{MODEL}/{held}"]
        assert b["trained_on_pairs"] == [f"{MODEL}/{other}"]
        assert all(0 <= v <= 1 for v in b["pooled"]["values"]) and len(b["pooled"]["values"]) == 2
    assert "## Transfer across models and methods" in md
    # fit / evaluate per pair work the same way, with either option
    one = tmp_path / "one"
    common = ["--data", str(release), "--method", "probe", "--out", str(one), "--threads", "1"]
    assert main(["fit", *common, "--trials", "1", "--max-rounds", "30",
                 "--predictor-option", "authors"]) == 0
    assert main(["evaluate", *common]) == 0
    assert json.loads((one / "predictor" / "predictor.json").read_text())[
        "predictor_option"] == "authors"


def test_all_names_a_missing_or_extra_column(tmp_path, capsys):
    """`asteer-train all` on a cache whose names lack one of the 414 or add one stops
    with an error naming the column, before training."""
    cols = authors_columns(10)
    write_cache(tmp_path / "a", "diffmean", 10, 0, {"feature_names": cols[:7] + cols[8:]})
    assert main(["all", "--data", str(tmp_path / "a"), "--out", str(tmp_path / "o")]) == 2
    assert f"missing ['{cols[7]}']" in capsys.readouterr().err
    write_cache(tmp_path / "b", "diffmean", 10, 0, {"feature_names": cols + ["Extra_T9_L10"]})
    assert main(["all", "--data", str(tmp_path / "b"), "--out", str(tmp_path / "o")]) == 2
    assert "extra ['Extra_T9_L10']" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


def test_paper_names_map_to_ours_and_theirs():
    from train.paper_numbers import paper_pair

    assert paper_pair("qwen3-1.7b", "diffmean") == ("Qwen3-1.7B", "DiffMean")
    assert paper_pair("Qwen3-1.7B", "probe") == ("Qwen3-1.7B", "LinearProbe")
    assert paper_pair("llama-3.2-3b-instruct", "probe") == ("Llama-3.2-3B", "LinearProbe")
    assert paper_pair("Llama-3.2-3B-Instruct", "diffmean") == ("Llama-3.2-3B", "DiffMean")
    assert paper_pair("gemma-2-2b-it", "diffmean") == ("gemma-2-2b-it", "DiffMean")
    assert paper_pair("tiny-a", "diffmean") is None


def test_authors_space_draws_theirs_and_maps_to_lightgbm():
    from train.model import XGB_TO_LIGHTGBM, authors_to_lightgbm, sample_authors_xgb

    rng = np.random.default_rng(42)
    draws = [sample_authors_xgb(rng) for _ in range(20)]
    # their first draw with seed 42, in their order (integers, then choices)
    ref = np.random.default_rng(42)
    assert draws[0]["n_estimators"] == int(ref.integers(500, 750))
    assert draws[0]["learning_rate"] == float(ref.choice([0.02, 0.03, 0.05, 0.08]))
    assert draws[0]["max_depth"] == int(ref.integers(6, 10))
    for d in draws:
        lgbm = authors_to_lightgbm(d)
        for xgb_name, lgb_name in XGB_TO_LIGHTGBM.items():
            assert lgbm[lgb_name] == d[xgb_name]
        assert lgbm["num_leaves"] == 2 ** d["max_depth"] and lgbm["bagging_freq"] == 1
    with pytest.raises(ValueError, match=r"\['booster'\]"):
        authors_to_lightgbm(draws[0] | {"booster": "dart"})


def test_report_search_beside_the_paper_and_extra_sections():
    """Where response lengths are known the strength search is compared; the paper's
    numbers sit beside the one pair it gives them for, and extra sections append."""
    from train.paper_numbers import SEARCH
    from train.report import add_section, build_report, report_markdown

    def run(seed, k20, igs):
        return {"predictor": "default", "seed": seed,
                "macro_f1": {"seen_test": {"predictor": 0.7, "alpha_only": 0.5},
                             "unseen": {"predictor": 0.6, "alpha_only": 0.4}},
                "search": {"ours@K=20": {"success_rate": k20, "mean_tokens": 5000.0},
                           "IGS": {"success_rate": igs, "mean_tokens": 50000.0}}}

    pair = {"model": "qwen3-1.7b", "method": "diffmean",
            "dataset": {"source_format": "asteer"},
            "runs": [run(1, 0.8, 0.9), run(2, 0.9, 0.9)]}
    other = pair | {"model": "tiny-a"}
    rep = build_report({"pairs": {"q": pair, "t": other}},
                       [{"title": "Transfer", "markdown": "x", "data": {"a": 1}}])
    by = {(r["pair"], r["search_method"], r["metric"]): r for r in rep["search"]}
    k = by[("q", "ours@K=20", "success_rate")]
    assert k["ours"]["mean"] == pytest.approx(0.85) and k["ours"]["std"] == pytest.approx(0.05)
    assert k["paper"] == SEARCH["ours@K=20"]["success_rate"]
    assert k["difference"] == pytest.approx(0.85 - 0.846)
    assert by[("q", "IGS", "mean_tokens")]["difference"] == pytest.approx(50000 - 51300)
    assert by[("t", "IGS", "mean_tokens")]["paper"] is None
    assert rep["search_skipped"] == {}
    assert rep["notes"] == ["t: the paper has no row for this (model, method)"]
    assert rep["sections"][0]["data"] == {"a": 1}
    md = report_markdown(rep)
    assert "| q | default | ours@K=20 | success_rate | 0.850 ± 0.050 | 0.846 | +0.004 |" in md
    assert md.rstrip().endswith("## Transfer\n\nx")
    with pytest.raises(ValueError, match="lacks \\['markdown'\\]"):
        add_section(rep, {"title": "no body"})


def test_hub_id_reads_only_the_feature_caches(tmp_path, monkeypatch):
    """A Hub id resolves through the Hugging Face cache (offline, pre-populated as the
    authors' repo would be); their other files there are not what training reads."""
    from huggingface_hub import constants

    from tests.authors_data import REPO, repo_folder, write_authors_cache

    commit = write_authors_cache(tmp_path, n_prompts=5, bank_size=2)
    snap = repo_folder(tmp_path) / "snapshots" / commit
    write_cache(snap, "diffmean", 10, seed=0)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert list_pairs(REPO) == [(MODEL, "diffmean")]
    d = load_dataset(REPO)
    assert d.report["source"] == REPO and d.report["n_features"] == 414
    assert d.report["rows_used"] == 150 * N_PROMPTS * len(ALPHAS)


def test_labels_follow_their_label_map(tmp_path):
    """Their map sends other judge strings to codes from 3 up: those rows are dropped and
    counted, the rest keep their class."""
    npz = write_cache(tmp_path, "diffmean", 10, 0,
                      {"label_map": LABEL_MAP | {"unparseable": 3}})
    with np.load(npz) as raw:
        arrays = {k: raw[k] for k in raw.files}
    y = arrays["y"].copy()
    y[:7] = 3
    np.savez_compressed(npz, **(arrays | {"y": y}))
    d = load_dataset(tmp_path)
    assert d.report["dropped_label_not_in_map"] == 7
    assert d.report["rows_used"] == len(y) - 7
    np.testing.assert_array_equal(d.frame["label"].to_numpy(), y[7:])


def test_search_refuses_rows_without_response_lengths(tmp_path):
    """Their caches carry no response lengths: the strength search says so instead of
    charging NaN tokens."""
    from train.search import build_items

    write_cache(tmp_path, "diffmean", 10, 0)
    d = load_dataset(tmp_path)
    assert d.frame["response_tokens"].isna().all()
    with pytest.raises(ValueError, match="no response_tokens"):
        build_items(d.frame)
    items, mean_len = build_items(d.frame, mean_length=1000.0)
    assert mean_len == 1000.0 and len(items) == 150 * N_PROMPTS


def _write_lengths(root: Path, model: str, methods: tuple[str, ...], skip: int = 0) -> Path:
    """An imported dataset's `rollouts` (the import's schema) with response_tokens for
    every cache row of `model` (less the first `skip` rows); alpha off by 1e-9 as a
    float64 from their JSON can be against the cache's float32."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from asteer_build.io.authors.facts import IMPORT_SCHEMA

    rows = [
        {"model": model, "method": method, "concept_id": str(c), "prompt_id": str(s),
         "alpha": a + 1e-9, "layer": 10, "response_tokens": int(100 + 2 * a + c % 7),
         "label": 1, "judge_status": "ok"}
        for method in methods for c in range(150) for s in range(N_PROMPTS) for a in ALPHAS
    ][skip:]
    (root / "rollouts").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=IMPORT_SCHEMA),
                   root / "rollouts" / "part-0.parquet")
    return root


def test_all_with_lengths_runs_the_search_on_the_caches(release, tmp_path, capsys):
    """`all --data CACHES --lengths IMPORTED`: response_tokens joined on (model, method,
    concept, prompt, alpha), the unmatched rows' items left out and counted, and the
    report's search rows have our numbers beside the paper's (Qwen3-1.7B / DiffMean)."""
    from train.paper_numbers import SEARCH

    lengths = _write_lengths(tmp_path / "imported", MODEL, ("diffmean",), skip=2)
    out = tmp_path / "out"
    rc = main(["all", "--data", str(release), "--method", "diffmean", "--lengths",
               str(lengths), "--out", str(out), "--trials", "2", "--max-rounds", "30",
               "--threads", "1", "--search-rows", "0", "--k", "5,20"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    joined = summary["dataset"]["lengths"]
    assert joined["rows_matched"] == 150 * N_PROMPTS * len(ALPHAS) - 2
    assert joined["rows_without_length"] == 2
    (run,) = summary["runs"]
    assert "skipped" not in run["search"]
    search = json.loads((out / "search.json").read_text())
    # the 2 unmatched rows are concept 0 / prompt 0, evaluated at seed 42: that whole
    # item (all its alphas) leaves the search, counted
    ex = search["excluded_no_length"]
    assert ex == run["search_excluded_no_length"] == {"rows": len(ALPHAS), "items": 1}
    assert search["all"]["items"] > 0
    for name, res in run["search"].items():
        assert 0 <= res["success_rate"] <= 1, name
        assert 0 < res["mean_tokens"] < 1e6 and np.isfinite(res["mean_tokens"]), name
    report = json.loads((out / "report.json").read_text())
    assert report["search_skipped"] == {}
    rows = {(r["search_method"], r["metric"]): r for r in report["search"]}
    k20 = rows[("ours@K=20", "success_rate")]
    assert k20["ours"]["mean"] == pytest.approx(run["search"]["ours@K=20"]["success_rate"])
    assert k20["paper"] == SEARCH["ours@K=20"]["success_rate"]
    assert k20["difference"] == pytest.approx(k20["ours"]["mean"] - k20["paper"])
    igs = rows[("IGS", "mean_tokens")]
    assert igs["paper"] == SEARCH["IGS"]["mean_tokens"] and igs["ours"]["mean"] > 0
    assert any("2 without a length" in n for n in report["notes"])
    assert not any("carry no response lengths" in n for n in report["notes"])
    # `search` on its own takes --lengths too, and gives the same numbers
    again = tmp_path / "again"
    assert main(["search", "--data", str(release), "--method", "diffmean", "--lengths",
                 str(lengths), "--out", str(again), "--predictor", str(out / "predictor"),
                 "--k", "5,20"]) == 0
    assert json.loads((again / "search.json").read_text())["all"] == search["all"]


def test_lengths_of_another_model_is_a_clear_error(release, tmp_path, capsys):
    """A lengths folder that holds nothing for the cache's (model, method) stops before
    training with the pair named; their cache method `probe_l2-0.01` is our `probe`."""
    from train.authors import cache_method

    assert (cache_method("probe_l2-0.01"), cache_method("diffmean")) == ("probe", "diffmean")
    lengths = _write_lengths(tmp_path / "imported", "gemma-2-2b-it", ("diffmean", "probe"))
    rc = main(["all", "--data", str(release), "--method", "diffmean", "--lengths",
               str(lengths), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"model='{MODEL}' method='diffmean'" in err and "gemma-2-2b-it" in err
    assert not (tmp_path / "o" / "report.json").exists()
    # a rollouts folder without the key columns: named, not a KeyError
    bare = tmp_path / "bare" / "rollouts"
    bare.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["x"], "response_tokens": [3]}), bare / "part-0.parquet")
    rc = main(["all", "--data", str(release), "--method", "diffmean", "--lengths",
               str(bare.parent), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and "lack the column(s) ['model', 'method', 'concept_id'" in err, err
