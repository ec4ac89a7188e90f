"""The body of a Ray engine actor: a `SteeredEngine` fed by the local executor's loop.

A plain class, so it can be tested without Ray; `ray.RayExecutor` wraps it with
`ray.remote`. The actor runs `feed.feed_engine` on a `feed.FeedThread`: the same window,
slots and writer thread as the local executor, so the engine never drains between the
shards the driver hands it a few ahead. The engine runs at normal CPU priority
(`_engine_priority`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..plan import Shard
from .base import host_name

if TYPE_CHECKING:
    from ...inputs.sources import Prompt
    from ..config import BuildConfig
    from ..work import ModelContext

__all__ = ["EngineHost"]

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
        from ...core.lockcheck import require_lock
        from ...engine import SteeredEngine
        from ..feed import FeedThread
        from ..shards import open_store
        from ..work import engine_kwargs, model_context, write_shard

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
                                 lambda s, res: write_shard(store, s, res, ctx.norms,
                                                            ctx.raw_alpha))
        await self.feeder.started()
        self._write_pid()
        return {"pid": os.getpid(), "node": _node_ip(), "host": host_name(),
                "max_in_flight": self.max_in_flight, "niceness": self.niceness}

    def _write_pid(self) -> None:
        """Where fault-injection tests find the actor process (`core.testseam` hook
        `actor_pid_dir`)."""
        from ...core import testseam

        pid_dir = testseam.hook("actor_pid_dir")
        if pid_dir:
            os.makedirs(pid_dir, exist_ok=True)
            with open(os.path.join(pid_dir, f"{os.getpid()}.pid"), "w") as f:
                f.write(str(os.getpid()))

    async def run_shard(self, shard: Shard) -> dict[str, Any]:
        """One shard through the shared feeder (`feed.py`): its requests join the window
        the other shards in flight draw on; files come back for the driver to commit."""
        from ..work import shard_requests

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
