"""Rollouts on a Ray cluster: one engine actor per placement group, shards from a queue.

- Each actor owns a `SteeredEngine` in a placement group sized to its model's
  tensor-parallel GPUs (CPU bundles on a CPU-only cluster).
- Inside an actor the local executor's feeding loop (`feed.feed_engine`, on a
  `feed.FeedThread`: the same window, slots and writer thread) keeps about
  `in_flight_factor x max_num_seqs` requests in flight, across shard boundaries: the
  driver hands each actor `shards_in_flight` shards ahead, and all of them draw on the
  same window, so the engine never drains between shards (the pattern of Ray Data LLM's
  engine stage). The engine runs at normal CPU priority (`_engine_priority`).
- The driver pulls from one queue per model, so fast actors take more shards. A dead
  actor's shards go back on the queue (at most `max_shard_retries` retries each) and a
  fresh actor replaces it; a shard over `shard_timeout_s` or an actor that misses health
  checks is killed the same way, so a stuck engine fails instead of hanging the build.
- Actors write shard files straight to the (shared) output location and return their
  `ShardFile`s; only the driver touches the manifest, so commits never race.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.console import console
from .plan import Shard

if TYPE_CHECKING:
    from ..inputs.sources import Prompt
    from .build import Run
    from .config import BuildConfig, ModelConfig
    from .work import ModelContext

__all__ = ["run_rollouts_ray", "vector_files_on_ray", "EngineHost"]

log = logging.getLogger("asteer_build.ray")


class EngineHost:
    """The body of the engine actor (a plain class, so it can be tested without Ray)."""

    def __init__(self, cfg: BuildConfig, store_uri: str, model_name: str, prompts: list[Prompt],
                 max_in_flight: int, sampling: Any = None) -> None:
        self.cfg, self.store_uri, self.model_name = cfg, store_uri, model_name
        self.prompts = prompts
        #: the head's resolved `EffectiveSampling` (the one build.json records)
        self.sampling = sampling
        self.max_in_flight = max_in_flight
        self.niceness: int | None = None
        self.ctx: ModelContext | None = None
        self.feeder: Any = None
        self.items_done = 0
        self.tokens_done = 0
        self.started = time.time()

    async def start(self) -> dict[str, Any]:
        from ..core.lockcheck import require_lock
        from ..engine import SteeredEngine
        from .feed import FeedThread
        from .shards import open_store
        from .work import engine_kwargs, model_context, write_shard

        require_lock(f"engine actor for {self.model_name} on {_node_ip()}")
        model = next(m for m in self.cfg.models if m.name == self.model_name)
        self.store = open_store(self.store_uri)
        self.ctx = model_context(self.store, self.cfg, model, self.prompts, self.sampling)
        self.capture = self.cfg.capture
        kw = engine_kwargs(model)
        if model.tensor_parallel_size > 1:
            kw.setdefault("distributed_executor_backend", "ray")
        ctx, store, layer = self.ctx, self.store, self.cfg.layer

        def make_engine() -> SteeredEngine:
            # on the feeding thread, which starts the engine's processes: they inherit it
            self.niceness = _engine_priority()
            engine = SteeredEngine(ctx.path, steer_layers=[layer], **kw)
            engine.register_vectors(ctx.vectors)
            return engine

        self.feeder = FeedThread(make_engine, self.capture, self.max_in_flight,
                                 lambda s, res: write_shard(store, s, res, ctx.norms))
        await self.feeder.started()
        self._write_pid()
        return {"pid": os.getpid(), "node": _node_ip(), "max_in_flight": self.max_in_flight,
                "niceness": self.niceness}

    def _write_pid(self) -> None:
        """Where fault-injection tests find the actor process (`core.testseam` hook
        `actor_pid_dir`)."""
        from ..core import testseam

        pid_dir = testseam.hook("actor_pid_dir")
        if pid_dir:
            os.makedirs(pid_dir, exist_ok=True)
            with open(os.path.join(pid_dir, f"{os.getpid()}.pid"), "w") as f:
                f.write(str(os.getpid()))

    async def run_shard(self, shard: Shard) -> dict[str, Any]:
        """One shard through the shared feeder (`feed.py`): its requests join the window
        the other shards in flight draw on; files come back for the driver to commit."""
        from .work import shard_requests

        assert self.feeder is not None
        t0 = time.time()
        files, tokens = await self.feeder.run_shard(
            shard, shard_requests(self.cfg, self.ctx, shard))
        self.items_done += len(shard.items)
        self.tokens_done += tokens
        return {"files": files, "items": len(shard.items), "tokens": tokens,
                "seconds": time.time() - t0, "pid": os.getpid(),
                "t_first": self.feeder.stats.t_first, "t_last": self.feeder.stats.t_last}

    async def health(self) -> dict[str, Any]:
        if self.feeder is not None:
            self.feeder.check()  # the feeding thread stops if the engine core dies
        return {"pid": os.getpid(), "items": self.items_done, "tokens": self.tokens_done}

    def shutdown(self) -> None:
        if self.feeder is not None:
            self.feeder.close()  # the feeding thread shuts its engine down
            self.feeder = None


def _engine_priority() -> int:
    """Give the calling thread (the actor's feeding thread; Linux keeps niceness per
    thread) and so the engine processes it starts, which inherit it, the normal CPU
    priority back; return the niceness it runs at.

    Ray starts workers at niceness 15 (`RAY_worker_niceness`) so that a burst of CPU
    tasks cannot starve the raylet and GCS. The engine actor is the one process whose
    speed is the build's speed: at niceness 15 every wake-up of a nice-0 process
    preempts its step, which on a small CPU node costs a measurable share of the
    generate phase. Raising priority needs privilege (root, CAP_SYS_NICE or an
    RLIMIT_NICE allowance); without it the actor keeps Ray's niceness, and
    `RAY_worker_niceness=0` on `ray start` does the same for the whole node.
    """
    current = os.nice(0)
    if current > 0:
        try:
            os.nice(-current)
        except OSError:
            log.warning("engine actor runs at niceness %d (Ray's default for workers); "
                        "set RAY_worker_niceness=0 on `ray start` to run it at normal "
                        "priority", current)
    return os.nice(0)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "?"


@dataclass
class _Slot:
    """One engine seat: an actor (replaced when it dies) in its placement group."""

    key: str
    model: str
    pg: Any
    actor: Any = None
    ready: bool = False
    start_ref: Any = None
    started_at: float = 0.0
    inflight: dict[Any, tuple[Shard, float]] = field(default_factory=dict)
    restarts: int = 0
    shards: int = 0
    items: int = 0
    tokens: int = 0
    pid: int | None = None
    health_ref: Any = None
    health_sent: float = 0.0
    t_first: float | None = None
    #: the engine's CPU niceness on its node (`_engine_priority`)
    niceness: int | None = None


def _resources(cluster: dict[str, float], tp: int, cpus: float) -> tuple[list[dict], dict]:
    if cluster.get("GPU", 0) >= 1:
        bundles = [{"GPU": 1.0, "CPU": 1.0} for _ in range(tp)]
        actor = {"num_gpus": 1.0 if tp == 1 else 0, "num_cpus": 1.0 if tp == 1 else 0}
    else:
        bundles = [{"CPU": cpus}]
        actor = {"num_cpus": cpus}
    return bundles, actor


def _replicas(model: ModelConfig, cluster: dict[str, float], cpus: float, n_shards: int) -> int:
    if model.replicas:
        return model.replicas
    if cluster.get("GPU", 0) >= 1:
        n = int(cluster["GPU"] // model.tensor_parallel_size)
    else:
        n = int(cluster.get("CPU", 1) // cpus)
    return max(1, min(n, n_shards))


class _ModelDispatch:
    """The driver side for one model: its slots, its shard queue, retries, progress."""

    def __init__(self, run: Run, model: ModelConfig, shards: list[Shard], actor_cls: Any,
                 cluster: dict[str, float], summary: dict[str, Any]) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.run, self.model, self.summary = run, model, summary
        self.ro = run.cfg.ray
        self.actor_cls = actor_cls
        self.queue: collections.deque[Shard] = collections.deque(shards)
        from .feed import in_flight_window

        self.in_flight = in_flight_window(model.engine_args, self.ro.in_flight_factor)
        bundles, self.actor_opts = _resources(cluster, model.tensor_parallel_size,
                                              self.ro.num_cpus_per_engine)
        self.n = _replicas(model, cluster, self.ro.num_cpus_per_engine, len(shards))
        self.attempts: collections.Counter[int] = collections.Counter()
        self.slots = [_Slot(f"{model.name}#{i}", model.name, placement_group(bundles))
                      for i in range(self.n)]
        ray.get([s.pg.ready() for s in self.slots], timeout=600)
        self.items = self.tokens = 0
        self.gen_seconds = 0.0
        #: the generate phase, as the actors saw it: first request submitted to last
        #: rollout finished (engine start-up excluded)
        self.t_first: float | None = None
        self.t_last: float | None = None

    def launch(self, slot: _Slot) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=slot.pg, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)
        slot.actor = self.actor_cls.options(
            scheduling_strategy=strategy, max_restarts=0, max_concurrency=1000,
            **self.actor_opts,
        ).remote(self.run.cfg, self.run.store.uri, self.model.name, self.run.plan.prompts,
                 self.in_flight, self.run.plan.sampling[self.model.name])
        slot.ready, slot.start_ref, slot.started_at = False, slot.actor.start.remote(), \
            time.time()
        slot.health_ref = None

    def _retry(self, shard: Shard) -> None:
        self.attempts[shard.index] += 1
        if self.attempts[shard.index] > self.ro.max_shard_retries:
            self.summary["failed"].append(shard.index)
            console.say(f"[ray] shard {shard.name} failed {self.attempts[shard.index]} times; "
                        "giving up on it", logging.ERROR)
        else:
            self.queue.appendleft(shard)
            self.summary["requeued"] += 1

    def fail_slot(self, slot: _Slot, why: str) -> None:
        """Requeue the slot's shards (bounded retries) and replace its actor."""
        import ray

        console.say(f"[ray] actor {slot.key} (pid {slot.pid}) lost: {why}; requeueing "
                    f"{len(slot.inflight)} shard(s)", logging.WARNING)
        for shard, _ in slot.inflight.values():
            self._retry(shard)
        slot.inflight.clear()
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        slot.restarts += 1
        if slot.restarts > self.ro.max_shard_retries + self.n:
            raise RuntimeError(f"actor {slot.key} died {slot.restarts} times: {why}")
        self.launch(slot)

    def busy(self) -> bool:
        return bool(self.queue) or any(s.inflight for s in self.slots)

    def loop(self) -> None:
        import ray

        for s in self.slots:
            self.launch(s)
        last_report = time.time()
        while self.busy():
            refs = self._feed_and_collect_refs()
            if not refs:
                time.sleep(0.1)
                continue
            done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            for ref in done:
                self._handle(ref, *refs[ref])
            now = time.time()
            self._watchdog(now)
            if now - last_report > 10 or not self.busy():
                last_report = now
                self.report(now)
        if self.t_first is not None and self.t_last is not None:
            self.gen_seconds = self.t_last - self.t_first

    def _feed_and_collect_refs(self) -> dict[Any, tuple[_Slot, str]]:
        refs: dict[Any, tuple[_Slot, str]] = {}
        for s in self.slots:
            while s.ready and self.queue and len(s.inflight) < self.ro.shards_in_flight:
                shard = self.queue.popleft()
                s.inflight[s.actor.run_shard.remote(shard)] = (shard, time.time())
            if not s.ready and s.start_ref is not None:
                refs[s.start_ref] = (s, "start")
            for r in s.inflight:
                refs[r] = (s, "shard")
            if s.health_ref is not None:
                refs[s.health_ref] = (s, "health")
        return refs

    def _handle(self, ref: Any, slot: _Slot, kind: str) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            res = ray.get(ref)
        except RayActorError as e:
            if kind == "start" and slot.restarts >= self.ro.max_shard_retries:
                raise RuntimeError(f"engine actor {slot.key} failed to start: {e}") from e
            self.fail_slot(slot, f"{kind}: {type(e).__name__}")
            return
        except RayTaskError as e:
            if kind == "start":
                raise RuntimeError(f"engine actor {slot.key} failed to start: {e}") from e
            if kind == "health":
                self.fail_slot(slot, f"health check raised: {str(e).splitlines()[-1][:200]}")
                return
            shard, _ = slot.inflight.pop(ref)
            console.say(f"[ray] shard {shard.name} raised on {slot.key}: "
                        f"{str(e).splitlines()[-1][:300]}", logging.WARNING)
            self._retry(shard)
            return
        if kind == "start":
            slot.ready, slot.start_ref, slot.pid = True, None, res["pid"]
            slot.t_first = slot.t_first or time.time()
            console.say(f"[ray] actor {slot.key} up on {res['node']} pid {res['pid']} in "
                        f"{time.time() - slot.started_at:.1f}s ({res['max_in_flight']} "
                        f"requests in flight, niceness {res.get('niceness')})")
            slot.niceness = res.get("niceness")
        elif kind == "health":
            slot.health_ref = None
        else:
            slot.inflight.pop(ref)
            self.run.manifest.record(res["files"], executor="ray", actor=slot.key)
            slot.shards += 1
            slot.items += res["items"]
            slot.tokens += res["tokens"]
            self.items += res["items"]
            self.tokens += res["tokens"]
            if res.get("t_first") is not None:
                self.t_first = min(self.t_first or res["t_first"], res["t_first"])
            if res.get("t_last") is not None:
                self.t_last = max(self.t_last or res["t_last"], res["t_last"])

    def _watchdog(self, now: float) -> None:
        ro = self.ro
        for s in self.slots:
            stuck = [sh for sh, t in s.inflight.values() if now - t > ro.shard_timeout_s]
            if stuck:
                self.fail_slot(s, f"shard {stuck[0].name} over {ro.shard_timeout_s:.0f}s")
            elif s.ready and s.health_ref is None and now - s.health_sent > ro.health_check_s:
                s.health_ref, s.health_sent = s.actor.health.remote(), now
            elif s.health_ref is not None and now - s.health_sent > 2 * ro.health_check_s:
                self.fail_slot(s, "missed health check")

    def report(self, now: float) -> None:
        for s in self.slots:
            dt = now - (s.t_first or now)
            rate = s.items / dt if dt > 0 else 0.0
            tok = s.tokens / dt if dt > 0 else 0.0
            console.say(f"[ray] {s.key} pid={s.pid} shards={s.shards} items={s.items} "
                        f"items/s={rate:.1f} tok/s={tok:.0f} in_flight={len(s.inflight)} "
                        f"restarts={s.restarts} queue={len(self.queue)}")

    def close(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
        from ray.util.placement_group import remove_placement_group

        for s in self.slots:
            self.summary["actors"].append({"actor": s.key, "shards": s.shards,
                                           "items": s.items, "tokens": s.tokens,
                                           "restarts": s.restarts,
                                           "niceness": s.niceness})
            try:
                ray.get(s.actor.shutdown.remote(), timeout=60)
            except (RayActorError, GetTimeoutError, RayTaskError):
                pass
            ray.kill(s.actor, no_restart=True)
            remove_placement_group(s.pg)


def _init(cfg: BuildConfig) -> dict[str, float]:
    import ray

    from ..core.lockcheck import require_lock

    require_lock("job driver")
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, log_to_driver=True)
    return ray.cluster_resources()


