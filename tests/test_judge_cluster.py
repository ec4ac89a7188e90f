"""Self-hosted judges (`judge.kind: vllm`) with the tiny model, and the agreement flow.

The session's reference build (24 rows), unjudged, for the module. (a) On the session's
local Ray cluster the judge stage starts a `vllm serve` actor, labels the build's shards
through it and stops it: the process is gone and its port free afterwards; where such
servers may run beside the engines (and judge while they generate) is decided by
`judge_room`. (b) The README's
agreement flow: a stratified sample of the build, labelled by the rules judge and by the
tiny-model vLLM judge, compared by `asteer-judge agree`; its kappa must equal one
computed here from the two label columns. The vLLM judge's labels of the sample are the
ones (a)'s judge stage gave (one served judge for the module: each `vllm serve` start
costs a minute or two here). The tiny model is random, so labels may be anything the
contract allows (0/1/2, or failed with an error); what is asserted is that nothing is
lost or guessed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from .judge_support import VLLM_CLI, vllm_env
from .pipeline_support import ROOT, env, free_port, tiny_config, vectors_only, write_config

pytestmark = pytest.mark.timeout(600)

SERVED = "tiny-judge"
#: the flags `vllm serve` of the tiny model needs on CPU (judge_support.CPU_FLAGS)
ENGINE_ARGS = {
    "dtype": "float32", "enforce_eager": True,
    "hf_overrides": {"max_position_embeddings": 2560}, "max_model_len": 2560,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    "max_num_seqs": 32,
}
SERVER_ENV = {k: vllm_env()[k] for k in ("VLLM_TARGET_DEVICE", "VLLM_CPU_KVCACHE_SPACE",
                                         "VLLM_PLUGINS", "TOKENIZERS_PARALLELISM",
                                         "HF_HUB_OFFLINE", "VLLM_LOGGING_LEVEL")}


def _server(tiny_model: str) -> dict:
    return {"model": tiny_model, "engine_args": ENGINE_ARGS, "replicas": 1,
            "gpus_per_replica": 1, "port_range": [free_port(), 65000], "host": "127.0.0.1",
            "start_timeout_s": 300, "max_concurrency": 8, "command": VLLM_CLI,
            "env": SERVER_ENV}


def _py(module: str, *args: str, env_: dict | None = None, timeout: float = 400):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          env=env_ or env(), capture_output=True, text=True, timeout=timeout)


def _rows(d: Path) -> list[dict]:
    return [r for p in sorted(d.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def _check_rows(rows: list[dict]) -> None:
    """Every row judged or failed with its error; never a defaulted label."""
    for r in rows:
        assert r["judge_status"] in ("ok", "failed"), r
        if r["judge_status"] == "ok":
            assert r["label"] in (0, 1, 2), r
        else:
            assert r["label"] is None and r["judge_error"], r


def _port_free(port: int) -> bool:
    """Nothing listens there (SO_REUSEADDR, as servers bind: the closed server's
    TIME_WAIT connections do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _serving(model: str, port: int) -> list[psutil.Process]:
    """`vllm serve` processes of `model` on `port` (the session's own judge server,
    conftest.judge_server, serves the same model on another port)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "serve" in cmd and model in cmd and str(port) in cmd:
            out.append(p)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("judge-cluster")


def _vllm_judge(tiny_model: str) -> dict:
    return {"kind": "vllm", "model": SERVED, "max_tokens": 300, "workers": 8,
            "retry": {"max_attempts": 3, "timeout_s": 120, "base_delay_s": 0.1},
            "server": _server(tiny_model)}


@pytest.fixture(scope="module")
def demo(work, pipeline_reference) -> tuple[Path, dict]:
    """The session's reference build (conftest.pipeline_reference: 24 rows in 6 shards)
    with its labels taken out, so the judge stage labels it from scratch."""
    run = work / "run"
    shutil.copytree(pipeline_reference, run,
                    ignore=shutil.ignore_patterns("labelled", ".staging"))
    m = json.loads((run / "build.json").read_text())
    m["stages"]["labelled"] = {}
    (run / "build.json").write_text(json.dumps(m))
    return run, tiny_config(run)


@pytest.fixture(scope="module")
def ray_judged(demo, ray_head, work, tiny_model):
    """The judge stage of the demo build with `judge.kind: vllm` on the local Ray cluster:
    one vLLM judge actor, started and stopped by the stage (it must own the server: that
    the stage stops it is under test). (b) reuses its labels, so the module starts one
    engine in all, the judge's."""
    run, cfg = demo
    addr, _, e = ray_head
    cfg = dict(cfg, ray={**cfg["ray"], "address": addr}, judge=_vllm_judge(tiny_model))
    r = _py("asteer_build.cli", "run", "--config",
            str(write_config(work / "vllm.yaml", cfg)), "--executor", "ray",
            "--stages", "judge", "--no-progress", env_=e)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return run, json.loads((run / "summary.json").read_text())


def test_a_vllm_judge_streams_only_where_its_servers_fit(work, pipeline_reference):
    """Ray (`ray_seats.judge_room`): the servers label while the engines generate when the
    cluster holds the largest model's seats and the judge's bundles; a model without
    `replicas` takes every GPU, so then they judge after generation, saying why. The
    local executor (one machine) always judges after generation. (The streaming judge
    opens its judge at the first commit, as test_streaming_judge's live pool shows.)"""
    import dataclasses

    from asteer_build.pipeline.build import prepare_run
    from asteer_build.pipeline.config import load_config
    from asteer_build.pipeline.executors.local import LocalExecutor
    from asteer_build.pipeline.executors.ray_seats import judge_room
    from asteer_build.pipeline.judge_stage import streams
    from asteer_build.pipeline.run import RunOptions

    local = work / "local"
    vectors_only(pipeline_reference, local)
    cfg = load_config(str(write_config(work / "local.yaml",
                                       tiny_config(local, judge=_vllm_judge("unused")))))
    (m,) = cfg.models  # replicas: 1
    gpus = {"GPU": 4.0, "CPU": 64.0}
    assert judge_room(gpus, [(m, 6)], 1.0, 3, 1) is None
    assert "the engines take 1 of the cluster's 4 GPUs and the judge servers need 4 more" \
        in judge_room(gpus, [(m, 6)], 1.0, 2, 2)
    tp2 = dataclasses.replace(m, tensor_parallel_size=2)
    assert judge_room(gpus, [(m, 6), (tp2, 6)], 1.0, 1, 2) is None  # models take turns
    why = judge_room(gpus, [(dataclasses.replace(m, replicas=None), 6)], 1.0, 1, 1)
    assert why == ("the engines take 4 of the cluster's 4 GPUs and the judge servers need "
                   "1 more (set models[].replicas to leave them room)")
    assert "the engines take 2 of the cluster's 3 CPUs" in judge_room(
        {"CPU": 3.0}, [(dataclasses.replace(m, replicas=2), 6)], 1.0, 2, 1)

    prepared = prepare_run(cfg, RunOptions(out=str(local), stages=("rollouts", "judge")))
    overlap, why = streams(prepared, LocalExecutor(prepared))
    assert not overlap and "local executor runs on one machine" in why


def test_judge_stage_serves_a_vllm_judge_on_ray_then_stops_it(ray_judged, tiny_model):
    run, s = ray_judged
    summary = s["judge"]
    assert summary["shards_judged"] == 6
    assert s["mode"] == "sequential"  # one stage: nothing to overlap
    rows = _rows(run / "labelled")
    assert len(rows) == 24 and len({x["id"] for x in rows}) == 24
    _check_rows(rows)
    assert {x["judge_model"] for x in rows} == {SERVED}
    assert summary["ok"] + summary["failed"] == 24
    # the requests reached the served judge: answers came back from it
    (stats,) = summary["endpoints"]
    assert stats["base_url"] == summary["servers"][0]["base_url"]
    # one request per distinct (prompt, concept, response): greedy rows repeat
    distinct_ok = {(x["prompt"], x["concept"], x["response"]) for x in rows
                   if x["judge_status"] == "ok"}
    assert stats["ok"] >= max(1, len(distinct_ok))
    assert (run / "logs" / "judge-server-0.log").is_file()
    # and it is gone: no process, no listener, nothing serving the tiny model
    (srv,) = summary["servers"]
    assert srv["host"] == "127.0.0.1"
    assert not psutil.pid_exists(srv["pid"]) or \
        psutil.Process(srv["pid"]).status() == psutil.STATUS_ZOMBIE
    assert _port_free(srv["port"])
    assert not _serving(tiny_model, srv["port"])


def _kappa(a: list[int], b: list[int]) -> float:
    """Cohen's kappa straight from its definition, independently of judge.agreement."""
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def test_agreement_of_rules_and_vllm_judges_on_a_stratified_sample(demo, ray_judged, work):
    run, _ = ray_judged
    sample = work / "sample"
    r = _py("judge.cli", "sample", "--in", str(run / "rollouts"), "--out", str(sample),
            "--n", "6", "--stratify", "concept_level,alpha")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout)
    # 2 concept levels x 3 alphas: 6 strata of 4 rows each (2 methods x 2 prompts), 1
    # drawn from every one
    assert s["rows"] == 6 and s["of"] == 24 and len(s["per_stratum"]) == 6
    assert set(s["per_stratum"].values()) == {1}
    rows = pq.read_table(sample / "sample.parquet").to_pylist()
    assert len({(x["concept_level"], x["alpha"]) for x in rows}) == 6
    assert "label" not in rows[0]  # unjudged: both judges label it from scratch

    r = _py("judge.cli", "run", "--rules", "--in", str(sample), "--out", str(work / "by-rules"))
    assert r.returncode == 0, r.stderr[-2000:]
    # the vLLM judge's labels of the sample's rows: the judge stage (a) labelled the whole
    # build through the served tiny model; its answers for these ids are the second judge
    ids = {x["id"] for x in rows}
    by_vllm = work / "by-vllm"
    by_vllm.mkdir()
    labelled = pq.read_table(run / "labelled")
    pq.write_table(labelled.filter(pa.compute.is_in(labelled["id"], pa.array(sorted(ids)))),
                   by_vllm / "part-0.parquet")
    a, b = _rows(work / "by-rules"), _rows(work / "by-vllm")
    assert len(b) == 6 and {x["id"] for x in b} == ids
    assert {x["judge_model"] for x in b} == {SERVED}
    _check_rows(b)
    assert all(x["judge_status"] == "ok" for x in a)
    r = _py("judge.cli", "agree", "--a", str(work / "by-rules"), "--b", str(work / "by-vllm"))
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    lb = {x["id"]: x["label"] for x in b}
    pairs = [(x["label"], lb[x["id"]]) for x in a if lb[x["id"]] is not None]
    assert rep["n"] == len(pairs) >= 1 and rep["excluded"] == 6 - len(pairs)
    assert rep["kappa"] == pytest.approx(_kappa([p[0] for p in pairs], [p[1] for p in pairs]))


