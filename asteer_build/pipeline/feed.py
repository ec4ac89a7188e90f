"""Feeding an engine with shards: the one place both executors keep requests in flight.

A build is a list of shards, each a few hundred requests with long-tailed lengths. Run
shard after shard as separate batches and the engine drains at every boundary: the last,
longest rollouts of a shard run nearly alone while the next shard waits. So both executors
feed an engine the same way, through this module:

- a window of about `in_flight_window(...)` requests (in_flight_factor x max_num_seqs)
  stays submitted, whichever shards they belong to: the next shard's requests join as
  soon as the previous shard's stop, so the engine never drains between shards;
- `ShardSlots` collects each shard's results in request order and says when its last
  one is in: that shard is complete, whatever the others are doing;
- `ShardWriter` writes a complete shard's files on a writer thread (bounded queue, so a
  slow disk applies back-pressure instead of piling up results), off the engine's step
  path, and hands the files to the commit callback. `shards.py` keeps each commit
  atomic; shards may complete (and commit) out of plan order, and a kill loses only the
  shards not yet committed.

`feed_engine` runs the feeding state machine (`feeder.Feeder`, which `run_with_capture`
runs too, as one shard) on a synchronous `SteeredEngine`, in both executors: the local
one calls it with the plan's shards; the Ray actor runs it on a `FeedThread`, whose
`ShardInbox` receives shards from the driver a few ahead. One loop, one window, the same
slots and writer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .feeder import Feeder, FeedStats, ShardInbox, ShardSlots
from .plan import Shard
from .records import CaptureSettings, RolloutRequest, RolloutResult

__all__ = ["in_flight_window", "ShardWriter", "ShardSlots", "ShardInbox", "feed_engine",
           "FeedThread", "FeedStats", "Feeder", "EngineDied", "engine_dead"]


class EngineDied(RuntimeError):
    """The engine's core process is gone. Nothing handed to this engine can finish and
    nothing handed to it later can run, and the shards were not at fault: the Ray
    driver requeues them without charging a retry and replaces the actor."""


def engine_dead(engine: Any) -> bool:
    """Whether vLLM's client has seen its engine-core process exit: its monitor thread
    sets the flag the moment the process is gone, while the feeding thread may be
    waiting for a shard and would learn it only from the next request. Always False for
    an in-process engine (nothing separate to die)."""
    llm_engine = getattr(getattr(engine, "llm", None), "llm_engine", None)
    resources = getattr(getattr(llm_engine, "engine_core", None), "resources", None)
    return bool(getattr(resources, "engine_dead", False))


def _death(error: BaseException, engine: Any) -> BaseException:
    """`error` as an `EngineDied` when it is the engine dying (vLLM's EngineDeadError,
    or any error once the engine is flagged dead), else unchanged."""
    if isinstance(error, EngineDied):
        return error
    names = {c.__name__ for c in type(error).__mro__}
    if "EngineDeadError" in names or (engine is not None and engine_dead(engine)):
        died = EngineDied(f"engine died: {type(error).__name__}: {error}")
        died.__cause__ = error
        return died
    return error


def in_flight_window(engine_args: dict[str, Any], factor: float) -> int:
    """Requests kept submitted: a little over the engine's batch (`max_num_seqs`), so a
    finished sequence is replaced at the next step, not after a round trip."""
    return max(1, int(round(factor * int(engine_args.get("max_num_seqs", 256)))))


class ShardWriter:
    """Writes complete shards on one thread, in completion order, and commits each.

    `write(shard, results) -> files` and `commit(files)` run on the writer thread; one
    thread, so commits never race and `build.json` sees them one at a time. At most
    `max_pending` shards wait; `submit` blocks beyond that (back-pressure)."""

    def __init__(self, write: Callable[[Shard, list[RolloutResult]], Any],
                 commit: Callable[[Shard, Any], None] | None = None,
                 max_pending: int = 4) -> None:
        self._write, self._commit = write, commit
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asteer-writer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []

    def _job(self, shard: Shard, results: list[RolloutResult]) -> Any:
        try:
            files = self._write(shard, results)
            if self._commit is not None:
                self._commit(shard, files)
            return files
        finally:
            self._slots.release()

    def submit(self, shard: Shard, results: list[RolloutResult]) -> Future:
        self._slots.acquire()
        fut = self._pool.submit(self._job, shard, results)
        self._futures.append(fut)
        self.check()
        return fut

    def check(self) -> None:
        """Raise the first write/commit error as soon as it is known (fail fast)."""
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        self._futures = [f for f in self._futures if not f.done()]

    def close(self, wait: bool = True) -> None:
        """Wait for every pending shard (re-raising a failure), then stop the thread."""
        try:
            if wait:
                for f in list(self._futures):
                    f.result()
        finally:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)




def feed_engine(engine: Any, batches: Iterable[tuple[Shard, list[RolloutRequest]]],
                capture: CaptureSettings | None, window: int,
                writer: ShardWriter, stats: FeedStats | None = None) -> FeedStats:
    """`Feeder.run` with each complete shard handed to `writer` at once (the build's
    executors; the time spent waiting for the writer's bounded queue is in `stats`)."""
    stats = stats if stats is not None else FeedStats()

    def write(shard: Shard, results: list[RolloutResult]) -> None:
        t = time.time()
        writer.submit(shard, results)
        stats.writer_wait_s += time.time() - t

    return Feeder(engine, batches, capture, window, write, stats).run()


class FeedThread:
    """`feed_engine` on a thread of the Ray engine actor, which owns the engine.

    The actor's event loop hands shards in (`run_shard`) and awaits each one's files,
    while this thread keeps the window full across shard boundaries, exactly as the
    local executor does: one feeding loop for both executors, so a fix or a measurement
    of one holds for the other. The engine is built, fed and shut down on this thread
    only, so its sockets never cross threads.
    """

    def __init__(self, make_engine: Callable[[], Any], capture: CaptureSettings | None,
                 window: int, write: Callable[[Shard, list[RolloutResult]], Any],
                 max_pending: int = 4) -> None:
        self.capture, self.window, self._write = capture, window, write
        self.inbox = ShardInbox()
        self.stats = FeedStats()
        self.error: BaseException | None = None
        self.engine: Any = None
        self._make_engine = make_engine
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.writer = ShardWriter(self._write_and_resolve, None, max_pending)
        self.thread = threading.Thread(target=self._run, name="asteer-feed", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
            self._ready.set()
            feed_engine(self.engine, self.inbox, self.capture, self.window, self.writer,
                        self.stats)
        except BaseException as e:  # the engine failed to start or died: fail every shard
            if not isinstance(self.error, EngineDied):  # `fail` may have said it first
                self.error = _death(e, self.engine) if self.engine is not None else e
            self._fail_all(self.error)
        finally:
            self._ready.set()
            if self.engine is not None:
                self.engine.shutdown()

    async def started(self) -> Any:
        """The engine, once built on the feeding thread (its start-up error, if any)."""
        await asyncio.to_thread(self._ready.wait)
        self.check()
        return self.engine

    def check(self) -> None:
        """Raise if the feeding thread failed or stopped while shards may still come: an
        `EngineDied` as itself, so the driver can tell a dead engine from a bad shard."""
        if isinstance(self.error, EngineDied):
            raise EngineDied(str(self.error)) from self.error
        if self.error is not None:
            raise RuntimeError(f"engine feeder failed: {self.error!r}") from self.error
        if not self.thread.is_alive():
            raise RuntimeError("engine feeder stopped")

    def engine_died(self) -> bool:
        return isinstance(self.error, EngineDied) or (
            self.engine is not None and engine_dead(self.engine))

    def fail(self, error: EngineDied) -> None:
        """Fail every shard held here with `error` and take no more (the engine is
        gone): an idle feeding thread then ends and shuts the engine's client down."""
        if not isinstance(self.error, EngineDied):
            self.error = error
        self._fail_all(self.error)
        self.inbox.close()

    def _resolve(self, index: int, result: Any = None, error: BaseException | None = None
                 ) -> None:
        with self._lock:
            entry = self._waiting.pop(index, None)
        if entry is None:
            return
        loop, fut = entry

        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        loop.call_soon_threadsafe(settle)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            pending = list(self._waiting)
        for index in pending:
            self._resolve(index, error=error)

    def _write_and_resolve(self, shard: Shard, results: list[RolloutResult]) -> Any:
        """A failed write fails its shard alone (the driver retries it, perhaps here);
        the engine goes on with the others."""
        try:
            files = self._write(shard, results)
        except Exception as e:
            self._resolve(shard.index, error=e)
            return None
        tokens = sum(r.response_tokens for r in results)
        self._resolve(shard.index, (files, tokens))
        return files

    async def run_shard(self, shard: Shard, reqs: list[RolloutRequest]) -> tuple[Any, int]:
        """Queue one shard behind those in flight; its (files, response tokens) once its
        files are written. A shard already in flight here is refused."""
        self.check()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if shard.index in self._waiting:
                raise RuntimeError(f"shard {shard.name} is already in flight here")
            self._waiting[shard.index] = (loop, fut)
        try:
            self.inbox.put(shard, reqs)
            # the thread may have failed after the first check, and `_fail_all` before
            # this shard was registered: then nothing else would ever settle it
            self.check()
        except BaseException:
            with self._lock:
                self._waiting.pop(shard.index, None)
            self.check()  # a closed inbox because the engine died says so
            raise
        return await fut

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking shards, let the thread finish what it runs, shut the engine down."""
        self.inbox.close()
        self.thread.join(timeout)
        self.writer.close(wait=False)
