"""One judge-kind registry (`judge.kinds`) behind the build and `asteer-judge`: unknown
kinds and mistyped endpoint fields are refused naming them (exit 2, one line), and
`kind: openai-batch` in `asteer-judge run` goes through the Batch API, not live calls.
Light: no engine; the Batch API is the loopback server of `batch_api_support`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import pytest
import yaml

from judge.cache import cache_key
from judge.config import KINDS, JudgeConfig
from judge.kinds import FACTORIES, HOSTED, JudgeContext, JudgeSession, open_judge
from judge.rubric import DEFAULT_RUBRIC

from .batch_api_support import batch_server, canned_label
from .judge_support import ROOT, make_rows, read_dir, run_cli, write_shard
from .pipeline_support import tiny_config

KEY = "sk-test-kinds-5c2e81"
ENDPOINT_FIELDS = "base_url, model, api_key_env, max_concurrency"


def _judge_yaml(tmp_path, judge) -> str:
    p = tmp_path / "judge.yaml"
    p.write_text(yaml.safe_dump({"judge": judge}) if not isinstance(judge, str) else judge)
    return str(p)


def _shards(tmp_path, n: int = 6) -> list[dict]:
    rows = make_rows(n, seed=5)
    write_shard(tmp_path / "in" / "s0.parquet", rows)
    return rows


def _run(tmp_path, *args: str, env: dict | None = None):
    return run_cli(["run", *args, "--in", str(tmp_path / "in"), "--out", str(tmp_path / "out")],
                   env=env or {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_every_config_kind_has_a_factory_or_a_host():
    assert set(FACTORIES) | set(HOSTED) == set(KINDS)
    assert not set(FACTORIES) & set(HOSTED)
    assert set(KINDS) == {"llm", "rules", "openai-batch", "vllm"}


BAD_JUDGE_INPUTS = [
    ({"kind": "rulez"},
     "judge.kind: unknown kind 'rulez' (known: llm, openai-batch, rules, vllm)"),
    ({"kind": "llm", "endpoints": [{"url": "http://127.0.0.1:9/v1"}]},
     f"judge.endpoints[0]: unknown field 'url' (known: {ENDPOINT_FIELDS})"),
    ({"kind": "llm", "endpoints": [{"base_url": "http://a/v1"}, {"model": "m"}]},
     "judge.endpoints[1].base_url: required: the endpoint's URL (got None)"),
    ({"kind": "llm", "endpoints": [{"base_url": "http://a/v1", "max_concurrency": 0}]},
     "judge.endpoints[0].max_concurrency: expected an integer >= 1 (got 0)"),
    ({"kind": "llm", "endpoints": "http://a/v1"},
     "judge.endpoints: expected a list of endpoints (got 'http://a/v1')"),
    ({"kind": "llm", "endpoints": ["http://a/v1"]},
     "judge.endpoints[0]: expected a mapping with base_url (got 'http://a/v1')"),
    ({"kind": "llm", "endpoints": [{"base_url": "http://a/v1", "api_key": "sk-x"}]},
     "judge.endpoints[0].api_key: put API keys in the environment and name them with "
     "api_key_env"),
]


@pytest.mark.parametrize("judge, msg", BAD_JUDGE_INPUTS)
def test_bad_judge_fields_are_named_by_the_build_config_and_the_judge_config(judge, msg):
    from asteer_build.pipeline.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(tiny_config(None, judge=judge))
    assert str(e.value) == msg
    with pytest.raises(ValueError) as e2:
        JudgeConfig.from_dict({"judge": judge})
    assert str(e2.value) == msg


def test_asteer_judge_exits_2_naming_the_bad_field(tmp_path):
    """Each bad judge YAML is one line on stderr and exit 2; nothing is labelled."""
    _shards(tmp_path)
    for judge, msg in BAD_JUDGE_INPUTS[:2]:
        r = _run(tmp_path, "--config", _judge_yaml(tmp_path, judge))
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == f"asteer-judge: error: {msg}"
        assert r.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, judge, msg", [
    (("--config", "{tmp}/none.yaml"), None, "--config: no such file '{tmp}/none.yaml'"),
    (("--config", "{cfg}"), "judge: [1\n", "{cfg}: not valid YAML: while parsing a flow "
     "sequence"),
    (("--config", "{cfg}"), {"kind": "vllm", "model": "m", "server": {"model": "m"}},
     "judge.kind: vllm: judge servers are started by asteer-build's judge stage"),
    (("--config", "{cfg}"), {"kind": "llm", "model": "m"},
     "judge.endpoints: the llm judge needs at least one endpoint (or set judge.kind: rules)"),
    (("--config", "{cfg}"), ["kind", "rules"],
     "judge: expected a mapping of judge settings (got ['kind', 'rules'])"),
])
def test_asteer_judge_run_bad_input_exits_2(tmp_path, args, judge, msg):
    _shards(tmp_path)
    cfg = _judge_yaml(tmp_path, judge) if judge is not None else ""
    if isinstance(judge, list):
        (tmp_path / "judge.yaml").write_text(yaml.safe_dump(judge))
    args = [a.format(tmp=tmp_path, cfg=cfg) for a in args]
    r = _run(tmp_path, *args)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(
        "asteer-judge: error: " + msg.format(tmp=tmp_path, cfg=cfg)), line
    assert not (tmp_path / "out").exists()


def test_missing_input_and_batch_commands_of_another_kind_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = run_cli(["run", "--rules", "--in", str(tmp_path / "nothere")], env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"asteer-judge: error: --in: no such file or folder " \
                               f"'{tmp_path / 'nothere'}'"
    _shards(tmp_path)
    cfg = _judge_yaml(tmp_path, {"kind": "rules"})
    r = run_cli(["batch-submit", "--config", cfg, "--in", str(tmp_path / "in")], env=env,
                timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("asteer-judge: error: judge.kind is 'rules'; the batch-* "
                                "commands need openai-batch")
    r = run_cli(["sample", "--in", str(tmp_path / "in"), "--out", str(tmp_path / "s"),
                 "--stratify", "colour"], env=env, timeout=60)
    assert r.returncode == 2 and "--stratify: no column(s) ['colour']" in r.stderr


def test_rules_kind_through_the_cli_labels_every_row(tmp_path):
    rows = _shards(tmp_path, 12)
    r = _run(tmp_path, "--config", _judge_yaml(tmp_path, {"kind": "rules"}))
    assert r.returncode == 0, r.stderr
    out = read_dir(tmp_path / "out")
    assert [o["id"] for o in out] == [x["id"] for x in rows]
    assert {o["judge_status"] for o in out} == {"ok"}
    assert {o["judge_model"] for o in out} == {"rules-v1"}
    assert json.loads(r.stdout)["endpoints"] == []


def test_openai_batch_in_asteer_judge_runs_the_batch_api_not_live_calls(tmp_path):
    """`kind: openai-batch` with `asteer-judge run`: every row is sent once in a Batch
    API file (the loopback server has no chat endpoint: a live call would fail the row)
    and labelled with that batch's answer; the state folder is the batch-* commands'."""
    rows = _shards(tmp_path, 10)
    with batch_server(KEY) as (srv, url):
        cfg = _judge_yaml(tmp_path, {
            "kind": "openai-batch", "model": "judge-k", "max_tokens": None,
            "temperature": None,
            "endpoints": [{"base_url": url, "api_key_env": "BATCH_TEST_KEY"}],
            "batch": {"max_requests_per_file": 4, "poll_initial_s": 0.05,
                      "poll_max_s": 0.2}})
        r = _run(tmp_path, "--config", cfg,
                 env={**os.environ, "PYTHONPATH": str(ROOT), "BATCH_TEST_KEY": KEY})
        assert r.returncode == 0, r.stderr
        keys = {cache_key(DEFAULT_RUBRIC.version, "judge-k", x["prompt"], x["concept"],
                          x["response"]) for x in rows}
        assert set(srv.submitted) == keys and set(srv.submitted.values()) == {1}
        assert len(srv.batches) == -(-len(keys) // 4)
        # a second run finds every row labelled: nothing is submitted again
        r2 = _run(tmp_path, "--config", cfg,
                  env={**os.environ, "PYTHONPATH": str(ROOT), "BATCH_TEST_KEY": KEY})
        assert r2.returncode == 0, r2.stderr
        assert set(srv.submitted.values()) == {1}
    out = read_dir(tmp_path / "out")
    assert len(out) == 10
    for o in out:
        k = cache_key(DEFAULT_RUBRIC.version, "judge-k", o["prompt"], o["concept"],
                      o["response"])
        assert o["judge_status"] == "ok" and o["label"] == canned_label(k)
    summary = json.loads(r.stdout)
    assert summary["batches"]["done"] and summary["batches"]["failed_lines"] == 0
    assert (tmp_path / "out" / ".batches").is_dir()
    assert KEY not in r.stderr and KEY not in r.stdout


def test_a_plugged_factory_runs_a_hosted_kind_and_its_lifetime_wraps_the_labelling(tmp_path):
    """What the builder does for `vllm`: its factory is used, entered before the judge
    labels and left after, also when labelling fails."""
    from judge.judges import RulesJudge

    events: list[str] = []

    @contextlib.asynccontextmanager
    async def served(cfg, ctx):
        events.append("start")
        try:
            yield JudgeSession(RulesJudge(), workers=3, info={"servers": ["s0"]})
        finally:
            events.append("stop")

    cfg = JudgeConfig.from_dict({"kind": "vllm", "model": "j", "server": {"model": "m"}})

    async def go(fail: bool) -> JudgeSession:
        async with open_judge(cfg, JudgeContext(), plug={"vllm": served}) as s:
            events.append("label")
            if fail:
                raise RuntimeError("labelling failed")
            return s

    s = asyncio.run(go(False))
    assert (s.workers, s.info) == (3, {"servers": ["s0"]})
    with pytest.raises(RuntimeError, match="labelling failed"):
        asyncio.run(go(True))
    assert events == ["start", "label", "stop", "start", "label", "stop"]
    with pytest.raises(ValueError, match="judge.kind: vllm: judge servers are started"):
        asyncio.run(_enter_unplugged(cfg))


async def _enter_unplugged(cfg: JudgeConfig) -> None:
    async with open_judge(cfg, JudgeContext()):
        pass


def test_an_unknown_kind_set_after_parsing_is_refused_by_the_registry():
    cfg = JudgeConfig.from_dict({"kind": "rules"})
    cfg.kind = "rulez"
    with pytest.raises(ValueError) as e:
        open_judge(cfg, JudgeContext())
    assert str(e.value) == "judge.kind: unknown kind 'rulez' (known: llm, openai-batch, " \
                           "rules, vllm)"


def _judge_only_run(tmp_path, judge: dict):
    """A run folder whose rollouts are committed (two shards of word-soup rows), so the
    build's judge stage runs alone, with no engine."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from asteer_build.pipeline.build import RunOptions, prepare_run
    from asteer_build.pipeline.config import parse_config

    cfg = parse_config(tiny_config(tmp_path / "run", judge=judge))
    run = prepare_run(cfg, RunOptions(stages=("judge",), progress=False))
    rows = make_rows(8, seed=7)
    for i, chunk in enumerate((rows[:4], rows[4:])):
        name = f"shard-{i:06d}"
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(chunk), buf)
        run.manifest.record([run.store.put_file("rollouts", name, f"rollouts/{name}.parquet",
                                                buf.getvalue(), len(chunk))])
    return run, rows


