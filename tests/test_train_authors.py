"""`asteer-train` on the authors' released feature caches (issue 17, scope 1).

The folder is written in their exact layout (their `xgb/feature_cache.py`
`save_feature_cache`: `cache/features__{method}__{model}__L{layer}.npz` with arrays
X, y, concept_id, alpha, sample_id, and `..._meta.json` as their
`xgb/build_feature_cache.py` writes it), with synthetic values that carry signal.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from asteer_build.engine.feature_names import authors_columns, feature_names
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


def test_cli_all_trains_and_evaluates_each_pair(release, tmp_path):
    out = tmp_path / "out"
    rc = main(["all", "--data", str(release), "--out", str(out), "--trials", "1",
               "--max-rounds", "40", "--threads", "1", "--search-rows", "0"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["pairs"]) == {f"{MODEL}__diffmean", f"{MODEL}__probe"}
    for key, res in summary["pairs"].items():
        assert (out / key / "summary.json").is_file()
        assert res["dataset"]["n_features"] == 414
        f1 = res["macro_f1"]
        # the signal columns let the predictor beat chance on unseen concepts
        assert f1["unseen"]["predictor"] > 0.6, (key, f1)
        assert "skipped" in res["search"]
    # fit / evaluate per pair work the same way
    one = tmp_path / "one"
    common = ["--data", str(release), "--method", "probe", "--out", str(one), "--threads", "1"]
    assert main(["fit", *common, "--trials", "1", "--max-rounds", "30"]) == 0
    assert main(["evaluate", *common]) == 0
    assert (one / "predictor").is_dir()


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
