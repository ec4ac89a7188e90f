"""End-to-end local builds of a tiny config: interrupted, rerun, judged again.

One uninterrupted local build is the reference (conftest.pipeline_reference); every other
build (SIGKILLed and resumed, `--rerun-shards`; on Ray in test_pipeline_ray) must end with
exactly its item ids and, generation being greedy, byte-identical rows. The builds here run
their engine in-process (pipeline_support.INPROCESS_ENGINE).
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

import pytest

from asteer_build.core.testseam import seam_env
from asteer_build.pipeline.shards import read_stage

from .pipeline_support import (
    INPROCESS_ENGINE,
    assert_same_build,
    check_no_partial,
    cli,
    committed,
    expected_ids,
    free_port,
    kill_group,
    sha,
    start_cli,
    temp_files,
    tiny_config,
    visible_shards,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def reference(pipeline_reference) -> Path:
    """The session's uninterrupted local build (conftest.pipeline_reference)."""
    return pipeline_reference


def test_local_build_is_complete_and_labelled(reference):
    t = read_stage(str(reference), "labelled")
    assert sorted(t.column("id").to_pylist()) == sorted(expected_ids(reference))
    assert set(t.column("judge_status").to_pylist()) == {"ok"}
    assert set(t.column("label").to_pylist()) <= {0, 1, 2}
    assert set(t.column("judge_rubric").to_pylist()) == {"rules-v1"}  # the rubric's version
    cols = set(read_stage(str(reference), "rollouts").column_names)
    assert {"id", "model", "method", "concept_id", "concept", "concept_level", "prompt_id",
            "prompt", "layer", "alpha", "vector_norm", "seed", "response", "response_tokens",
            "finish_reason", "label", "judge_model", "judge_status",
            "judge_explanation"} <= cols
    st = cli("status", str(reference), timeout=60)
    assert st.returncode == 0
    stages = json.loads(st.stdout)["stages"]
    assert stages["rollouts"]["shards_done"] == stages["rollouts"]["shards_total"] == 6
    m = json.loads((reference / "build.json").read_text())
    e = m["stages"]["rollouts"]["shard-000000"]
    assert {"rows", "sha256", "config_hash", "software"} <= set(e)
    assert m["stages"]["labelled"]["shard-000000"]["judge_rubric"] == "rules-v1"
    # effective sampling per model: the tiny world's file is silent -> transformers'
    # defaults (vLLM drops them at temperature 0, which is greedy either way)
    s = m["sampling"]["tiny"]
    assert (s["temperature"], s["top_k"], s["top_p"]) == (0.0, 50, 1.0)
    assert (reference / "vectors" / "tiny" / "diffmean.safetensors").exists()


def test_sigkill_mid_shard_then_resume_matches_uninterrupted(work, reference):
    run = work / "killed"
    cfg = write_config(work / "killed.yaml", tiny_config(run))
    p = start_cli("run", "--config", str(cfg), "--no-progress",
                  **seam_env(commit_delay_s=0.5), **INPROCESS_ENGINE)
    try:
        # Kill while a rollouts shard sits under its temp name, after some are committed.
        wait_for(lambda: len(committed(run, "rollouts")) >= 2 and
                 any(f.parent.name == "rollouts" for f in temp_files(run)),
                 300, "a rollouts shard mid-commit")
    finally:
        kill_group(p)
    before = committed(run, "rollouts")
    assert 2 <= len(before) < 6
    # What was committed before the kill survives it, rows and ids included: the kill
    # loses at most the shards not yet committed (requests run across shard boundaries,
    # so several shards are in flight at once).
    before_ids = read_stage(str(run), "rollouts").column("id").to_pylist()
    assert len(before_ids) == len(set(before_ids)) == 4 * len(before)
    # No partial shard is visible: temp names are dot files, committed files check out.
    check_no_partial(run)
    assert all(not f.name.startswith(".") for f in visible_shards(run, "rollouts"))
    r = cli("run", "--config", str(cfg), "--no-progress", "--json", **INPROCESS_ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)  # --json: stdout is the summary JSON, nothing else
    assert summary == json.loads((run / "summary.json").read_text())
    ro = summary["rollouts"]
    assert ro["shards_run"] == 6 - len(before)  # committed ones skipped
    # the generate phase's window (epoch seconds) is the one its seconds were taken from
    (t_first, t_last), = ro["generate_windows"].values()
    assert t_first < t_last and abs((t_last - t_first) - ro["generate_seconds"]) < 0.011
    after = committed(run, "rollouts")
    assert {n: e["sha256"] for n, e in before.items()} == \
        {n: after[n]["sha256"] for n in before}  # not rewritten
    # No duplicates: every planned id exactly once, the pre-kill ones among them.
    ids = read_stage(str(run), "rollouts").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 24 and set(before_ids) <= set(ids)
    assert_same_build(run, reference)


