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

`feed_engine` drives a synchronous `SteeredEngine` step by step, in both executors: the
local one calls it with the plan's shards; the Ray actor runs it on a `FeedThread`, whose
`ShardInbox` receives shards from the driver a few ahead. One loop, one window, the same
slots and writer.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .plan import Shard
from .rollouts import (
    CaptureSettings,
    RolloutRequest,
    RolloutResult,
    capture_pairs,
    check_features,
    check_replay,
    finish_result,
    replay_sampling_params,
    replay_spec,
    result_from_output,
    sampling_params,
)

__all__ = ["in_flight_window", "ShardWriter", "ShardSlots", "ShardInbox", "feed_engine",
           "FeedThread", "FeedStats"]


def in_flight_window(engine_args: dict[str, Any], factor: float) -> int:
    """Requests kept submitted: a little over the engine's batch (`max_num_seqs`), so a
    finished sequence is replaced at the next step, not after a round trip."""
    return max(1, int(round(factor * int(engine_args.get("max_num_seqs", 256)))))


@dataclass
class FeedStats:
    """The generate phase: first request submitted to last rollout finished (engine
    start-up excluded), and what it produced."""

    t_first: float | None = None
    t_last: float | None = None
    items: int = 0
    tokens: int = 0
    shards: int = 0
    #: seconds the engine loop spent waiting for the writer's bounded queue
    writer_wait_s: float = 0.0

    @property
    def generate_seconds(self) -> float:
        if self.t_first is None or self.t_last is None:
            return 0.0
        return max(0.0, self.t_last - self.t_first)


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


@dataclass
class _Slot:
    shard: Shard
    results: list[RolloutResult | None]
    left: int


@dataclass
class ShardSlots:
    """Results of the shards in flight, in request order; `put` returns the shard and its
    results when its last rollout is in."""

    slots: dict[int, _Slot] = field(default_factory=dict)

    def open(self, shard: Shard, n: int) -> None:
        self.slots[shard.index] = _Slot(shard, [None] * n, n)

    def put(self, shard_index: int, pos: int, res: RolloutResult
            ) -> tuple[Shard, list[RolloutResult]] | None:
        s = self.slots[shard_index]
        if s.results[pos] is not None:
            raise RuntimeError(f"shard {s.shard.name}: request {pos} finished twice")
        s.results[pos] = res
        s.left -= 1
        if s.left:
            return None
        del self.slots[shard_index]
        return s.shard, list(s.results)  # type: ignore[arg-type]


class _Requests:
    """(shard index, position, request) in hand-in order, opening each shard's slot as
    its first request is taken. Polled, never exhausted for good: a `ShardInbox` may be
    empty now and have shards later, so `take` returning None only means "nothing now"."""

    def __init__(self, batches: Iterable[tuple[Shard, list[RolloutRequest]]],
                 slots: ShardSlots) -> None:
        self.batches, self.slots = iter(batches), slots
        self.current: Iterator[tuple[int, RolloutRequest]] | None = None
        self.shard_index = -1

    def take(self) -> tuple[int, int, RolloutRequest] | None:
        while True:
            if self.current is not None:
                nxt = next(self.current, None)
                if nxt is not None:
                    return self.shard_index, nxt[0], nxt[1]
                self.current = None
            batch = next(self.batches, None)
            if batch is None:
                return None
            shard, reqs = batch
            self.slots.open(shard, len(reqs))
            self.shard_index, self.current = shard.index, enumerate(reqs)


