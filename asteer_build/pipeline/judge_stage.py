"""The judge stage: label committed rollouts shards, after generation or while it runs.

Sequential (`--sequential`, or `--stages judge`): every committed, unlabelled rollouts
shard, one after another. Streaming (the default when a run has both stages): a
`StreamingJudge` thread starts before the rollouts and is handed each rollouts shard the
moment its manifest entry is saved (the executors' `on_commit`), so the dataset arrives
at about max(generate, judge) instead of their sum. The engines never wait for it: the
hand-off is a queue.

- A live judge (`rules`, `llm`: an endpoint pool) labels each shard as it arrives.
- The Batch API (`openai-batch`) gathers the arriving shards' requests into files of
  `judge.batch.max_requests_per_file` and submits them in waves under the enqueued-token
  budget while the engines generate; a shard is labelled once every one of its rows has
  an answer or a final failure. The cost cap is enforced per wave: reached mid-run, the
  judge stops submitting and says so, the rollouts go on, and the rows it could not
  send stay `pending` (never a made-up label).
- A self-hosted `vllm` judge streams where its servers fit beside the engines (the Ray
  executor, on GPUs the engines leave free: `Executor.judge_room`), started when the
  first shard commits; elsewhere (one machine, one GPU) they would fight the engines
  for the same GPUs: it judges after generation, and the run says why.

Commits from both stages go through the one `Manifest` (its lock serialises them); the
driver is its only writer. Resuming is the sequential case's: a shard is labelled once
its `labelled` entry is committed; the judgment cache and the Batch API state (in the
run folder, `judge_state`) make a rerun pay for nothing twice.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path
from typing import Any

from ..core.console import console
from ..core.paths import cache_dir
from .judge_state import StateMirror
from .run import Run

__all__ = ["CostCapRefused", "check_cost_cap", "judge_stage", "StreamingJudge", "scratch_dir",
           "streams"]

#: judge kinds that label while the engines generate; `vllm` too where its servers fit
#: beside the engines (`Executor.judge_room`)
STREAMING_KINDS = ("rules", "llm", "openai-batch")


def streams(run: Run, executor: Any) -> tuple[bool, str | None]:
    """Whether this run judges while it generates, and if it might have but does not,
    why (for the run to say)."""
    o = run.opts
    if "rollouts" not in o.stages or "judge" not in o.stages or o.sequential:
        return False, None
    jc = run.cfg.judge
    if jc.kind in STREAMING_KINDS:
        return True, None
    if jc.kind == "vllm":
        from .judge_servers import ServerSpec

        spec = ServerSpec.from_dict(jc.server)
        why = executor.judge_room(spec.replicas, spec.gpus_per_replica)
        return why is None, why
    return False, f"the {jc.kind} judge runs on the build's own resources"


class CostCapRefused(RuntimeError):
    """The plan's judge estimate passes the cost cap; nothing was started."""


def check_cost_cap(run: Run) -> None:
    """Before any engine starts: a Batch API judge whose estimated spend for the rows
    still unlabelled (the plan's estimate, `plan.judge_estimate`, at batch prices) passes
    `judge.batch.cost_cap_usd` stops the run here, unless `--yes`. Waves enforce the cap
    again as they go out (`_batch_waves`): the estimate assumes each response's length."""
    from .plan import judge_estimate

    jc = run.cfg.judge
    cap = jc.batch.cost_cap_usd if jc.kind == "openai-batch" else None
    if cap is None or jc.prices is None or run.opts.yes or "judge" not in run.opts.stages:
        return
    done = sum(e["rows"] for e in run.manifest.entries("labelled").values()
               if not (run.opts.rerun_failed and (e.get("failed") or e.get("pending"))))
    calls = max(0, run.plan.n_items - done)
    est = judge_estimate(run.cfg, calls, run.plan.prompts, run.plan.concepts)
    cost = est["cost_usd"]["batch"]
    if cost > cap:
        raise CostCapRefused(
            f"judge.batch.cost_cap_usd: judging the {calls:,} rows not labelled yet is "
            f"estimated at ~${cost:,.2f} at batch prices (~{est['input_tokens']:,} input "
            f"tokens, judge.prices), over the cap of ${cap:,.2f}; nothing was started. Pass "
            "--yes, raise the cap, or run `--stages vectors,rollouts` now and judge later")


