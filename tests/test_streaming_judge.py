"""The judge while the engines generate (`pipeline/judge_stage.py`): the Batch API gets
shards as they commit, a SIGKILL in the overlapped phase then a rerun ends with every
row labelled once by the server's answer and no custom_id sent twice; `--sequential`
keeps the old order."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from asteer_build.core.testseam import seam_env
from asteer_build.pipeline.shards import read_stage

from .pipeline_support import (
    INPROCESS_ENGINE,
    cli,
    committed,
    kill_group,
    start_cli,
    tiny_config,
    vectors_only,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("streaming")


def test_batch_waves_go_out_while_rollouts_commit_and_survive_a_kill(work,
                                                                     pipeline_reference):
    """Shards commit 4 s apart (the commit seam); the first batch is created before the
    last rollouts shard commits; the build is SIGKILLed in that overlap and rerun: each
    custom_id reached the server once, every row carries the server's answer, and the
    ids are the reference build's."""
    from judge.cache import cache_key
    from judge.rubric import DEFAULT_RUBRIC

    from .batch_api_support import batch_judge, batch_server, canned_label

    run = work / "batch-stream"
    vectors_only(pipeline_reference, run)
    ref_rows = read_stage(str(pipeline_reference), "rollouts").to_pylist()
    want = {cache_key(DEFAULT_RUBRIC.version, "judge-b", x["prompt"], x["concept"],
                      x["response"]) for x in ref_rows}
    key = "sk-stream-" + secrets.token_hex(8)
    with batch_server(key) as (srv, url):
        path = write_config(work / "batch-stream.yaml", tiny_config(run, judge=batch_judge(url)))
        p = start_cli("run", "--config", str(path), "--no-progress", BATCH_TEST_KEY=key,
                      **INPROCESS_ENGINE, **seam_env(commit_delay_s=2.0))
        # the overlap: a batch on the server while rollouts shards are still to commit
        wait_for(lambda: srv.batches and len(committed(run, "rollouts")) < 6, 300,
                 "a batch submitted before the last rollouts shard")
        assert len(committed(run, "rollouts")) < 6
        kill_group(p)
        first = p.stdout.read()
        r = cli("run", "--config", str(path), "--no-progress", "--json", timeout=400,
                BATCH_TEST_KEY=key, **INPROCESS_ENGINE)
        assert r.returncode == 0, r.stderr[-3000:]
        assert set(srv.submitted) == want and set(srv.submitted.values()) == {1}
    summary = json.loads(r.stdout)
    assert summary["mode"] == "streaming"
    assert "as rollouts commit" in (run / "logs" / "build.log").read_text()
    rows = read_stage(str(run), "labelled").to_pylist()
    assert sorted(x["id"] for x in rows) == sorted(x["id"] for x in ref_rows)
    for x in rows:
        k = cache_key(DEFAULT_RUBRIC.version, "judge-b", x["prompt"], x["concept"],
                      x["response"])
        assert x["judge_status"] == "ok" and x["label"] == canned_label(k)
    assert key not in first + r.stdout + r.stderr


