"""Batch-file mode round-trips through `vllm run-batch` on the tiny model."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

try:  # tests/ may or may not be a package
    from .judge_support import (
        CPU_FLAGS,
        VLLM_CLI,
        make_rows,
        read_dir,
        run_cli,
        vllm_env,
        write_shard,
    )
except ImportError:
    from judge_support import (
        CPU_FLAGS,
        VLLM_CLI,
        make_rows,
        read_dir,
        run_cli,
        vllm_env,
        write_shard,
    )


@pytest.mark.slow  # `vllm run-batch` starts an engine
def test_batch_files_round_trip_through_vllm_run_batch(tmp_path):
    from asteer_build.inputs.tinyworld import build_tiny_model

    model = str(build_tiny_model())
    rows = make_rows(20, seed=7)
    dup = dict(rows[18], id="dup-of-18")  # same content, another id: one request
    rows[19] = dup
    write_shard(tmp_path / "in" / "s0.parquet", rows)
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(yaml.safe_dump({"judge": {"model": model, "max_tokens": 300}}))
    common = [
        "--config",
        str(cfg),
        "--in",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache.jsonl"),
    ]
    req, res = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"

    w = run_cli(["batch-write", *common, "--requests", str(req)])
    assert w.returncode == 0, w.stderr
    lines = [json.loads(x) for x in req.read_text().splitlines()]
    assert len(lines) == 19 and len({x["custom_id"] for x in lines}) == 19
    assert lines[0]["url"] == "/v1/chat/completions"
    assert lines[0]["body"]["response_format"]["type"] == "json_schema"

    proc = subprocess.run(
        [
            *VLLM_CLI,
            "run-batch",
            "-i",
            str(req),
            "-o",
            str(res),
            "--model",
            model,
            "--max-num-seqs",
            "32",
            *CPU_FLAGS,
        ],
        env=vllm_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x) for x in res.read_text().splitlines()]
    assert {r["custom_id"] for r in results} == {x["custom_id"] for x in lines}

    # One result comes back as a server error: its row must end failed, not labelled.
    broken = results[0]["custom_id"]
    results[0]["response"] = {"status_code": 500, "body": {"error": "injected"}}
    res.write_text("".join(json.dumps(r) + "\n" for r in results))

    r = run_cli(["batch-read", *common, "--results", str(res)])
    assert r.returncode == 0, r.stderr
    out = read_dir(tmp_path / "out")
    assert [x["id"] for x in out] == [x["id"] for x in rows]
    broken_rows = [x for x, line in zip(out, _keys_for(out, lines), strict=True) if line == broken]
    assert broken_rows and all(
        x["judge_status"] == "failed" and x["label"] is None and "http_500" in x["judge_error"]
        for x in broken_rows
    )
    ok = [x for x in out if x not in broken_rows]
    assert all(x["judge_status"] == "ok" and x["label"] in (0, 1, 2) for x in ok)
    assert all(x["judge_model"] == model for x in out)
    by_id = {x["id"]: x for x in out}
    assert by_id["dup-of-18"]["label"] == by_id[rows[18]["id"]]["label"]

    # Idempotent: nothing left to request, except the failed row with --rerun-failed.
    req2 = tmp_path / "again.jsonl"
    assert run_cli(["batch-write", *common, "--requests", str(req2)]).returncode == 0
    assert req2.read_text() == ""
    args = ["batch-write", *common, "--requests", str(req2), "--rerun-failed"]
    assert run_cli(args).returncode == 0
    assert [json.loads(x)["custom_id"] for x in req2.read_text().splitlines()] == [broken]


def _keys_for(out: list[dict], lines: list[dict]) -> list[str]:
    """Map each output row to the custom_id of the request that carried its content."""
    from judge.cache import cache_key
    from judge.rubric import RUBRIC_VERSION

    model = lines[0]["body"]["model"]
    return [cache_key(RUBRIC_VERSION, model, x["prompt"], x["concept"], x["response"]) for x in out]
