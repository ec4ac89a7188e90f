"""Shared fixtures: the tiny world model and helpers to start engines on it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

from . import xdist_units

#: what a caller may export that would point the suite's Hub, object-store or Ray steps
#: somewhere else (or nowhere): HF_HUB_OFFLINE=1, usual on air-gapped clusters, stops the
#: loopback Hub upload before it is sent; a user's token or endpoint would go with it;
#: RAY_ADDRESS would attach a test's driver to the caller's cluster. Dropped at import,
#: before huggingface_hub or Ray read them, whatever was exported.
CALLER_VARIABLES = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME",
    "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_DISABLE_XET",
)
#: every AWS_* and RAY_* variable goes: credentials, profile, endpoint, region, a cluster
#: address or token, Ray's internal settings
CALLER_PREFIXES = ("AWS_", "RAY_")


def _pin_environment() -> None:
    for name in list(os.environ):
        if name in CALLER_VARIABLES or name.startswith(CALLER_PREFIXES):
            del os.environ[name]
    # A fresh Hugging Face home: no token file or hub cache of the caller's is read.
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="asteer-test-hf-home-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # Under xdist (`make test` runs two workers) each worker's engines get a core of their
    # own: vLLM's CPU backend binds every engine's one OpenMP thread to the first core
    # (VLLM_CPU_OMP_THREADS_BIND=auto), so two workers' engines would share it.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cpus = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(cpus[int(worker[2:]) % len(cpus)])


_pin_environment()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `datasets` caches a local folder's Arrow files under a key that ignores the folder's
# path and times, so a "load it back" test could read another run's cache: one fresh
# cache per test session.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="asteer-test-hf-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

#: fixtures that start a vLLM engine, `vllm serve`, a Ray head, a build or the demo: a
#: test that uses one, directly or through another fixture, is marked `slow` (`make
#: test-fast` leaves it out). Tests that start an engine in their own body carry the mark.
SLOW_FIXTURES = frozenset({
    "engines", "engine", "arch", "judge_server", "server", "ray_head", "pipeline_reference",
    "reference", "run_dir", "demo",
})


@pytest.hookimpl(tryfirst=True)  # the units are read off the `slow` marks set here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    xdist_units.worker_collected(config, items)


def pytest_configure(config: pytest.Config) -> None:
    xdist_units.configure_controller(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    xdist_units.configure_node(node)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    return xdist_units.make_scheduler(config, log)


PROMPTS = [
    "explain the ocean to a friend",
    "write a short story about a robot",
    "why is coffee good for people",
    "list three reasons to travel",
    "how can we learn music in school",
    "what is a good plan for the day",
    "write a poem about winter",
    "explain money",
]


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The product's tiny world (steerable; greedy decoding repeats one token)."""
    from asteer_build.inputs.tinyworld import build_tiny_model

    return str(build_tiny_model())


@pytest.fixture(scope="session")
def varied_model() -> str:
    """A tiny world with varied greedy text, for engine equalities that must not be
    vacuous (see tinyworld.VARIED)."""
    from asteer_build.inputs.tinyworld import VARIED, build_tiny_model

    return str(build_tiny_model(VARIED))


def chat_ids(model_path: str, questions: list[str]) -> list[list[int]]:
    """User turns rendered as the build renders them (the default prompt format)."""
    from asteer_build.core.prompts import prompt_ids

    return [prompt_ids(model_path, q) for q in questions]


def engine_args(**over):
    args = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=64,
        seed=0,
        kv_cache_memory_bytes=512 << 20,
        block_size=32,
    )
    args.update(over)
    return args


class EngineRegistry:
    """Steered engines shared by the session's test modules, keyed by (model, engine
    args, in-process or not): modules that only need an engine with the same args get
    the same one. At most `cap` stay alive (~2 GB each); the least recently used is shut
    down to make room.

    `inprocess=True` runs the engine core in the test process (uni executor,
    VLLM_ENABLE_V1_MULTIPROCESSING=0): a start then costs a few seconds instead of the
    25-60 s of a new engine-core process that imports vLLM again. vLLM keeps one
    distributed state per process, so one in-process engine lives at a time and its
    shutdown clears that state (`cleanup_dist_env_and_memory`, as vLLM's own tests do)
    for the next. Modules that test the multiprocess engine itself, compilation, TP or
    AsyncLLM start their own."""

    def __init__(self, cap: int = 2) -> None:
        self.cap = cap
        self._live: dict[tuple, object] = {}
        self.started = 0

    def get(self, model: str, *, inprocess: bool = False, **over):
        from asteer_build.engine import SteeredEngine

        if inprocess:
            over.setdefault("distributed_executor_backend", "uni")
        args = engine_args(**over)
        key = (model, inprocess, tuple(sorted((k, repr(v)) for k, v in args.items())))
        eng = self._live.pop(key, None)
        if eng is None:
            for k in [k for k in self._live if inprocess and k[1]]:
                self._shutdown(k)
            while len(self._live) >= self.cap:
                self._shutdown(next(iter(self._live)))
            mp = pytest.MonkeyPatch()
            if inprocess:
                mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # vLLM's CPU worker binds its OpenMP threads, this (main) thread among them,
            # to cores; processes the tests start later would inherit that binding
            cpus = os.sched_getaffinity(0)
            try:
                eng = SteeredEngine(model, **args)
            finally:
                mp.undo()
                os.sched_setaffinity(0, cpus)
                if inprocess:
                    # an engine core caches vLLM's environment variables once it is up;
                    # in this process that would freeze VLLM_ENABLE_V1_MULTIPROCESSING=0
                    # and every later test's settings (TP thread binding, cache root)
                    from vllm import envs

                    envs.disable_envs_cache()
            self.started += 1
        self._live[key] = eng  # last = most recently used
        return eng

    def _shutdown(self, key: tuple) -> None:
        self._live.pop(key).shutdown()
        if key[1]:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()

    def close(self) -> None:
        while self._live:
            self._shutdown(next(iter(self._live)))