def scratch_dir(run: Run) -> str:
    """Local home of the judge cache (an append log, so a local file) and the Batch API
    state: inside the run folder when that is local (`.staging`, the name earlier runs
    used, so they find their cache again), else a working copy under $ASTEER_CACHE by
    plan hash, mirrored into the run folder (`judge_state`)."""
    if run.store.local:
        return run.store.path(".staging")
    return str(cache_dir() / "staging" / run.plan.plan_hash)


class ShardFeed:
    """Rollouts shard names for the judge, in commit order: put from any thread, taken on
    the judge's event loop; `None` after `close` and the last name."""

    def __init__(self, names: list[str]) -> None:
        self._q: queue.Queue[str | None] = queue.Queue()
        for n in names:
            self._q.put(n)
        self.closed = False
        #: set (on the judge's loop) when a name or the end arrives: a waiting judge
        #: wakes at once instead of at its next poll
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def put(self, name: str | None) -> None:
        self._q.put(name)
        if self._wake is not None:
            loop, ev = self._wake
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the judge has finished (every planned shard labelled)
                pass

    def close(self) -> None:
        self.put(None)

    async def wait(self, timeout: float) -> None:
        """Sleep up to `timeout`, less if a shard (or the end) arrives meanwhile."""
        if self._wake is None:
            self._wake = (asyncio.get_running_loop(), asyncio.Event())
        ev = self._wake[1]
        if self._q.empty():
            try:
                await asyncio.wait_for(ev.wait(), timeout)
            except TimeoutError:
                pass
        ev.clear()

    async def next(self) -> str | None:
        if self.closed:
            return None
        name = await asyncio.to_thread(self._q.get)
        self.closed = name is None
        return name

    def take(self) -> list[str]:
        """The names waiting now (sets `closed` when the end is among them)."""
        out = []
        while not self.closed:
            try:
                name = self._q.get_nowait()
            except queue.Empty:
                break
            if name is None:
                self.closed = True
            else:
                out.append(name)
        return out


def _todo(run: Run) -> tuple[list[str], set[str]]:
    labelled = run.manifest.entries("labelled")
    rerun: set[str] = set()
    if run.opts.rerun_failed:
        rerun = {n for n, e in labelled.items() if e.get("failed", 0) or e.get("pending", 0)}
    todo = [n for n in sorted(run.manifest.entries("rollouts"))
            if n not in labelled or n in rerun]
    return todo, rerun


def judge_stage(run: Run, feed: ShardFeed | None = None) -> dict[str, Any]:
    """Label every committed, unlabelled shard (and, with a feed, each one it brings,
    until it closes); the stage's summary, with its busy window."""
    todo, rerun = _todo(run)
    streaming = feed is not None
    if feed is None:
        if not todo:
            return {"shards_judged": 0}
        feed = ShardFeed(todo)
        feed.close()
        total = len(todo)
    else:  # every planned shard not labelled yet
        done = set(run.manifest.entries("labelled")) - rerun
        total = len([s for s in run.plan.shards if s.name not in done])
    t0 = time.time()
    reports, out = asyncio.run(_judge_async(run, feed, rerun, total, streaming))
    if streaming:
        console.say(f"judge: {len(reports)} shard(s) labelled as they committed, "
                    f"{time.time() - t0:.1f}s")
    return {"shards_judged": len(reports), "ok": sum(r.ok for r in reports),
            "failed": sum(r.failed for r in reports),
            "pending": sum(r.pending for r in reports), **out,
            "window": [t0, time.time()]}


