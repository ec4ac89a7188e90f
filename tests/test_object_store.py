"""A run folder on an S3 API (moto, in process, behind a loopback proxy): what each
commit costs at the server, a store outage mid-build, and `status` / `publish` from
`s3://`. Builds use the local executor with the in-process engine; the multi-node Ray
builds on the same kind of store are in test_ray_faults.py."""

from __future__ import annotations

import collections
import json
import threading
import time
from pathlib import Path

import pytest

from asteer_build.core.testseam import seam_env
from asteer_build.pipeline.shards import Manifest, open_store, read_stage

from .pipeline_support import INPROCESS_ENGINE, cli, start_cli, tiny_config, write_config
from .s3_support import BUCKET, s3_env, s3_server

pytestmark = pytest.mark.slow

SECRET = "asteer-test-secret"


@pytest.fixture(scope="module")
def s3():
    """The module's S3 server, reached through a proxy the outage test cuts."""
    with s3_server(proxy=True) as (srv, url):
        yield srv, url


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("object-store")


def _env(url: str, **extra: str) -> dict[str, str]:
    return {**s3_env(url), **INPROCESS_ENGINE, **extra}


def _objects(srv, prefix: str) -> dict[str, bytes]:
    """Every object under the prefix, read straight from the server."""
    import boto3

    c = boto3.client("s3", endpoint_url=srv.url, region_name="us-east-1",
                     aws_access_key_id="k", aws_secret_access_key="s")
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = c.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def test_s3_commits_upload_each_shard_once(s3, work, monkeypatch):
    """60 shards on the S3 API: each committed file is one upload (a PutObject or one
    multipart upload), nothing is copied or deleted, each commit adds one journal object
    whose size does not grow with the shard count, and build.json is rewritten per stage,
    not per commit. The secret key is in no object and no output; `status` and
    `publish --dry-run` read the run from s3://."""
    srv, url = s3
    uri = f"s3://{BUCKET}/count-run"
    cfg = tiny_config(uri, shard_size=1,
                      prompts=[{"prompt_id": f"p{i}", "prompt": p} for i, p in enumerate(
                          ["explain the ocean to a friend", "list three reasons to travel",
                           "describe your morning"])],
                      alphas={"diffmean": [1.0, 2.0, 3.0, 4.0, 6.0],
                              "probe": [1.0, 2.0, 3.0, 4.0, 6.0]})
    mark = srv.mark()
    r = cli("run", "--config", str(write_config(work / "count.yaml", cfg)), "--no-progress",
            **_env(url))
    assert r.returncode == 0, r.stderr[-3000:]
    reqs = [q for q in srv.since(mark) if q.key.startswith("count-run/")]
    for k, v in s3_env(url).items():
        monkeypatch.setenv(k, v)
    m = Manifest.load(open_store(uri))
    assert m is not None
    files = [e["path"] for st in ("rollouts", "features", "activations", "labelled")
             for e in m.entries(st).values()]
    assert len(m.entries("rollouts")) == 60 and len(files) == 2 * 60  # rollouts, labelled
    uploads = collections.Counter()
    for q in reqs:
        if q.op in ("PutObject", "CreateMultipartUpload"):
            uploads[q.key[len("count-run/"):]] += 1
    for f in files:
        assert uploads[f] == 1, (f, uploads[f])
    ops = collections.Counter(q.op for q in reqs)
    assert ops["CopyObject"] == ops["DeleteObject"] == ops["DeleteObjects"] == 0, ops
    # One journal object per commit (vectors: one per model), each written once.
    journal = [q for q in reqs if "/journal/" in q.key
               and q.op in ("PutObject", "UploadPart")]
    assert len(journal) == len(files) + 1
    sizes = [q.bytes for q in journal if "-rollouts-" in q.key]
    assert max(sizes[-10:]) <= 1.05 * max(sizes[:10]), sizes
    manifests = [q for q in reqs if q.key == "count-run/build.json"
                 and q.op in ("PutObject", "CreateMultipartUpload")]
    assert 1 <= len(manifests) <= 6, len(manifests)  # created, then once per stage
    t = read_stage(open_store(uri), "labelled")
    assert t.num_rows == 60 == len(set(t.column("id").to_pylist()))
    objs = _objects(srv, "count-run/")
    assert not [k for k, v in objs.items() if SECRET.encode() in v]
    assert SECRET not in r.stdout + r.stderr
    st = cli("status", uri, timeout=120, **_env(url))
    assert st.returncode == 0, st.stderr[-2000:]
    status = json.loads(st.stdout)
    assert status["stages"]["labelled"]["rows"] == 60 and status["run"] == uri
    pub = cli("publish", uri, "--repo", "someone/tiny", "--dry-run", "--folder",
              str(work / "published"), timeout=300, **_env(url))
    assert pub.returncode == 0, pub.stderr[-3000:]
    assert (work / "published" / "build.json").exists()


