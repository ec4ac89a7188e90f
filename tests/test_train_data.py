"""Dataset loading, leakage-free splits and feature-name handling on a synthetic
dataset written in the published schema."""

import pandas as pd
import pytest

from train.data import DatasetError, list_pairs, load_dataset
from train.feature_names import parse_feature_name, select_features
from train.splits import SplitError, make_splits, partition_concepts
from train.synthetic import generate, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ds"), n_failed=5, n_pending=3)


def test_load_joins_on_id_and_reports_dropped_rows(dataset):
    d = load_dataset(dataset)
    assert (d.model, d.method) == ("tiny-model", "diffmean")
    r = d.report
    assert r["rows_total"] == 12 * 8 * 12
    assert r["dropped_judge_status"] == {"failed": 5, "pending": 3}
    assert r["rows_used"] == 12 * 8 * 12 - 8 == len(d.frame)
    assert d.frame["id"].is_unique
    assert set(d.frame["label"].unique()) == {0, 1, 2}
    assert "alpha" in d.feature_names and "vector_norm" in d.feature_names
    assert "SA_t0_k0" in d.feature_names and "concept_id" not in d.feature_names
    assert d.frame["SA_t0_k0"].dtype == "float32"
    # features are aligned to their rollout by id, not by position
    raw = pd.read_parquet(dataset / "features")
    one = d.frame.iloc[17]
    assert raw.set_index("id").loc[one["id"], "DA_t1_k2"] == pytest.approx(one["DA_t1_k2"])


def test_several_pairs_must_be_chosen(tmp_path):
    pairs = (("m1", "diffmean"), ("m1", "probe"))
    write_dataset(tmp_path, generate(n_concepts=6, n_prompts=4, pairs=pairs))
    assert list_pairs(tmp_path) == list(pairs)
    with pytest.raises(DatasetError, match="several .model, method. pairs"):
        load_dataset(tmp_path)
    d = load_dataset(tmp_path, method="probe")
    assert set(d.frame["method"]) == {"probe"}
    with pytest.raises(DatasetError, match="no rows for model='m2'"):
        load_dataset(tmp_path, model="m2")


def test_the_alpha_feature_reads_either_strength(tmp_path):
    """`--alpha-feature alpha_raw` (an `alpha_units: norm` build): the predictor's alpha is
    the multiple of v applied; a dataset without the column says so."""
    import pyarrow as pa

    tables = generate(n_concepts=6, n_prompts=4)
    roll = tables["rollouts"]
    i = roll.column_names.index("alpha_raw")
    tables["rollouts"] = roll.set_column(i, "alpha_raw", pa.compute.multiply(
        roll.column("alpha"), 2.5))
    write_dataset(tmp_path / "a", tables)
    plain, raw = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "a", alpha="alpha_raw")
    assert raw.report["alpha_feature"] == "alpha_raw" and "alpha" in raw.feature_names
    pd.testing.assert_series_equal(raw.frame["alpha"], plain.frame["alpha"] * 2.5,
                                   check_exact=False, rtol=1e-6)
    tables["rollouts"] = roll.drop_columns(["alpha_raw"])
    write_dataset(tmp_path / "b", tables)
    with pytest.raises(DatasetError, match="no alpha_raw column"):
        load_dataset(tmp_path / "b", alpha="alpha_raw")


def test_dataset_without_labels_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, generate(n_concepts=6, n_prompts=4, with_labels=False))
    with pytest.raises(DatasetError, match="no labels.*judge stage"):
        load_dataset(tmp_path)


def test_missing_configs_are_named(tmp_path):
    with pytest.raises(DatasetError, match="rollouts"):
        load_dataset(tmp_path)
    write_dataset(tmp_path, {"rollouts": generate(n_concepts=3, n_prompts=3)["rollouts"]})
    with pytest.raises(DatasetError, match="features"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="neither an existing folder nor a Hub repo id"):
        load_dataset(tmp_path / "nope" / "deeper")


def _items(frame, split_series):
    return frame.assign(split=split_series)[["concept_id", "prompt_id", "split"]]


def test_unseen_concepts_are_disjoint_and_stratified(dataset):
    d = load_dataset(dataset)
    s = make_splits(d.frame, d.concepts)
    assert not set(s.seen) & set(s.unseen)
    assert set(s.seen) | set(s.unseen) == set(d.frame["concept_id"])
    levels = d.concepts.set_index("concept_id")["concept_level"]
    # 4 concepts per level, 20 % unseen -> round(0.8) = 1 per level
    assert sorted(levels[s.unseen]) == ["high", "low", "mid"]
    split = s.assign(d.frame)
    assert set(d.frame.loc[split == "unseen", "concept_id"]) == set(s.unseen)
    assert not set(d.frame.loc[split != "unseen", "concept_id"]) & set(s.unseen)


def test_reference_proportions_for_50_per_level():
    concepts = pd.DataFrame(
        {
            "concept_id": [f"c{i}" for i in range(150)],
            "concept_level": ["low", "mid", "high"] * 50,
        }
    )
    seen, unseen, how = partition_concepts(concepts)
    assert (len(seen), len(unseen), how) == (120, 30, "stratified")
    lv = concepts.set_index("concept_id")["concept_level"]
    assert lv[unseen].value_counts().to_dict() == {"low": 10, "mid": 10, "high": 10}
    assert partition_concepts(concepts)[1] == unseen  # seeded
    assert partition_concepts(concepts, seed=7)[1] != unseen