class ShardInbox:
    """Shards handed to a running `feed_engine` from another thread (the Ray actor's
    event loop). Iterating it never blocks (empty now is not finished), so the engine
    keeps stepping while the driver's next shard is on its way; `wait` blocks only when
    the engine has nothing left to run."""

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[Shard, list[RolloutRequest]]] = \
            collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, shard: Shard, reqs: list[RolloutRequest]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"shard {shard.name}: the feeder is closed")
            self._queue.append((shard, reqs))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __iter__(self) -> ShardInbox:
        return self

    def __next__(self) -> tuple[Shard, list[RolloutRequest]]:
        with self._cond:
            if self._queue:
                return self._queue.popleft()
        raise StopIteration

    def wait(self) -> bool:
        """Block until a shard is queued (True) or the inbox is closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            return bool(self._queue)


def feed_engine(engine: Any, batches: Iterable[tuple[Shard, list[RolloutRequest]]],
                capture: CaptureSettings | None, window: int,
                writer: ShardWriter, stats: FeedStats | None = None) -> FeedStats:
    """Run every shard's requests on a synchronous `SteeredEngine`, `window` rollouts in
    flight across shard boundaries; each complete shard goes to `writer` at once.

    With capture, each rollout's unsteered replay joins the running batch once the
    rollout has the tokens it needs (as `rollouts.run_with_capture`), and a shard's
    captures are collected from the workers when its last replay is done.

    `batches` may be a `ShardInbox`: then this runs until the inbox is closed, waiting
    for shards whenever the engine has run everything it was given. `stats`, when
    given, is updated as rollouts finish (the Ray actor reads it between shards).
    """
    from vllm.sampling_params import RequestOutputKind

    if capture is not None:
        check_features(capture)
    stats = stats if stats is not None else FeedStats()
    slots = ShardSlots()
    source = _Requests(batches, slots)
    nonce = uuid.uuid4().hex[:8]
    authors = capture is not None and capture.replay == "authors"
    tok = engine.get_tokenizer() if authors else None
    need = float("inf") if authors else (max(capture.steps) + 1 if capture else 0)
    replay_params = replay_sampling_params() if capture is not None else None
    warmed: set[tuple[int, ...]] = set()
    # per live rollout (key n): (shard index, pos, request, tokens, texts, finish, keys)
    live: dict[int, dict[str, Any]] = {}
    # per shard with capture: rollouts whose steered run and replay are both done
    ready: dict[int, list[dict[str, Any]]] = {}
    counter = iter(range(1 << 62))
    steered_live = 0

    def complete(shard_index: int, pos: int, res: RolloutResult) -> None:
        done = slots.put(shard_index, pos, res)
        stats.items += 1
        stats.tokens += res.response_tokens
        stats.t_last = time.time()
        if done is not None:
            t = time.time()
            writer.submit(*done)
            stats.writer_wait_s += time.time() - t
            stats.shards += 1

    def submit_next() -> list[tuple[str, dict, Any]]:
        nonlocal steered_live
        out: list[tuple[str, dict, Any]] = []
        while steered_live < window:
            nxt = source.take()
            if nxt is None:
                break
            si, pos, r = nxt
            n = next(counter)
            steered_live += 1
            sp = sampling_params(r)
            if capture is None:
                sp.output_kind = RequestOutputKind.FINAL_ONLY
                params = engine.decorate(sp, r.steer(), None)
                live[n] = {"shard": si, "pos": pos, "req": r}
            else:
                check_replay(capture, [r])
                ids = tuple(r.prompt_token_ids)
                if r.positions == "all" and not authors and ids not in warmed:
                    # one unsteered prefill per distinct prompt: the replays find its KV
                    warmed.add(ids)
                    out.append((f"w{n}:{nonce}", {"prompt_token_ids": list(ids)},
                                replay_params))
                sp.output_kind = RequestOutputKind.DELTA
                sk, rk = f"{r.id}:{nonce}:s", f"{r.id}:{nonce}:r"
                params = engine.decorate(sp, r.steer(), {"key": sk, "steps": list(capture.steps)})
                live[n] = {"shard": si, "pos": pos, "req": r, "tokens": [], "texts": [],
                           "finish": None, "keys": (sk, rk), "replayed": False,
                           "steered_done": False, "replay_done": False}
            out.append((f"s{n}:{nonce}", {"prompt_token_ids": r.prompt_token_ids}, params))
            if stats.t_first is None:
                stats.t_first = time.time()
        return out

    def finish_captured(rec: dict[str, Any]) -> None:
        si = rec["shard"]
        ready.setdefault(si, []).append(rec)
        slot = slots.slots[si]
        if len(ready[si]) < slot.left:
            return
        recs = ready.pop(si)
        reqs = [x["req"] for x in recs]
        collected = engine.collect(capture_pairs(reqs, [x["keys"] for x in recs], capture,
                                          engine.num_layers))
        for x, c in zip(recs, collected, strict=True):
            from types import SimpleNamespace

            out = SimpleNamespace(outputs=[SimpleNamespace(
                text="".join(x["texts"]), token_ids=x["tokens"], finish_reason=x["finish"])])
            complete(si, x["pos"], finish_result(x["req"], out, c, capture, engine.num_layers))

    def on_output(out: Any) -> list[tuple[str, dict, Any]]:
        nonlocal steered_live
        kind, n = out.request_id[0], int(out.request_id[1:].split(":")[0])
        if kind == "w":
            return []
        rec = live[n]
        more: list[tuple[str, dict, Any]] = []
        if capture is None:
            if out.finished:
                del live[n]
                steered_live -= 1
                complete(rec["shard"], rec["pos"], result_from_output(rec["req"], out))
                more = submit_next()
            return more
        if kind == "r":
            if out.finished:
                rec["replay_done"] = True
        else:
            comp = out.outputs[0]
            rec["tokens"].extend(comp.token_ids)
            rec["texts"].append(comp.text)
            if out.finished:
                rec["finish"] = comp.finish_reason
                rec["steered_done"] = True
                steered_live -= 1
            if not rec["replayed"] and (len(rec["tokens"]) >= need or out.finished):
                rec["replayed"] = True
                ids, cap = replay_spec(rec["req"], rec["tokens"], capture, rec["keys"][1],
                                        tok)
                more.append((f"r{n}:{nonce}", {"prompt_token_ids": ids},
                             engine.decorate(replay_params, None, cap)))
        if rec["steered_done"] and rec["replay_done"]:
            del live[n]
            finish_captured(rec)
        if out.finished and kind == "s":
            more.extend(submit_next())
        return more

    while True:
        engine.stream(submit_next(), on_output)
        if not isinstance(batches, ShardInbox) or not batches.wait():
            break
    if slots.slots:  # the engine stopped with rollouts missing: never commit a partial shard
        names = ", ".join(s.shard.name for s in slots.slots.values())
        raise RuntimeError(f"rollouts: engine finished with shards incomplete: {names}")
    return stats


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
            self.error = e
            self._fail_all(e)
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
        """Raise if the feeding thread failed or stopped while shards may still come."""
        if self.error is not None:
            raise RuntimeError(f"engine feeder failed: {self.error!r}") from self.error
        if not self.thread.is_alive():
            raise RuntimeError("engine feeder stopped")

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
            raise
        return await fut

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking shards, let the thread finish what it runs, shut the engine down."""
        self.inbox.close()
        self.thread.join(timeout)
        self.writer.close(wait=False)