def test_server_flags_and_bad_server_settings_named():
    """Engine args become `vllm serve` flags; a bad `judge.server` fails at config load,
    naming the field and the value, before any engine starts."""
    from asteer_build.pipeline.config import ConfigError, parse_config
    from asteer_build.pipeline.judge_servers import serve_args

    assert serve_args({"max_model_len": 4096, "enforce_eager": True, "trust_remote_code":
                       False, "hf_overrides": {"a": 1}}) == [
        "--max-model-len", "4096", "--enforce-eager", "--hf-overrides", '{"a": 1}']
    for server, msg in [
        (None, r"judge\.server\.model"),
        ({"model": "m", "replicas": 0}, r"judge\.server\.replicas.*0"),
        ({"model": "m", "port_range": [9000, 80]}, r"judge\.server\.port_range.*9000"),
        ({"model": "m", "gpu": 1}, r"judge\.server: unknown settings \['gpu'\]"),
    ]:
        raw = tiny_config(None, judge={"kind": "vllm", "model": "j", "server": server})
        with pytest.raises(ConfigError, match=msg):
            parse_config(raw)
    ok = tiny_config(None, judge={"kind": "vllm", "model": "j", "server": {"model": "m"}})
    assert parse_config(ok).judge.server == {"model": "m"}
