"""`judge.kind` -> what runs it: the one registry the build's judge stage and
`asteer-judge run` both open judges through, so a kind means the same thing in both.

A kind's factory takes the config and a `JudgeContext` and returns an async context
manager: entering starts what the judge needs (an endpoint pool; the Batch API stage,
run to the end; judge servers), yields a `JudgeSession` (the judge and how many rows to
keep in flight), and leaving stops it, also when labelling fails.

`vllm` is a kind this package knows but does not run: its servers are started by the
builder (`asteer_build.pipeline.judge_servers`), which plugs its factory in through
`open_judge(..., plug=...)`; the judge package never starts vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from judge.cache import JudgmentCache
from judge.config import KINDS, JudgeConfig
from judge.judges import Judge
from judge.label import BatchJudge, Request
from judge.pool import EndpointConfig
from judge.rubric import DEFAULT_RUBRIC, Rubric

__all__ = ["JudgeContext", "JudgeSession", "JudgeFactory", "FACTORIES", "HOSTED",
           "open_judge", "llm_session"]

log = logging.getLogger("judge")


@dataclass
class JudgeContext:
    """What the caller owns and the kinds need: the rubric, the one open judgment cache,
    and for `openai-batch` where its state lives and which rows still need a judgment."""

    rubric: Rubric = DEFAULT_RUBRIC
    cache: JudgmentCache | None = None
    #: openai-batch: the batch state folder (a rerun resumes the batches found there)
    batch_dir: str | Path | None = None
    #: openai-batch: the calls the labelling will make (read when the stage starts)
    requests: Callable[[], Sequence[Request]] | None = None
    rerun_failed: bool = False
    #: openai-batch: submit beyond `judge.batch.cost_cap_usd`
    yes: bool = False
    say: Callable[[str], None] = log.info
    #: openai-batch: called after each batch-state write (`BatchStage.on_save`)
    on_state_saved: Callable[[], None] | None = None


@dataclass
class JudgeSession:
    judge: Judge | BatchJudge
    #: rows labelled concurrently (a batch judge takes a table at once: 1)
    workers: int = 1
    #: per-endpoint counters, read after labelling (a pool's; none for other kinds)
    stats: Callable[[], list[dict[str, Any]]] = list
    #: what the summary should show about the lifetime (e.g. the servers started)
    info: dict[str, Any] = field(default_factory=dict)


JudgeFactory = Callable[[JudgeConfig, JudgeContext],
                        contextlib.AbstractAsyncContextManager[JudgeSession]]


@contextlib.asynccontextmanager
async def _rules(cfg: JudgeConfig, ctx: JudgeContext) -> AsyncIterator[JudgeSession]:
    from judge.judges import RulesJudge

    yield JudgeSession(RulesJudge())


@contextlib.asynccontextmanager
async def llm_session(cfg: JudgeConfig, ctx: JudgeContext,
                      endpoints: Sequence[EndpointConfig] | None = None
                      ) -> AsyncIterator[JudgeSession]:
    """The rubric through an `EndpointPool` of `endpoints` (default: the config's), open
    while labelling runs. Also the `vllm` kind's judge once its servers are up."""
    from judge.judges import LLMJudge
    from judge.pool import EndpointPool

    eps = _need_endpoints(cfg, cfg.endpoints if endpoints is None else endpoints)
    async with EndpointPool(eps, model=cfg.model, retry=cfg.retry) as pool:
        judge = LLMJudge(pool, cfg.model, max_tokens=cfg.max_tokens,
                         temperature=cfg.temperature, structured=cfg.structured,
                         rubric=ctx.rubric)
        yield JudgeSession(judge, cfg.workers or 2 * pool.capacity, pool.stats)


def _need_endpoints(cfg: JudgeConfig, eps: Sequence[EndpointConfig]) -> list[EndpointConfig]:
    if not eps:
        raise ValueError(f"judge.endpoints: the {cfg.kind} judge needs at least one endpoint "
                         "(or set judge.kind: rules)")
    return list(eps)


def _llm(cfg: JudgeConfig, ctx: JudgeContext
         ) -> contextlib.AbstractAsyncContextManager[JudgeSession]:
    _need_endpoints(cfg, cfg.endpoints)  # now, before the caller writes anything
    return llm_session(cfg, ctx)


def _openai_batch(cfg: JudgeConfig, ctx: JudgeContext
                  ) -> contextlib.AbstractAsyncContextManager[JudgeSession]:
    _need_endpoints(cfg, cfg.endpoints)  # the first is the Batch API's
    return _batch_session(cfg, ctx)


@contextlib.asynccontextmanager
async def _batch_session(cfg: JudgeConfig, ctx: JudgeContext) -> AsyncIterator[JudgeSession]:
    """Queue the rows still to judge, run the Batch API stage to the end (in a thread:
    it polls with sleeps), then label from its answers, now in the cache, and its final
    failures. The state folder makes a killed run resume its batches, never pay twice."""
    from judge.batches import BatchStage, FailuresJudge

    if ctx.cache is None or ctx.batch_dir is None or ctx.requests is None:
        raise ValueError("judge.kind openai-batch: the caller gave no judgment cache, batch "
                         "state folder or requests")
    stage = BatchStage.from_config(cfg, ctx.batch_dir, ctx.cache, ctx.rubric,
                                   on_save=ctx.on_state_saved)
    queued = stage.add(ctx.requests(), rerun_failed=ctx.rerun_failed)
    ctx.say(f"judge: {queued} request(s) queued for the Batch API; "
            f"{len(stage.records)} batch(es) in {stage.dir}")
    await asyncio.to_thread(stage.run, yes=ctx.yes)
    s = stage.summary()
    ctx.say(f"judge: batches done, {s['failed_lines']} line(s) failed, "
            f"~${s['estimated_cost_usd']:.2f} estimated")
    yield JudgeSession(FailuresJudge(cfg.model, ctx.rubric.version, dict(stage.failures)),
                       info={"batches": s})


#: the kinds this package runs itself
FACTORIES: dict[str, JudgeFactory] = {
    "llm": _llm,
    "rules": _rules,
    "openai-batch": _openai_batch,
}

#: kinds a host program runs (it plugs the factory in), and what to say without it
HOSTED: dict[str, str] = {
    "vllm": "judge servers are started by asteer-build's judge stage (judge.server); to "
            "judge with servers that are already running, use kind: llm with their "
            "endpoints",
}


def _factory(kind: str, plug: Mapping[str, JudgeFactory]) -> JudgeFactory:
    if kind in plug:
        return plug[kind]
    if kind in FACTORIES:
        return FACTORIES[kind]
    if kind in HOSTED:
        raise ValueError(f"judge.kind: {kind}: {HOSTED[kind]}")
    raise ValueError(f"judge.kind: unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")


def open_judge(cfg: JudgeConfig, ctx: JudgeContext,
               plug: Mapping[str, JudgeFactory] | None = None
               ) -> contextlib.AbstractAsyncContextManager[JudgeSession]:
    """The judge of `cfg.kind` and its lifetime (`async with open_judge(...) as s`).
    `plug`: factories the caller runs itself (the builder's `vllm`). An unknown kind, a
    hosted one nobody plugged in, or a kind without its endpoints is a `ValueError` here,
    before anything starts; the lifetime starts on entering."""
    return _factory(cfg.kind, plug or {})(cfg, ctx)
