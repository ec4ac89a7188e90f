"""`asteer-build publish --follow`: a run published while it builds, killed and restarted,
ends up in the Hub repo exactly as a plain publish of the finished run puts it there, with
every file uploaded once.

The followed run folder is filled from the test the way the builder fills one: shard
files put into place through the run's `Store`, then committed through
`Manifest.load(store).record(...)` (a journal object per commit, read back by the
follower through `Manifest.load`). Its shards are real Parquet in the dataset contract's
schemas, written without an engine (which would take minutes). The Hub is
`hub_support.accepting_hub`, a loopback server that takes real `huggingface_hub` uploads
(preupload, LFS batch and PUT, NDJSON commit, paths-info) and counts them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asteer_build.core import contract
from asteer_build.io import publish as pub
from asteer_build.pipeline.shards import STAGES, Manifest, ShardFile, Store, open_store

from .hub_support import accepting_hub
from .pipeline_support import BIN, ROOT, env, kill_group, wait_for

pytestmark = [
    pytest.mark.timeout(300),
    # huggingface_hub's own LFS PUT (`data=fileobj`), not ours
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

TOKEN = "hf_FAKEfollowTOKEN0123456789abcdefXYZ"
REPO = "asteer-org/follow-test"
#: kept layer offsets per model: tiny-b has feature columns tiny-a lacks, so the features
#: schema is final only once both models have a shard
MODELS = {"tiny-a": (0,), "tiny-b": (0, 1)}
METHODS = ("diffmean", "probe")
CONCEPTS = (("tw-ocean", "ocean", "mid"), ("tw-robot", "robot", "high"))
PROMPTS = (("p0", "explain the ocean to a friend"), ("p1", "list three reasons to travel"))
ALPHAS = (1.0, 3.0, 6.0)
STEPS = (0, 1)
SHARD_SIZE = 4
#: 2 models x 2 methods x 2 concepts x 2 prompts x 3 alphas = 48 items, 12 shards of 4
N_SHARDS = 12
#: a rollouts shard is estimated at 4 x (256 + 2 x 16) = 1152 B, a features one at
#: 4 x 632 = 2528 B: two shards per rollouts file, one per features file
TARGET = 3_000
#: shards 0-5 are tiny-a's, 6-11 tiny-b's (plan order: model, method, concept, ...)
SHARD_MODEL = ["tiny-a"] * 6 + ["tiny-b"] * 6
VECTORS = [f"vectors/{m}/{n}" for m in MODELS
           for n in ("diffmean.safetensors", "index.json", "probe.safetensors")]


def _config(out: Path) -> dict:
    return {
        "name": "follow-test",
        "models": [{"name": m, "path": "tinyworld"} for m in MODELS],
        "methods": list(METHODS),
        "layer": 2,
        "concepts": [dict(zip(("concept_id", "concept", "concept_level"), c, strict=True))
                     for c in CONCEPTS],
        "prompts": [{"prompt_id": p, "prompt": t} for p, t in PROMPTS],
        "alphas": {m: list(ALPHAS) for m in METHODS},
        "sampling": {"temperature": 0.0, "max_tokens": 16},
        "judge": {"kind": "rules"},
        "shard_size": SHARD_SIZE,
        "capture": {"steps": list(STEPS), "offsets": [0, 1]},
        "output": str(out),
    }


def _items() -> list[dict]:
    out = []
    for m in MODELS:
        for method in METHODS:
            for cid, concept, level in CONCEPTS:
                for pid, prompt in PROMPTS:
                    for a in ALPHAS:
                        key = f"{m}|{method}|{cid}|{pid}|{a}"
                        out.append({"id": hashlib.sha256(key.encode()).hexdigest()[:24],
                                    "model": m, "method": method, "concept_id": cid,
                                    "concept": concept, "concept_level": level,
                                    "prompt_id": pid, "prompt": prompt, "alpha": a})
    return out


def _shard_tables(items: list[dict], rng: np.random.Generator) -> dict[str, pa.Table]:
    n = len(items)
    col = {k: [it[k] for it in items] for k in items[0]}
    texts = [f"the {c} is a good place to learn " * (1 + int(a))
             for c, a in zip(col["concept"], col["alpha"], strict=True)]
    roll = {
        **col, "layer": [2] * n, "vector_norm": rng.uniform(1, 2, n).astype(np.float32),
        "alpha_raw": col["alpha"], "seed": rng.integers(0, 2**31, n), "response": texts,
        "response_tokens": [len(t.split()) for t in texts], "finish_reason": ["length"] * n,
        "label": [None] * n, "judge_model": [None] * n, "judge_status": ["pending"] * n,
        "judge_explanation": [None] * n,
    }
    rollouts = pa.table(roll, schema=contract.ROLLOUTS_SHARD_SCHEMA)
    judged = {**roll, "label": [{1.0: 0, 3.0: 1, 6.0: 2}[a] for a in col["alpha"]],
              "judge_model": ["rules"] * n, "judge_status": ["ok"] * n,
              "judge_explanation": ["keyword count"] * n, "judge_error": [None] * n,
              "judge_rubric": ["rules-v1"] * n}
    labelled = pa.table(judged, schema=contract.ROLLOUTS_SCHEMA)
    names = contract.feature_names(STEPS, MODELS[items[0]["model"]])
    schema = contract.features_schema(names)
    feats = {f.name: col[f.name] for f in contract.FEATURES_KEY_FIELDS}
    for f in list(schema)[len(feats):]:
        feats[f.name] = rng.standard_normal(n).astype(np.float32)
    return {"features": pa.table(feats, schema=schema), "rollouts": rollouts,
            "labelled": labelled}


def _source_run(root: Path) -> tuple[Store, Manifest]:
    """A finished run, committed the way the builder commits one."""
    store = open_store(str(root))
    store.makedirs("")
    m = Manifest.create(store, config=_config(root), config_hash="cfg0123456789abc",
                        plan_hash="plan0123456789ab", n_items=48, n_shards=N_SHARDS)
    rng = np.random.default_rng(0)
    for model in MODELS:
        files = []
        for rel in (v for v in VECTORS if v.startswith(f"vectors/{model}/")):
            data = (json.dumps({"model": model, "layer": 2}).encode() if rel.endswith(".json")
                    else rng.bytes(3000))
            files.append(store.put_file("vectors", rel[len("vectors/"):], rel, data, 2))
        m.record([ShardFile("vectors", model, f"vectors/{model}", 2, files[-1].sha256,
                            sum(f.bytes for f in files))],
                 parts={f.path: f.sha256 for f in files})
    items = _items()
    for i in range(N_SHARDS):
        name = f"shard-{i:06d}"
        tables = _shard_tables(items[i * SHARD_SIZE:(i + 1) * SHARD_SIZE], rng)
        m.record([store.write_table(s, name, tables[s]) for s in ("features", "rollouts")],
                 executor="test")
        m.record([store.write_table("labelled", name, tables["labelled"])], ok=SHARD_SIZE,
                 failed=0, pending=0, judge_model="rules", judge_rubric="rules-v1")
    m.compact()
    return store, m


_RECORD_KEYS = ("path", "rows", "sha256", "bytes", "config_hash", "software", "committed")


class Feeder:
    """An empty run folder with the source run's records, filled commit by commit."""

    def __init__(self, src: tuple[Store, Manifest], root: Path) -> None:
        self.src_store, self.src = src
        self.store = open_store(str(root))
        self.store.makedirs("")
        data = copy.deepcopy(self.src.data)
        data["stages"] = {s: {} for s in STAGES}
        data.pop("journal_through", None)
        Manifest(self.store, data).save()

    def commit(self, stage: str, name: str) -> None:
        e = self.src.entries(stage)[name]
        files = []
        for rel in e.get("parts") or {e["path"]: e["sha256"]}:
            files.append(self.store.put_file(stage, name, rel, self.src_store.read_bytes(rel),
                                             e["rows"]))
        f = files[-1] if stage != "vectors" else ShardFile(
            stage, name, e["path"], e["rows"], e["sha256"], e["bytes"])
        extra = {k: v for k, v in e.items() if k not in _RECORD_KEYS}
        m = Manifest.load(self.store)
        assert m is not None
        m.record([f], **extra)

    def shard(self, i: int) -> None:
        name = f"shard-{i:06d}"
        self.commit("features", name)
        self.commit("rollouts", name)
        self.commit("labelled", name)