def test_s3_outage_mid_build_is_waited_out(s3, work, pipeline_reference, monkeypatch):
    """The S3 API unreachable for ~10 s while rollouts commit: every write and journal
    entry is retried with backoff; the build ends with the reference build's ids and
    labels, each row once, and every object under the run is one the manifest names."""
    srv, url = s3
    proxy = srv.proxy
    uri = f"s3://{BUCKET}/outage-run"
    cfg = tiny_config(uri)
    p = start_cli("run", "--config", str(write_config(work / "outage.yaml", cfg)),
                  "--no-progress", **_env(url, **seam_env(commit_delay_s=0.2)))
    deadline = time.time() + 300
    while not any("/journal/" in q.key and "-rollouts-" in q.key
                  for q in srv.since(0) if q.key.startswith("outage-run/")):
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() < deadline, "no rollouts shard committed"
        time.sleep(0.1)
    proxy.cut()
    t_cut = time.time()
    threading.Timer(10.0, proxy.restore).start()
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert time.time() - t_cut >= 10
    assert proxy.refused > 0  # the outage was real: connections were refused
    for k, v in s3_env(url).items():
        monkeypatch.setenv(k, v)
    store = open_store(uri)
    got = read_stage(store, "labelled")
    m = Manifest.load(store)
    ref = read_stage(str(pipeline_reference), "labelled")
    assert got.num_rows == 24 == len(set(got.column("id").to_pylist()))
    assert sorted(zip(got.column("id").to_pylist(), got.column("label").to_pylist(),
                      strict=True)) == \
        sorted(zip(ref.column("id").to_pylist(), ref.column("label").to_pylist(), strict=True))
    named = {e["path"] for st in ("rollouts", "features", "activations", "labelled")
             for e in m.entries(st).values()}
    objs = _objects(srv, "outage-run/")
    for k in objs:
        rel = k[len("outage-run/"):]
        if rel.split("/")[0] in ("rollouts", "features", "activations", "labelled"):
            assert rel in named, rel


def _upload_run(srv, local: Path, prefix: str, *, drop: tuple[str, ...]) -> None:
    """A local run folder copied onto the S3 server, without the stages named in `drop`
    (files and manifest entries)."""
    import boto3

    c = boto3.client("s3", endpoint_url=srv.url, region_name="us-east-1",
                     aws_access_key_id="k", aws_secret_access_key="s")
    for f in sorted(local.rglob("*")):
        rel = f.relative_to(local).as_posix()
        if not f.is_file() or rel.split("/")[0] in (*drop, ".staging", "logs"):
            continue
        data = f.read_bytes()
        if rel == "build.json":
            m = json.loads(data)
            for st in drop:
                m["stages"][st] = {}
            data = json.dumps(m).encode()
        c.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)


def test_batch_judge_state_travels_with_the_run_folder(s3, work, pipeline_reference):
    """The Batch API judge on an s3:// run folder, SIGKILLed while it polls; the rerun
    comes from "another machine" (its own ASTEER_CACHE and HOME, so no local state):
    it finds the batches in the run folder's `judge-state/`, submits no custom_id twice
    and labels every row once with the server's answer."""
    import secrets

    from judge.cache import cache_key
    from judge.rubric import DEFAULT_RUBRIC

    from .batch_api_support import batch_judge, batch_server, canned_label
    from .pipeline_support import kill_group, wait_for

    srv3, url3 = s3
    _upload_run(srv3, pipeline_reference, "batch-run", drop=("labelled",))
    uri = f"s3://{BUCKET}/batch-run"
    ro = read_stage(str(pipeline_reference), "rollouts").to_pylist()
    want = {cache_key(DEFAULT_RUBRIC.version, "judge-b", x["prompt"], x["concept"],
                      x["response"]) for x in ro}
    n_files = -(-len(want) // 4)
    key = "sk-s3-batch-" + secrets.token_hex(8)
    machines = {n: {"ASTEER_CACHE": str(work / n / "cache"), "HOME": str(work / n)}
                for n in ("machine-a", "machine-b")}
    with batch_server(key) as (srv, url):
        cfg = tiny_config(uri)
        cfg["judge"] = batch_judge(url)
        path = write_config(work / "s3-batch.yaml", cfg)
        srv.hold.set()
        p = start_cli("run", "--config", str(path), "--stages", "judge", "--no-progress",
                      BATCH_TEST_KEY=key, **_env(url3, **machines["machine-a"]))
        wait_for(lambda: len(srv.batches) >= n_files and srv.retrieves >= 3 * n_files, 120,
                 "the judge stage polling its batches")
        assert p.poll() is None
        kill_group(p)
        n_batches = len(srv.batches)
        srv.hold.clear()
        state = [k for k in _objects(srv3, "batch-run/judge-state/")]
        assert any(k.endswith("/batches.json") for k in state), state
        r = cli("run", "--config", str(path), "--stages", "judge", "--no-progress",
                timeout=180, BATCH_TEST_KEY=key, **_env(url3, **machines["machine-b"]))
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(srv.batches) == n_batches == n_files
        assert set(srv.submitted.values()) == {1} and set(srv.submitted) == want
    import os

    old = {k: os.environ.get(k) for k in s3_env(url3)}
    os.environ.update(s3_env(url3))
    try:
        rows = read_stage(open_store(uri), "labelled").to_pylist()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert len(rows) == 24 == len({x["id"] for x in rows})
    for x in rows:
        k = cache_key(DEFAULT_RUBRIC.version, "judge-b", x["prompt"], x["concept"],
                      x["response"])
        assert x["judge_status"] == "ok" and x["label"] == canned_label(k)
    assert not [k for k, v in _objects(srv3, "batch-run/").items() if key.encode() in v]
