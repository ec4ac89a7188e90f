"""The feeding state machine: shards of rollout requests through a synchronous
`SteeredEngine`, a window of rollouts in flight across shard boundaries.

One machine for every caller: the build's executors (`feed.feed_engine`, and on the Ray
actor `feed.FeedThread` with a `ShardInbox`) and `rollouts.run_with_capture` (one
shard, everything in flight). Each rollout is a typed `LiveRollout` from submission to
its row; each engine request is known by id as the `Kind` of request it is for its
rollout, never parsed back from the id.

- `ShardSlots` collects each shard's rows in request order and says when its last one
  is in: that shard is complete, whatever the others are doing, and goes to the
  `on_shard` callback at once (so shards may complete out of plan order).
- With capture, each rollout's replay joins the running batch as soon as the rollout
  has the tokens it needs, and a shard's captures are collected from the workers when
  its last replay is done.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .records import (
    CaptureSettings,
    RolloutRequest,
    RolloutResult,
    capture_keys,
    capture_pair,
    check_features,
    check_replay,
    finish_result,
    output_result,
    replay_sampling_params,
    replay_spec,
    sampling_params,
    steered_capture,
)

__all__ = ["ShardLike", "OneBatch", "FeedStats", "ShardSlots", "ShardInbox", "Kind", "Phase",
           "LiveRollout", "Feeder"]


class ShardLike(Protocol):
    """What feeding needs of a shard (`plan.ShardLike`, or `OneBatch`): an index unique among
    the shards in flight, and a name for messages."""

    @property
    def index(self) -> int: ...

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class OneBatch:
    """A plain list of requests fed as one shard (`rollouts.run_with_capture`)."""

    index: int = 0
    name: str = "batch"


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


@dataclass
class _Slot:
    shard: ShardLike
    results: list[RolloutResult | None]
    left: int


@dataclass
class ShardSlots:
    """Results of the shards in flight, in request order; `put` returns the shard and its
    results when its last rollout is in."""

    slots: dict[int, _Slot] = field(default_factory=dict)

    def open(self, shard: ShardLike, n: int) -> None:
        self.slots[shard.index] = _Slot(shard, [None] * n, n)

    def put(self, shard_index: int, pos: int, res: RolloutResult
            ) -> tuple[ShardLike, list[RolloutResult]] | None:
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
    empty now and have shards later, so `take` returning None only means "nothing now".
    A shard with no requests has no last rollout to complete it: it waits in `empty`."""

    def __init__(self, batches: Iterable[tuple[ShardLike, list[RolloutRequest]]],
                 slots: ShardSlots) -> None:
        self.batches, self.slots = iter(batches), slots
        self.current: Iterator[tuple[int, RolloutRequest]] | None = None
        self.shard_index = -1
        self.empty: list[ShardLike] = []

    def take_empty(self) -> list[ShardLike]:
        out, self.empty = self.empty, []
        return out

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
            if not reqs:
                self.empty.append(shard)
                continue
            self.slots.open(shard, len(reqs))
            self.shard_index, self.current = shard.index, enumerate(reqs)


