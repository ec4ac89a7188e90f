"""Adapter for vLLM 0.32/0.33's GPU Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`).

MRv2 keeps each request in a persistent state slot (`req_states.req_id_to_index`) for its
lifetime and builds every step's batch through `idx_mapping_np` (batch index -> slot). So
the per-request row and window start live in two slot-indexed arrays, written when a
request is added and cleared when it finishes or is preempted (MRv2 frees preempted
requests and re-adds them as new on resume); the per-step lookup is one numpy gather,
with no per-request Python in the step. The index is filled right after
`prepare_inputs`, before the forward or the full-graph replay reads it. Dummy runs
(`execute_model(dummy_run=True)`: data-parallel ranks without work, warmup, graph
capture) skip `prepare_inputs`, so they get an empty fill instead.

Not exercised in CI (no GPU there): the CPU adapter and the shared `SteeringState` are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..capture_buffer import CAP_KEY, POOL_KEY, CaptureBuffer, PoolBuffer
from ..spec import from_extra_args
from ..steering import SteeringState
from .common import UnsupportedVLLMError, new_request_prompt_len

NAME = "gpu-v2"


def check(runner: Any) -> None:
    need = ("add_requests", "finish_requests", "prepare_inputs", "req_states", "max_num_reqs")
    missing = [a for a in need if not hasattr(runner, a)]
    if missing:
        raise UnsupportedVLLMError(
            f"asteer: this vLLM's Model Runner V2 lacks {missing}; supported are vLLM 0.32 and 0.33"
        )


def install(
    runner: Any, state: SteeringState, capture: CaptureBuffer, pool: PoolBuffer
) -> None:
    nslots = runner.max_num_reqs
    rows_by_slot = np.zeros(nslots, dtype=np.int64)
    start_by_slot = np.zeros(nslots, dtype=np.int64)
    # capture arrays by slot: key, base (very negative = none), step mask, steering layer
    cap_key_by_slot = [""] * nslots
    cap_base_by_slot = np.full(nslots, -(1 << 40), dtype=np.int64)
    cap_mask_by_slot = np.zeros(nslots, dtype=np.uint64)
    cap_layer_by_slot = np.full(nslots, -1, dtype=np.int64)
    slots = runner.req_states.req_id_to_index
    orig_finish = runner.finish_requests
    orig_add = runner.add_requests
    orig_prepare = runner.prepare_inputs
    orig_execute = runner.execute_model

    def finish_requests(scheduler_output, *args, **kwargs):
        gone = scheduler_output.finished_req_ids
        if scheduler_output.preempted_req_ids:
            gone = gone | scheduler_output.preempted_req_ids
        for req_id in gone:
            slot = slots.get(req_id)
            if slot is not None:
                rows_by_slot[slot] = 0
                start_by_slot[slot] = 0
                cap_base_by_slot[slot] = -(1 << 40)
                cap_mask_by_slot[slot] = 0
            state.release(req_id)
            capture.release(req_id)
            pool.release(req_id)
        return orig_finish(scheduler_output, *args, **kwargs)

    def add_requests(scheduler_output, *args, **kwargs):
        out = orig_add(scheduler_output, *args, **kwargs)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            spec = from_extra_args(sp.extra_args if sp is not None else None)
            prompt_len = new_request_prompt_len(new)
            row = state.acquire(new.req_id, spec, prompt_len)
            slot = slots[new.req_id]
            rows_by_slot[slot] = row
            start_by_slot[slot] = state.requests[new.req_id][2] if row else 0
            layer = int(spec["l"]) if row else -1
            capture.acquire(new.req_id, (sp.extra_args or {}).get(CAP_KEY) if sp else None,
                            prompt_len, layer)
            pool.acquire(new.req_id, (sp.extra_args or {}).get(POOL_KEY) if sp else None,
                         prompt_len)
            cap = capture.requests.get(new.req_id)
            if cap is not None:
                cap_key_by_slot[slot] = cap[0]
                cap_base_by_slot[slot], cap_mask_by_slot[slot], cap_layer_by_slot[slot] = cap[1:]
        return out

    def prepare_inputs(*args, **kwargs):
        batch = orig_prepare(*args, **kwargs)
        n = batch.num_reqs
        idx = batch.idx_mapping_np[:n]
        computed = batch.num_computed_tokens_np[:n].astype(np.int64, copy=False)
        scheduled = batch.num_scheduled_tokens[:n].astype(np.int64, copy=False)
        state.fill_index(rows_by_slot[idx], start_by_slot[idx], computed, scheduled)
        masks = cap_mask_by_slot[idx]
        keys = [cap_key_by_slot[i] for i in idx] if masks.any() else [""] * n
        capture.fill((keys, cap_base_by_slot[idx], masks, cap_layer_by_slot[idx]),
                     computed, scheduled)
        # Pooling requests are rare (the vectors stage): a per-request lookup only then.
        pool_arrays = pool.request_arrays(batch.req_ids[:n]) if pool.requests else (
            np.zeros(n, np.int64), np.full(n, -1, np.int64), np.zeros(n, np.int64))
        pool.fill(pool_arrays, computed, scheduled)
        return batch

    def execute_model(*args, **kwargs):
        if kwargs.get("dummy_run", args[2] if len(args) > 2 else False):
            # Dummy batches (DP ranks with no work, warmup, graph capture) skip
            # `prepare_inputs`: without this they would read the last real step's
            # indices (capture gathers past the dummy batch, dummy tokens pooled).
            fill_empty(state, capture, pool)
        try:
            return orig_execute(*args, **kwargs)
        finally:
            capture.drain()

    runner.finish_requests = finish_requests
    runner.add_requests = add_requests
    runner.prepare_inputs = prepare_inputs
    runner.execute_model = execute_model


def fill_empty(state: SteeringState, capture: CaptureBuffer, pool: PoolBuffer) -> None:
    """Indices for a step with no real requests: in bounds, selecting nothing."""
    state.fill_empty()
    capture.fill_empty()
    pool.fill_empty()
