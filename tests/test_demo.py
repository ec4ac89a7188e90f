"""`make demo`'s build, end to end on the tiny world, and what it writes (issue 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from asteer_build.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(out)  # `make demo`'s own settings: what it prints is what is checked
    return out, summary


def test_demo_writes_every_plot_as_a_png(demo):
    out, summary = demo
    plots = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in plots}
    for method in ("diffmean", "probe"):
        assert f"label_fraction_by_concept-{method}.png" in names
        for kind in ("confusion", "importance", "label_fraction_vs_alpha", "search"):
            assert f"tiny-{method}-{kind}.png" in names
    for p in plots:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 2000, p.name


def test_demo_has_all_three_regimes(demo):
    _, summary = demo
    assert summary["judge_status"] == {"ok": summary["rollouts"]}
    assert set(summary["label_fractions"]) == {"under", "success", "over"}
    for label, frac in summary["label_fractions"].items():
        assert frac > 0.10, (label, frac)


def test_summary_numbers_equal_the_result_files(demo):
    out, summary = demo
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    import pyarrow.parquet as pq

    labels = []
    for f in sorted((out / "dataset" / "rollouts").glob("*.parquet")):
        labels += pq.read_table(f, columns=["label"]).column("label").to_pylist()
    assert len(labels) == summary["rollouts"]
    names = {0: "under", 1: "success", 2: "over"}
    assert {names[k]: labels.count(k) for k in names} == summary["labels"]
    assert len(summary["predictors"]) == 2
    for key, p in summary["predictors"].items():
        train_summary = json.loads(Path(p["summary_file"]).read_text())
        assert train_summary["macro_f1"] == p["macro_f1"]
        assert train_summary["search"] == p["search"]
        # on the builder's own data the predictor beats both baselines on unseen
        # concepts (issue 8). On this default split; over 10 split seeds it does so on
        # average, not on every split (benchmarks/results/predictor_vs_baselines.json)
        unseen = p["macro_f1"]["unseen"]
        assert unseen["predictor"] > max(unseen["majority"], unseen["alpha_only"]), (key, unseen)
