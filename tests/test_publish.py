"""Publishing a run folder as a Hugging Face dataset, and loading it back.

The run folder is real pipeline output: the vectors stage runs on the tiny world model,
rollout shards are written by the pipeline's own `write_shard` (with synthetic responses,
features and float16 activations instead of an engine, which would take minutes), and
the judge stage labels them with the rules judge. Everything after that is the code under
test, read back with real `datasets`, Parquet and `huggingface_hub` card parsing; the only
network step is pointed at a loopback server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asteer_build.io import publish as pub
from asteer_build.io.publish import PublishError, PublishOptions

from .hub_support import loopback_hub

# The 300 s bound is each test's own body. The module fixtures below (a real vectors stage:
# torch + transformers imports, the HF reference, the judge stage) are built once, inside
# the setup of whichever selected test first asks for them; a whole-item timer billed that
# one-off build to that test, and on a loaded 2-core machine the build alone took 100-300 s,
# so the first test failed with "Timeout (>300.0s)" in setup. The fixtures get their own,
# separate bound (`_fixture_deadline`).
pytestmark = pytest.mark.timeout(300, func_only=True)
FIXTURE_TIMEOUT_S = 900

ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_FAKEasteerTOKEN0123456789abcdefXYZ"
STEPS, OFFSETS, HIDDEN = (0, 1), (0, 1), 16
# Small targets so a tiny run still spreads over several files and row groups: a file is a
# fixed span of planned shards sized from the config's estimate of one (`boundaries`): 3
# rollouts shards (8 rows x (256 + 2 x 16 tokens) B), 1 features, 2 activations per file.
SMALL = {"target_file_bytes": 8_000, "row_group_bytes": 4_000}


def _config(run: Path) -> dict:
    return {
        "name": "publish-test",
        "models": [{"name": "tiny", "path": "tinyworld"}],
        "methods": ["diffmean", "probe"],
        "layer": 2,
        "concepts": "builtin:tinyworld",
        "prompts": [
            {"prompt_id": "p0", "prompt": "explain the ocean to a friend"},
            {"prompt_id": "p1", "prompt": "list three reasons to travel"},
        ],
        "alphas": {"diffmean": [1.0, 3.0, 6.0], "probe": [1.0, 3.0]},
        "sampling": {"temperature": 0.0, "max_tokens": 16},
        "judge": {"kind": "rules"},
        "shard_size": 8,
        "vectors": {"bank_size": 8},
        "capture": {"steps": list(STEPS), "offsets": list(OFFSETS)},
        "output": str(run),
    }


def _response(i: int, concept: str, alpha: float) -> str:
    if alpha >= 6.0:
        return f"{concept} " * 12
    if alpha >= 3.0 or i % 3 == 0:
        return f"the city is a good place and the {concept} helps people learn"
    return "the city is a good place for people to learn and work"


@contextlib.contextmanager
def _fixture_deadline(what: str, seconds: float = FIXTURE_TIMEOUT_S):
    """Fail a module fixture's build that runs past `seconds` (pytest-timeout, with
    func_only, leaves setup unbounded). SIGALRM, like pytest-timeout's signal method,
    which is not armed during setup."""

    def fire(signum, frame):
        pytest.fail(f"{what}: not built within {seconds:.0f} s", pytrace=True)

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """vectors (real) -> rollouts + features + activations (pipeline writer) -> judge."""
    with _fixture_deadline("run_dir"):
        return _build_run(tmp_path_factory)


def _build_run(tmp_path_factory) -> Path:
    from asteer_build.engine.features import feature_names
    from asteer_build.pipeline.build import RunOptions, prepare_run, run_build
    from asteer_build.pipeline.config import parse_config
    from asteer_build.pipeline.rollouts import RolloutResult
    from asteer_build.pipeline.work import write_shard
    from asteer_build.vectors import load_vectors

    run = tmp_path_factory.mktemp("publish") / "run"
    cfg = parse_config(_config(run))
    run_build(cfg, RunOptions(stages=("vectors",), progress=False))
    r = prepare_run(cfg, RunOptions(stages=("rollouts",), progress=False))
    files = {
        n: r.store.read_bytes(f"vectors/tiny/{n}")
        for n in ("index.json", "diffmean.safetensors", "probe.safetensors")
    }
    _, norms = load_vectors(files)
    names = feature_names(STEPS, OFFSETS)
    rng = np.random.default_rng(0)
    for shard in r.plan.shards:
        results = []
        for i, it in enumerate(shard.items):
            text = _response(shard.index * 100 + i, it.concept, it.alpha)
            acts = {
                "steered": rng.standard_normal((2, 2, HIDDEN)).astype(np.float16),
                "replay": rng.standard_normal((2, 2, HIDDEN)).astype(np.float16),
                "steered_pre": rng.standard_normal((2, 1, HIDDEN)).astype(np.float16),
            }
            feats = dict(zip(names, rng.standard_normal(len(names)).tolist(), strict=True))
            feats["alpha"], feats["vector_norm"] = it.alpha, norms[f"{it.method}/{it.concept_id}"]
            results.append(
                RolloutResult(it.id, text, list(range(len(text.split()))), "length", feats, acts)
            )
        r.manifest.record(write_shard(r.store, shard, results, norms), executor="test")
    run_build(cfg, RunOptions(stages=("judge",), progress=False))
    return run


@pytest.fixture(scope="module")
def published(run_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pub") / "ds"
    with _fixture_deadline("published"):
        pub.assemble(
            str(run_dir),
            str(folder),
            repo="asteer-org/asteer-test",
            opts=PublishOptions(configs=pub.CONFIGS, **SMALL),
        )
    return folder


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _card(folder: Path):
    from huggingface_hub import DatasetCard

    return DatasetCard.load(folder / "README.md")


def _run_rows(run: Path, stage: str) -> pa.Table:
    from asteer_build.pipeline.shards import read_stage

    return read_stage(str(run), stage)


# ------------------------------------------------------------------------ loading back


def test_every_config_loads_with_declared_features(published, run_dir):
    import datasets

    card = _card(published)
    info = {d["config_name"]: d for d in card.data.to_dict()["dataset_info"]}
    names = [c["config_name"] for c in card.data.to_dict()["configs"]]
    assert names == ["rollouts", "features", "activations", "concepts", "prompts"]
    for name in names:
        ds = datasets.load_dataset(str(published), name, split="train")
        declared = datasets.Features._from_yaml_list(info[name]["features"])
        assert ds.features == declared, name
        assert ds.num_rows == info[name]["splits"][0]["num_examples"], name
    # Default config is rollouts; labels are int8 with the judge columns.
    ds = datasets.load_dataset(str(published), split="train")
    assert "response" in ds.column_names and ds.features["label"].dtype == "int8"


def test_activations_come_back_as_numpy_arrays_of_the_declared_shape(published, run_dir):
    import datasets

    ds = datasets.load_dataset(str(published), "activations", split="train")
    assert ds.features["steered"] == datasets.Array3D((2, 2, HIDDEN), "float16")
    assert ds.features["steered_pre"] == datasets.Array3D((2, 1, HIDDEN), "float16")
    arr = ds.with_format("numpy", dtype=np.float16)
    src = _run_rows(run_dir, "activations")
    want = {i: k for k, i in enumerate(src.column("id").to_pylist())}
    for row in (0, ds.num_rows // 2, ds.num_rows - 1):
        got = arr[row]
        assert isinstance(got["steered"], np.ndarray)
        assert got["steered"].shape == (2, 2, HIDDEN) and got["steered"].dtype == np.float16
        assert got["steered_pre"].shape == (2, 1, HIDDEN)
        k = want[got["id"]]
        ref = np.asarray(src.column("replay")[k].as_py(), dtype=np.float16)
        np.testing.assert_array_equal(got["replay"], ref)
    batch = arr[:5]["steered"]
    assert batch.shape == (5, 2, 2, HIDDEN)


def test_rows_match_the_run_and_keep_plan_order(published, run_dir):
    got = pq.read_table(sorted((published / "rollouts").glob("*.parquet")))
    want = _run_rows(run_dir, "labelled")
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    assert got.column("label").to_pylist() == want.column("label").to_pylist()
    assert len(list((published / "rollouts").glob("*.parquet"))) > 1, "expected several files"
    acts = sorted((published / "activations").rglob("*.parquet"))
    assert max(pq.ParquetFile(f).metadata.num_row_groups for f in acts) > 1
    feats = pq.read_table(sorted((published / "features").glob("*.parquet")))
    assert feats.column("id").to_pylist() == want.column("id").to_pylist()
    assert feats.schema.field("dn_t0_k0").type == pa.float32()
    # Vectors are the stage's files, byte for byte.
    for name in ("index.json", "diffmean.safetensors", "probe.safetensors"):
        assert (published / "vectors/tiny" / name).read_bytes() == (
            run_dir / "vectors/tiny" / name
        ).read_bytes()


def test_card_yaml_parses_and_its_counts_equal_the_data(published, run_dir):
    card = _card(published)
    d = card.data.to_dict()
    assert d["license"] == "apache-2.0"
    assert d["task_categories"] and d["size_categories"] == ["n<1K"]
    assert [c for c in d["configs"] if c.get("default")][0]["config_name"] == "rollouts"
    for info in d["dataset_info"]:
        cfg = next(c for c in d["configs"] if c["config_name"] == info["config_name"])
        files = [p for pat in cfg["data_files"] for p in published.glob(pat["path"])]
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        assert info["splits"][0]["num_examples"] == rows, info["config_name"]
        assert info["download_size"] == sum(f.stat().st_size for f in files)
    labelled = _run_rows(run_dir, "labelled")
    assert d["dataset_info"][0]["splits"][0]["num_examples"] == labelled.num_rows
    # The label distribution table: one line per (model, method), numbers from the data.
    text = card.text
    for method in ("diffmean", "probe"):
        t = labelled.filter(pa.compute.equal(labelled["method"], method))
        labels = t.column("label").to_pylist()
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| tiny | {method} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert int(cells[2]) == t.num_rows
        assert [int(cells[i]) for i in (4, 5, 6)] == [labels.count(k) for k in (0, 1, 2)]
    assert len(set(labelled.column("label").to_pylist())) >= 2, "fixture should vary labels"
    # Feature families from asteer_build.engine.features, the rubric version, the build config.
    for needle in (
        "`dnr` = dn(t) / dn(t0)",
        "sa",
        "rules-v1",
        "config_hash"[:6],
        "under-steer",
        'load_dataset("asteer-org/asteer-test", "features"',
    ):
        assert needle in text, needle
    m = json.loads((published / "build.json").read_text())
    assert m["config_hash"] in text and m["config"]["name"] == "publish-test"
    # The partition as the authors draw it, said in build.json and in the card's words.
    assert m["partition"]["scheme"] == "stratified" and m["partition"]["seed"] == 42
    assert m["partition"]["level_order"] == ["low", "mid", "high"]
    assert m["partition"]["prompt_split"] == {"test_size": 0.3, "val_size": 0.2, "seed": 42}
    assert "`numpy.random.default_rng(42)`; per `concept_level` in the order low, mid, high" \
        in text
    assert (m["sampling"]["tiny"]["top_k"], m["sampling"]["tiny"]["top_p"]) == (50, 1.0)
    assert {e["judge_rubric"] for e in m["stages"]["labelled"].values()} == {"rules-v1"}
    assert set(m["stages"]) >= {"rollouts", "labelled", "features", "activations", "vectors"}
    assert {f["path"] for f in m["files"]} >= {
        "concepts/train-00000.parquet",
        "vectors/tiny/index.json",
    }


def test_concept_partition_matches_train_default_split(published):
    pd = pytest.importorskip("pandas")
    from train.splits import partition_concepts

    concepts = pq.read_table(published / "concepts/train-00000.parquet").to_pandas()
    _, unseen, _ = partition_concepts(concepts.drop(columns="partition"))
    assert sorted(concepts.loc[concepts.partition == "ood", "concept_id"]) == unseen
    # Paper scale: 50 concepts per level, 10 unseen each.
    big = pd.DataFrame(
        {
            "concept_id": [f"c{i:03d}" for i in range(150)],
            "concept_level": ["low", "mid", "high"] * 50,
        }
    )
    _, unseen, _ = partition_concepts(big)
    assert (
        pub.partition_concepts(dict(zip(big.concept_id, big.concept_level, strict=True))) == unseen
    )
    assert len(unseen) == 30


def test_train_package_loads_the_published_folder(published):
    pytest.importorskip("pandas")
    from train.data import load_dataset
    from train.splits import make_splits

    data = load_dataset(published, model="tiny", method="diffmean")
    assert data.report["rows_used"] > 0 and "dn_t0_k0" in data.feature_names
    assert "partition" in data.concepts.columns
    splits = make_splits(data.frame, data.concepts, use_partition_column=True)
    assert splits.unseen == sorted(
        data.concepts.loc[data.concepts.partition == "ood", "concept_id"]
    )


# ------------------------------------------------------------ idempotence and resumption


def test_publishing_twice_is_idempotent(published, run_dir, tmp_path):
    before = _hashes(published)
    res = pub.assemble(
        str(run_dir),
        str(published),
        repo="asteer-org/asteer-test",
        opts=PublishOptions(configs=pub.CONFIGS, **SMALL),
    )
    assert res.written == [] and _hashes(published) == before
    # A fresh folder gets the same bytes: determinism, not just skipping.
    fresh = tmp_path / "again"
    pub.assemble(
        str(run_dir),
        str(fresh),
        repo="asteer-org/asteer-test",
        opts=PublishOptions(configs=pub.CONFIGS, **SMALL),
    )
    assert _hashes(fresh) == before


def test_interrupted_publish_resumes_and_completes(published, run_dir, tmp_path):
    folder = tmp_path / "ds"
    done: list[str] = []

    class Boom(RuntimeError):
        pass

    def hook(path: str) -> None:
        done.append(path)
        if len(done) == 4:
            raise Boom(path)

    with pytest.raises(Boom):
        pub.assemble(
            str(run_dir),
            str(folder),
            repo="asteer-org/asteer-test",
            opts=PublishOptions(configs=pub.CONFIGS, on_file=hook, **SMALL),
        )
    assert not (folder / "README.md").exists()
    # A kill mid-file leaves a temp file; a torn final file must be rewritten, not kept.
    (folder / "rollouts" / ".train-00009.parquet.tmp-deadbeef").write_bytes(b"partial")
    torn = folder / done[1]
    torn.write_bytes(torn.read_bytes()[:100])
    res = pub.assemble(
        str(run_dir),
        str(folder),
        repo="asteer-org/asteer-test",
        opts=PublishOptions(configs=pub.CONFIGS, **SMALL),
    )
    assert set(res.skipped) == {done[0], done[2], done[3]}
    assert done[1] in res.written
    assert _hashes(folder) == _hashes(published)
    assert not list(folder.rglob(".*.tmp-*"))


def test_killed_publish_subprocess_resumes(run_dir, published, tmp_path):
    """SIGKILL a real `asteer-build publish` mid-way, then rerun it."""
    folder = tmp_path / "killed"
    code = (
        "import os, signal, sys\n"
        "from asteer_build.io import publish as pub\n"
        "n = []\n"
        "def hook(p):\n"
        "    n.append(p)\n"
        "    if len(n) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"pub.assemble({str(run_dir)!r}, {str(folder)!r}, repo='asteer-org/asteer-test',"
        f" opts=pub.PublishOptions(configs=pub.CONFIGS, on_file=hook, **{SMALL!r}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert p.returncode == -9
    res = pub.assemble(
        str(run_dir),
        str(folder),
        repo="asteer-org/asteer-test",
        opts=PublishOptions(configs=pub.CONFIGS, **SMALL),
    )
    assert len(res.skipped) == 3
    assert _hashes(folder) == _hashes(published)


def test_dropping_a_config_removes_its_files(run_dir, tmp_path):
    folder = tmp_path / "ds"
    pub.assemble(str(run_dir), str(folder), opts=PublishOptions(configs=pub.CONFIGS, **SMALL))
    res = pub.assemble(str(run_dir), str(folder), opts=PublishOptions(**SMALL))
    assert not (folder / "activations").exists()
    assert any(r.startswith("activations/") for r in res.removed)
    names = [c["config_name"] for c in _card(folder).data.to_dict()["configs"]]
    assert names == ["rollouts", "features", "concepts", "prompts"]


# ------------------------------------------------------------------ token and upload


def test_upload_is_one_call_with_the_right_arguments(published, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    with loopback_hub() as (endpoint, log), pytest.raises(
            (HfHubHTTPError, OSError, ValueError)):
        pub.hub_upload(str(published), "asteer-org/asteer-test", private=True,
                       token=FAKE_TOKEN, endpoint=endpoint)
    create = log[0]
    assert (create["method"], create["path"]) == ("POST", "/api/repos/create")
    assert create["auth"] == f"Bearer {FAKE_TOKEN}"
    body = json.loads(create["body"])
    assert body["name"] == "asteer-test" and body["organization"] == "asteer-org"
    assert body["type"] == "dataset"
    assert body.get("private") is True or body.get("visibility") == "private"
    # Then the folder upload itself, against the dataset repo, authenticated.
    later = log[1:]
    assert later and all(r["auth"] == f"Bearer {FAKE_TOKEN}" for r in later)
    assert any("/datasets/asteer-org/asteer-test" in r["path"] for r in later), [
        (r["method"], r["path"]) for r in later
    ]
    # The upload offers every file of the folder, and neither the state file nor temps.
    offered = {
        f["path"]
        for r in later
        if r["path"].endswith("/preupload/main")
        for f in json.loads(r["body"])["files"]
    }
    assert offered == set(_hashes(published))
    assert (published / pub.STATE_FILE).exists()


def test_token_never_reaches_folder_card_logs_or_manifest(run_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    folder = tmp_path / "ds"
    calls = []

    def fake_upload(folder_, repo, *, private, token):
        calls.append((folder_, repo, private, token))
        return "url"

    caplog.set_level(logging.DEBUG)
    res = pub.publish(
        str(run_dir),
        "asteer-org/asteer-test",
        private=True,
        upload=fake_upload,
        opts=PublishOptions(folder=str(folder), configs=pub.CONFIGS, **SMALL),
    )
    assert res.uploaded
    assert calls == [(str(folder), "asteer-org/asteer-test", True, FAKE_TOKEN)]
    assert FAKE_TOKEN not in caplog.text
    assert FAKE_TOKEN not in json.dumps(res.as_dict())
    for p in folder.rglob("*"):
        if p.is_file():
            assert FAKE_TOKEN.encode() not in p.read_bytes(), p
    # The CLI, dry run and real, logs and prints nothing of it either.
    env = {
        **os.environ,
        "HF_TOKEN": FAKE_TOKEN,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    cli = [
        str(Path(sys.executable).parent / "asteer-build"),
        "--log-level",
        "DEBUG",
        "publish",
        str(run_dir),
        "--repo",
        "asteer-org/asteer-test",
        "--folder",
        str(folder),
        "--configs",
        "all",
    ]
    r = subprocess.run(
        [*cli, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["uploaded"] is False and out["files"]
    assert "README.md" in r.stderr and "build.json" in r.stderr
    assert FAKE_TOKEN not in r.stdout + r.stderr
    # Without a token the real publish stops before assembling anything.
    env_no = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    env_no["HF_HOME"] = str(tmp_path / "hf-home")
    r = subprocess.run(
        cli[:-2] + ["--folder", str(tmp_path / "none")],
        cwd=ROOT,
        env=env_no,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "HF_TOKEN" in r.stderr
    assert not (tmp_path / "none").exists()


def test_a_folder_holding_the_token_is_refused(published, tmp_path):
    import shutil

    folder = tmp_path / "leaky"
    shutil.copytree(published, folder)
    (folder / "notes.txt").write_text(f"token={FAKE_TOKEN}\n")
    with pytest.raises(PublishError, match="contains the Hub token"):
        pub.check_no_secret(folder, FAKE_TOKEN)
    pub.check_no_secret(published, FAKE_TOKEN)


def test_missing_stage_is_skipped_by_default_and_an_error_when_asked_for(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    m = json.loads((run / "build.json").read_text())
    m["stages"]["features"], m["stages"]["activations"] = {}, {}  # a run without capture
    (run / "build.json").write_text(json.dumps(m))
    res = pub.assemble(str(run), str(tmp_path / "ds"), opts=PublishOptions(**SMALL))
    assert res.counts["rollouts"] == 120 and "features" not in res.counts
    with pytest.raises(PublishError, match="no committed features"):
        pub.assemble(
            str(run),
            str(tmp_path / "ds2"),
            opts=PublishOptions(configs=("rollouts", "features"), explicit=True),
        )


def test_bad_arguments_fail_before_any_work(run_dir, tmp_path):
    with pytest.raises(PublishError, match="ORG/NAME"):
        pub.publish(str(run_dir), "not a repo", dry_run=True)
    with pytest.raises(PublishError, match="unknown config"):
        pub.assemble(
            str(run_dir), str(tmp_path / "x"), opts=PublishOptions(configs=("rollouts", "nope"))
        )
    with pytest.raises(FileNotFoundError):
        pub.assemble(str(tmp_path / "no-run"), str(tmp_path / "y"))
    assert re.fullmatch(r"[\w/.-]+", pub.default_folder("a/b", str(run_dir)))


def test_resolve_dataset_takes_a_folder_or_a_hub_id(published, monkeypatch):
    assert pub.resolve_dataset(str(published)) == str(published)
    with pytest.raises(PublishError, match="neither a folder"):
        pub.resolve_dataset("./no/such/folder")
    seen = {}

    def fake_download(**kw):
        seen.update(kw)
        return str(published)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert pub.resolve_dataset("asteer-org/asteer-test") == str(published)
    assert seen == {"repo_id": "asteer-org/asteer-test", "repo_type": "dataset"}


def _nested(arr: np.ndarray) -> pa.Array:
    a = pa.array(arr.reshape(-1))
    for dim in reversed(arr.shape[1:]):
        a = pa.FixedSizeListArray.from_arrays(a, int(dim))
    return a


def test_models_with_different_hidden_sizes_get_one_activations_config_each(tmp_path):
    """Paper scale mixes hidden sizes (2048, 2304, 3072): one Array3D cannot declare
    them all, so each model gets `activations-<model>`; features are the union."""
    import datasets

    from asteer_build.pipeline.shards import Manifest, open_store

    store = open_store(str(tmp_path / "run"))
    store.makedirs("")
    m = Manifest.create(
        store,
        config={"name": "two", "judge": {"kind": "rules"}},
        config_hash="h",
        plan_hash="p",
        n_items=8,
        n_shards=2,
    )
    files = []
    for i, (model, hidden, feats) in enumerate(
        (("a", 4, ["dn_t0_k0"]), ("b", 6, ["dn_t0_k0", "dn_t0_k5"]))
    ):
        ids = [f"{model}{j}" for j in range(4)]
        n = len(ids)
        roll = {f.name: pa.nulls(n, f.type) for f in pub.ROLLOUTS_SCHEMA}
        roll.update(
            id=pa.array(ids),
            model=pa.array([model] * n),
            method=pa.array(["probe"] * n),
            concept_id=pa.array(["c0", "c1", "c2", "c3"]),
            concept=pa.array(["x"] * n),
            concept_level=pa.array(["low"] * n),
            prompt_id=pa.array(["p"] * n),
            prompt=pa.array(["q"] * n),
            alpha=pa.array([1.0] * n),
            judge_status=pa.array(["pending"] * n),
        )
        name = f"shard-{i:06d}"
        files.append(store.write_table("rollouts", name, pa.table(roll)))
        ft = {"id": ids, "model": [model] * n}
        ft.update({c: pa.array(np.ones(n, np.float32)) for c in feats})
        files.append(store.write_table("features", name, pa.table(ft)))
        act = np.arange(n * 2 * 3 * hidden, dtype=np.float16).reshape(n, 2, 3, hidden)
        files.append(
            store.write_table(
                "activations",
                name,
                pa.table(
                    {
                        "id": ids,
                        "steered": _nested(act),
                        "replay": _nested(act),
                        "steered_pre": _nested(act[:, :, :1]),
                    }
                ),
            )
        )
    m.record(files)
    folder = tmp_path / "ds"
    pub.assemble(store.uri, str(folder), opts=PublishOptions(configs=pub.CONFIGS))
    names = [c["config_name"] for c in _card(folder).data.to_dict()["configs"]]
    assert names == [
        "rollouts",
        "features",
        "activations-a",
        "activations-b",
        "concepts",
        "prompts",
    ]
    for model, hidden in (("a", 4), ("b", 6)):
        ds = datasets.load_dataset(str(folder), f"activations-{model}", split="train")
        assert ds.num_rows == 4
        row = ds.with_format("numpy", dtype=np.float16)[1]
        assert row["id"] == f"{model}1" and row["steered"].shape == (2, 3, hidden)
        assert row["steered_pre"].shape == (2, 1, hidden)
    f = datasets.load_dataset(str(folder), "features", split="train").to_pandas()
    assert f.loc[f.model == "a", "dn_t0_k5"].isna().all()
    assert (f.loc[f.model == "b", "dn_t0_k5"] == 1).all()