def test_rerun_shards_rewrites_only_those(work, reference):
    run = work / "rerun"
    shutil.copytree(reference, run)
    cfg = write_config(work / "rerun.yaml", tiny_config(run))
    files = {p: (p.stat().st_mtime_ns, sha(p)) for st in ("rollouts", "labelled")
             for p in visible_shards(run, st)}
    time.sleep(0.05)
    r = cli("run", "--config", str(cfg), "--no-progress", "--rerun-shards", "1,4", "--json",
            **INPROCESS_ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    ro = json.loads(r.stdout)["rollouts"]
    assert ro["shards_run"] == 2
    assert sorted(x["shard"] for x in ro["shards"]) == ["shard-000001", "shard-000004"]
    for p, (mtime, digest) in files.items():
        rewritten = p.stem in ("shard-000001", "shard-000004")
        assert (p.stat().st_mtime_ns != mtime) == rewritten, p
        assert sha(p) == digest, p  # greedy: same bytes again
    assert_same_build(run, reference)
    # A config edit that changes items is refused, naming the remedy.
    edited = tiny_config(run)
    edited["alphas"]["diffmean"] = [1.0, 2.0, 6.0]
    r = cli("run", "--config", str(write_config(work / "edited.yaml", edited)), timeout=60)
    assert r.returncode == 3
    assert "refusing to build" in r.stderr and "--out" in r.stderr


def test_judge_failures_are_recorded_then_rerun_failed_relabels(work, reference):
    """No engine: the judge stage alone over committed rollouts. An unreachable judge
    endpoint leaves rows failed (never a fake label); `--rerun-failed` with a working
    judge relabels exactly those."""
    run = work / "judge"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("labelled", ".staging"))
    m = json.loads((run / "build.json").read_text())
    m["stages"]["labelled"] = {}
    (run / "build.json").write_text(json.dumps(m))
    broken = tiny_config(run)
    broken["judge"] = {
        "kind": "llm", "model": "judge-x",
        "endpoints": [{"base_url": f"http://127.0.0.1:{free_port()}/v1", "max_concurrency": 4}],
        "retry": {"max_attempts": 1, "timeout_s": 2, "acquire_timeout_s": 5},
    }
    r = cli("run", "--config", str(write_config(work / "judge-broken.yaml", broken)),
            "--stages", "judge", timeout=300, OPENAI_API_KEY="unused")
    assert r.returncode == 0, r.stderr[-3000:]
    t = read_stage(str(run), "labelled")
    assert set(t.column("judge_status").to_pylist()) == {"failed"}
    assert t.column("label").null_count == t.num_rows
    assert json.loads(cli("status", str(run), timeout=60).stdout)[
        "stages"]["labelled"]["failed"] == 24
    fixed = write_config(work / "judge-fixed.yaml", tiny_config(run))
    r = cli("run", "--config", str(fixed), "--stages", "judge", "--rerun-failed", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    t = read_stage(str(run), "labelled")
    assert set(t.column("judge_status").to_pylist()) == {"ok"}
    assert t.column("label").equals(read_stage(str(reference), "labelled").column("label"))


def test_batch_judge_stage_survives_sigkill_while_polling(work, reference):
    """`judge.kind: openai-batch` in a build, against a loopback Files/Batches server:
    the judge stage is SIGKILLed while it polls, the rerun submits nothing twice and
    labels every row once with the server's answer; no API key lands in the run."""
    from judge.cache import cache_key
    from judge.rubric import DEFAULT_RUBRIC

    from .batch_api_support import batch_judge, batch_server, canned_label

    key = "sk-build-batch-" + secrets.token_hex(8)
    run = work / "judge-batch"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("labelled", ".staging"))
    m = json.loads((run / "build.json").read_text())
    m["stages"]["labelled"] = {}
    (run / "build.json").write_text(json.dumps(m))
    ro = read_stage(str(run), "rollouts").to_pylist()
    want = {cache_key(DEFAULT_RUBRIC.version, "judge-b", x["prompt"], x["concept"],
                      x["response"]) for x in ro}
    n_files = -(-len(want) // 4)
    with batch_server(key) as (srv, url):
        cfg = tiny_config(run)
        cfg["judge"] = batch_judge(url)
        path = write_config(work / "judge-batch.yaml", cfg)
        srv.hold.set()
        p = start_cli("run", "--config", str(path), "--stages", "judge", "--no-progress",
                      BATCH_TEST_KEY=key)
        wait_for(lambda: len(srv.batches) >= n_files and srv.retrieves >= 3 * n_files, 120,
                 "the judge stage polling its batches")
        assert p.poll() is None
        kill_group(p)
        first_log = p.stdout.read()
        n_batches = len(srv.batches)
        srv.hold.clear()
        r = cli("run", "--config", str(path), "--stages", "judge", "--no-progress",
                timeout=120, BATCH_TEST_KEY=key)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(srv.batches) == n_batches == n_files
        assert set(srv.submitted.values()) == {1} and set(srv.submitted) == want
    t = read_stage(str(run), "labelled")
    rows = t.to_pylist()
    assert len(rows) == 24 == len({x["id"] for x in rows})
    keys = {cache_key(DEFAULT_RUBRIC.version, "judge-b", x["prompt"], x["concept"],
                      x["response"]): x for x in rows}
    assert set(keys) == set(srv.submitted)
    for k, x in keys.items():
        assert x["judge_status"] == "ok" and x["label"] == canned_label(k)
    for f in run.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    assert key not in first_log and key not in r.stderr and key not in r.stdout


def test_alpha_units_norm_build(work):
    """`alpha_units: norm`: the vectors stage measures the banks' mean residual norm m at
    the layer (`residual_norm.json`, only in this mode), the engine adds alpha x m x
    v / ||v|| (the captured stream moves by exactly alpha x m at the steered layer), and
    each row records the raw multiple alpha x m / ||v|| it applied."""
    import numpy as np

    run = work / "norm-units"
    cfg = tiny_config(run, alphas={"diffmean": [0.5, 1.0], "probe": [0.5, 1.0]},
                      alpha_units="norm", vectors={"bank_size": 16},
                      capture={"steps": [0, 1], "offsets": [0, 1], "activations": True})
    r = cli("run", "--config", str(write_config(work / "norm.yaml", cfg)), "--no-progress",
            **INPROCESS_ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    rn = json.loads((run / "vectors" / "tiny" / "residual_norm.json").read_text())
    m = rn["mean_token_norm"]
    assert rn["alpha_units"] == "norm" and rn["layer"] == 2 and m > 0
    assert rn["texts"] == 2 * 2 * 16 and len(rn["per_concept"]) == 2
    rows = read_stage(str(run), "labelled").to_pylist()
    assert len(rows) == 16 and {x["judge_status"] for x in rows} == {"ok"}
    for x in rows:
        assert x["alpha_raw"] == pytest.approx(x["alpha"] * m / x["vector_norm"], rel=1e-6)
    # probe vectors are not DiffMean's length: the same alpha is a different raw multiple
    raw = {x["method"]: x["alpha_raw"] / x["alpha"] for x in rows if x["concept_id"] ==
           "tw-ocean"}
    assert raw["probe"] != pytest.approx(raw["diffmean"], rel=0.05)
    acts = {x["id"]: x for x in read_stage(str(run), "activations").to_pylist()}
    for x in rows:
        a = acts[x["id"]]
        added = np.asarray(a["steered"][0][0], np.float32) - np.asarray(a["steered_pre"][0],
                                                                        np.float32)
        # float16 storage of states of norm ~m: a few 1e-3 relative
        assert float(np.linalg.norm(added)) == pytest.approx(x["alpha"] * m, rel=5e-3)
    feats = {x["id"]: x for x in read_stage(str(run), "features").to_pylist()}
    assert all(feats[x["id"]]["alpha"] == pytest.approx(x["alpha"]) for x in rows)


def test_pca_and_file_vectors_build_end_to_end(work, reference):
    """`methods: [diffmean, probe, pca, file]` on the small config, with capture: the build
    completes; the `file` vectors are the reference build's own DiffMean (re-keyed
    `<concept_id>/<layer>`), so their rows equal the diffmean rows' tokens and features
    per (concept, prompt, alpha). A file missing a concept stops the run naming it."""
    from safetensors.torch import load_file, save_file

    from asteer_build.core.feature_names import feature_names

    dm = load_file(str(reference / "vectors" / "tiny" / "diffmean.safetensors"))
    mine = save_file({f"{cid}/2": v for cid, v in dm.items()}, str(work / "mine.safetensors"))
    del mine
    methods = ["diffmean", "probe", "pca", "file"]
    run = work / "four-methods"
    steps, offsets = (0, 1), (0, 1)
    cfg = tiny_config(run, methods=methods, alphas={m: [1.0, 3.0, 6.0] for m in methods},
                      vectors={"bank_size": 16, "file": {"path": "mine.safetensors"}},
                      capture={"steps": list(steps), "offsets": list(offsets)})
    r = cli("run", "--config", str(write_config(work / "four.yaml", cfg)), "--no-progress",
            **INPROCESS_ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_stage(str(run), "labelled").to_pylist()
    assert len(rows) == 48 == len({x["id"] for x in rows})
    assert {x["method"] for x in rows} == set(methods)
    assert {x["judge_status"] for x in rows} == {"ok"}
    feats = {x["id"]: x for x in read_stage(str(run), "features").to_pylist()}
    assert len(feats) == 48
    for x in rows:
        x.update({k: v for k, v in feats[x["id"]].items() if k not in x})
    by = {(x["method"], x["concept_id"], x["prompt_id"], x["alpha"]): x for x in rows}
    same = ["response", "response_tokens", "finish_reason", "vector_norm",
            *feature_names(steps, offsets)]
    for (m, cid, pid, a), x in by.items():
        if m == "file":
            d = by[("diffmean", cid, pid, a)]
            assert {k: x[k] for k in same} == {k: d[k] for k in same}, (cid, pid, a)
    # PCA is a vector of its own: its rows' features are not the diffmean rows' again (the
    # tiny model's greedy text is one token repeated, whatever the vector)
    names = feature_names(steps, offsets)
    differ = [k for k in by if k[0] == "pca" and
              [by[k][n] for n in names] != [by[("diffmean", *k[1:])][n] for n in names]]
    assert len(differ) == 12, differ
    index = json.loads((run / "vectors" / "tiny" / "index.json").read_text())
    assert index["file"]["tw-ocean"]["source"] == str(work / "mine.safetensors")
    assert index["pca"]["tw-ocean"]["norm"] == pytest.approx(
        index["diffmean"]["tw-ocean"]["norm"], rel=1e-5)
    # a file without tw-robot's vector: refused naming the concept and the layer
    save_file({"tw-ocean/2": dm["tw-ocean"]}, str(work / "partial.safetensors"))
    cfg = dict(cfg, output=str(work / "partial-run"),
               vectors={"bank_size": 16, "file": {"path": "partial.safetensors"}})
    r = cli("run", "--config", str(write_config(work / "partial.yaml", cfg)), "--no-progress",
            **INPROCESS_ENGINE)
    assert r.returncode != 0
    assert "no vector for concept 'tw-robot' at layer 2 (key 'tw-robot/2'; it has none " \
        "for it)" in r.stderr, r.stderr[-3000:]
    assert not (work / "partial-run" / "rollouts").exists() or not visible_shards(
        work / "partial-run", "rollouts")
