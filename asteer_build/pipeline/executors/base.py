"""The executor interface, the per-shard commit record, and the one rollouts summary.

An executor runs a build's engine work: the vectors stage's pooling and the rollouts.
`build` picks one by name (`get_executor`), the way vLLM picks its executor class from
`distributed_executor_backend`, and never asks which one it has. Each rollouts shard is
reported the moment its manifest entry is saved, as a `ShardRecord` passed to the
build's callback: a later stage (a streaming judge, a multi-node driver) can start on a
shard without waiting for the stage to end.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..plan import Shard
    from ..run import Run

__all__ = ["Executor", "ShardRecord", "OnCommit", "RolloutTally", "host_name"]


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard: what it holds, where and when it ran, what it took.

    `attempts` counts the times this run handed the shard to an engine, the committing
    one included; `retry_causes` says why each earlier attempt was lost (so it has
    `attempts - 1` entries). `started` is when the committing attempt was handed to its
    engine, `ended` when its manifest entry was saved (epoch seconds). `node` is the Ray
    node id it ran on: nodes of one machine, or of a cluster of identical hosts, share
    `host`."""

    stage: str
    shard: str
    model: str
    rows: int
    host: str
    pid: int
    #: the Ray actor that ran it (its slot, e.g. `tiny#0`); None in-process
    actor: str | None
    attempts: int
    retry_causes: tuple[str, ...]
    started: float
    ended: float
    #: the Ray node id; None in-process
    node: str | None = None

    def __post_init__(self) -> None:
        if self.attempts != len(self.retry_causes) + 1:
            raise ValueError(f"shard {self.shard}: {self.attempts} attempt(s) but "
                             f"{len(self.retry_causes)} retry cause(s)")
        if self.ended < self.started:
            raise ValueError(f"shard {self.shard}: ended {self.ended} before it started "
                             f"{self.started}")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["retry_causes"] = list(self.retry_causes)
        return d


#: the build's subscriber: called once per committed shard, on the thread that committed
#: it (the local executor's writer thread, the Ray driver's loop), so keep it short
OnCommit = Callable[[ShardRecord], None]


def host_name() -> str:
    return socket.gethostname()


class RolloutTally:
    """What a rollouts stage did, summed over models, and the summary every executor
    returns from it: the same keys whichever ran (benchmarks compare them side by side),
    plus the executor's own extras."""

    def __init__(self, executor: str, on_commit: OnCommit) -> None:
        self.executor = executor
        self.t0 = time.time()
        self.items = self.tokens = 0
        #: per model, epoch seconds: first request submitted, last rollout finished
        self.windows: dict[str, list[float | None]] = {}
        self.records: list[ShardRecord] = []
        self._on_commit = on_commit
        self._lock = threading.Lock()

    def committed(self, record: ShardRecord) -> None:
        """Keep the record for the summary and pass it on to the build's subscriber."""
        with self._lock:
            self.records.append(record)
        self._on_commit(record)

    def model_done(self, model: str, items: int, tokens: int, t_first: float | None,
                   t_last: float | None) -> None:
        self.items += items
        self.tokens += tokens
        self.windows[model] = [t_first, t_last]

    def summary(self, shards_run: int, **extra: Any) -> dict[str, Any]:
        dt = time.time() - self.t0
        gen = sum(max(0.0, b - a) for a, b in self.windows.values()
                  if a is not None and b is not None)
        return {"executor": self.executor, **extra, "shards_run": shards_run,
                "items_run": self.items, "tokens": self.tokens, "seconds": round(dt, 2),
                # first request submitted to last rollout finished, engine start-up
                # excluded: what throughput comparisons should use
                "generate_seconds": round(gen, 2),
                # epoch seconds, per model: to line the phase up with metrics or CPU samples
                "generate_windows": self.windows,
                "items_per_s": round(self.items / dt, 2) if dt else None,
                "shards": [r.as_dict() for r in self.records]}


class Executor(ABC):
    """Runs one build's engine work; one instance per `execute_run`, closed at its end.

    Subclasses set `name` (their key in `EXECUTORS`)."""

    name: ClassVar[str]

    def __init__(self, run: Run) -> None:
        self.run = run

    @abstractmethod
    def vector_files(self, model: ModelConfig, settings: Any) -> dict[str, bytes]:
        """The vectors stage's files (name -> bytes) for `model`, pooled with `settings`
        (a `VectorSettings`); the build stores and commits them."""

    @abstractmethod
    def run_rollouts(self, todo: list[Shard], on_commit: OnCommit) -> dict[str, Any]:
        """Run and commit every shard of `todo` (each through the manifest, then
        `on_commit`); return `RolloutTally.summary`. Raise if a shard could not be
        committed, after committing the others."""

    def judge_room(self, replicas: int, gpus_per_replica: int) -> str | None:
        """Whether self-hosted judge servers fit beside this executor's engines, so they
        can label while the engines generate: None if so, else why not. One machine
        (the default): never, the servers would share the engines' GPUs."""
        return (f"the {self.name} executor runs on one machine, where a vllm judge would "
                "share the engines' GPUs")

    def close(self) -> None:
        """Release what the executor keeps across stages (engines), also after a failure;
        nothing by default."""
        return None