class _Labeller:
    """What labelling one shard takes: the store, the manifest, the cache, the mirror."""

    def __init__(self, run: Run, rerun: set[str], cache: Any, mirror: StateMirror | None,
                 total: int, streaming: bool) -> None:
        self.run, self.rerun, self.cache, self.mirror = run, rerun, cache, mirror
        self.reports: list[Any] = []
        self.total, self.streaming = total, streaming
        # Streaming, the rollouts' bar is the one on the terminal (two bars on one
        # terminal interleave); `asteer-build status` shows both stages.
        self.bar = console.progress(total=total or None, unit="shard", desc="judge",
                                    disable=not run.opts.progress or streaming)

    def complete(self) -> bool:
        """Streaming, every planned shard is labelled: the judge is done even though the
        rollouts stage has not returned yet (its engines are still shutting down)."""
        return self.streaming and len(self.reports) >= self.total

    def base(self, name: str) -> str:
        """The file a shard is labelled from, as the manifest names it (never a path
        made up here: an object store's names are the writer's)."""
        entry = self.run.manifest.entries("labelled").get(name)
        if entry and name in self.rerun:
            return entry["path"]
        return self.run.manifest.entries("rollouts")[name]["path"]

    def table(self, name: str) -> Any:
        from judge.label import table_from_parquet

        return table_from_parquet(self.run.store.read_bytes(self.base(name)))

    async def label(self, name: str, judge: Any, workers: int, table: Any = None,
                    **kw: Any) -> None:
        from judge.label import LabelReport, alabel_table, table_to_parquet

        rep = LabelReport(f"{name}.parquet")
        table = await alabel_table(self.table(name) if table is None else table, judge,
                                   cache=self.cache, rerun_failed=name in self.rerun,
                                   workers=workers, report=rep, **kw)
        run = self.run
        f = await asyncio.to_thread(run.store.put_file, "labelled", name,
                                    f"labelled/{name}.parquet", table_to_parquet(table),
                                    rep.rows)
        run.manifest.record([f], ok=rep.ok, failed=rep.failed, pending=rep.pending,
                            judge_model=judge.judge_model, judge_rubric=judge.rubric_version)
        if self.mirror is not None:
            await asyncio.to_thread(self.mirror.sync)
        self.reports.append(rep)
        self.bar.update(1)


async def _judge_async(run: Run, feed: ShardFeed, rerun: set[str], n_known: int,
                       streaming: bool) -> tuple[list[Any], dict[str, Any]]:
    """The judge comes from the kind registry (`judge.kinds`), as in `asteer-judge`, with
    the builder's `vllm` servers plugged in; its lifetime (servers, endpoint pool) spans
    the labelling and ends also when it fails. The Batch API runs here in waves
    (`_batch_waves`) so that it can take shards as they come."""
    from judge.batches import state_dir_for
    from judge.cache import JudgmentCache
    from judge.kinds import JudgeContext, open_judge

    from .judge_servers import vllm_judge

    jc = run.cfg.judge
    console.say(f"judge: {n_known} shard(s) to label ({jc.kind} judge"
                f"{', as rollouts commit' if streaming else ''})")
    scratch = Path(scratch_dir(run))
    # A remote run folder keeps the state in `judge-state/` (judge_state.StateMirror);
    # a cache file the config names is the user's own, not mirrored.
    mirror = None if run.store.local else StateMirror(run.store, scratch)
    if mirror is not None:
        await asyncio.to_thread(mirror.pull)
    cache_path = jc.cache and run.cfg.resolve(jc.cache) or str(scratch / "judge-cache.jsonl")
    rubric = jc.rubric(run.cfg.base_dir)
    batch_dir = state_dir_for(scratch / "batches", jc.model, rubric.version)
    with JudgmentCache(cache_path) as cache:
        lab = _Labeller(run, rerun, cache, mirror, n_known, streaming)
        with lab.bar:
            if jc.kind == "openai-batch":
                info = await _batch_waves(run, feed, lab, rubric, batch_dir)
                return lab.reports, info
            ctx = JudgeContext(rubric=rubric, rerun_failed=bool(rerun), cache=cache,
                               yes=run.opts.yes, say=console.say)
            log_dir = run.store.path("logs") if run.store.local else None
            # Streaming, the judge (a vllm judge's servers, an endpoint pool) starts when
            # the first shard commits: a run that fails before then starts nothing.
            name = await feed.next()
            if name is None:
                return lab.reports, {}
            lifetime = open_judge(jc, ctx, plug={"vllm": vllm_judge(
                executor=run.opts.executor, cfg=run.cfg, log_dir=log_dir)})
            async with lifetime as session:
                while name is not None:
                    await lab.label(name, session.judge, session.workers)
                    name = None if lab.complete() else await feed.next()
                out = dict(session.info)
                stats = session.stats()
                if stats:
                    out["endpoints"] = stats
    return lab.reports, out


