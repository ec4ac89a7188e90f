"""The executor seam: executors picked by name, and the per-shard commit records a build
receives while its rollouts stage runs (a real small build on the local executor)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from asteer_build.pipeline.build import RunOptions, execute_run, prepare_run
from asteer_build.pipeline.config import parse_config
from asteer_build.pipeline.executors import (
    EXECUTORS,
    Executor,
    RolloutTally,
    ShardRecord,
    get_executor,
)
from asteer_build.pipeline.shards import read_stage

from .pipeline_support import (
    BIN,
    ROOT,
    committed,
    env,
    kill_group,
    manifest,
    start_cli,
    tiny_config,
    vectors_only,
    wait_for,
    write_config,
)


def test_registry_names_its_executors():
    assert list(EXECUTORS) == ["local", "ray"]
    for name in EXECUTORS:
        cls = get_executor(name)
        assert issubclass(cls, Executor) and cls.name == name
    with pytest.raises(ValueError) as e:
        get_executor("slurm")
    assert str(e.value) == "unknown executor 'slurm' (known: local, ray)"
    with pytest.raises(ValueError, match=r"unknown executor \['local'\] \(known: local, ray\)"):
        get_executor(["local"])  # type: ignore[arg-type]


def test_naming_the_local_executor_does_not_import_ray():
    code = ("import sys; from asteer_build.pipeline.executors import get_executor; "
            "get_executor('local'); print('ray' in sys.modules)")
    r = subprocess.run([str(BIN / "python"), "-c", code], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_unknown_executor_is_refused_before_anything_runs(tmp_path):
    cfg = parse_config(tiny_config(tmp_path / "run"), base_dir=str(tmp_path))
    with pytest.raises(ValueError) as e:
        prepare_run(cfg, RunOptions(executor="slurm"))
    assert str(e.value) == "--executor: unknown executor 'slurm' (known: local, ray)"
    assert not (tmp_path / "run").exists()
    r = subprocess.run([str(BIN / "asteer-build"), "run", "--config", "x.yaml",
                        "--executor", "slurm"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "argument --executor: invalid choice: 'slurm' (choose from 'local', 'ray')" \
        in r.stderr


def _record(**over) -> ShardRecord:
    kw = dict(stage="rollouts", shard="shard-000003", model="tiny", rows=4, host="h",
              pid=7, actor="tiny#0", attempts=2, retry_causes=("actor tiny#0 lost",),
              started=10.0, ended=12.5)
    kw.update(over)
    return ShardRecord(**kw)


def test_a_record_cannot_contradict_itself():
    assert _record().as_dict()["retry_causes"] == ["actor tiny#0 lost"]
    with pytest.raises(ValueError, match="shard-000003: 3 attempt\\(s\\) but 1 retry cause"):
        _record(attempts=3)
    with pytest.raises(ValueError, match="shard-000003: ended 9.0 before it started 10.0"):
        _record(ended=9.0)


def test_one_summary_shape_for_every_executor():
    seen: list[ShardRecord] = []
    t = RolloutTally("ray", seen.append)
    t.committed(_record())
    t.model_done("a", items=8, tokens=100, t_first=100.0, t_last=103.25)
    t.model_done("b", items=4, tokens=50, t_first=200.0, t_last=None)  # nothing generated
    s = t.summary(2, requeued=1)
    assert seen == t.records == [_record()]
    assert (s["executor"], s["shards_run"], s["items_run"], s["tokens"], s["requeued"]) == \
        ("ray", 2, 12, 150, 1)
    assert s["generate_seconds"] == 3.25
    assert s["generate_windows"] == {"a": [100.0, 103.25], "b": [200.0, None]}
    assert s["shards"] == [_record().as_dict()]


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_local_build_reports_each_shard_as_it_commits(tmp_path):
    """One record per shard, delivered while the stage runs: when a record arrives, its
    shard's manifest entry is already saved and later shards are not committed yet."""
    run_dir = tmp_path / "run"
    cfg = parse_config(tiny_config(run_dir), base_dir=str(tmp_path))
    seen: list[tuple[ShardRecord, set[str], str]] = []

    def on_shard(rec: ShardRecord) -> None:
        on_disk = set(manifest(run_dir)["stages"]["rollouts"])
        seen.append((rec, on_disk, threading.current_thread().name))

    run = prepare_run(cfg, RunOptions(stages=("vectors", "rollouts"), progress=False))
    summary = execute_run(run, on_shard=on_shard)

    names = [f"shard-{i:06d}" for i in range(6)]
    records = [r for r, _, _ in seen]
    assert sorted(r.shard for r in records) == names
    for i, (rec, on_disk, thread) in enumerate(seen):
        assert rec.shard in on_disk and len(on_disk) == i + 1  # committed, one at a time
        assert thread.startswith("asteer-writer")  # the committing thread
    entries = manifest(run_dir)["stages"]["rollouts"]
    t0 = summary["rollouts"]["generate_windows"]["tiny"][0]
    for rec in records:
        assert (rec.stage, rec.model, rec.rows) == ("rollouts", "tiny", 4)
        assert rec.rows == entries[rec.shard]["rows"]
        assert (rec.host, rec.pid, rec.actor) == (socket.gethostname(), os.getpid(), None)
        assert (rec.attempts, rec.retry_causes) == (1, ())
        assert t0 - 1 <= rec.started <= rec.ended
    assert records == sorted(records, key=lambda r: r.ended)
    # the summary carries the same records, in commit order, next to the keys it had
    ro = json.loads((run_dir / "summary.json").read_text())["rollouts"]
    assert ro["shards"] == [r.as_dict() for r in records]
    assert (ro["executor"], ro["shards_run"], ro["items_run"]) == ("local", 6, 24)
    assert {"tokens", "seconds", "generate_seconds", "writer_wait_seconds",
            "engine_start_seconds", "items_per_s"} <= set(ro)
    assert ro["tokens"] == sum(read_stage(str(run_dir), "rollouts")
                               .column("response_tokens").to_pylist())
    # a rerun finds every shard committed: nothing runs, nothing is reported
    seen.clear()
    again = execute_run(prepare_run(cfg, RunOptions(stages=("rollouts",), progress=False)),
                        on_shard=on_shard)
    assert again["rollouts"] == {"shards_run": 0, "items_run": 0} and seen == []
    assert Path(run_dir / "vectors" / "tiny" / "diffmean.safetensors").exists()