def test_sequential_keeps_the_old_order(work, pipeline_reference):
    """`--sequential`: the judge's busy window starts after the rollouts' last shard."""
    run = work / "sequential"
    vectors_only(pipeline_reference, run)
    path = write_config(work / "sequential.yaml", tiny_config(run))
    r = cli("run", "--config", str(path), "--no-progress", "--json", "--sequential",
            **INPROCESS_ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["mode"] == "sequential"
    last_commit = max(x["ended"] for x in s["rollouts"]["shards"])
    assert s["judge"]["window"][0] >= last_commit
    got = read_stage(str(run), "labelled")
    ref = read_stage(str(pipeline_reference), "labelled")
    assert got.column("id").to_pylist() == ref.column("id").to_pylist()
    assert got.column("label").to_pylist() == ref.column("label").to_pylist()


def test_live_pool_labels_shards_while_rollouts_commit(work, pipeline_reference):
    """An endpoint pool (`kind: llm`) behind the fault proxy (each row's first attempt
    answered 500, then dropped for a few): the judge calls start before the last rollouts
    shard commits, every row ends labelled once, with the endpoint's answer for that row
    (the canned label of its judge prompt, what a `--sequential` build gets from it)."""
    from judge.rubric import DEFAULT_RUBRIC

    from .batch_api_support import batch_server, canned_label
    from .judge_support import FaultProxy

    key = "sk-live-" + secrets.token_hex(8)
    with batch_server(key, chat_latency_s=0.05) as (srv, url):
        proxy = FaultProxy(url, plan=lambda k, n, b: ("http500" if n == 0 else
                                                      "drop" if n == 1 and k < "4" else
                                                      "pass"))
        judge = {"kind": "llm", "model": "judge-live",
                 "endpoints": [{"base_url": proxy.url, "api_key_env": "LIVE_TEST_KEY",
                                "max_concurrency": 4}],
                 "retry": {"max_attempts": 4, "timeout_s": 5, "base_delay_s": 0.05,
                           "failures_to_eject": 1000}}
        run = work / "live-streaming"
        vectors_only(pipeline_reference, run)
        path = write_config(work / "live-streaming.yaml", tiny_config(run, judge=judge))
        r = cli("run", "--config", str(path), "--no-progress", "--json", timeout=400,
                LIVE_TEST_KEY=key, **INPROCESS_ENGINE, **seam_env(commit_delay_s=1.0))
        assert r.returncode == 0, r.stderr[-3000:]
        s, calls = json.loads(r.stdout), list(srv.chat_times)
    assert s["mode"] == "streaming"
    last_commit = max(x["ended"] for x in s["rollouts"]["shards"])
    assert min(calls) < last_commit  # the judge worked while shards were still coming
    assert s["judge"]["window"][0] < last_commit
    got = read_stage(str(run), "labelled").to_pylist()
    ref = read_stage(str(pipeline_reference), "rollouts").to_pylist()
    assert sorted(x["id"] for x in got) == sorted(x["id"] for x in ref)
    for x in got:
        msg = DEFAULT_RUBRIC.messages(x["prompt"], x["concept"], x["response"])[-1]
        assert (x["judge_status"], x["label"]) == ("ok", canned_label(msg["content"]))
    # the faults were real: each distinct judgment's first call (the tiny model repeats
    # itself, so 24 rows need fewer) was answered 500
    assert proxy.injected["http500"] == len(proxy.attempts) >= 4


def test_cost_cap_is_checked_against_the_plan_before_any_engine_starts(work,
                                                                      pipeline_reference):
    """A Batch API judge whose plan estimate (`plan`'s figure, at batch prices) passes
    `judge.batch.cost_cap_usd` stops the run before the rollouts start (exit 4, as
    `asteer-judge`), naming the estimate and the cap. (A cap reached mid-run, when the
    rows turn out dearer than the estimate, stops the waves instead: `_batch_waves`.)"""
    from .batch_api_support import batch_judge

    run = work / "capped"
    vectors_only(pipeline_reference, run)
    judge = {**batch_judge("http://127.0.0.1:9/v1"),
             "prices": {"input_per_mtok": 2.0, "output_per_mtok": 8.0,
                        "output_tokens_per_call": 100}}
    cfg = tiny_config(run, judge=judge)
    plan = cli("plan", str(write_config(work / "capped.yaml", cfg)))
    assert plan.returncode == 0, plan.stderr[-2000:]
    est = json.loads(plan.stdout)["judge"]
    cost = est["cost_usd"]["batch"]
    assert est["calls"] == 24 and cost > 0
    cfg["judge"]["batch"] = {**judge["batch"], "cost_cap_usd": cost / 2}
    path = write_config(work / "capped.yaml", cfg)
    r = cli("run", "--config", str(path), "--no-progress", "--json", BATCH_TEST_KEY="sk-x")
    assert r.returncode == 4, r.stderr[-2000:]
    assert f"~${cost:,.2f}" in r.stderr and f"cap of ${cost / 2:,.2f}" in r.stderr
    assert "24 rows not labelled yet" in r.stderr
    assert set(committed(run, "rollouts")) == set()  # nothing ran
    assert "engine" not in r.stderr
