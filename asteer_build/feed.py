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

`feed_engine` drives an in-process synchronous `SteeredEngine` (the local executor) step
by step; `AsyncShardFeeder` drives an `AsyncSteeredEngine` (the Ray actor, which receives
shards from the driver a few ahead). Both use the same window, slots and writer.
"""

from __future__ import annotations

import asyncio
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
    run_rollout_async,
    sampling_params,
)

__all__ = ["in_flight_window", "ShardWriter", "ShardSlots", "feed_engine", "AsyncShardFeeder",
           "FeedStats"]


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


def _requests(batches: Iterable[tuple[Shard, list[RolloutRequest]]], slots: ShardSlots
              ) -> Iterator[tuple[int, int, RolloutRequest]]:
    """(shard index, position, request), opening each shard's slot as it starts."""
    for shard, reqs in batches:
        slots.open(shard, len(reqs))
        for pos, r in enumerate(reqs):
            yield shard.index, pos, r


def feed_engine(engine: Any, batches: Iterable[tuple[Shard, list[RolloutRequest]]],
                capture: CaptureSettings | None, window: int,
                writer: ShardWriter) -> FeedStats:
    """Run every shard's requests on a synchronous `SteeredEngine`, `window` rollouts in
    flight across shard boundaries; each complete shard goes to `writer` at once.

    With capture, each rollout's unsteered replay joins the running batch once the
    rollout has the tokens it needs (as `rollouts.run_with_capture`), and a shard's
    captures are collected from the workers when its last replay is done.
    """
    from vllm.sampling_params import RequestOutputKind

    if capture is not None:
        check_features(capture)
    stats = FeedStats()
    slots = ShardSlots()
    source = _requests(batches, slots)
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
            nxt = next(source, None)
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

    engine.stream(submit_next(), on_output)
    if slots.slots:  # the engine stopped with rollouts missing: never commit a partial shard
        names = ", ".join(s.shard.name for s in slots.slots.values())
        raise RuntimeError(f"rollouts: engine finished with shards incomplete: {names}")
    return stats


class AsyncShardFeeder:
    """The same feeding on an `AsyncSteeredEngine` (the Ray engine actor): every shard
    handed in runs concurrently, all drawing on one window of `window` requests, so the
    engine keeps working across shard boundaries; a complete shard is written by the
    writer thread, and `run_shard` returns its files for the driver to commit."""

    def __init__(self, engine: Any, capture: CaptureSettings | None, window: int,
                 write: Callable[[Shard, list[RolloutResult]], Any],
                 max_pending: int = 4) -> None:
        self.engine, self.capture = engine, capture
        self.sem = asyncio.Semaphore(window)
        self.writer = ShardWriter(write, None, max_pending)
        self.stats = FeedStats()

    async def _one(self, req: RolloutRequest) -> RolloutResult:
        async with self.sem:
            if self.stats.t_first is None:
                self.stats.t_first = time.time()
            res = await run_rollout_async(self.engine, req, self.capture)
        self.stats.t_last = time.time()
        return res

    async def run_shard(self, shard: Shard, reqs: list[RolloutRequest]) -> tuple[Any, int]:
        results = list(await asyncio.gather(*(self._one(r) for r in reqs)))
        # submit() may block on the bounded queue: off the event loop
        fut = await asyncio.to_thread(self.writer.submit, shard, results)
        files = await asyncio.wrap_future(fut)
        tokens = sum(r.response_tokens for r in results)
        self.stats.items += len(results)
        self.stats.tokens += tokens
        self.stats.shards += 1
        return files, tokens

    def close(self) -> None:
        self.writer.close(wait=False)