def _labelled(run) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for name, e in sorted(run.manifest.entries("labelled").items())
            for r in pq.read_table(run.store.path(e["path"])).to_pylist()]


def test_the_build_judge_stage_opens_the_rules_kind_through_the_registry(tmp_path):
    from asteer_build.pipeline.build import execute_run

    run, rows = _judge_only_run(tmp_path, {"kind": "rules"})
    summary = execute_run(run)
    j = summary["judge"]
    t0, t1 = j.pop("window")  # the stage's busy window, epoch seconds
    assert j == {"shards_judged": 2, "ok": 8, "failed": 0, "pending": 0} and t0 <= t1
    out = _labelled(run)
    assert [o["id"] for o in out] == [r["id"] for r in rows]
    assert {(o["judge_status"], o["judge_model"]) for o in out} == {("ok", "rules-v1")}


def test_the_build_judge_stage_runs_openai_batch_through_the_registry(tmp_path, monkeypatch):
    """The build's Batch API path, now the registry's: every row sent once, labelled
    with its batch answer, the state beside the judge cache in the run folder."""
    from asteer_build.pipeline.build import execute_run

    monkeypatch.setenv("BATCH_TEST_KEY", KEY)
    with batch_server(KEY) as (srv, url):
        run, rows = _judge_only_run(tmp_path, {
            "kind": "openai-batch", "model": "judge-b",
            "endpoints": [{"base_url": url, "api_key_env": "BATCH_TEST_KEY"}],
            "batch": {"max_requests_per_file": 3, "poll_initial_s": 0.05,
                      "poll_max_s": 0.2}})
        summary = execute_run(run)
        assert set(srv.submitted.values()) == {1} and len(srv.submitted) == 8
        assert len(srv.batches) == 3
    j = summary["judge"]
    assert (j["shards_judged"], j["ok"], j["failed"]) == (2, 8, 0)
    assert j["batches"]["done"] and j["batches"]["failed_lines"] == 0
    assert j["batches"]["state_dir"].startswith(str(tmp_path / "run" / ".staging" / "batches"))
    for o in _labelled(run):
        k = cache_key(DEFAULT_RUBRIC.version, "judge-b", o["prompt"], o["concept"],
                      o["response"])
        assert o["judge_status"] == "ok" and o["label"] == canned_label(k)


