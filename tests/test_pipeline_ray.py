"""The tiny config built by `ray job submit` on the session's Ray cluster (a head and two
one-"GPU" workers), token authentication on: a client without the token is refused, and
a build whose engine actor is SIGKILLed mid-shard (with its engine processes, as a lost
node would) ends exactly as the uninterrupted local build (conftest.pipeline_reference),
with its vectors pooled on a worker and each shard naming the node it ran on. Node, engine
and start faults: test_ray_faults.py."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from asteer_build.core.testseam import seam_env

from .pipeline_support import (
    BIN,
    ROOT,
    assert_same_build,
    committed,
    ray_auth_env,
    temp_files,
    tiny_config,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline-ray")


@pytest.fixture(scope="module")
def ray_cluster(ray_head) -> str:
    """The session's local cluster (conftest.ray_head), token authentication on: its
    dashboard address, where `ray job` submits."""
    return ray_head[1]


@pytest.fixture(scope="module")
def client_env(ray_token):
    return ray_auth_env(ray_token)


def _job(addr: str, e: dict[str, str], command: str, *args: str,
         timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray job COMMAND --address ADDR ARGS...`: the address before any `--`, where it is
    an option and not part of the entrypoint (nothing else may find the cluster)."""
    return subprocess.run([str(BIN / "ray"), "job", command, "--address", addr, *args],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


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


def test_ray_job_with_actor_sigkill_matches_local(work, pipeline_reference, ray_cluster,
                                                  client_env, ray_head):
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
    # the head has no GPU: the vectors task and the engine ran on workers, and say where
    ids = ray_head.node_ids()
    workers = {ids["worker1"], ids["worker2"]}
    pooled = re.search(r"\[ray\] vectors: pooled on node (\w+) ", logs)
    assert pooled and pooled.group(1) in {w[:12] for w in workers}, logs[-4000:]
    assert re.search(r"\[ray\] tiny#0 pid=\d+ node=(\w{12}) shards=", logs)
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
    assert {x["node"] for x in records} <= workers
    entries = committed(run, "rollouts")  # build.json names the same node and retries
    for x in records:
        e = entries[x["shard"]]
        assert (e["actor"], e["node"], e["attempts"], e["retry_causes"]) == \
            (x["actor"], x["node"], x["attempts"], x["retry_causes"])
    assert engine_nice and (engine_nice == {0} if os.geteuid() == 0 else True)
    assert [a["niceness"] for a in summary["rollouts"]["actors"]] == \
        [0 if os.geteuid() == 0 else 15]
    (t_first, t_last), = summary["rollouts"]["generate_windows"].values()
    assert abs((t_last - t_first) - summary["rollouts"]["generate_seconds"]) < 0.011
    assert_same_build(run, pipeline_reference)
    assert pq.read_metadata(run / "labelled" / "shard-000005.parquet").num_rows == 4