def vector_files_on_ray(cfg: BuildConfig, *args: Any) -> dict[str, bytes]:
    """`work.vector_files` (the vectors stage) as a Ray task: on GPU workers when the
    cluster has GPUs, as many as the pooling engine's tensor parallelism asks."""
    import ray

    from .work import vector_files

    tp = int(((args[2].engine_args if len(args) > 2 else None) or {}).get(
        "tensor_parallel_size", 1))
    gpus = tp if _init(cfg).get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(vector_files)
    return ray.get(task.remote(*args))


def run_rollouts_ray(run: Run, todo: list[Shard]) -> dict[str, Any]:
    import ray

    cfg = run.cfg
    cluster = _init(cfg)
    actor_cls = ray.remote(EngineHost)
    t0 = time.time()
    summary: dict[str, Any] = {"executor": "ray", "actors": [], "requeued": 0, "failed": []}
    items_run = tokens_run = 0
    gen_seconds = 0.0
    windows: dict[str, list[float | None]] = {}
    for model in cfg.models:
        shards = [s for s in todo if s.model == model.name]
        if not shards:
            continue
        d = _ModelDispatch(run, model, shards, actor_cls, cluster, summary)
        try:
            d.loop()
        finally:
            d.close()
        items_run += d.items
        tokens_run += d.tokens
        gen_seconds += d.gen_seconds
        windows[model.name] = [d.t_first, d.t_last]
    dt = time.time() - t0
    summary.update(shards_run=len(todo) - len(summary["failed"]), items_run=items_run,
                   tokens=tokens_run, seconds=round(dt, 2),
                   generate_seconds=round(gen_seconds, 2), generate_windows=windows,
                   items_per_s=round(items_run / dt, 2) if dt else None)
    console.say(f"[ray] summary: {summary['shards_run']} shards, {items_run} items, "
                f"{tokens_run} tokens in {dt:.1f}s ({items_run / max(dt, 1e-9):.1f} items/s); "
                f"requeued {summary['requeued']}, failed {summary['failed']}")
    if summary["failed"]:
        raise RuntimeError(f"shards {summary['failed']} failed after "
                           f"{cfg.ray.max_shard_retries} retries; rerun to retry them")
    return summary
