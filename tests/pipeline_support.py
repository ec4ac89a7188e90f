"""Helpers for the build-pipeline tests: tiny configs, CLI subprocesses, run folders."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

ENGINE_ARGS = {
    "dtype": "float32", "enforce_eager": True, "max_model_len": 512, "max_num_seqs": 16,
    "seed": 0, "kv_cache_memory_bytes": 256 << 20, "block_size": 32,
}

#: vLLM's own switch for an engine core inside the calling process: one process instead of
#: three on the CPU backend (front end, engine core, worker: each imports vLLM), ~15 s less
#: per start here. The local builds that test the pipeline itself (commits, kills, resume,
#: reruns) use it; the demo, the Ray job and test_engine keep the multiprocess engine users
#: get by default.
INPROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def tiny_config(out: str | Path | None, **over) -> dict:
    """2 concepts x 2 prompts x 3 alphas x 2 methods = 24 greedy items in 6 shards."""
    cfg = {
        "name": "pipeline-test",
        "models": [{"name": "tiny", "path": "tinyworld", "engine_args": dict(ENGINE_ARGS),
                    "replicas": 1}],
        "methods": ["diffmean", "probe"],
        "layer": 2,
        "concepts": [
            {"concept_id": "tw-ocean", "concept": "ocean", "concept_level": "mid"},
            {"concept_id": "tw-robot", "concept": "robot", "concept_level": "high"},
        ],
        "prompts": [
            {"prompt_id": "p0", "prompt": "explain the ocean to a friend"},
            {"prompt_id": "p1", "prompt": "list three reasons to travel"},
        ],
        "alphas": {"diffmean": [1.0, 3.0, 6.0], "probe": [1.0, 3.0, 6.0]},
        "sampling": {"temperature": 0.0, "max_tokens": 16},
        "judge": {"kind": "rules"},
        "shard_size": 4,
        "vectors": {"bank_size": 16},
        "ray": {"health_check_s": 5.0, "max_shard_retries": 2},
    }
    if out is not None:
        cfg["output"] = str(out)
    cfg.update(over)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    e.update(extra)
    return e


def cli(*args: str, timeout: float = 400, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "asteer-build"), *args], cwd=ROOT, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, **extra_env: str) -> subprocess.Popen:
    """In its own session, so a test can SIGKILL it with its engine processes."""
    return subprocess.Popen([str(BIN / "asteer-build"), *args], cwd=ROOT, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


def vectors_only(ref: Path, run: Path) -> None:
    """A copy of a finished local run folder with its vectors only: the rollouts and
    judge stages left to run."""
    import shutil

    shutil.copytree(ref, run, ignore=shutil.ignore_patterns(
        "rollouts", "labelled", ".staging", "logs", "summary.json"))
    m = json.loads((run / "build.json").read_text())
    m["stages"] = {"vectors": m["stages"]["vectors"]}
    (run / "build.json").write_text(json.dumps(m))


def manifest(run: Path | str) -> dict:
    """build.json with its journal applied (what a reader sees mid-run too)."""
    from asteer_build.pipeline.shards import Manifest, open_store

    m = Manifest.load(open_store(str(run)))
    if m is None:
        raise FileNotFoundError(f"{run}: no build.json")
    return m.data


def committed(run: Path, stage: str) -> dict:
    try:
        return manifest(run)["stages"].get(stage, {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_for(pred, timeout: float, what: str, poll: float = 0.2):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*.tmp-*") if p.is_file()]


def visible_shards(run: Path, stage: str) -> list[Path]:
    return sorted(p for p in (run / stage).glob("*.parquet") if not p.name.startswith("."))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def check_no_partial(run: Path) -> None:
    """Every visible shard file reads as complete Parquet and committed ones match the
    manifest's checksum and row count."""
    import pyarrow.parquet as pq

    m = manifest(run)
    for stage in ("rollouts", "labelled"):
        for p in visible_shards(run, stage):
            pq.read_table(p)  # raises on a torn file
        for name, e in m["stages"][stage].items():
            p = run / e["path"]
            assert sha(p) == e["sha256"], f"{stage}/{name}: checksum differs from manifest"
            assert pq.read_metadata(p).num_rows == e["rows"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_auth_env(token: Path, **extra: str) -> dict[str, str]:
    """A Ray client's (or head's) environment with the session's cluster token."""
    e = env(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token), **extra)
    e.pop("RAY_ADDRESS", None)
    e.pop("RAY_AUTH_TOKEN", None)
    return e


def expected_ids(run: Path) -> list[str]:
    """The item ids tiny_config plans for `run`."""
    from asteer_build.pipeline.config import parse_config
    from asteer_build.pipeline.plan import make_plan

    cfg = parse_config(tiny_config(run))
    return [i.id for i in make_plan(cfg).items()]


def assert_same_build(run: Path, ref: Path) -> None:
    """`run` ended as the uninterrupted build `ref`: its planned ids once each, equal rows,
    byte-identical rollouts shards, nothing partial."""
    from asteer_build.pipeline.shards import read_stage

    check_no_partial(run)
    assert not temp_files(run)
    for stage in ("rollouts", "labelled"):
        got, want = read_stage(str(run), stage), read_stage(str(ref), stage)
        ids = got.column("id").to_pylist()
        assert len(ids) == len(set(ids)), f"{stage}: duplicate ids"
        assert sorted(ids) == sorted(expected_ids(ref))
        assert got.equals(want), f"{stage}: rows differ from the uninterrupted build"
    # Byte-identical shard files, not just equal tables.
    for name, e in committed(ref, "rollouts").items():
        assert committed(run, "rollouts")[name]["sha256"] == e["sha256"], name
