"""Transfer (train.transfer, `asteer-train transfer`) on a synthetic dataset of three
models x two methods, one model's hidden-state features on a 40x larger scale: the folds
hold out exactly the named model or method, the pooled inputs are the named transforms,
and the pooled predictor, never trained on the held-out pair, beats alpha-only there
(the synthetic windows move with concept and prompt, so alpha alone cannot place them)."""

import json

import numpy as np
import pyarrow as pa
import pytest

from asteer_build.inputs.tinyworld import parse_tiny_name
from asteer_build.pipeline.config import ConfigError, parse_config
from train.cli import main
from train.synthetic import generate, write_dataset
from train.transfer import (
    ALPHA_X_NORM,
    TRANSFORMS,
    Z_PREFIX,
    TransferError,
    comparable_features,
    holdout_mask,
    load_pooled,
    split_frame,
)

MODELS = ("ma", "mb", "mc")
PAIRS = tuple((m, me) for m in MODELS for me in ("diffmean", "probe"))
SCALED_MODEL, SCALE = "mc", 40.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tables = generate(n_concepts=9, n_prompts=6, pairs=PAIRS, seed=5)
    feats = tables["features"]
    scaled = np.asarray(feats.column("model").to_pylist()) == SCALED_MODEL
    cols = {}
    for name in feats.column_names:
        col = feats.column(name)
        if pa.types.is_floating(col.type) and name != "alpha":
            v = col.to_numpy().astype(np.float32)
            col = pa.array(np.where(scaled, v * SCALE, v).astype(np.float32))
        cols[name] = col
    tables["features"] = pa.table(cols, schema=feats.schema)
    return write_dataset(tmp_path_factory.mktemp("xfer"), tables)


@pytest.fixture(scope="module")
def cli_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("xfer_out")
    rc = main(["transfer", "--data", str(dataset), "--out", str(out), "--seeds", "1",
               "--trials", "1", "--threads", "1"])
    assert rc == 0
    return json.loads((out / "transfer.json").read_text()), (out / "transfer.md").read_text()


def test_folds_hold_out_exactly_the_named_model_and_method(dataset, cli_run):
    pooled = load_pooled(dataset)
    frame = pooled.frame
    mask = holdout_mask(frame, "model", "mb")
    assert set(frame.loc[mask, "model"]) == {"mb"}
    assert int(mask.sum()) == int((frame["model"] == "mb").sum())
    res, _ = cli_run
    lomo = res["leave_one_model_out"]
    assert sorted(lomo) == list(MODELS)
    assert lomo["mb"]["held_out_pairs"] == ["mb/diffmean", "mb/probe"]
    assert lomo["mb"]["trained_on_pairs"] == ["ma/diffmean", "ma/probe", "mc/diffmean",
                                              "mc/probe"]
    # the pooled predictor's training rows are the other models' train split only
    split = split_frame(pooled, 0)
    train_other = int(((frame["model"] != "mb") & (split == "train")).sum())
    assert lomo["mb"]["pooled_train_rows_per_seed"] == [train_other]
    evald = int(((frame["model"] == "mb") & split.isin(["test", "unseen"])).sum())
    assert lomo["mb"]["eval_rows_per_seed"] == [evald]
    lomethod = res["leave_one_method_out"]
    assert lomethod["probe"]["held_out_pairs"] == [f"{m}/probe" for m in MODELS]
    with pytest.raises(TransferError, match="model='nope'"):
        holdout_mask(frame, "model", "nope")


