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
  A dead engine core (`feed.EngineDied`) is not the shards' fault: they go back
  without being charged a retry.
- A lost node takes its replicas' placement groups with it; Ray places them again when
  a node with the resources joins. The seat waits up to `node_wait_s` for that, then the
  build goes on with the replicas left (`lost_replicas` in the summary), and stops only
  when none is left.
- An actor that fails to start `max_start_failures` times in a row stops the build with
  the start's error: a start that keeps failing does not heal by retrying.
- Actors write shard files straight to the (shared) output location and return their
  `ShardFile`s; only the driver touches the manifest, so commits never race. Each
  commit is reported as a `ShardRecord` naming the actor, its host, node and pid, and
  the cause of every retry the shard took.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from ...core.console import console
from ..plan import Shard
from .base import Executor, OnCommit, RolloutTally, ShardRecord
from .ray_actor import EngineHost, pool_vectors
from .ray_seats import Slot, judge_room, last_line, placement_groups, short

if TYPE_CHECKING:
    from ..config import BuildConfig, ModelConfig
    from ..run import Run

__all__ = ["RayExecutor", "vector_files_on_ray", "EngineHost"]

log = logging.getLogger("asteer_build.ray")


class _ModelDispatch:
    """The driver side for one model: its slots, its shard queue, retries, progress."""

    def __init__(self, run: Run, model: ModelConfig, shards: list[Shard], actor_cls: Any,
                 cluster: dict[str, float], summary: dict[str, Any],
                 tally: RolloutTally) -> None:
        import ray

        from ..feed import in_flight_window

        self.run, self.model, self.summary, self.tally = run, model, summary, tally
        self.ro = run.cfg.ray
        self.actor_cls = actor_cls
        self.queue: collections.deque[Shard] = collections.deque(shards)
        self.in_flight = in_flight_window(model.engine_args, self.ro.in_flight_factor)
        pgs, self.actor_opts = placement_groups(model, cluster, self.ro.num_cpus_per_engine,
                                                len(shards))
        self.n = len(pgs)
        #: shard index -> why each of its lost attempts was lost
        self.causes: collections.defaultdict[int, list[str]] = collections.defaultdict(list)
        #: shard index -> the lost attempts charged against `max_shard_retries`
        self.charged: collections.Counter[int] = collections.Counter()
        self.slots = [Slot(f"{model.name}#{i}", model.name, pg) for i, pg in enumerate(pgs)]
        ray.get([s.pg.ready() for s in self.slots], timeout=600)
        self.items = self.tokens = 0
        #: the generate phase, as the actors saw it: first request submitted to last
        #: rollout finished (engine start-up excluded)
        self.t_first: float | None = None
        self.t_last: float | None = None

    def launch(self, slot: Slot) -> None:
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

    def _retry(self, shard: Shard, cause: str, charge: bool = True) -> None:
        """Requeue a lost attempt; `charge`: it counts against `max_shard_retries` (not
        when the engine died under it: the shard was not at fault)."""
        self.causes[shard.index].append(cause)
        self.charged[shard.index] += charge
        if self.charged[shard.index] > self.ro.max_shard_retries:
            self.summary["failed"].append(shard.index)
            console.say(f"[ray] shard {shard.name} failed {self.charged[shard.index]} "
                        f"times; giving up on it (last: {cause})", logging.ERROR)
        else:
            self.queue.appendleft(shard)
            self.summary["requeued"] += 1

    def fail_slot(self, slot: Slot, why: str, charge: bool = True) -> None:
        """Requeue the slot's shards (bounded retries, when `charge`) and replace its
        actor."""
        where = f"{slot.key} (pid {slot.pid}) on node {short(slot.node)}"
        console.say(f"[ray] actor {where} lost: {why}; requeueing {len(slot.inflight)} "
                    "shard(s)", logging.WARNING)
        for shard, _ in slot.inflight.values():
            self._retry(shard, f"actor {where} lost: {why}", charge)
        slot.inflight.clear()
        slot.restarts += 1
        if slot.restarts > self.ro.max_shard_retries + self.n:
            raise RuntimeError(f"actor {slot.key} died {slot.restarts} times: {why}")
        self._kill(slot)
        self.launch(slot)

    @staticmethod
    def _kill(slot: Slot) -> None:
        import ray

        slot.ready = False
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass

    def _start_failed(self, slot: Slot, e: BaseException) -> None:
        """A start that raised or whose actor died: try again until `max_start_failures`
        in a row; a start lost with its node is no failure (the seat waits for a node)."""
        from ray.exceptions import RayActorError

        if isinstance(e, RayActorError) and ("its node has died" in str(e)
                                             or not self._placed(slot)):
            console.say(f"[ray] actor {slot.key}: its node is gone before it started; "
                        f"its seat waits up to {self.ro.node_wait_s:.0f}s for a node",
                        logging.WARNING)
        else:
            slot.start_failures += 1
            cap, line = self.ro.max_start_failures, last_line(e)
            if slot.start_failures >= cap:
                raise RuntimeError(
                    f"engine actor {slot.key} failed to start {slot.start_failures} "
                    f"time(s) in a row (ray.max_start_failures: {cap}); last error: {line}")
            console.say(f"[ray] actor {slot.key} failed to start ({slot.start_failures} of "
                        f"{cap}): {line}", logging.WARNING)
        self._kill(slot)
        self.launch(slot)

    def _placed(self, slot: Slot) -> bool:
        """Whether the slot's placement group has its nodes (not RESCHEDULING after a
        node was lost)."""
        from ray.util import placement_group_table

        return placement_group_table(slot.pg).get("state") == "CREATED"

    def _drop(self, slot: Slot, now: float) -> None:
        """Give up a seat whose node stayed away `node_wait_s`: the build goes on with
        the others."""
        from ray.util.placement_group import remove_placement_group

        self._kill(slot)
        slot.lost = True
        remove_placement_group(slot.pg)
        self._lost_entry(slot, now, gave_up=True)
        left = sum(not s.lost for s in self.slots)
        console.say(f"[ray] {slot.key}: no node for its placement group after "
                    f"{now - (slot.unplaced_since or now):.0f}s (ray.node_wait_s "
                    f"{self.ro.node_wait_s:.0f}); going on with {left} of {self.n} "
                    "replica(s)", logging.WARNING)
        if not left:
            raise RuntimeError(f"{self.model.name}: every engine replica lost its node; "
                               f"{len(self.queue)} shard(s) not run")

    def _lost_entry(self, slot: Slot, now: float, gave_up: bool) -> None:
        since = slot.unplaced_since or now
        self.summary["lost_replicas"].append({
            "actor": slot.key, "node": slot.node, "since": round(since, 3),
            "waited_s": round(now - since, 2), "gave_up": gave_up})

    def busy(self) -> bool:
        return bool(self.queue) or any(s.inflight for s in self.slots)

    def loop(self) -> None:
        import ray

        for s in self.slots:
            self.launch(s)
        last_report = time.time()
        while self.busy():
            refs = self._feed_and_collect_refs()
            if refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in done:
                    self._handle(ref, *refs[ref])
            else:
                time.sleep(0.1)
            now = time.time()
            self._watchdog(now)
            if now - last_report > 10 or not self.busy():
                last_report = now
                self.report(now)

    def _feed_and_collect_refs(self) -> dict[Any, tuple[Slot, str]]:
        refs: dict[Any, tuple[Slot, str]] = {}
        for s in self.slots:
            if s.lost:
                continue
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

    def _handle(self, ref: Any, slot: Slot, kind: str) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from ..feed import EngineDied

        try:
            res = ray.get(ref)
        except RayActorError as e:
            if kind == "start":
                self._start_failed(slot, e)
            else:
                self.fail_slot(slot, f"{kind}: {type(e).__name__}")
            return
        except RayTaskError as e:
            if kind == "start":
                self._start_failed(slot, e)
            elif isinstance(getattr(e, "cause", None), EngineDied):
                self.fail_slot(slot, f"engine died ({kind}): {last_line(e)}", charge=False)
            elif kind == "health":
                self.fail_slot(slot, f"health check raised: {last_line(e)[:200]}")
            else:
                shard, _ = slot.inflight.pop(ref)
                cause = (f"raised on {slot.key} (pid {slot.pid}) on node "
                         f"{short(slot.node)}: {last_line(e)}")
                console.say(f"[ray] shard {shard.name} {cause}", logging.WARNING)
                self._retry(shard, cause)
            return
        if kind == "start":
            slot.ready, slot.start_ref, slot.pid = True, None, res["pid"]
            slot.host, slot.node, slot.start_failures = res["host"], res["node"], 0
            slot.unplaced_since = None
            slot.t_first = slot.t_first or time.time()
            console.say(f"[ray] actor {slot.key} up on node {short(slot.node)} "
                        f"({res['node_ip']}) pid {res['pid']} in "
                        f"{time.time() - slot.started_at:.1f}s ({res['max_in_flight']} "
                        f"requests in flight, niceness {res.get('niceness')})")
            slot.niceness = res.get("niceness")
        elif kind == "health":
            slot.health_ref = None
        else:
            shard, sent = slot.inflight.pop(ref)
            causes = tuple(self.causes.pop(shard.index, ()))
            self.charged.pop(shard.index, None)
            node = res.get("node", slot.node)
            self.run.manifest.record(res["files"], executor="ray", actor=slot.key, node=node,
                                     attempts=len(causes) + 1, retry_causes=list(causes))
            self.tally.committed(ShardRecord(
                "rollouts", shard.name, shard.model,
                next(f.rows for f in res["files"] if f.stage == "rollouts"), slot.host,
                res["pid"], slot.key, len(causes) + 1, causes, sent, time.time(), node))
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
            if s.lost:
                continue
            if not s.ready:
                self._await_node(s, now)
                continue
            stuck = [sh for sh, t in s.inflight.values() if now - t > ro.shard_timeout_s]
            if stuck:
                self.fail_slot(s, f"shard {stuck[0].name} over {ro.shard_timeout_s:.0f}s")
            elif s.ready and s.health_ref is None and now - s.health_sent > ro.health_check_s:
                s.health_ref, s.health_sent = s.actor.health.remote(), now
            elif s.health_ref is not None and now - s.health_sent > 2 * ro.health_check_s:
                self.fail_slot(s, "missed health check")

    def _await_node(self, s: Slot, now: float) -> None:
        """A starting seat: note when its placement group lost its node (checked once a
        second), give the seat up after `node_wait_s` without one."""
        if now - s.placement_checked < 1.0:
            return
        s.placement_checked = now
        if self._placed(s):
            s.unplaced_since = None
        elif s.unplaced_since is None:
            s.unplaced_since = now
            console.say(f"[ray] {s.key}: its node (last {short(s.node)}) is gone; the seat "
                        f"waits up to {self.ro.node_wait_s:.0f}s for a node",
                        logging.WARNING)
        elif now - s.unplaced_since >= self.ro.node_wait_s:
            self._drop(s, now)

    def report(self, now: float) -> None:
        for s in self.slots:
            dt = now - (s.t_first or now)
            rate = s.items / dt if dt > 0 else 0.0
            tok = s.tokens / dt if dt > 0 else 0.0
            state = " lost" if s.lost else " waiting-for-node" if s.unplaced_since else ""
            console.say(f"[ray] {s.key} pid={s.pid} node={short(s.node)}{state} "
                        f"shards={s.shards} items={s.items} items/s={rate:.1f} "
                        f"tok/s={tok:.0f} in_flight={len(s.inflight)} "
                        f"restarts={s.restarts} queue={len(self.queue)}")

    def close(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
        from ray.util.placement_group import remove_placement_group

        now = time.time()
        for s in self.slots:
            self.summary["actors"].append({"actor": s.key, "node": s.node,
                                           "shards": s.shards, "items": s.items,
                                           "tokens": s.tokens, "restarts": s.restarts,
                                           "niceness": s.niceness, "lost": s.lost})
            if s.lost:
                continue
            if s.unplaced_since is not None:  # the build ended while it waited
                self._lost_entry(s, now, gave_up=False)
            if s.ready:
                try:
                    ray.get(s.actor.shutdown.remote(), timeout=60)
                except (RayActorError, GetTimeoutError, RayTaskError):
                    pass
            self._kill(s)
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

    tp = int((settings.engine_args or {}).get("tensor_parallel_size", 1))
    gpus = tp if _init(cfg).get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(pool_vectors)
    files, where = ray.get(task.remote(model_path, concepts, settings))
    console.say(f"[ray] vectors: pooled on node {short(where['node'])} ({where['host']}, "
                f"{where['node_ip']}) in {where['seconds']:.1f}s")
    return files


class RayExecutor(Executor):
    """Engines as Ray actors on the cluster at `ray.address`; the vectors stage as a Ray
    task, since the head node often has no GPU."""

    name = "ray"

    def vector_files(self, model: ModelConfig, settings: Any) -> dict[str, bytes]:
        return vector_files_on_ray(self.run.cfg, model.path, self.run.plan.concepts,
                                   settings)

    def judge_room(self, replicas: int, gpus_per_replica: int) -> str | None:
        run = self.run
        engines = [(m, sum(1 for s in run.plan.shards if s.model == m.name))
                   for m in run.cfg.models]
        return judge_room(_init(run.cfg), engines, run.cfg.ray.num_cpus_per_engine,
                          replicas, gpus_per_replica)

    def run_rollouts(self, todo: list[Shard], on_commit: OnCommit) -> dict[str, Any]:
        import ray

        run = self.run
        cluster = _init(run.cfg)
        actor_cls = ray.remote(EngineHost)
        tally = RolloutTally(self.name, on_commit)
        extra: dict[str, Any] = {"actors": [], "requeued": 0, "failed": [],
                                 "lost_replicas": []}
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
        # replicas that lost their node: the build ran on fewer engines than planned
        extra["degraded"] = bool(extra["lost_replicas"])
        summary = tally.summary(len(todo) - len(extra["failed"]), **extra)
        lost = [x["actor"] for x in extra["lost_replicas"]]
        console.say(f"[ray] summary: {summary['shards_run']} shards, {tally.items} items, "
                    f"{tally.tokens} tokens in {summary['seconds']:.1f}s "
                    f"({summary['items_per_s'] or 0.0:.1f} items/s); "
                    f"requeued {extra['requeued']}, failed {extra['failed']}"
                    + (f"; degraded: lost replicas {lost}" if lost else ""))
        if extra["failed"]:
            raise RuntimeError(f"shards {extra['failed']} failed after "
                               f"{run.cfg.ray.max_shard_retries} retries; rerun to retry them")
        return summary