class ShardInbox:
    """Shards handed to a running `feed_engine` from another thread (the Ray actor's
    event loop). Iterating it never blocks (empty now is not finished), so the engine
    keeps stepping while the driver's next shard is on its way; `wait` blocks only when
    the engine has nothing left to run."""

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[ShardLike, list[RolloutRequest]]] = \
            collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, shard: ShardLike, reqs: list[RolloutRequest]) -> None:
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

    def __next__(self) -> tuple[ShardLike, list[RolloutRequest]]:
        with self._cond:
            if self._queue:
                return self._queue.popleft()
        raise StopIteration

    def wait(self) -> bool:
        """Block until a shard is queued (True) or the inbox is closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed)
            return bool(self._queue)



class Kind(enum.Enum):
    """What an engine request is to the rollout it serves (the value prefixes its id)."""

    WARM = "w"  # an unsteered prefill of a prompt, so its replays find the KV cached
    STEERED = "s"
    REPLAY = "r"


class Phase(enum.Enum):
    """Where a live rollout stands."""

    GENERATING = "generating"  # the steered run is in flight, its replay not yet sent
    REPLAYING = "replaying"  # the replay is sent: waiting for both runs to finish
    DONE = "done"  # no engine request left: its row can be made (with capture, collected)


@dataclass(eq=False)
class LiveRollout:
    """One rollout from submission to result: its request, where its row goes (shard,
    position), its capture keys, its engine requests in flight and its outputs so far."""

    n: int
    shard: int
    pos: int
    req: RolloutRequest
    keys: tuple[str, str] | None = None
    phase: Phase = Phase.GENERATING
    running: set[Kind] = field(default_factory=lambda: {Kind.STEERED})
    tokens: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish: Any = None

    def result(self) -> RolloutResult:
        return output_result(self.req, "".join(self.texts), self.tokens, self.finish)


#: (request id, prompt, decorated params): what `SteeredEngine.stream` adds
Submission = tuple[str, dict[str, Any], Any]


class Feeder:
    """The feeding state machine: shards of requests through a synchronous
    `SteeredEngine`, `window` rollouts in flight across shard boundaries; each shard's
    rows go to `on_shard` as soon as its last rollout is done.

    With capture, each rollout's unsteered replay joins the running batch once the
    rollout has the tokens it needs (the authors' replay decodes the whole response, so
    it waits for the end); a prefill of each distinct prompt steered at `all` positions
    runs first, so the replays find its unsteered KV in the prefix cache; a shard's
    captures are collected from the workers when its last replay is done.

    `batches` may be a `ShardInbox`: then `run` goes on until the inbox is closed,
    waiting for shards whenever the engine has run everything it was given. `stats` is
    updated as rollouts finish (the Ray actor reads it between shards).
    """

    def __init__(self, engine: Any, batches: Iterable[tuple[ShardLike, list[RolloutRequest]]],
                 capture: CaptureSettings | None, window: int,
                 on_shard: Callable[[ShardLike, list[RolloutResult]], None],
                 stats: FeedStats | None = None) -> None:
        if capture is not None:
            check_features(capture)
        self.engine, self.batches, self.capture, self.window = engine, batches, capture, window
        self.on_shard = on_shard
        self.stats = stats if stats is not None else FeedStats()
        self.slots = ShardSlots()
        self.source = _Requests(batches, self.slots)
        self.nonce = uuid.uuid4().hex[:8]
        self.authors = capture is not None and capture.replay == "authors"
        self.tokenizer = engine.get_tokenizer() if self.authors else None
        self.need = float("inf") if self.authors else (
            max(capture.steps) + 1 if capture is not None else 0)
        self.replay_params = replay_sampling_params() if capture is not None else None
        self.warmed: set[tuple[int, ...]] = set()
        self.requests: dict[str, tuple[Kind, LiveRollout | None]] = {}
        #: per shard with capture: its rollouts in phase DONE, not yet collected
        self.ready: dict[int, list[LiveRollout]] = {}
        self.taken = 0
        self.steered_live = 0

    def run(self) -> FeedStats:
        while True:
            self.engine.stream(self._submit(), self._on_output)
            if not isinstance(self.batches, ShardInbox) or not self.batches.wait():
                break
        if self.slots.slots:  # the engine stopped with rollouts missing: never a partial shard
            names = ", ".join(s.shard.name for s in self.slots.slots.values())
            raise RuntimeError(f"rollouts: engine finished with shards incomplete: {names}")
        return self.stats

    def _request(self, kind: Kind, live: LiveRollout, ids: list[int], params: Any,
                 serves: bool = True) -> Submission:
        rid = f"{kind.value}{live.n}:{self.nonce}"
        self.requests[rid] = (kind, live if serves else None)
        return rid, {"prompt_token_ids": ids}, params

    def _submit(self) -> list[Submission]:
        """Steered requests (and warm-up prefills) until `window` steered runs are live."""
        from vllm.sampling_params import RequestOutputKind

        out: list[Submission] = []
        while self.steered_live < self.window:
            nxt = self.source.take()
            if nxt is None:
                break
            si, pos, req = nxt
            live = LiveRollout(self.taken, si, pos, req)
            self.taken += 1
            self.steered_live += 1
            sp = sampling_params(req)
            if self.capture is None:
                sp.output_kind = RequestOutputKind.FINAL_ONLY
                params = self.engine.decorate(sp, req.steer(), None)
            else:
                check_replay(self.capture, [req])
                ids = tuple(req.prompt_token_ids)
                if req.positions == "all" and not self.authors and ids not in self.warmed:
                    self.warmed.add(ids)
                    out.append(self._request(Kind.WARM, live, list(ids), self.replay_params,
                                             serves=False))
                sp.output_kind = RequestOutputKind.DELTA
                live.keys = capture_keys(req, self.nonce)
                params = self.engine.decorate(sp, req.steer(),
                                              steered_capture(self.capture, live.keys[0]))
            out.append(self._request(Kind.STEERED, live, req.prompt_token_ids, params))
            if self.stats.t_first is None:
                self.stats.t_first = time.time()
        for shard in self.source.take_empty():
            self._shard_done(shard, [])
        return out

    def _on_output(self, out: Any) -> list[Submission]:
        kind, live = self.requests[out.request_id]
        if out.finished:
            del self.requests[out.request_id]
        if live is None:  # a warm-up prefill: only its cached KV matters
            return []
        more: list[Submission] = []
        if kind is Kind.REPLAY:
            if out.finished:
                live.running.discard(Kind.REPLAY)
        else:
            comp = out.outputs[0]
            live.tokens.extend(comp.token_ids)
            live.texts.append(comp.text)
            if out.finished:
                live.finish = comp.finish_reason
                live.running.discard(Kind.STEERED)
                self.steered_live -= 1
            if self.capture is not None and live.phase is Phase.GENERATING and (
                    len(live.tokens) >= self.need or out.finished):
                more.append(self._replay(live))
        if not live.running:
            live.phase = Phase.DONE
            self._rollout_done(live)
        if out.finished and kind is Kind.STEERED:
            more.extend(self._submit())
        return more

    def _replay(self, live: LiveRollout) -> Submission:
        assert self.capture is not None and live.keys is not None
        live.phase = Phase.REPLAYING
        live.running.add(Kind.REPLAY)
        ids, cap = replay_spec(live.req, live.tokens, self.capture, live.keys[1],
                               self.tokenizer)
        return self._request(Kind.REPLAY, live, ids,
                             self.engine.decorate(self.replay_params, None, cap))

    def _rollout_done(self, live: LiveRollout) -> None:
        if self.capture is None:
            self._complete(live.shard, live.pos, live.result())
            return
        batch = self.ready.setdefault(live.shard, [])
        batch.append(live)
        if len(batch) < self.slots.slots[live.shard].left:
            return
        del self.ready[live.shard]
        layers = self.engine.num_layers
        collected = self.engine.collect(
            [capture_pair(x.req, x.keys, self.capture, layers) for x in batch])  # type: ignore[arg-type]
        for x, c in zip(batch, collected, strict=True):
            self._complete(x.shard, x.pos,
                           finish_result(x.req, x.result(), c, self.capture, layers))

    def _complete(self, shard_index: int, pos: int, res: RolloutResult) -> None:
        done = self.slots.put(shard_index, pos, res)
        self.stats.items += 1
        self.stats.tokens += res.response_tokens
        self.stats.t_last = time.time()
        if done is not None:
            self._shard_done(*done)

    def _shard_done(self, shard: ShardLike, results: list[RolloutResult]) -> None:
        self.on_shard(shard, results)
        self.stats.shards += 1

