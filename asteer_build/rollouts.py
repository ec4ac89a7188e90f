"""Steered rollouts as the pipeline consumes them: requests in, result rows out.

This is the contract between the engine (and its capture, replay and features) and the
build pipeline: the pipeline plans `RolloutRequest`s, calls `run_rollouts` (local,
synchronous) or `run_rollouts_async` (Ray feeder, many in flight), and writes the returned
`RolloutResult`s into shards. Capture settings, when given, add the early hidden-state
features and raw activations of `asteer_build.capture` / `asteer_build.features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine import SteerSpec


@dataclass(frozen=True)
class RolloutRequest:
    """One planned rollout. `prompt_token_ids` is the chat-templated prompt."""

    id: str
    prompt_token_ids: list[int]
    vector: str
    alpha: float
    layer: int
    positions: str = "all"
    seed: int | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0

    def steer(self) -> SteerSpec:
        return SteerSpec(self.vector, float(self.alpha), int(self.layer), self.positions)


@dataclass
class RolloutResult:
    id: str
    response: str
    response_token_ids: list[int]
    finish_reason: str
    #: feature name -> value (float32), None when capture is off
    features: dict[str, float] | None = None
    #: name -> float16 array [positions, layers, hidden], None when activations are off
    activations: dict[str, np.ndarray] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def response_tokens(self) -> int:
        return len(self.response_token_ids)


def sampling_params(req: RolloutRequest):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
    )


def _result(req: RolloutRequest, out: Any) -> RolloutResult:
    comp = out.outputs[0]
    return RolloutResult(
        id=req.id,
        response=comp.text,
        response_token_ids=list(comp.token_ids),
        finish_reason=str(comp.finish_reason),
    )


def run_rollouts(engine: Any, requests: Sequence[RolloutRequest], capture: Any = None):
    """Generate every request in one continuous batch; results in request order."""
    if capture is not None:
        from .capture import run_with_capture

        return run_with_capture(engine, requests, capture)
    outs = engine.generate(
        [{"prompt_token_ids": r.prompt_token_ids} for r in requests],
        [sampling_params(r) for r in requests],
        [r.steer() for r in requests],
    )
    return [_result(r, o) for r, o in zip(requests, outs, strict=True)]


async def run_rollout_async(engine: Any, req: RolloutRequest, capture: Any = None):
    """One request on an `AsyncSteeredEngine`; the feeder keeps many of these in flight."""
    if capture is not None:
        from .capture import run_one_with_capture_async

        return await run_one_with_capture_async(engine, req, capture)
    out = await engine.generate_final(
        {"prompt_token_ids": req.prompt_token_ids}, sampling_params(req), req.steer(), req.id
    )
    return _result(req, out)