@pytest.fixture
def hub_env(monkeypatch):
    """Xet off in this process (its switch is read at import) and in the CLI's."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _cli_env(hub) -> dict[str, str]:
    return {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _start(args: tuple[str, ...], hub, errs: Path) -> subprocess.Popen:
    """The CLI in its own session (so the test can SIGKILL its group), JSON on stdout."""
    return subprocess.Popen([str(BIN / "asteer-build"), *args], cwd=ROOT, env=env(**_cli_env(hub)),
                            stdout=subprocess.PIPE, stderr=errs.open("w"), text=True,
                            start_new_session=True)


def _data(hub, prefix: str) -> list[str]:
    return [p for p in hub.files(REPO) if p.startswith(prefix)]


def test_follow_killed_and_restarted_uploads_each_file_once(tmp_path, hub_env):
    src = _source_run(tmp_path / "source")
    feed = Feeder(src, tmp_path / "run")
    run, folder = tmp_path / "run", tmp_path / "ds"
    args = ("publish", str(run), "--repo", REPO, "--follow", "--poll-s", "0.2",
            "--commit-every-s", "0", "--target-file-bytes", str(TARGET), "--folder", str(folder))
    with accepting_hub() as hub:
        for model in MODELS:
            feed.commit("vectors", model)
        feed.shard(0)
        p1 = _start(args, hub, tmp_path / "follow-1.log")
        try:
            for i in range(1, 6):  # tiny-a's shards, while the follower starts
                time.sleep(0.3)
                feed.shard(i)
            wait_for(lambda: len(_data(hub, "rollouts/")) >= 3, 120, "rollouts files 0-2")
            at_kill = hub.files(REPO)
            # Then kill it between uploading and committing: the next files (the features
            # of shards 0-6, final once tiny-b's shard 6 is in) reach the Hub's LFS store,
            # their commit never lands.
            hub.commits_open.clear()
            feed.shard(6)
            wait_for(lambda: hub.held, 120, "a held commit")
        finally:
            kill_group(p1)
            hub.commits_open.set()
        assert p1.returncode == -9
        # Shards 0-5 labelled: rollouts spans [0,2) [2,4) [4,6) final, and the vectors. No
        # features (tiny-b had no shard: their schema was not final), no card.
        assert set(at_kill) == {f"rollouts/train-0000{i}.parquet" for i in range(3)} | set(
            VECTORS), sorted(at_kill)
        assert hub.files(REPO) == at_kill and len(hub.objects) == 3 + 4 + 7
        for i in range(7, 9):
            feed.shard(i)
        p2 = _start(args, hub, tmp_path / "follow-2.log")
        try:
            # tiny-b has shards now: the features of shards 0-8 go up while 9-11 build
            wait_for(lambda: len(_data(hub, "features/")) >= 9, 120, "features files 0-8")
            assert "README.md" not in hub.files(REPO)
            for i in range(9, N_SHARDS):
                feed.shard(i)
                time.sleep(0.3)
            out, _ = p2.communicate(timeout=120)
        finally:
            kill_group(p2)
        assert p2.returncode == 0, (tmp_path / "follow-2.log").read_text()[-3000:]
        res = json.loads(out)
        assert res["complete"] is True
        # What the first follower committed was recognised by checksum, not sent again;
        # what it uploaded but never committed was committed without a second upload.
        assert set(res["present"]) == set(at_kill)
        assert not set(res["present"]) & set(res["uploaded"])

        followed = hub.files(REPO)
        uploads, writes = hub.uploads(REPO), hub.writes[REPO]
        commits = hub.commits[REPO]
    assert {p: n for p, n in uploads.items() if n != 1} == {}
    assert {p: n for p, n in writes.items() if n != 1} == {}
    assert set(res["present"]) | set(res["uploaded"]) == set(followed)
    # Data as planned: spans of 2 shards (rollouts) and 1 (features), the card and
    # build.json in the last commit, never a dot file.
    assert _data_paths(followed, "rollouts/") == [f"rollouts/train-{i:05d}.parquet"
                                                  for i in range(6)]
    assert _data_paths(followed, "features/") == [f"features/train-{i:05d}.parquet"
                                                  for i in range(N_SHARDS)]
    assert {"README.md", "build.json"} <= set(commits[-1]["paths"])
    assert len(commits) >= 3 and not any(p.startswith(".") for p in followed)
    rows = pa.concat_tables([pq.read_table(io.BytesIO(followed[p]))
                             for p in _data_paths(followed, "rollouts/")])
    want = [it["id"] for it in _items()]
    assert rows.column("id").to_pylist() == want
    assert rows.column("label").to_pylist() == [{1.0: 0, 3.0: 1, 6.0: 2}[a]
                                               for a in rows.column("alpha").to_pylist()]
    feats = pq.read_table(io.BytesIO(followed["features/train-00000.parquet"]))
    assert "dn_t0_k1" in feats.column_names  # tiny-b's column, in a tiny-a file: the union

    # A plain publish of the finished run, into a second Hub: the same files, byte for byte.
    with accepting_hub() as plain_hub:
        pub.publish(str(run), REPO,
                    opts=pub.PublishOptions(folder=str(tmp_path / "plain"),
                                            target_file_bytes=TARGET),
                    upload=functools.partial(pub.hub_upload, endpoint=plain_hub.endpoint))
        plain = plain_hub.files(REPO)
    assert sorted(plain) == sorted(followed)
    assert {p for p in plain if plain[p] != followed[p]} == set()


def _data_paths(files: dict[str, bytes], prefix: str) -> list[str]:
    return sorted(p for p in files if p.startswith(prefix))


def test_follow_dry_run_lists_ready_files_and_uploads_nothing(tmp_path, monkeypatch):
    from .pipeline_support import cli

    src = _source_run(tmp_path / "source")
    feed = Feeder(src, tmp_path / "run")
    for model in MODELS:
        feed.commit("vectors", model)
    for i in range(7):
        feed.shard(i)
    feed.commit("features", "shard-000007")  # built, not yet labelled
    feed.commit("rollouts", "shard-000007")
    with accepting_hub() as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1"}
        r = cli("publish", str(tmp_path / "run"), "--repo", REPO, "--follow", "--dry-run",
                "--target-file-bytes", str(TARGET), "--folder", str(tmp_path / "ds"),
                timeout=120, **env)
        log = list(hub.log)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    listed = [f["path"] for f in out["files"]]
    # rollouts: spans [0,2) [2,4) [4,6) labelled, [6,8) waits for shard 7's label;
    # features: final since shard 6 is tiny-b's, one file per committed shard 0-7.
    assert listed == sorted(
        [f"rollouts/train-0000{i}.parquet" for i in range(3)]
        + [f"features/train-0000{i}.parquet" for i in range(8)] + VECTORS)
    assert out["complete"] is False and out["uploaded"] == [] and out["commits"] == 0
    assert "dry run: nothing uploaded" in r.stderr and "no card or build.json" in r.stderr
    assert log == []  # no token asked for, nothing sent
    on_disk = sorted(p.relative_to(tmp_path / "ds").as_posix()
                     for p in (tmp_path / "ds").rglob("*") if p.is_file()
                     and not p.name.startswith("."))
    assert on_disk == listed


def test_follow_function_stops_when_asked_and_keeps_what_is_ready(tmp_path, hub_env, caplog):
    """`follow(..., stop=event)` on a thread, as `asteer-build run --publish` will run it:
    setting the event ends it after one last pass; the run is left incomplete. A failed
    commit (a Hub outage) is retried a poll later, without uploading its files again."""
    import threading

    src = _source_run(tmp_path / "source")
    feed = Feeder(src, tmp_path / "run")
    for model in MODELS:
        feed.commit("vectors", model)
    stop = threading.Event()
    with accepting_hub() as hub:
        hub.fail_commits = 1
        out: dict = {}

        def target() -> None:
            out["res"] = pub.follow(
                str(tmp_path / "run"), REPO, stop=stop, poll_s=0.1, commit_every_s=0,
                endpoint=hub.endpoint,
                opts=pub.PublishOptions(folder=str(tmp_path / "ds"), target_file_bytes=TARGET))

        t = threading.Thread(target=target)
        t.start()
        for i in range(4):
            feed.shard(i)
        wait_for(lambda: hub.fail_commits <= 0, 60, "the failed commit")
        stop.set()
        t.join(60)
        assert not t.is_alive()
        files = hub.files(REPO)
        uploads, commits = hub.uploads(REPO), hub.commits[REPO]
    res = out["res"]
    assert "upload to asteer-org/follow-test failed (HfHubHTTPError" in caplog.text
    assert set(uploads.values()) == {1} and sum(len(c["paths"]) for c in commits) == len(files)
    assert res.complete is False and "README.md" not in files
    assert set(files) == {"rollouts/train-00000.parquet", "rollouts/train-00001.parquet",
                          *VECTORS}
    assert sorted(res.uploaded + res.present) == sorted(files)


@pytest.mark.slow
def test_run_with_publish_uploads_the_dataset_as_it_builds(tmp_path, hub_env,
                                                           pipeline_reference):
    """`asteer-build run --publish REPO`: the follower beside a real build; the repo ends
    complete, with the files a plain publish of the finished run folder writes, each
    uploaded once."""
    from .pipeline_support import (
        INPROCESS_ENGINE,
        cli,
        tiny_config,
        vectors_only,
        write_config,
    )

    run = tmp_path / "run"
    vectors_only(pipeline_reference, run)
    path = write_config(tmp_path / "run.yaml", tiny_config(run))
    with accepting_hub() as hub:
        r = cli("run", "--config", str(path), "--no-progress", "--json", "--publish", REPO,
                timeout=400, **INPROCESS_ENGINE, **_cli_env(hub))
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads(r.stdout)
        assert s["publish"]["complete"] is True, s["publish"]
        followed = hub.files(REPO)
        assert set(hub.uploads(REPO).values()) <= {1}
    assert {"README.md", "build.json"} <= set(followed)
    with accepting_hub() as plain_hub:
        pub.publish(str(run), REPO, opts=pub.PublishOptions(folder=str(tmp_path / "plain")),
                    upload=functools.partial(pub.hub_upload, endpoint=plain_hub.endpoint))
        plain = plain_hub.files(REPO)
    data = [p for p in plain if p.endswith(".parquet")]
    assert data and {p: plain[p] for p in data} == {p: followed[p] for p in data}