@pytest.fixture(scope="session")
def engines():
    """The session's EngineRegistry: `engines.get(model, **engine_args overrides)`."""
    reg = EngineRegistry()
    yield reg
    reg.close()


#: the engine args of the shared tiny-world engine (test_engine, test_capture): a 64-token
#: budget forces chunked prefill of the longer prompts; 48 sequences take the largest
#: batch either module sends in one step
SHARED_ENGINE = {"max_num_batched_tokens": 64, "max_num_seqs": 48}


# -- one Ray cluster per session ----------------------------------------------------------


@pytest.fixture(scope="session")
def ray_token(tmp_path_factory):
    """A cluster token of our own, as `ray get-auth-token --generate` would write, but in
    the session's temp folder (RAY_AUTH_TOKEN_PATH), never in the user's ~/.ray."""
    import secrets

    folder = tmp_path_factory.mktemp("ray-auth")
    folder.chmod(0o700)
    path = folder / "token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def s3():
    """The session's loopback S3 server (tests/s3_support), bucket `s3_support.BUCKET`
    made: where the Ray cluster's nodes write builds (`s3://asteer-test/<prefix>`). Its
    `.url` is the endpoint; `s3_support.s3_env(url)` a client's environment."""
    from .s3_support import s3_server

    with s3_server() as (srv, _):
        yield srv


@pytest.fixture(scope="session")
def ray_head(ray_token, s3, tmp_path_factory):
    """The session's one Ray cluster (tests/ray_cluster.LocalRayCluster): a head and two
    worker nodes on 127.0.0.1, token authentication on (the way Ray ships it and
    cluster/README.md tells users to run theirs), each worker with one "GPU", every node
    with its own home, temp, asteer and Hugging Face dirs and the S3 server's
    environment. Unpacks as (GCS address, dashboard URL for `ray job`, client
    environment); a test that removes a node starts it again before it ends."""
    from .ray_cluster import LocalRayCluster

    cluster = LocalRayCluster(ray_token, tmp_path_factory.mktemp("ray-cluster"), s3.url)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- one reference build per session ------------------------------------------------------


@pytest.fixture(scope="session")
def pipeline_reference(tmp_path_factory):
    """An uninterrupted local build of pipeline_support.tiny_config, run as a user would:
    quiet, no --json. Tests that read it (or copy it and rebuild parts) share this one
    build; none may write into it."""
    import json

    from .pipeline_support import INPROCESS_ENGINE, cli, tiny_config, write_config

    work = tmp_path_factory.mktemp("reference")
    run = work / "ref"
    cfg = write_config(work / "ref.yaml", tiny_config(run))
    r = cli("run", "--config", str(cfg), "--no-progress", **INPROCESS_ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    # No JSON on stdout: a short human summary; the full one is summary.json in the run
    # folder, every engine/library line is in its logs/build.log.
    assert "{" not in r.stdout and f"summary: {run}/summary.json" in r.stdout
    assert len((r.stdout + r.stderr).splitlines()) < 20, r.stdout + r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"]["stages"]["labelled"]["rows"] == 24
    log = (run / "logs" / "build.log").read_text()
    assert "vectors: tiny" in log and "judge: 6 shard(s)" in log
    return run


# -- one `vllm serve` per session ---------------------------------------------------------


@pytest.fixture(scope="session")
def judge_server(tmp_path_factory):
    """One `vllm serve` of the tiny model for the session's judge and bank tests. It
    requires an API key (in judge_support.KEY_ENV), so every passing request also proves
    the key travelled. Outages are made with judge_support.FaultProxy in front of it, never
    by killing it: later tests use it."""
    import secrets

    from asteer_build.inputs.tinyworld import build_tiny_model

    from .judge_support import KEY_ENV, served_model, vllm_server

    key = "sk-asteer-FAKE-" + secrets.token_hex(12)
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = key
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    try:
        with vllm_server(str(build_tiny_model()), log, api_key=key) as url:
            yield {"url": url, "model": served_model(url, key), "key": key}
    finally:
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old


