"""The Batch API judge stage (`judge.batches`, `asteer-judge batch-*`) against a loopback
Files/Batches server: splitting, expiry and error lines, kill and rerun, cost cap,
waves, and no API key anywhere on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

try:
    from .batch_api_support import batch_server, canned_label
    from .judge_support import ROOT, make_rows, read_dir, run_cli, write_shard
except ImportError:
    from batch_api_support import batch_server, canned_label
    from judge_support import ROOT, make_rows, read_dir, run_cli, write_shard

from judge.batches import split_lines
from judge.cache import cache_key
from judge.rubric import DEFAULT_RUBRIC

KEY = "sk-test-batch-7f3a9c1e5d"
MODEL = "gpt-test-judge"


def _setup(tmp: Path, url: str, n: int = 30, **batch) -> tuple[list[str], dict]:
    rows = make_rows(n, seed=3)
    write_shard(tmp / "in" / "s0.parquet", rows[: n // 2])
    write_shard(tmp / "in" / "s1.parquet", rows[n // 2:])
    cfg = tmp / "judge.yaml"
    cfg.write_text(yaml.safe_dump({"judge": {
        "kind": "openai-batch", "model": MODEL, "max_tokens": None, "temperature": None,
        "endpoints": [{"base_url": url, "api_key_env": "BATCH_TEST_KEY"}],
        "batch": {"poll_initial_s": 0.05, "poll_max_s": 0.2, **batch},
        "prices": {"input_per_mtok": 0.25, "output_per_mtok": 2.0, "batch_discount": 0.5,
                   "output_tokens_per_call": 600}}}))
    common = ["--config", str(cfg), "--in", str(tmp / "in"), "--out", str(tmp / "out"),
              "--cache", str(tmp / "out" / "cache.jsonl")]
    return common, {r["id"]: r for r in rows}


def _env() -> dict[str, str]:
    return {**os.environ, "BATCH_TEST_KEY": KEY, "PYTHONPATH": str(ROOT)}


def _key(r: dict) -> str:
    return cache_key(DEFAULT_RUBRIC.version, MODEL, r["prompt"], r["concept"], r["response"])


def _assert_no_key(*paths: Path) -> None:
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            assert KEY.encode() not in f.read_bytes(), f


def test_split_lines_respects_both_limits():
    lines = [json.dumps({"custom_id": f"k{i}", "pad": "x" * (i % 7) * 10}) for i in range(50)]
    chunks = split_lines(lines, max_requests=8, max_bytes=400)
    assert [x for c in chunks for x in c] == lines
    assert all(len(c) <= 8 and sum(len(x) + 1 for x in c) <= 400 for c in chunks)
    assert len(chunks) > 50 // 8  # the byte limit split some chunks early
    try:
        split_lines([json.dumps({"custom_id": "big", "p": "y" * 500})], 8, 400)
    except ValueError as e:
        assert "big" in str(e) and "max_bytes_per_file" in str(e)
    else:
        raise AssertionError("an oversized line must be refused")


def test_files_split_and_every_row_labelled_from_real_answers(tmp_path):
    with batch_server(KEY) as (srv, url):
        common, rows = _setup(tmp_path, url, n=30, max_requests_per_file=7,
                              max_bytes_per_file=40_000)
        r = run_cli(["batch-collect", *common, "--wait"], env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        inputs = [f for f in srv.files.values() if f["purpose"] == "batch"]
        assert len(inputs) == 5 and all(f["bytes"] <= 40_000 for f in inputs)
        assert all(len(f["_data"].splitlines()) <= 7 for f in inputs)
        assert sorted(srv.submitted.values()) == [1] * 30
    out = read_dir(tmp_path / "out")
    assert len(out) == 30 and {o["id"] for o in out} == set(rows)
    for o in out:
        assert o["judge_status"] == "ok"
        assert o["label"] == canned_label(_key(rows[o["id"]]))
    summary = json.loads(r.stdout)
    assert summary["done"] and summary["failed_lines"] == 0
    _assert_no_key(tmp_path / "out")
    assert KEY not in r.stderr and KEY not in r.stdout


def test_expired_and_error_lines_are_resubmitted_then_labelled_or_failed(tmp_path):
    with batch_server(KEY) as (srv, url):
        common, rows = _setup(tmp_path, url, n=24, max_requests_per_file=12)
        keys = sorted(_key(r) for r in rows.values())
        flaky, broken, garbage = set(keys[:3]), set(keys[3:5]), keys[5]

        def action(cid: str, attempt: int) -> str:
            if cid in broken:
                return "error" if attempt % 2 == 0 else "http500"
            if cid in flaky and attempt == 0:
                return "error"
            return "garbage" if cid == garbage else "ok"

        srv.line_action = action
        srv.expire_batches = {"b00000"}
        r = run_cli(["batch-collect", *common, "--wait"], env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        # resubmitted: the expired half of b00000, the flaky and broken lines; broken
        # ones went out 1 + max_resubmits (2) times; the garbage answer only once
        for k in broken:
            assert srv.submitted[k] == 3
        assert srv.submitted[garbage] == 1
        assert sum(srv.submitted[k] == 2 for k in keys) >= 6 + 1
        statuses = [b["status"] for b in srv.batches.values()]
        assert statuses.count("expired") == 1
    out = {o["id"]: o for o in read_dir(tmp_path / "out")}
    for rid, o in out.items():
        k = _key(rows[rid])
        if k in broken or k == garbage:
            assert o["judge_status"] == "failed" and o["label"] is None
            assert o["judge_error"].startswith("batch")
        else:
            assert o["judge_status"] == "ok" and o["label"] == canned_label(k)
    assert "unparsable" in next(o for o in out.values() if _key(rows[o["id"]]) == garbage)[
        "judge_error"]


def test_sigkill_during_polling_then_rerun_submits_nothing_twice(tmp_path):
    with batch_server(KEY) as (srv, url):
        common, rows = _setup(tmp_path, url, n=20, max_requests_per_file=6)
        srv.hold.set()
        log = tmp_path / "first.log"
        with open(log, "wb") as lf:
            p = subprocess.Popen([sys.executable, "-m", "judge.cli", "batch-collect", *common,
                                  "--wait"], cwd=ROOT, env=_env(), stdout=lf, stderr=lf)
        deadline = time.monotonic() + 30
        while (len(srv.batches) < 4 or srv.retrieves < 8) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(srv.batches) == 4 and p.poll() is None  # polling, not done
        p.send_signal(signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
        srv.hold.clear()
        r = run_cli(["batch-collect", *common, "--wait"], env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        assert len(srv.batches) == 4
        assert sorted(srv.submitted.values()) == [1] * 20
    out = read_dir(tmp_path / "out")
    assert sorted(o["id"] for o in out) == sorted(rows)
    assert all(o["judge_status"] == "ok" and o["label"] == canned_label(_key(rows[o["id"]]))
               for o in out)
    cache_lines = (tmp_path / "out" / "cache.jsonl").read_text().splitlines()
    assert len(cache_lines) == 20 == len({json.loads(x)["key"] for x in cache_lines})
    _assert_no_key(tmp_path / "out", log)
    assert KEY not in r.stderr


def test_kill_between_create_and_persist_reattaches(tmp_path):
    with batch_server(KEY) as (srv, url):
        common, rows = _setup(tmp_path, url, n=10)
        srv.hold.set()
        r = run_cli(["batch-submit", *common], env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        assert len(srv.batches) == 1
        # as if killed after batches.create returned but before its id was saved
        (state_path,) = (tmp_path / "out" / ".batches").glob("*/batches.json")
        st = json.loads(state_path.read_text())
        st["batches"][0].update(state="creating", batch_id=None, status=None)
        state_path.write_text(json.dumps(st))
        srv.hold.clear()
        r = run_cli(["batch-collect", *common, "--wait"], env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        assert len(srv.batches) == 1 and sorted(srv.submitted.values()) == [1] * 10
        assert len([f for f in srv.files.values() if f["purpose"] == "batch"]) == 1
    assert all(o["judge_status"] == "ok" for o in read_dir(tmp_path / "out"))


def test_cost_cap_refuses_without_yes_and_waves_respect_the_token_budget(tmp_path):
    with batch_server(KEY) as (srv, url):
        common, rows = _setup(tmp_path, url, n=12, max_requests_per_file=4,
                              cost_cap_usd=0.000001, enqueued_token_budget=1)
        r = run_cli(["batch-submit", *common], env=_env(), timeout=60)
        assert r.returncode == 4, r.stderr
        assert "cost_cap_usd" in json.loads(r.stdout)["refused"]
        assert srv.files == {} and srv.batches == {}
        srv.polls_to_finish = 2
        r = run_cli(["batch-collect", *common, "--wait", "--yes"], env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        assert len(srv.batches) == 3 and srv.max_active == 1  # one batch per wave
    assert all(o["judge_status"] == "ok" for o in read_dir(tmp_path / "out"))


def test_cancel_leaves_unanswered_lines_failed(tmp_path):
    with batch_server(KEY) as (srv, url):
        common, rows = _setup(tmp_path, url, n=8)
        srv.hold.set()
        assert run_cli(["batch-submit", *common], env=_env()).returncode == 0
        st = json.loads(run_cli(["batch-status", *common], env=_env()).stdout)
        assert st["by_state"] == {"in_progress": 1} and st["in_flight_requests"] == 8
        assert not st["done"] and 0 < st["estimated_cost_usd"] < 0.01
        r = run_cli(["batch-cancel", *common], env=_env())
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["cancelled"] == ["b00000"]
        r = run_cli(["batch-collect", *common, "--wait"], env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        assert sorted(srv.submitted.values()) == [1] * 8  # cancelled lines not resubmitted
    out = read_dir(tmp_path / "out")
    assert all(o["judge_status"] == "failed" and o["label"] is None and
               "batch_cancelled" in o["judge_error"] for o in out)


def test_plan_of_the_paper_config_prints_judge_tokens_and_costs():
    r = subprocess.run([sys.executable, "-m", "asteer_build.cli", "plan",
                        "configs/asteer-paper.yaml"], cwd=ROOT,
                       env={**_env(), "HF_HUB_OFFLINE": "1"},  # no network in tests
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)["judge"]
    assert j["kind"] == "openai-batch" and j["model"] == "gpt-5-mini"
    assert j["calls"] == json.loads(r.stdout)["items"]
    assert j["response_tokens_assumed"] == 1140
    # rubric (~500 tokens) + prompt + concept + a 1,140-token response per call
    assert 1500 < j["input_tokens_per_call"] < 2500
    assert j["input_tokens"] == j["calls"] * j["input_tokens_per_call"]
    assert j["tokenizer"] in ("chars/4", "tiktoken:o200k_base")
    c = j["cost_usd"]
    live = (j["input_tokens"] * 0.25 + j["output_tokens"] * 2.0) / 1e6
    assert c["live"] == round(live, 2) and c["batch"] == round(live * 0.5, 2)
    line = next(x for x in r.stderr.splitlines() if x.strip().startswith("judge gpt-5-mini"))
    assert "input" in line and "output tokens" in line and "batch" in line and "live" in line


def test_a_batch_failed_as_a_whole_is_resubmitted_then_its_lines_fail_with_the_reason(
        tmp_path):
    with batch_server(KEY) as (srv, url):
        common, rows = _setup(tmp_path, url, n=6, max_resubmits=1)
        srv.fail_batches = {"b00000", "b00000-r1"}
        r = run_cli(["batch-collect", *common, "--wait"], env=_env(), timeout=60)
        assert r.returncode == 0, r.stderr
        assert sorted(srv.submitted.values()) == [2] * 6
    out = read_dir(tmp_path / "out")
    assert all(o["judge_status"] == "failed" and o["label"] is None
               and "invalid_file: canned refusal" in o["judge_error"] for o in out)


def test_bad_batch_settings_name_the_field():
    from judge.config import JudgeConfig

    for section, bad, field in (("batch", {"max_requests_per_file": 0}, "max_requests_per_file"),
                                ("batch", {"max_resubmits": -1}, "max_resubmits"),
                                ("batch", {"colour": 1}, "colour"),
                                ("prices", {"batch_discount": 1.5}, "batch_discount")):
        try:
            JudgeConfig.from_dict({"kind": "openai-batch", section: bad})
        except ValueError as e:
            assert f"judge.{section}" in str(e) and field in str(e), e
        else:
            raise AssertionError(f"{section}: {bad} accepted")


def test_token_estimate_stays_offline_and_says_how_it_counted(tmp_path, monkeypatch):
    from judge import estimate

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached
    estimate._encoding.cache_clear()
    t0 = time.monotonic()
    assert estimate.method("gpt-5-mini") == "chars/4"
    assert time.monotonic() - t0 < 5  # refused at once, no download attempted
    assert estimate.count_tokens("x" * 10, "gpt-5-mini") == 3
    assert estimate.count_messages([{"role": "user", "content": "abcd"}], "gpt-5-mini") == 5
    estimate._encoding.cache_clear()
