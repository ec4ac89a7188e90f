"""The embedded default: one in-process `SteeredEngine` per model, fed by `feed.py`.

No Ray, nothing to set up: what `make demo` and a single-GPU user run. The engine keeps
a window of requests in flight across shard boundaries (no drain between shards); each
shard is written on a writer thread and committed as soon as its last rollout is done,
so a kill loses at most the shards not yet committed. The engine is the one the vectors
stage pooled on when it built this model's vectors in the same run (`run.engines`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..core.console import console
from .feed import ShardWriter, feed_engine, in_flight_window
from .plan import Shard
from .work import engine_kwargs, model_context, shard_requests, write_shard

if TYPE_CHECKING:
    from .build import Run

__all__ = ["run_rollouts_local", "start_engine"]


def start_engine(run: Run, model: Any) -> Any:
    """The model's in-process engine for this run: started once, shared by the vectors
    and rollouts stages, shut down by the build when it ends (`close_engines`)."""
    from ..engine import SteeredEngine
    from .work import resolve_model_path

    engines = run.engines
    if model.name not in engines:
        console.say(f"{model.name}: starting the engine")
        t = time.time()
        engines[model.name] = SteeredEngine(resolve_model_path(model.path),
                                            steer_layers=[run.cfg.layer],
                                            **engine_kwargs(model))
        run.engine_start_seconds[model.name] = round(time.time() - t, 2)
    return engines[model.name]


def run_rollouts_local(run: Run, todo: list[Shard]) -> dict[str, Any]:
    cfg, store, manifest = run.cfg, run.store, run.manifest
    capture = cfg.capture
    done_items = done_tokens = 0
    gen_seconds = writer_wait = 0.0
    windows: dict[str, list[float | None]] = {}
    t0 = time.time()
    for model in cfg.models:
        shards = [s for s in todo if s.model == model.name]
        if not shards:
            continue
        ctx = model_context(store, cfg, model, run.plan.prompts, run.plan.sampling[model.name])
        engine = start_engine(run, model)
        engine.register_vectors(ctx.vectors)
        console.say(f"rollouts: {model.name}: {len(shards)} shards, "
                    f"{sum(len(s.items) for s in shards):,} items")
        bar = console.progress(total=sum(len(s.items) for s in shards), unit="item",
                               desc=f"rollouts {model.name}", disable=not run.opts.progress)

        def commit(shard: Shard, files: Any, _bar: Any = bar) -> None:
            manifest.record(files, executor="local")
            _bar.update(len(shard.items))

        writer = ShardWriter(lambda s, res, _ctx=ctx: write_shard(store, s, res, _ctx.norms),
                             commit)
        window = in_flight_window(model.engine_args, cfg.ray.in_flight_factor)
        try:
            stats = feed_engine(engine, ((s, shard_requests(cfg, ctx, s)) for s in shards),
                                capture, window, writer)
            writer.close()
        except BaseException:
            writer.close(wait=False)
            raise
        finally:
            bar.close()
        done_items += stats.items
        done_tokens += stats.tokens
        gen_seconds += stats.generate_seconds
        windows[model.name] = [stats.t_first, stats.t_last]
        writer_wait += stats.writer_wait_s
    dt = time.time() - t0
    return {"executor": "local", "shards_run": len(todo), "items_run": done_items,
            "tokens": done_tokens, "seconds": round(dt, 2),
            # first request submitted to last rollout finished, engine start-up excluded:
            # what throughput comparisons should use
            "generate_seconds": round(gen_seconds, 2),
            # epoch seconds, per model: to line the phase up with metrics or CPU samples
            "generate_windows": windows,
            "writer_wait_seconds": round(writer_wait, 3),
            "engine_start_seconds": dict(run.engine_start_seconds),
            "items_per_s": round(done_items / dt, 2) if dt else None}
