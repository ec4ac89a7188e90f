"""Self-hosted judges: `vllm serve` of an open model, started next to the builders.

`judge.kind: vllm` in a build config makes the judge stage start judge servers, hand
their URLs to the judge's OpenAI-compatible pool as endpoints, and stop them when the
stage ends, also when it fails. The `judge` package never imports vLLM and never starts
anything: it only talks to endpoints, so the same labelling code serves the OpenAI API,
a Batch file or these servers.

    judge:
      kind: vllm
      model: qwen-judge            # the served name; part of every cache key
      server:
        model: Qwen/Qwen2.5-7B-Instruct   # a path or Hub id for `vllm serve`
        engine_args: {max_model_len: 4096, gpu_memory_utilization: 0.9}
        replicas: 2
        gpus_per_replica: 1        # GPU bundles on a GPU cluster; ignored on CPU ones
        port_range: [8100, 8199]   # each server takes the first free port of its node
        host: null                 # address to bind and call; null: the node's address
        start_timeout_s: 900
        max_concurrency: 64        # requests in flight per server
        command: [vllm]            # how to run the vLLM CLI on the nodes
        env: {}                    # extra environment for the server processes

With the Ray executor every server is a Ray actor (`ServerProcess` wrapped by
`ray.remote`) in a placement group: one bundle of `gpus_per_replica` GPUs per replica
on a GPU cluster, one CPU on a CPU cluster. The actor launches `vllm serve` as a
subprocess in its own process group on a free port of its node, waits for `/health`,
and returns its base URL. With the local executor the same class runs in this process:
one machine, one server. Stopping kills the whole process group (the API server and
its engine core), so no vLLM process outlives the stage. A builder (or actor) that dies
without stopping it, SIGKILLed say, takes the server with it: `vllm serve` runs under
a parent-death signal (Linux `PR_SET_PDEATHSIG`, set by a small exec wrapper, `_ORPHAN_GUARD`),
so the kernel sends it SIGTERM when the process that started it is gone, and vLLM's API
server then stops its engine core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from judge.config import JudgeConfig
    from judge.kinds import JudgeContext, JudgeFactory, JudgeSession

log = logging.getLogger("asteer_build")

__all__ = ["ServerSpec", "ServerProcess", "serve_args", "served_judge", "stop_group",
           "vllm_judge"]


@dataclass
class ServerSpec:
    """`judge.server`: what to serve, how many, and where."""

    model: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    gpus_per_replica: int = 1
    port_range: tuple[int, int] = (8100, 8199)
    #: where to bind (and where the pool calls); None: the node's address in the cluster
    host: str | None = None
    start_timeout_s: float = 900.0
    max_concurrency: int = 32
    command: list[str] = field(default_factory=lambda: ["vllm"])
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ServerSpec:
        if not d or not d.get("model"):
            raise ValueError("judge.server.model: `judge.kind: vllm` needs the judge model's "
                             "path or Hub id (got none)")
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"judge.server: unknown settings {sorted(bad)} "
                             f"(known: {sorted(known)})")
        s = cls(**d)
        for name in ("replicas", "max_concurrency"):
            v = getattr(s, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"judge.server.{name}: expected an integer >= 1 (got {v!r})")
        if not isinstance(s.gpus_per_replica, int) or s.gpus_per_replica < 0:
            raise ValueError("judge.server.gpus_per_replica: expected an integer >= 0 "
                             f"(got {s.gpus_per_replica!r})")
        pr = list(s.port_range)
        if len(pr) != 2 or not all(isinstance(p, int) for p in pr) or not \
                1024 <= pr[0] <= pr[1] <= 65535:
            raise ValueError(f"judge.server.port_range: expected [low, high] within "
                             f"1024..65535 (got {s.port_range!r})")
        s.port_range = (pr[0], pr[1])
        if isinstance(s.command, str):
            s.command = [s.command]
        return s


#: Run as `python -c _ORPHAN_GUARD PARENT_PID CMD...`: ask the kernel for SIGTERM when
#: the parent dies, leave at once if it already has (it may die between fork and prctl),
#: then become CMD. An exec wrapper instead of Popen's `preexec_fn`, which is unsafe in a
#: process with threads (the builder has several).
_ORPHAN_GUARD = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:\n"  # 1 = PR_SET_PDEATHSIG
    "    sys.exit('judge server: prctl(PR_SET_PDEATHSIG) failed: errno %d'"
    " % ctypes.get_errno())\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('judge server: the process that started it is gone')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def orphan_guarded(cmd: list[str]) -> list[str]:
    """`cmd` under the parent-death signal (Linux); elsewhere `cmd` as it is."""
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), *cmd]


def serve_args(engine_args: dict[str, Any]) -> list[str]:
    """`vllm serve` flags from engine args: `max_model_len: 4096` -> `--max-model-len
    4096`, `true` -> a bare flag, `false`/null -> left out, dicts and lists as JSON."""
    out: list[str] = []
    for k, v in engine_args.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, dict | list):
            out += [flag, json.dumps(v)]
        else:
            out += [flag, str(v)]
    return out


def _free_port(host: str, low: int, high: int) -> int:
    for port in range(low, high + 1):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"judge.server.port_range: no free port in {low}..{high} on {host}")


class ServerProcess:
    """One `vllm serve` subprocess: a Ray actor on a cluster, a plain object locally."""

    def __init__(self, spec: ServerSpec, served_name: str, host: str | None = None,
                 log_path: str | None = None) -> None:
        self.spec, self.served_name = spec, served_name
        self.host = host
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> dict[str, Any]:
        """Launch and wait for `/health`; returns base_url, pid and port."""
        host = self.host or self.spec.host or _node_ip()
        port = _free_port(host, *self.spec.port_range)
        cmd = [*self.spec.command, "serve", self.spec.model, "--host", host, "--port",
               str(port), "--served-model-name", self.served_name,
               *serve_args(self.spec.engine_args)]
        env = {**os.environ, **{k: str(v) for k, v in self.spec.env.items()}}
        log_path = self.log_path or tempfile.mkstemp(prefix="judge-server-", suffix=".log")[1]
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        started_at = time.time()
        with open(log_path, "ab") as f:
            # its own session: stop() kills the group, engine core included
            self.proc = subprocess.Popen(orphan_guarded(cmd), stdout=f,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.port = port
        deadline = time.monotonic() + self.spec.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"judge server {self.spec.model} exited with "
                                   f"{self.proc.returncode} before it was ready: {tail}")
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"judge server {self.spec.model} not ready after "
                                       f"{self.spec.start_timeout_s:.0f}s "
                                       "(judge.server.start_timeout_s); log: "
                                       f"{log_path}") from None
                time.sleep(0.5)
        return {"base_url": f"http://{host}:{port}/v1", "pid": self.proc.pid, "port": port,
                "host": host, "log": log_path, "node": _node_id(), "started_at": started_at}

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; idempotent."""
        if self.proc is not None:
            stop_group(self.proc, grace_s)


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a `vllm serve` started in its own process group (`start_new_session`):
    SIGTERM to the group, SIGKILL after `grace_s`, then SIGKILL to what is left of the
    group (the engine core may outlive the API server by a moment). Idempotent."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _node_id() -> str | None:
    """The Ray node this runs on (a server's record says where it ran), else None."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            # the address the cluster knows this node by (`ray start
            # --node-ip-address`), which is where the driver can reach it
            me = ray.get_runtime_context().get_node_id()
            for n in ray.nodes():
                if n.get("NodeID") == me and n.get("NodeManagerAddress"):
                    return n["NodeManagerAddress"]
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


@contextlib.contextmanager
def served_judge(spec: ServerSpec, served_name: str, *, executor: str = "local",
                 cfg: Any = None, log_dir: str | None = None) -> Iterator[list[dict[str, Any]]]:
    """Start the judge servers, yield one dict per server (`base_url`, `pid`, `port`,
    `max_concurrency`), stop them all on the way out, whatever happened inside."""
    logs = [str(Path(log_dir) / f"judge-server-{i}.log") if log_dir else None
            for i in range(spec.replicas)]
    if executor != "ray":
        if spec.replicas != 1:
            log.warning("judge.server.replicas=%d: the local executor runs one server",
                        spec.replicas)
        server = ServerProcess(spec, served_name, "127.0.0.1", logs[0])
        try:
            info = server.start()
            yield [{**info, "max_concurrency": spec.max_concurrency}]
        finally:
            server.stop()
        return

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from ..core.lockcheck import require_lock

    require_lock("job driver")
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address if cfg is not None else None, log_to_driver=True)
    cluster = ray.cluster_resources()
    gpu = cluster.get("GPU", 0) >= 1 and spec.gpus_per_replica > 0
    bundle = {"CPU": 1, "GPU": spec.gpus_per_replica} if gpu else {"CPU": 1}
    pg = placement_group([dict(bundle) for _ in range(spec.replicas)], strategy="SPREAD")
    actor_cls = ray.remote(ServerProcess)
    actors: list[Any] = []
    try:
        ray.get(pg.ready(), timeout=spec.start_timeout_s)
        for i in range(spec.replicas):
            actors.append(actor_cls.options(
                num_cpus=1, num_gpus=bundle.get("GPU", 0), placement_group=pg,
                placement_group_bundle_index=i, max_restarts=0,
            ).remote(spec, served_name, None, logs[i]))
        infos = ray.get([a.start.remote() for a in actors])
        yield [{**info, "max_concurrency": spec.max_concurrency} for info in infos]
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.get(a.stop.remote(), timeout=60)
            ray.kill(a, no_restart=True)
        remove_placement_group(pg)


def vllm_judge(*, executor: str = "local", cfg: Any = None,
               log_dir: str | None = None) -> JudgeFactory:
    """The builder's factory for `judge.kind: vllm`, plugged into the kind registry
    (`judge.kinds.open_judge(..., plug={"vllm": ...})`): start the judge servers, judge
    through them as the `llm` kind does, stop them when labelling ends, also when it
    fails. The summary names the servers it ran."""

    @contextlib.asynccontextmanager
    async def lifetime(jc: JudgeConfig, ctx: JudgeContext) -> AsyncIterator[JudgeSession]:
        from judge.kinds import llm_session
        from judge.pool import EndpointConfig

        spec = ServerSpec.from_dict(jc.server)
        ctx.say(f"judge: starting {spec.replicas} vllm judge server(s) of {spec.model}")
        with served_judge(spec, jc.model, executor=executor, cfg=cfg,
                          log_dir=log_dir) as served:
            endpoints = [EndpointConfig(s["base_url"], max_concurrency=s["max_concurrency"])
                         for s in served]
            async with llm_session(jc, ctx, endpoints) as session:
                session.info["servers"] = [
                    {k: s[k] for k in ("base_url", "pid", "port", "host", "node",
                                       "started_at")} for s in served]
                yield session

    return lifetime
