"""End-to-end builds of a tiny config: local, interrupted, rerun, and on a real Ray cluster.

One uninterrupted local build is the reference; every other build (SIGKILLed and resumed,
`--rerun-shards`, `ray job submit` with an actor SIGKILLed mid-shard) must end with
exactly its item ids and, generation being greedy, byte-identical rows.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from asteer_build.core.testseam import seam_env
from asteer_build.pipeline.config import parse_config
from asteer_build.pipeline.plan import make_plan
from asteer_build.pipeline.shards import read_stage

from .pipeline_support import (
    BIN,
    ROOT,
    check_no_partial,
    cli,
    committed,
    free_port,
    kill_group,
    ray_auth_env,
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


def _expected_ids(run: Path) -> list[str]:
    cfg = parse_config(tiny_config(run))
    return [i.id for i in make_plan(cfg).items()]


def _assert_same_build(run: Path, ref: Path) -> None:
    check_no_partial(run)
    assert not temp_files(run)
    for stage in ("rollouts", "labelled"):
        got, want = read_stage(str(run), stage), read_stage(str(ref), stage)
        ids = got.column("id").to_pylist()
        assert len(ids) == len(set(ids)), f"{stage}: duplicate ids"
        assert sorted(ids) == sorted(_expected_ids(ref))
        assert got.equals(want), f"{stage}: rows differ from the uninterrupted build"
    # Byte-identical shard files, not just equal tables.
    for name, e in committed(ref, "rollouts").items():
        assert committed(run, "rollouts")[name]["sha256"] == e["sha256"], name


def test_local_build_is_complete_and_labelled(reference):
    t = read_stage(str(reference), "labelled")
    assert sorted(t.column("id").to_pylist()) == sorted(_expected_ids(reference))
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
                  **seam_env(commit_delay_s=0.5))
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
    r = cli("run", "--config", str(cfg), "--no-progress", "--json")
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
    _assert_same_build(run, reference)


def test_rerun_shards_rewrites_only_those(work, reference):
    run = work / "rerun"
    shutil.copytree(reference, run)
    cfg = write_config(work / "rerun.yaml", tiny_config(run))
    files = {p: (p.stat().st_mtime_ns, sha(p)) for st in ("rollouts", "labelled")
             for p in visible_shards(run, st)}
    time.sleep(0.05)
    r = cli("run", "--config", str(cfg), "--no-progress", "--rerun-shards", "1,4", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    ro = json.loads(r.stdout)["rollouts"]
    assert ro["shards_run"] == 2
    assert sorted(x["shard"] for x in ro["shards"]) == ["shard-000001", "shard-000004"]
    for p, (mtime, digest) in files.items():
        rewritten = p.stem in ("shard-000001", "shard-000004")
        assert (p.stat().st_mtime_ns != mtime) == rewritten, p
        assert sha(p) == digest, p  # greedy: same bytes again
    _assert_same_build(run, reference)
    # A config edit that changes items is refused, naming the remedy.
    edited = tiny_config(run)
    edited["alphas"]["diffmean"] = [1.0, 2.0, 6.0]
    r = cli("run", "--config", str(write_config(work / "edited.yaml", edited)), timeout=60)
    assert r.returncode == 3
    assert "refusing to build" in r.stderr and "--out" in r.stderr


# --- Ray ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(ray_head) -> str:
    """The session's local cluster (conftest.ray_head), token authentication on: its
    dashboard address, where `ray job` submits."""
    return ray_head[1]


@pytest.fixture(scope="module")
def client_env(ray_token):
    return ray_auth_env(ray_token)


def _job(addr: str, e: dict[str, str], *args: str,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", *args, "--address", addr], cwd=ROOT,
                          env=e, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_without_the_token_is_refused(ray_cluster, client_env, work):
    """Auth is really on: a client without the cluster's token (none in RAY_AUTH_TOKEN_PATH,
    RAY_AUTH_TOKEN or its home) or with a wrong one gets Ray's own error, and no job runs."""
    home = work / "no-token-home"
    home.mkdir(exist_ok=True)
    no_token = {k: v for k, v in client_env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    no_token["HOME"] = str(home)
    r = _job(ray_cluster, no_token, "submit", "--no-wait", "--", "true", timeout=60)
    # Ray 2.60 raises AuthenticationError or, on the submit path, aborts in its C++ token
    # loader; both say this.
    assert r.returncode != 0
    assert "Token authentication is enabled but Ray couldn't find an authentication token" \
        in r.stderr, r.stderr[-3000:]
    wrong = dict(no_token, RAY_AUTH_TOKEN=secrets.token_hex(32))
    r = _job(ray_cluster, wrong, "submit", "--no-wait", "--", "true", timeout=60)
    assert r.returncode != 0 and "ray.exceptions.AuthenticationError" in r.stderr, \
        r.stderr[-3000:]
    unset = {k: v for k, v in no_token.items() if k != "RAY_AUTH_MODE"}
    r = _job(ray_cluster, unset, "submit", "--no-wait", "--", "true", timeout=60)
    assert r.returncode != 0 and "ray.exceptions.AuthenticationError" in r.stderr, \
        r.stderr[-3000:]
    r = _job(ray_cluster, client_env, "list", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "entrypoint='true'" not in r.stdout + r.stderr


def test_ray_job_with_actor_sigkill_matches_local(work, reference, ray_cluster, client_env):
    run = work / "ray"
    pids = work / "actor-pids"
    cfg = write_config(work / "ray.yaml", tiny_config(run))
    # As cluster/runtime_env.yaml does with the GPU lock: driver and actors check theirs.
    runtime_env = {"env_vars": {**seam_env(actor_pid_dir=str(pids), commit_delay_s=0.5),
                                "ASTEER_REQUIRE_LOCK": "requirements/cpu.txt",
                                "TOKENIZERS_PARALLELISM": "false"}}
    sub_id = f"asteer-test-{os.getpid()}"
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_cluster, "--working-dir", ".",
         "--submission-id", sub_id, "--no-wait", "--runtime-env-json", json.dumps(runtime_env),
         "--", "asteer-build", "run", "--config", str(cfg), "--executor", "ray",
         "--no-progress", "--json"],
        cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    victims: list[psutil.Process] = []
    try:
        first = wait_for(lambda: list(pids.glob("*.pid")), 300, "the engine actor")
        pid = int(first[0].read_text())
        wait_for(lambda: len(committed(run, "rollouts")) >= 1 and
                 any(f.parent.name == "rollouts" for f in temp_files(run)),
                 300, "a rollouts shard mid-commit on the actor")
        proc = psutil.Process(pid)
        victims = [proc, *proc.children(recursive=True)]
        # the engine's processes run at normal priority, not Ray's worker niceness 15
        # (raising priority needs root, which this suite has where it runs as root)
        engine_nice = {v.nice() for v in victims[1:]}
        for v in victims:  # the actor and its engine processes, as a lost node would
            try:
                v.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        done_at_kill = len(committed(run, "rollouts"))
        assert done_at_kill < 6

        def finished():
            r = _job(ray_cluster, client_env, "status", sub_id, timeout=60)
            s = (r.stdout + r.stderr).lower()
            return next((x for x in ("succeeded", "failed", "stopped") if x in s), None)

        status = wait_for(finished, 400, "the Ray job", poll=2.0)
        logs = _job(ray_cluster, client_env, "logs", sub_id, timeout=60).stdout
        assert status == "succeeded", logs[-4000:]
    finally:
        for v in victims:
            try:
                v.kill()
            except psutil.NoSuchProcess:
                pass
    assert "lost" in logs and "[ray] summary" in logs and "[ray] tiny#0" in logs
    assert len(list(pids.glob("*.pid"))) >= 2  # a replacement actor took over
    summary, _ = json.JSONDecoder().raw_decode(logs[logs.rindex('{\n "run"'):])
    assert summary["rollouts"]["requeued"] >= 1
    # one commit record per shard; the killed actor's shards name it in their retry cause
    records = summary["rollouts"]["shards"]
    assert sorted(x["shard"] for x in records) == [f"shard-{i:06d}" for i in range(6)]
    assert {x["actor"] for x in records} == {"tiny#0"}
    retried = [x for x in records if x["attempts"] > 1]
    assert retried and all(x["pid"] != pid for x in retried)
    for x in retried:
        assert len(x["retry_causes"]) == x["attempts"] - 1
        assert f"tiny#0 (pid {pid})" in x["retry_causes"][0], x["retry_causes"]
    assert sum(x["pid"] == pid for x in records) >= done_at_kill
    assert engine_nice and (engine_nice == {0} if os.geteuid() == 0 else True)
    assert [a["niceness"] for a in summary["rollouts"]["actors"]] == \
        [0 if os.geteuid() == 0 else 15]
    (t_first, t_last), = summary["rollouts"]["generate_windows"].values()
    assert abs((t_last - t_first) - summary["rollouts"]["generate_seconds"]) < 0.011
    _assert_same_build(run, reference)
    assert pq.read_metadata(run / "labelled" / "shard-000005.parquet").num_rows == 4


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

    from .batch_api_support import batch_server, canned_label

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
        cfg["judge"] = {"kind": "openai-batch", "model": "judge-b",
                        "endpoints": [{"base_url": url, "api_key_env": "BATCH_TEST_KEY"}],
                        "batch": {"max_requests_per_file": 4, "poll_initial_s": 0.05,
                                  "poll_max_s": 0.2}}
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
