"""The body of a Ray engine actor: a `SteeredEngine` fed by the local executor's loop.

A plain class, so it can be tested without Ray; `ray.RayExecutor` wraps it with
`ray.remote`. The actor runs `feed.feed_engine` on a `feed.FeedThread`: the same window,
slots and writer thread as the local executor, so the engine never drains between the
shards the driver hands it a few ahead. The engine runs at normal CPU priority
(`_engine_priority`).

A dead engine core ends the actor: a watcher thread sees vLLM's engine-dead flag, fails
the shards held here with `feed.EngineDied` (the driver requeues them without charging
a retry) and exits the process a moment later, so no shard is ever handed to an actor
whose engine is gone and the driver's replacement starts at once, not after the next
missed health check.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from ..plan import Shard
from .base import host_name

if TYPE_CHECKING:
    from ...inputs.sources import Prompt
    from ..config import BuildConfig
    from ..work import ModelContext

__all__ = ["EngineHost", "node_id", "pool_vectors", "ENGINE_DEATH_GRACE_S"]

log = logging.getLogger("asteer_build.ray")

#: how long an actor whose engine died stays up: long enough for the failed shards'
#: replies to reach the driver (which then kills it itself), short enough that Ray
#: and the driver see it gone within seconds
ENGINE_DEATH_GRACE_S = 3.0


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
        _check_model_path(model.name, model.path)
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
        threading.Thread(target=self._watch_engine, args=(self.feeder,),
                         name="asteer-engine-watch", daemon=True).start()
        self._write_pid()
        return {"pid": os.getpid(), "node_ip": _node_ip(), "node": node_id(),
                "host": host_name(), "max_in_flight": self.max_in_flight,
                "niceness": self.niceness}

    def _watch_engine(self, feeder: Any, poll_s: float = 0.5) -> None:
        """End this actor once its engine core is dead (see the module docstring)."""
        from ..feed import EngineDied

        while not feeder.engine_died():
            if self.feeder is not feeder:  # shut down in order: nothing to watch
                return
            time.sleep(poll_s)
        if self.feeder is not feeder:
            return
        err = feeder.error if isinstance(feeder.error, EngineDied) else EngineDied(
            f"engine died: the engine core of {self.model_name} (actor pid {os.getpid()}) "
            "exited")
        log.error("%s; failing the shards held here and exiting", err)
        feeder.fail(err)
        time.sleep(ENGINE_DEATH_GRACE_S)
        os._exit(1)

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
                "seconds": time.time() - t0, "pid": os.getpid(), "node": node_id(),
                "t_first": self.feeder.stats.t_first, "t_last": self.feeder.stats.t_last}

    async def health(self) -> dict[str, Any]:
        if self.feeder is not None:
            self.feeder.check()  # the feeding thread stops if the engine core dies
        return {"pid": os.getpid(), "items": self.items_done, "tokens": self.tokens_done}

    def shutdown(self) -> None:
        # forgotten first: the engine watcher must not take this shutdown for a death
        feeder, self.feeder = self.feeder, None
        if feeder is not None:
            feeder.close()  # the feeding thread shuts its engine down


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


def pool_vectors(model_path: str, concepts: list[Any], settings: Any
                 ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The vectors stage's Ray task (`ray.vector_files_on_ray`): `work.vector_files` on
    the node Ray picked, and which node that was."""
    from ..work import vector_files

    t = time.time()
    files = vector_files(model_path, concepts, settings)
    return files, {"node": node_id(), "node_ip": _node_ip(), "host": host_name(),
                   "seconds": time.time() - t}


def _check_model_path(name: str, path: str) -> None:
    """Fail a start in a second, before vLLM is imported, when the model is a local
    path this node does not have, or a folder with no model config in it: the config
    was checked on the driver's machine, and a shared folder that is mounted there but
    not here (its mount point empty) is the usual way a node lacks it. An absolute path
    is never a Hub id."""
    from ..work import resolve_model_path

    resolved = resolve_model_path(path)
    if not os.path.isabs(resolved):
        return
    where = f"on node {node_id()[:12]} ({host_name()}, {_node_ip()})"
    if not os.path.exists(resolved):
        raise FileNotFoundError(f"model {name}: no {resolved} {where}")
    if os.path.isdir(resolved) and not any(
            os.path.isfile(os.path.join(resolved, f)) for f in ("config.json", "params.json")):
        raise FileNotFoundError(f"model {name}: {resolved} {where} holds no config.json "
                                "(a shared folder not mounted or synced here?)")


def node_id() -> str:
    """This process's Ray node id (hex); "?" outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or "?"
    except Exception:
        return "?"


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "?"
