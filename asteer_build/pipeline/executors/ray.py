"""Rollouts on a Ray cluster: one engine actor per placement group, shards from a queue.

- Each actor owns a `SteeredEngine` in a placement group sized to its model's
  tensor-parallel GPUs (CPU bundles on a CPU-only cluster).
- Inside an actor (`ray_actor.EngineHost`) the local executor's feeding loop
  (`feed.feed_engine`, on a `feed.FeedThread`: the same window, slots and writer thread)
  keeps about `in_flight_factor x max_num_seqs` requests in flight, across shard
  boundaries: the driver hands each actor `shards_in_flight` shards ahead, and all of
  them draw on the same window, so the engine never drains between shards (the pattern
  of Ray Data LLM's engine stage).
- The driver pulls from one queue per model, so fast actors take more shards. A dead
  actor's shards go back on the queue (at most `max_shard_retries` retries each) and a
  fresh actor replaces it; a shard over `shard_timeout_s` or an actor that misses health
  checks is killed the same way, so a stuck engine fails instead of hanging the build.
- Actors write shard files straight to the (shared) output location and return their
  `ShardFile`s; only the driver touches the manifest, so commits never race. Each
  commit is reported as a `ShardRecord` naming the actor, its host and pid, and the
  cause of every retry the shard took.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...core.console import console
from ..plan import Shard
from .base import Executor, OnCommit, RolloutTally, ShardRecord
from .ray_actor import EngineHost

if TYPE_CHECKING:
    from ..config import BuildConfig, ModelConfig
    from ..run import Run

__all__ = ["RayExecutor", "vector_files_on_ray", "EngineHost"]

log = logging.getLogger("asteer_build.ray")


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
    #: the actor's host name (`ShardRecord.host`)
    host: str = "?"
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
                 cluster: dict[str, float], summary: dict[str, Any],
                 tally: RolloutTally) -> None:
        import ray
        from ray.util.placement_group import placement_group

        from ..feed import in_flight_window

        self.run, self.model, self.summary, self.tally = run, model, summary, tally
        self.ro = run.cfg.ray
        self.actor_cls = actor_cls
        self.queue: collections.deque[Shard] = collections.deque(shards)
        self.in_flight = in_flight_window(model.engine_args, self.ro.in_flight_factor)
        bundles, self.actor_opts = _resources(cluster, model.tensor_parallel_size,
                                              self.ro.num_cpus_per_engine)
        self.n = _replicas(model, cluster, self.ro.num_cpus_per_engine, len(shards))
        #: shard index -> why each of its lost attempts was lost
        self.causes: collections.defaultdict[int, list[str]] = collections.defaultdict(list)
        self.slots = [_Slot(f"{model.name}#{i}", model.name, placement_group(bundles))
                      for i in range(self.n)]
        ray.get([s.pg.ready() for s in self.slots], timeout=600)
        self.items = self.tokens = 0
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

    def _retry(self, shard: Shard, cause: str) -> None:
        causes = self.causes[shard.index]
        causes.append(cause)
        if len(causes) > self.ro.max_shard_retries:
            self.summary["failed"].append(shard.index)
            console.say(f"[ray] shard {shard.name} failed {len(causes)} times; "
                        f"giving up on it (last: {cause})", logging.ERROR)
        else:
            self.queue.appendleft(shard)
            self.summary["requeued"] += 1

    def fail_slot(self, slot: _Slot, why: str) -> None:
        """Requeue the slot's shards (bounded retries) and replace its actor."""
        import ray

        console.say(f"[ray] actor {slot.key} (pid {slot.pid}) lost: {why}; requeueing "
                    f"{len(slot.inflight)} shard(s)", logging.WARNING)
        for shard, _ in slot.inflight.values():
            self._retry(shard, f"actor {slot.key} (pid {slot.pid}) lost: {why}")
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
            cause = f"raised on {slot.key} (pid {slot.pid}): {str(e).splitlines()[-1][:300]}"
            console.say(f"[ray] shard {shard.name} {cause}", logging.WARNING)
            self._retry(shard, cause)
            return
        if kind == "start":
            slot.ready, slot.start_ref, slot.pid = True, None, res["pid"]
            slot.host = res["host"]
            slot.t_first = slot.t_first or time.time()
            console.say(f"[ray] actor {slot.key} up on {res['node']} pid {res['pid']} in "
                        f"{time.time() - slot.started_at:.1f}s ({res['max_in_flight']} "
                        f"requests in flight, niceness {res.get('niceness')})")
            slot.niceness = res.get("niceness")
        elif kind == "health":
            slot.health_ref = None
        else:
            shard, sent = slot.inflight.pop(ref)
            self.run.manifest.record(res["files"], executor="ray", actor=slot.key)
            causes = tuple(self.causes.pop(shard.index, ()))
            self.tally.committed(ShardRecord(
                "rollouts", shard.name, shard.model,
                next(f.rows for f in res["files"] if f.stage == "rollouts"), slot.host,
                res["pid"], slot.key, len(causes) + 1, causes, sent, time.time()))
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

    from ...core.lockcheck import require_lock

    require_lock("job driver")
    if not ray.is_initialized():
        ray.init(address=cfg.ray.address, log_to_driver=True)
    return ray.cluster_resources()


def vector_files_on_ray(cfg: BuildConfig, model_path: str, concepts: list[Any],
                        settings: Any) -> dict[str, bytes]:
    """`work.vector_files` (the vectors stage) as a Ray task: on GPU workers when the
    cluster has GPUs, as many as the pooling engine's tensor parallelism asks."""
    import ray

    from ..work import vector_files

    tp = int((settings.engine_args or {}).get("tensor_parallel_size", 1))
    gpus = tp if _init(cfg).get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(vector_files)
    return ray.get(task.remote(model_path, concepts, settings))


class RayExecutor(Executor):
    """Engines as Ray actors on the cluster at `ray.address`; the vectors stage as a Ray
    task, since the head node often has no GPU."""

    name = "ray"

    def vector_files(self, model: ModelConfig, settings: Any) -> dict[str, bytes]:
        return vector_files_on_ray(self.run.cfg, model.path, self.run.plan.concepts,
                                   settings)

    def run_rollouts(self, todo: list[Shard], on_commit: OnCommit) -> dict[str, Any]:
        import ray

        run = self.run
        cluster = _init(run.cfg)
        actor_cls = ray.remote(EngineHost)
        tally = RolloutTally(self.name, on_commit)
        extra: dict[str, Any] = {"actors": [], "requeued": 0, "failed": []}
        for model in run.cfg.models:
            shards = [s for s in todo if s.model == model.name]
            if not shards:
                continue
            d = _ModelDispatch(run, model, shards, actor_cls, cluster, extra, tally)
            try:
                d.loop()
            finally:
                d.close()
            tally.model_done(model.name, d.items, d.tokens, d.t_first, d.t_last)
        summary = tally.summary(len(todo) - len(extra["failed"]), **extra)
        console.say(f"[ray] summary: {summary['shards_run']} shards, {tally.items} items, "
                    f"{tally.tokens} tokens in {summary['seconds']:.1f}s "
                    f"({summary['items_per_s'] or 0.0:.1f} items/s); "
                    f"requeued {extra['requeued']}, failed {extra['failed']}")
        if extra["failed"]:
            raise RuntimeError(f"shards {extra['failed']} failed after "
                               f"{run.cfg.ray.max_shard_retries} retries; rerun to retry them")
        return summary
