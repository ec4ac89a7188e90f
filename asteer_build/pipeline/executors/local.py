"""The embedded default: one in-process `SteeredEngine` per model, fed by `feed.py`.

No Ray, nothing to set up: what `make demo` and a single-GPU user run. The engine keeps
a window of requests in flight across shard boundaries (no drain between shards); each
shard is written on a writer thread and committed as soon as its last rollout is done,
so a kill loses at most the shards not yet committed. The vectors stage pools on the
same engine when rollouts follow in this run, so one engine starts per model, not two.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ...core.console import console
from ..feed import ShardWriter, feed_engine, in_flight_window
from ..plan import Shard
from ..work import engine_kwargs, model_context, shard_requests, write_shard
from .base import Executor, OnCommit, RolloutTally, ShardRecord, host_name

if TYPE_CHECKING:
    from ...engine import SteeredEngine
    from ..config import ModelConfig
    from ..rollouts import RolloutRequest
    from ..run import Run

__all__ = ["LocalExecutor"]


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, run: Run) -> None:
        super().__init__(run)
        #: in-process engines by model name: started by the first stage that needs one,
        #: reused by the next, shut down by `close`
        self.engines: dict[str, SteeredEngine] = {}
        self.engine_start_seconds: dict[str, float] = {}

    def start_engine(self, model: ModelConfig) -> SteeredEngine:
        """The model's engine for this run, started on first use."""
        from ...engine import SteeredEngine
        from ..work import resolve_model_path

        if model.name not in self.engines:
            console.say(f"{model.name}: starting the engine")
            t = time.time()
            self.engines[model.name] = SteeredEngine(resolve_model_path(model.path),
                                                     steer_layers=[self.run.cfg.layer],
                                                     **engine_kwargs(model))
            self.engine_start_seconds[model.name] = round(time.time() - t, 2)
        return self.engines[model.name]

    def close(self) -> None:
        while self.engines:
            _, engine = self.engines.popitem()
            engine.shutdown()

    def vector_files(self, model: ModelConfig, settings: Any) -> dict[str, bytes]:
        from ..work import vector_files

        return vector_files(model.path, self.run.plan.concepts, settings,
                            engine=self._shared_engine(model, settings))

    def _shared_engine(self, model: ModelConfig, settings: Any) -> SteeredEngine | None:
        """The rollouts' engine when the vectors stage can pool on it (vLLM pooling with
        the model's own engine arguments) and rollouts follow in this run; else None
        (the stage starts its own)."""
        if (settings.pool != "vllm" or "rollouts" not in self.run.opts.stages
                or dict(settings.engine_args or {}) != engine_kwargs(model)):
            return None
        return self.start_engine(model)

    def run_rollouts(self, todo: list[Shard], on_commit: OnCommit) -> dict[str, Any]:
        run = self.run
        cfg, store, manifest = run.cfg, run.store, run.manifest
        capture = cfg.capture
        tally = RolloutTally(self.name, on_commit)
        host, pid = host_name(), os.getpid()
        writer_wait = 0.0
        for model in cfg.models:
            shards = [s for s in todo if s.model == model.name]
            if not shards:
                continue
            ctx = model_context(store, cfg, model, run.plan.prompts,
                                run.plan.sampling[model.name])
            engine = self.start_engine(model)
            engine.register_vectors(ctx.vectors)
            console.say(f"rollouts: {model.name}: {len(shards)} shards, "
                        f"{sum(len(s.items) for s in shards):,} items")
            bar = console.progress(total=sum(len(s.items) for s in shards), unit="item",
                                   desc=f"rollouts {model.name}",
                                   disable=not run.opts.progress)
            #: shard index -> when the feeding loop took its first request
            started: dict[int, float] = {}

            def commit(shard: Shard, files: Any, _bar: Any = bar,
                       _started: dict[int, float] = started) -> None:
                manifest.record(files, executor="local")
                tally.committed(ShardRecord(
                    "rollouts", shard.name, shard.model,
                    next(f.rows for f in files if f.stage == "rollouts"), host, pid, None,
                    1, (), _started[shard.index], time.time()))
                _bar.update(len(shard.items))

            writer = ShardWriter(
                lambda s, res, _ctx=ctx: write_shard(store, s, res, _ctx.norms,
                                                     _ctx.raw_alpha), commit)
            window = in_flight_window(model.engine_args, cfg.ray.in_flight_factor)
            try:
                reqs = functools.partial(shard_requests, cfg, ctx)
                stats = feed_engine(engine, _stamped(shards, started, reqs), capture, window,
                                    writer)
                writer.close()
            except BaseException:
                writer.close(wait=False)
                raise
            finally:
                bar.close()
            tally.model_done(model.name, stats.items, stats.tokens, stats.t_first,
                             stats.t_last)
            writer_wait += stats.writer_wait_s
        return tally.summary(len(todo), writer_wait_seconds=round(writer_wait, 3),
                             engine_start_seconds=dict(self.engine_start_seconds))


def _stamped(shards: list[Shard], started: dict[int, float],
             requests: Callable[[Shard], list[RolloutRequest]]
             ) -> Iterator[tuple[Shard, list[RolloutRequest]]]:
    """The shards with their requests, as `feed_engine` pulls them: it takes the next
    shard only when the window has room for its first request, so the time of each pull
    is when the shard started running."""
    for s in shards:
        started[s.index] = time.time()
        yield s, requests(s)