async def _batch_waves(run: Run, feed: ShardFeed, lab: _Labeller, rubric: Any,
                       batch_dir: Path) -> dict[str, Any]:
    """The Batch API over shards as they arrive: requests gathered into files, files
    submitted under the token budget and the cost cap, each shard labelled once all its
    rows are answered or finally failed. A file goes out when it is full or when no
    more shards are coming; a killed run resumes from the state folder (a request
    already in a file is never queued again)."""
    from judge.batches import BatchStage, CostCapExceeded, FailuresJudge, requests_for_table
    from judge.kinds import _need_endpoints

    jc = run.cfg.judge
    _need_endpoints(jc, jc.endpoints)
    stage = await asyncio.to_thread(
        BatchStage.from_config, jc, batch_dir, lab.cache, rubric,
        on_save=lab.mirror.sync if lab.mirror is not None else None)
    waiting: dict[str, tuple[Any, set[str]]] = {}  # shard -> (table, its request keys)
    buffer: list[Any] = []
    arrived = 0
    cap_hit: str | None = None
    s = jc.batch
    delay = s.poll_initial_s
    while True:
        new = feed.take()
        arrived += len(new)
        # no more shards are coming: the feed ended, or (streaming) every planned one came
        last = feed.closed or (lab.streaming and arrived >= lab.total)
        for name in new:
            table = lab.table(name)
            reqs = requests_for_table(table, jc.model, rubric.version,
                                      rerun_failed=name in lab.rerun)
            waiting[name] = (table, {r.key for r in reqs})
            buffer.extend(reqs)
        if buffer and (len(buffer) >= s.max_requests_per_file or last):
            await asyncio.to_thread(stage.add, buffer, rerun_failed=bool(lab.rerun))
            buffer = []
        if cap_hit is None:
            try:
                await asyncio.to_thread(stage.submit, yes=run.opts.yes)
            except CostCapExceeded as e:
                cap_hit = str(e)
                console.say(f"judge: not submitting more batches: {e}; the rows not sent "
                            "stay pending (rerun with --yes or a higher cap)")
        changed = await asyncio.to_thread(stage.poll)
        changed = bool(await asyncio.to_thread(stage.collect)) or changed
        stuck = cap_hit is not None and stage.summary()["in_flight_requests"] == 0
        failures = stage.failures
        for name, (table, keys) in list(waiting.items()):
            if stuck or all(k in lab.cache or k in failures for k in keys):
                await lab.label(name, FailuresJudge(jc.model, rubric.version, dict(failures)),
                                1, table=table)
                del waiting[name]
        if last and not waiting and not buffer:  # streaming: every planned shard labelled
            break
        delay = s.poll_initial_s if changed or new else min(s.poll_max_s, delay * 2)
        await feed.wait(delay)
    out = stage.summary()
    if cap_hit:
        out["stopped"] = cap_hit
    return {"batches": out}


class StreamingJudge:
    """The judge stage on a thread of its own, fed each rollouts shard as it commits."""

    def __init__(self, run: Run) -> None:
        self.run = run
        todo, _ = _todo(run)
        self.feed = ShardFeed(todo)
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="asteer-judge", daemon=True)

    def _main(self) -> None:
        # At the driver's own priority. A lower one (niceness 19, until Dec 2026) made a
        # live judge wait out the front end's time slices for every call: measured on two
        # cores (bench_time_to_dataset's set-up, 2 runs each), a shard's calls took
        # 1.00-1.30 s while generation ran against 0.92-1.01 s at the same priority, and
        # generation was no faster (17.1-17.6 s against 16.9-17.1 s).
        try:
            self.result = judge_stage(self.run, self.feed)
        except BaseException as e:  # handed to the driver in `finish`
            self.error = e

    def start(self) -> StreamingJudge:
        self._thread.start()
        return self

    def on_commit(self, record: Any) -> None:
        self.feed.put(record.shard)

    def finish(self) -> dict[str, Any] | None:
        """No more shards: wait for the judge to label what it has, then its summary
        (None when it never started: an earlier stage failed)."""
        if self._thread.ident is None:
            return None
        self.feed.close()
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
