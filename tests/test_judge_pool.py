"""The judge pool against a real `vllm serve` of the tiny model, directly and through a
fault-injecting proxy. The session's server (conftest.judge_server); it requires an API
key, so every passing request also proves the key travelled, and the secrecy test proves
it went nowhere else."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from judge.cache import JudgmentCache
from judge.judges import LLMJudge
from judge.pool import EndpointConfig, EndpointPool, RetryPolicy
from judge.rubric import build_messages
from judge.shards import judge_shards

try:  # tests/ may or may not be a package
    from .judge_support import (
        KEY_ENV,
        ROOT,
        FaultProxy,
        make_rows,
        read_dir,
        row_key,
        run_cli,
        write_shard,
    )
except ImportError:
    from judge_support import (
        KEY_ENV,
        ROOT,
        FaultProxy,
        make_rows,
        read_dir,
        row_key,
        run_cli,
        write_shard,
    )

#: the reason comes before the label: room for EXPLANATION_MAX characters and the JSON
JUDGE_MAX_TOKENS = 300
FAULTS = ["drop", "http500", "http429", "slow", "malformed"]


@pytest.fixture(scope="module")
def server(judge_server):
    """The session's `vllm serve` (conftest.judge_server), API key required."""
    return judge_server


@pytest.fixture(scope="module")
def proxy(server):
    p = FaultProxy(server["url"], slow_s=4.0)
    yield p
    p.close()


@pytest.fixture
def clean_proxy(proxy):
    proxy.reset()
    yield proxy
    proxy.release_held()
    proxy.reset()


def user_key(row: dict) -> str:
    return row_key({"messages": build_messages(row["prompt"], row["concept"], row["response"])})


def check_rows(rows_in: list[dict], rows_out: list[dict]) -> None:
    """None lost, none duplicated, none defaulted: the invariant every run must keep."""
    assert [r["id"] for r in rows_out] == [r["id"] for r in rows_in]
    for r in rows_out:
        assert r["judge_status"] in ("ok", "failed"), r
        if r["judge_status"] == "ok":
            assert r["label"] in (0, 1, 2) and isinstance(r["judge_explanation"], str), r
            assert r["judge_error"] is None
        else:
            assert r["label"] is None and r["judge_explanation"] is None, r
            assert r["judge_error"], r


def run_judge(in_dir, out_dir, cache_path, endpoints, model, retry=None, rerun=False):
    async def go():
        with JudgmentCache(cache_path) as cache:
            async with EndpointPool(endpoints, model=model, retry=retry, seed=0) as pool:
                # room for the reason (<= EXPLANATION_MAX chars), which comes first
                judge = LLMJudge(pool, model, max_tokens=JUDGE_MAX_TOKENS)
                reps = await judge_shards(
                    in_dir, out_dir, judge, cache, rerun_failed=rerun, workers=2 * pool.capacity
                )
                return reps, pool.stats()

    return asyncio.run(go())


def test_every_row_gets_a_valid_label(server, tmp_path):
    rows = make_rows(32, seed=1)
    write_shard(tmp_path / "in" / "s0.parquet", rows)
    ep = EndpointConfig(server["url"], api_key_env=KEY_ENV, max_concurrency=16)
    reps, stats = run_judge(
        tmp_path / "in", tmp_path / "out", tmp_path / "c.jsonl", [ep], server["model"]
    )
    out = read_dir(tmp_path / "out")
    check_rows(rows, out)
    assert all(r["judge_status"] == "ok" for r in out)
    assert all(r["judge_model"] == server["model"] for r in out)
    assert reps[0].calls == 32 and stats[0]["structured"] is True


