"""The embedded default: one in-process `SteeredEngine` per model, shards in plan order.

No Ray, nothing to set up: what `make demo` and a single-GPU user run. Each shard is one
continuous batch; its files are committed before the next shard starts, so a kill loses
at most the shard in progress.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .console import console
from .plan import Shard
from .rollouts import run_rollouts
from .work import capture_settings, engine_kwargs, model_context, shard_requests, write_shard

if TYPE_CHECKING:
    from .build import Run

__all__ = ["run_rollouts_local"]


def run_rollouts_local(run: Run, todo: list[Shard]) -> dict[str, Any]:
    from .engine import SteeredEngine

    cfg, store, manifest = run.cfg, run.store, run.manifest
    capture = capture_settings(cfg)
    done_items = done_tokens = 0
    gen_seconds = 0.0
    t0 = time.time()
    for model in cfg.models:
        shards = [s for s in todo if s.model == model.name]
        if not shards:
            continue
        ctx = model_context(store, cfg, model, run.plan.prompts, run.plan.sampling[model.name])
        console.say(f"rollouts: {model.name}: starting the engine")
        engine = SteeredEngine(ctx.path, steer_layers=[cfg.layer], **engine_kwargs(model))
        try:
            engine.register_vectors(ctx.vectors)
            bar = console.progress(total=sum(len(s.items) for s in shards), unit="item",
                       desc=f"rollouts {model.name}", disable=not run.opts.progress)
            t_model = time.time()
            tokens = 0
            for s in shards:
                results = run_rollouts(engine, shard_requests(cfg, ctx, s), capture)
                files = write_shard(store, s, results, ctx.norms)
                manifest.record(files, executor="local")
                tokens += sum(r.response_tokens for r in results)
                bar.update(len(s.items))
                bar.set_postfix(tok_s=f"{tokens / max(time.time() - t_model, 1e-9):.0f}",
                                shard=s.index)
                done_items += len(s.items)
            bar.close()
            done_tokens += tokens
            gen_seconds += time.time() - t_model
        finally:
            engine.shutdown()
    dt = time.time() - t0
    return {"executor": "local", "shards_run": len(todo), "items_run": done_items,
            "tokens": done_tokens, "seconds": round(dt, 2),
            # time with an engine up: what throughput comparisons should use
            "generate_seconds": round(gen_seconds, 2),
            "items_per_s": round(done_items / dt, 2) if dt else None}