def test_transforms_are_applied_as_named(dataset):
    pooled = load_pooled(dataset)
    frame = pooled.frame
    split = split_frame(pooled, 0)
    x, names = comparable_features(frame, pooled.feature_names, split)
    assert names[0] == ALPHA_X_NORM and set(TRANSFORMS) == {ALPHA_X_NORM, "zscore_per_pair"}
    np.testing.assert_allclose(
        x[ALPHA_X_NORM], frame["alpha"] * frame["vector_norm"], rtol=1e-5
    )
    col = Z_PREFIX + "DN_t0_k0"
    for (model, method), idx in frame.groupby(["model", "method"]).indices.items():
        train = idx[split.to_numpy()[idx] == "train"]
        z = x[col].to_numpy()[train]
        assert abs(z.mean()) < 1e-4 and abs(z.std() - 1.0) < 1e-3, (model, method)
    # the 40x scale of one model is gone after the transform
    raw = frame["DN_t0_k0"].abs()
    assert raw[frame["model"] == SCALED_MODEL].mean() > 10 * raw[frame["model"] == "ma"].mean()
    zs = x[col].abs()
    ratio = zs[frame["model"] == SCALED_MODEL].mean() / zs[frame["model"] == "ma"].mean()
    assert 0.7 < ratio < 1.4


def test_pooled_beats_alpha_only_on_held_out_models(cli_run):
    res, md = cli_run
    assert res["split_seeds"] == [0]
    assert res["dataset"]["models"] == list(MODELS)
    assert res["dataset"]["pairs"]["mc/probe"]["rows"] == 9 * 6 * 12 - 8
    for block in ("leave_one_model_out", "leave_one_method_out"):
        for value, r in res[block].items():
            assert r["pooled"]["mean"] > r["alpha_only"]["mean"] + 0.05, (block, value, r)
            assert 0.0 < r["per_pair"]["mean"] <= 1.0
    # the scaled model transfers too (per-pair standardisation), close to its own predictor
    mc = res["leave_one_model_out"][SCALED_MODEL]
    assert mc["pooled"]["mean"] > mc["per_pair"]["mean"] - 0.1
    # ... and without the transforms it does not: its raw features are off the scale
    assert mc["pooled"]["mean"] > mc["pooled_raw"]["mean"] + 0.05, mc
    assert "### Leave one model out" in md and "| mc |" in md and "alpha_x_norm" in md


def test_config_names_several_tiny_models():
    assert parse_tiny_name("tinyworld") == (None, 0)
    assert parse_tiny_name("tinyworld:seed=2") == (None, 2)
    assert parse_tiny_name("tinyworld:qwen3:seed=1") == ("qwen3", 1)
    assert parse_tiny_name("some/model") is None
    base = {"methods": ["diffmean"], "layer": 2, "judge": {"kind": "rules"},
            "alphas": {"diffmean": [1, 2]}}
    cfg = parse_config({**base, "models": [{"path": "tinyworld:seed=1"},
                                           {"path": "tinyworld:gemma2"}]})
    assert [m.name for m in cfg.models] == ["tinyworld-seed1", "tinyworld-gemma2"]
    with pytest.raises(ConfigError, match="bad part 'seed=x'"):
        parse_config({**base, "models": [{"path": "tinyworld:seed=x"}]})


def test_every_vector_method_is_treated_alike(tmp_path):
    """The vector methods beyond the paper's two (`pca`, `file`) are methods like any
    other to training: leave-one-method-out holds each of four out in turn, and the
    pooled predictor still beats alpha-only on every one."""
    methods = ("diffmean", "probe", "pca", "file")
    pairs = tuple((m, me) for m in ("ma", "mb") for me in methods)
    data = write_dataset(tmp_path / "four", generate(n_concepts=9, n_prompts=6, pairs=pairs,
                                                      seed=7))
    out = tmp_path / "out"
    assert main(["transfer", "--data", str(data), "--out", str(out), "--seeds", "1",
                 "--trials", "1", "--threads", "1"]) == 0
    res = json.loads((out / "transfer.json").read_text())
    lomethod = res["leave_one_method_out"]
    assert sorted(lomethod) == sorted(methods)
    for me, r in lomethod.items():
        assert r["held_out_pairs"] == [f"ma/{me}", f"mb/{me}"]
        assert r["pooled"]["mean"] > r["alpha_only"]["mean"] + 0.05, (me, r)
    assert "| pca |" in (out / "transfer.md").read_text()