def _fault_plan(always_500: set[str], garbage: set[str]):
    def plan(key: str, attempt: int, body: dict) -> str:
        if key in always_500:
            return "http500"
        if key in garbage:
            return "garbage"
        h = int(key, 16)
        n_faults = h % 3  # 0, 1 or 2 faults before the request gets through
        return FAULTS[(h // 3 + attempt) % len(FAULTS)] if attempt < n_faults else "pass"

    return plan


def test_faults_every_row_labelled_or_failed(server, clean_proxy, tmp_path):
    rows = make_rows(30, seed=2)
    write_shard(tmp_path / "in" / "s0.parquet", rows)
    keys = [user_key(r) for r in rows]
    always_500, garbage = {keys[0], keys[1]}, {keys[2]}
    clean_proxy.reset(_fault_plan(always_500, garbage))
    ep = EndpointConfig(clean_proxy.url, api_key_env=KEY_ENV, max_concurrency=8)
    retry = RetryPolicy(
        max_attempts=8,
        base_delay_s=0.05,
        max_delay_s=0.5,
        timeout_s=3.0,
        failures_to_eject=3,
        cooldown_s=0.2,
        max_cooldown_s=1.0,
    )
    reps, stats = run_judge(
        tmp_path / "in", tmp_path / "out", tmp_path / "c.jsonl", [ep], server["model"], retry
    )
    out = read_dir(tmp_path / "out")
    check_rows(rows, out)
    for f in FAULTS:
        assert clean_proxy.injected[f] > 0, (f, clean_proxy.injected)
    by_id = {r["id"]: r for r in out}
    for i in (0, 1):
        r = by_id[rows[i]["id"]]
        assert r["judge_status"] == "failed" and "http_500" in r["judge_error"]
    assert by_id[rows[2]["id"]]["judge_status"] == "failed"
    assert "unparsable" in by_id[rows[2]["id"]]["judge_error"]
    assert all(by_id[r["id"]]["judge_status"] == "ok" for r in rows[3:])
    assert stats[0]["ejected"] >= 1  # the always-failing rows took the endpoint out

    # --rerun-failed: only the three failed rows are asked again.
    clean_proxy.reset()
    reps, _ = run_judge(
        tmp_path / "in",
        tmp_path / "out",
        tmp_path / "c.jsonl",
        [ep],
        server["model"],
        retry,
        rerun=True,
    )
    out2 = read_dir(tmp_path / "out")
    check_rows(rows, out2)
    assert all(r["judge_status"] == "ok" for r in out2)
    assert reps[0].calls == 3 and sum(clean_proxy.forwarded.values()) == 3
    assert {
        r["id"]: r["label"] for r in out2 if r["id"] not in {rows[i]["id"] for i in range(3)}
    } == {r["id"]: r["label"] for r in out if r["judge_status"] == "ok"}


def test_failing_endpoint_taken_out_and_probed_back(server, clean_proxy):
    bad = FaultProxy(server["url"], plan=lambda k, n, b: "drop")
    retry = RetryPolicy(
        max_attempts=6,
        base_delay_s=0.02,
        max_delay_s=0.2,
        timeout_s=10,
        failures_to_eject=2,
        cooldown_s=0.3,
        max_cooldown_s=0.3,
    )
    eps = [
        EndpointConfig(clean_proxy.url, api_key_env=KEY_ENV, max_concurrency=4),
        EndpointConfig(bad.url, api_key_env=KEY_ENV, max_concurrency=4),
    ]

    async def burst(pool: EndpointPool, tag: str, n: int = 24):
        msgs = [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]
        return await asyncio.gather(*(pool.complete(m, max_tokens=4) for m in msgs))

    async def go():
        async with EndpointPool(eps, model=server["model"], retry=retry, seed=0) as pool:
            first = await burst(pool, "a")
            s1 = pool.stats()
            bad.reset()  # the endpoint recovers
            await asyncio.sleep(0.4)
            second = await burst(pool, "b")
            return first, s1, second, pool.stats()

    try:
        first, s1, second, s2 = asyncio.run(go())
    finally:
        bad.close()
    assert len(first) == len(second) == 24
    assert s1[1]["ejected"] >= 1 and s1[1]["ok"] == 0
    # Ejected after `failures_to_eject` in-flight failures; later only single probes.
    assert s1[1]["errors"] <= 4 + 2 * s1[1]["ejected"]
    assert s2[1]["state"] == "healthy" and s2[1]["ok"] > 0  # probed back, takes traffic


def test_structured_output_rejected_falls_back_to_text(server, clean_proxy, tmp_path):
    rows = make_rows(8, seed=3)
    write_shard(tmp_path / "in" / "s0.parquet", rows)
    clean_proxy.reset(lambda k, n, b: "reject_rf")
    ep = EndpointConfig(clean_proxy.url, api_key_env=KEY_ENV, max_concurrency=4)
    _, stats = run_judge(
        tmp_path / "in", tmp_path / "out", tmp_path / "c.jsonl", [ep], server["model"]
    )
    out = read_dir(tmp_path / "out")
    check_rows(rows, out)  # word soup from a random model: failed, never defaulted
    assert stats[0]["structured"] is False
    assert sum(clean_proxy.forwarded.values()) == 8  # each row answered once, as text


def _config(tmp_path: Path, url: str, model: str) -> Path:
    cfg = {
        "judge": {
            "model": model,
            "max_tokens": JUDGE_MAX_TOKENS,
            "workers": 8,
            "endpoints": [{"base_url": url, "api_key_env": KEY_ENV, "max_concurrency": 4}],
            "retry": {"max_attempts": 4, "timeout_s": 60, "base_delay_s": 0.05},
        }
    }
    path = tmp_path / "judge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_midway_then_rerun_judges_each_row_once(server, clean_proxy, tmp_path):
    rows0, rows1 = make_rows(20, seed=4, prefix="a"), make_rows(20, seed=5, prefix="b")
    write_shard(tmp_path / "in" / "s0.parquet", rows0)
    write_shard(tmp_path / "in" / "s1.parquet", rows1)
    cfg = _config(tmp_path, clean_proxy.url, server["model"])
    cache = tmp_path / "cache.jsonl"
    args = [
        "run",
        "--config",
        str(cfg),
        "--in",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--cache",
        str(cache),
    ]
    clean_proxy.hold_after = 28  # shard 0 finishes, shard 1 stalls with requests in flight
    proc = subprocess.Popen(
        [sys.executable, "-m", "judge.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while True:
        n_fwd = sum(clean_proxy.forwarded.values())
        lines = cache.read_text().count("\n") if cache.exists() else 0
        if clean_proxy.held >= 1 and n_fwd >= 28 and lines == n_fwd:
            break
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, (n_fwd, lines, clean_proxy.held)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    judged_before = sum(clean_proxy.forwarded.values())
    assert judged_before == 28 == clean_proxy.admitted
    assert (tmp_path / "out" / "s0.parquet").exists()
    assert not (tmp_path / "out" / "s1.parquet").exists()  # no half-written shard
    clean_proxy.release_held()
    clean_proxy.hold_after = None

    res = run_cli(args)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)["shards"]
    assert summary[0]["skipped"] and summary[1]["calls"] == 40 - judged_before
    assert summary[1]["cached"] == judged_before - 20
    # Server side: every row judged exactly once across both runs.
    keys = {user_key(r) for r in rows0 + rows1}
    assert set(clean_proxy.forwarded) == keys
    assert all(v == 1 for v in clean_proxy.forwarded.values())
    entries = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(entries) == 40 and len({e["key"] for e in entries}) == 40
    out = read_dir(tmp_path / "out")
    check_rows(rows0 + rows1, out)
    assert all(r["judge_status"] == "ok" for r in out)


def test_api_key_never_logged_or_written(server, clean_proxy, tmp_path):
    rows = make_rows(12, seed=6)
    write_shard(tmp_path / "in" / "s0.parquet", rows)
    keys = [user_key(r) for r in rows]
    # The proxy echoes the Authorization header into an error body, the classic leak:
    # once for two rows (then they pass), and always for one row (it ends failed).
    clean_proxy.reset(
        lambda k, n, b: "echo_auth" if k == keys[0] or (k in keys[1:3] and n == 0) else "pass"
    )
    cfg = _config(tmp_path, clean_proxy.url, server["model"])
    out_dir = tmp_path / "out"
    res = run_cli(
        [
            "--log-level",
            "DEBUG",
            "run",
            "--config",
            str(cfg),
            "--in",
            str(tmp_path / "in"),
            "--out",
            str(out_dir),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    key = server["key"]
    assert clean_proxy.injected["echo_auth"] >= 3
    out = read_dir(out_dir)
    check_rows(rows, out)
    failed = [r for r in out if r["judge_status"] == "failed"]
    assert [r["id"] for r in failed] == [rows[0]["id"]]
    assert "bad auth header: Bearer ***" in failed[0]["judge_error"]  # echoed, then masked
    assert sum(r["judge_status"] == "ok" for r in out) == 11  # the server took the key
    assert key not in res.stderr and key not in res.stdout
    assert "DEBUG" in res.stderr  # debug logging was really on
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".jsonl") for p in files)  # the cache is among them
    for p in files:
        assert key.encode() not in p.read_bytes(), p


def test_rubric_file_end_to_end_and_its_version_on_every_row(server, clean_proxy, tmp_path):
    """`rubric_file` (relative to the judge config) is the one user message the server
    sees, placeholders filled; every labelled row records that rubric's version."""
    from judge.rubric import Rubric

    rows = make_rows(4, seed=9)
    write_shard(tmp_path / "in" / "s0.parquet", rows)
    cfg_path = _config(tmp_path, clean_proxy.url, server["model"])
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["judge"]["rubric_file"] = "short-rubric.txt"
    cfg_path.write_text(yaml.safe_dump(cfg))
    rubric_path = tmp_path / "short-rubric.txt"
    rubric_path.write_text("Steering grade. Concept: {concept}\nPrompt: {prompt}\n"
                           "Response: {response}\nGive the reason first: "
                           '{"explanation": "...", "label": 0, 1 or 2}')
    rubric = Rubric.from_file(rubric_path)
    r = run_cli(["run", "--config", str(cfg_path), "--in", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c.jsonl")])
    assert r.returncode == 0, r.stderr[-2000:]
    out = read_dir(tmp_path / "out")
    check_rows(rows, out)
    assert all(x["judge_status"] == "ok" for x in out)
    assert {x["judge_rubric"] for x in out} == {rubric.version}
    assert rubric.version.startswith("short-rubric+")
    # the server was asked with the file's text: one request per row, keyed by the
    # user message that rubric builds
    want = {row_key({"messages": rubric.messages(x["prompt"], x["concept"], x["response"])})
            for x in rows}
    assert set(clean_proxy.forwarded) == want


def test_each_fault_reaches_the_row_under_its_own_kind(server, clean_proxy):
    """What a failed row's `judge_error` starts with, per fault, through the client's
    transport (aiohttp, where installed): a dropped connection is `connection`, a slow
    answer `timeout`, each with its own message; a refused port is `connection` too."""
    from judge.pool import PoolError

    from .judge_support import free_port

    retry = RetryPolicy(max_attempts=1, timeout_s=1.0, failures_to_eject=99)
    kinds = {"drop": "connection", "slow": "timeout", "http500": "http_500",
             "malformed": "bad_response"}

    async def one(url: str) -> PoolError:
        ep = EndpointConfig(url, api_key_env=KEY_ENV, max_concurrency=1)
        async with EndpointPool([ep], model=server["model"], retry=retry) as pool:
            with pytest.raises(PoolError) as e:
                await pool.complete([{"role": "user", "content": "x"}], max_tokens=4)
            return e.value

    got = {}
    for action in kinds:
        clean_proxy.reset(lambda k, n, b, a=action: a)
        got[action] = asyncio.run(one(clean_proxy.url))
    refused = asyncio.run(one(f"http://127.0.0.1:{free_port()}/v1"))
    assert {a: e.kind for a, e in got.items()} == kinds
    assert str(got["slow"]).startswith("timeout after 1 attempt(s): no response within 1.0s")
    assert "no response within" not in str(got["drop"])
    assert refused.kind == "connection" and "no response within" not in str(refused)