def test_the_build_judge_stage_opens_an_llm_pool_and_reports_its_endpoints(tmp_path,
                                                                            monkeypatch):
    """An unreachable endpoint: every row failed with the pool's reason, none labelled,
    and the summary carries the pool's per-endpoint counts."""
    from asteer_build.pipeline.build import execute_run

    from .judge_support import free_port

    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    url = f"http://127.0.0.1:{free_port()}/v1"
    run, rows = _judge_only_run(tmp_path, {
        "kind": "llm", "model": "judge-x", "endpoints": [{"base_url": url,
                                                          "max_concurrency": 2}],
        "retry": {"max_attempts": 1, "timeout_s": 2, "acquire_timeout_s": 5}})
    j = execute_run(run)["judge"]
    assert (j["shards_judged"], j["ok"], j["failed"]) == (2, 0, 8)
    (ep,) = j["endpoints"]
    assert ep["ok"] == 0 and ep["errors"] >= 1
    out = _labelled(run)
    assert {o["judge_status"] for o in out} == {"failed"}
    assert all(o["label"] is None for o in out)
    # the first calls fail to connect; once the endpoint is ejected, the rest find none
    assert {o["judge_error"].split(" after ")[0] for o in out} <= {"connection", "no_endpoint"}
    assert any(o["judge_error"].startswith("connection after 1 attempt(s)") for o in out)