def test_no_item_in_two_splits_and_prompt_proportions():
    tables = generate(n_concepts=6, n_prompts=50, alphas=(1.0, 2.0, 3.0))
    frame = tables["rollouts"].to_pandas()
    concepts = tables["concepts"].to_pandas()
    s = make_splits(frame, concepts)
    items = _items(frame, s.assign(frame)).drop_duplicates()
    # every (concept, prompt) item appears with exactly one split over all its alphas
    assert not items.duplicated(["concept_id", "prompt_id"]).any()
    per_concept = items[items["split"] != "unseen"].groupby("concept_id")["split"]
    for _, splits in per_concept:
        assert splits.value_counts().to_dict() == {"train": 28, "test": 15, "val": 7}
    # prompt split differs between concepts (not one global prompt split)
    test_sets = [
        frozenset(g.loc[g["split"] == "test", "prompt_id"])
        for _, g in items.groupby("concept_id")
        if (g["split"] == "test").any()
    ]
    assert len(set(test_sets)) > 1


def test_explicit_and_partition_column_unseen(dataset):
    d = load_dataset(dataset)
    s = make_splits(d.frame, d.concepts, unseen=["c000", "c005"])
    assert s.unseen == ["c000", "c005"] and s.how == "explicit"
    s = make_splits(d.frame, d.concepts, use_partition_column=True)
    assert s.unseen == ["c009", "c010", "c011"] and s.how == "partition-column"
    with pytest.raises(SplitError, match="not in the dataset: \\['zzz'\\]"):
        make_splits(d.frame, d.concepts, unseen=["zzz"])


def test_split_round_trips_and_rejects_unknown_items(dataset):
    d = load_dataset(dataset)
    s = make_splits(d.frame, d.concepts)
    again = type(s).from_dict(s.to_dict())
    assert again.assign(d.frame).equals(s.assign(d.frame))
    extra = d.frame.iloc[:1].assign(prompt_id="p999")
    with pytest.raises(SplitError, match="not in the split"):
        s.assign(extra)


def test_feature_name_parser():
    p = parse_feature_name
    assert p("SA_t0_k0")[1:] == ("SA", 0, 0, None)
    assert p("dn_ratio_t3_k10")[1:] == ("dn_ratio", 3, 10, None)
    assert p("DA_t1_mean")[1:] == ("DA", 1, None, "mean")
    assert p("DN_k5_max")[1:] == ("DN", None, 5, "max")
    assert p("DS_std")[1:] == ("DS", None, None, "std")
    assert p("alpha")[1:] == ("alpha", None, None, None)
    assert p("weird")[1:] == ("weird", None, None, None)


def test_feature_selection_for_ablations():
    names = [
        "SA_t0_k0",
        "SA_t1_k0",
        "DA_t0_k1",
        "DA_t0_mean",
        "DA_k1_max",
        "DA_std",
        "alpha",
        "vector_norm",
    ]
    assert select_features(names, no_alpha=True) == [n for n in names if n != "alpha"]
    assert select_features(names, groups=["SA"]) == ["SA_t0_k0", "SA_t1_k0", "alpha"]
    # pooled statistics (per-layer, global) mix later tokens in: dropped
    assert select_features(names, tokens=[0]) == [
        "SA_t0_k0",
        "DA_t0_k1",
        "DA_t0_mean",
        "alpha",
        "vector_norm",
    ]
    with pytest.raises(ValueError, match="leaves no features"):
        select_features(["alpha"], no_alpha=True)


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        return str(write_dataset(tmp_path / "snap", generate(n_concepts=3, n_prompts=3)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    d = load_dataset("someone/asteer-tiny")
    assert calls[0][:2] == ("someone/asteer-tiny", "dataset")
    assert not any("activations" in p for p in calls[0][2])
    assert len(d.frame) > 0

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DatasetError, match="could not download Hub dataset 'a/b': no network"):
        load_dataset("a/b")


def test_paper_ids_split_as_the_authors():
    """Numeric ids (the authors' concept_id and sample_id): the partition and the
    per-concept prompt split are the authors' own output (values in test_contract)."""
    from .test_contract import AUTHORS_SPLIT_42, AUTHORS_UNSEEN_42, PAPER_LEVELS

    concepts = pd.DataFrame({"concept_id": list(PAPER_LEVELS),
                             "concept_level": list(PAPER_LEVELS.values())})
    frame = pd.DataFrame([(c, str(p)) for c in PAPER_LEVELS for p in range(50)],
                         columns=["concept_id", "prompt_id"])
    s = make_splits(frame, concepts)
    assert s.unseen == [str(i) for i in AUTHORS_UNSEEN_42] and s.how == "stratified"
    for cid, (test, val) in AUTHORS_SPLIT_42.items():
        assert sorted(int(p) for (c, p), v in s.items.items()
                      if c == str(cid) and v == "test") == test
        assert sorted(int(p) for (c, p), v in s.items.items()
                      if c == str(cid) and v == "val") == val
    legacy = make_splits(frame, concepts, partition="contiguous")
    assert legacy.unseen == [str(i) for i in range(120, 150)] and legacy.how == "contiguous"