def test_sigterm_stops_a_local_build_with_its_engine_processes(tmp_path, pipeline_reference):
    """`kill PID` (SIGTERM: a scheduler, `ray job stop`) mid-rollouts unwinds the build
    like Ctrl-C: the CLI exits 143 after shutting its engine down, so no vLLM engine-core
    or worker process outlives it, and what it committed stays committed."""
    import signal

    import psutil

    from asteer_build.core.testseam import seam_env

    run = tmp_path / "run"
    vectors_only(pipeline_reference, run)
    path = write_config(tmp_path / "cfg.yaml", tiny_config(run))
    # the default multiprocess engine: its core and worker are this CLI's children
    p = start_cli("run", "--config", str(path), "--no-progress", "--stages", "rollouts",
                  **seam_env(commit_delay_s=1.0))
    try:
        wait_for(lambda: len(committed(run, "rollouts")) >= 1, 300, "a rollouts commit")
        engine = psutil.Process(p.pid).children(recursive=True)
        assert engine, "no engine processes under the CLI"
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(engine, timeout=10)
        assert not alive, [x.pid for x in alive]
    finally:
        kill_group(p)
    done = committed(run, "rollouts")
    assert 1 <= len(done) < 6
    for name, e in done.items():
        assert (run / e["path"]).is_file(), name
