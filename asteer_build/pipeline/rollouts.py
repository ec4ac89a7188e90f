"""Steered rollouts as the pipeline consumes them: requests in, result rows out, with
early hidden-state capture, the exact unsteered replay and the features.

This is the contract between the engine and the build pipeline: the pipeline plans
`RolloutRequest`s, runs them through `feed.feed_engine` (both executors) or `run_rollouts`
(one batch), and writes the returned `RolloutResult`s into shards.
`CaptureSettings`, when given, add the features and raw activations. The per-rollout
records and specs are defined in `records.py` (and import from here as well); with
capture, both the executors and `run_with_capture` run the one feeding state machine,
`feeder.Feeder`.

Capture and replay, for each steered rollout:
1. the steered request carries a capture spec: the worker keeps the residual stream at
   decode steps t in `steps` (t = 0: the forward over the last prompt token; t = n: the
   forward consuming generated token n), after every block, and before the steering
   addition at the steered layer L;
2. once it has the tokens the last capture step needs (or finished), a replay runs
   with no steering over exactly the same token ids
   (chat-templated prompt + the first generated tokens up to the last capture step),
   one prefill, capturing the same positions. Its prompt blocks come from the prefix
   cache (unsteered KV of the same prompt), so it costs a few tokens per rollout.
   `capture.replay: authors` runs the reference authors' replay instead (their
   `raw_hidden_state.py`), to reproduce their released features and measure its flaw:
   the bare prompt text + the decoded, cleaned response text, re-tokenized with the
   tokenizer's own special tokens and no chat template; step t is position
   len(tokens(prompt)) - 1 + t of that sequence. Its contexts differ from the steered
   run's, so DN / DS at the steered layer are no longer 0 / 1;
3. `collect` takes both from the worker and computes the features there
   (`asteer_build.engine.features`), returning them with the optional raw activations.

Offsets whose layer L + k is past the model's last block are dropped and recorded in
each result (`extra["dropped_offsets"]`), never silently. A response shorter than a
capture step cannot have that step: it is listed in `extra["steps_missing"]` and its
feature cells are computed from zero rows (distances 0, cosines 0).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np

from ..core.contract import DEFAULT_OFFSETS as DEFAULT_OFFSETS  # the public import path
from ..core.contract import DEFAULT_STEPS as DEFAULT_STEPS
from ..engine.protocol import AsyncSteeringEngine, SteeringEngine
from .feeder import Feeder, OneBatch
from .records import (
    CaptureSettings,
    RolloutRequest,
    RolloutResult,
    capture_keys,
    capture_pair,
    check_features,
    check_replay,
    finish_result,
    replay_sampling_params,
    replay_spec,
    result_from_output,
    sampling_params,
    steered_capture,
)
from .records import authors_response_text as authors_response_text


def run_with_capture(
    engine: SteeringEngine, requests: Sequence[RolloutRequest], settings: CaptureSettings
) -> list[RolloutResult]:
    """Rollouts with capture, replay and features (synchronous `SteeredEngine`): one
    shard through the build's feeding state machine (`feeder.Feeder`), all in flight.

    Each rollout's replay is submitted as soon as the rollout has generated the tokens
    the replay needs (or finished), so replays run inside the same continuous batch as
    the remaining decoding instead of after it; a prefill of each distinct prompt runs
    first so the replays find its unsteered KV in the prefix cache.
    """
    reqs = list(requests)
    check_features(settings)
    check_replay(settings, reqs)
    got: list[RolloutResult] = []
    Feeder(engine, [(OneBatch(), reqs)], settings, max(1, len(reqs)),
           lambda _, results: got.extend(results)).run()
    return got


async def run_one_with_capture_async(
    engine: AsyncSteeringEngine, req: RolloutRequest, settings: CaptureSettings
) -> RolloutResult:
    """The same for one request on an `AsyncSteeredEngine` (for asyncio callers)."""
    check_features(settings)
    check_replay(settings, [req])
    tok = engine.get_tokenizer() if settings.replay == "authors" else None
    sk, rk = capture_keys(req, uuid.uuid4().hex[:8])
    out = await engine.generate_final(
        {"prompt_token_ids": req.prompt_token_ids}, sampling_params(req), req.steer(),
        request_id=sk, capture=steered_capture(settings, sk),
    )
    ids, cap = replay_spec(req, list(out.outputs[0].token_ids), settings, rk, tok)
    await engine.generate_final(
        {"prompt_token_ids": ids}, replay_sampling_params(), None, request_id=rk, capture=cap,
    )
    (collected,) = await engine.collect(
        [capture_pair(req, (sk, rk), settings, engine.num_layers)])
    return finish_result(req, result_from_output(req, out), collected, settings,
                         engine.num_layers)


def replay_activations(
    engine: SteeringEngine,
    requests: Sequence[RolloutRequest],
    results: Sequence[RolloutResult],
    settings: CaptureSettings,
    replay: str | None = None,
) -> list[tuple[np.ndarray, list[int]]]:
    """Replay finished rollouts again, in `replay` mode (default: the settings'), and
    return per rollout its `[T, K, H]` float32 states at the settings' steps and kept
    offsets (zero rows for steps it could not capture) and the steps it captured.

    This is how two replays are compared on one steered pass (benchmarks/replay_modes.py):
    the other replay's features are `features.compute_batch` over the rollout's own
    `steered` / `steered_pre` activations and these states, after zeroing the steps
    either side lacks (what `collect` does for a rollout's own replay).
    """
    from dataclasses import replace

    mode = settings.replay if replay is None else replay
    s = replace(settings, replay=mode)
    reqs = list(requests)
    check_replay(s, reqs)
    tok = engine.get_tokenizer() if mode == "authors" else None
    nonce = uuid.uuid4().hex[:8]
    prompts, caps, pairs = [], [], []
    for req, res in zip(reqs, results, strict=True):
        if res.id != req.id:
            raise ValueError(f"result {res.id} does not belong to request {req.id}")
        key = f"{req.id}:{nonce}:x"
        ids, cap = replay_spec(req, res.response_token_ids, s, key, tok)
        prompts.append({"prompt_token_ids": ids})
        caps.append(cap)
        # the replay alone (steered == replay): only its activations are wanted
        pairs.append(capture_pair(req, (key, key), replace(
            s, features=False, activations=True, activation_dtype="float32",
            extra_offsets=()), engine.num_layers))
    engine.generate(prompts, [replay_sampling_params()] * len(prompts), None, capture=caps)
    out = []
    for req, got in zip(reqs, engine.collect(pairs), strict=True):
        if got.error:
            raise RuntimeError(f"rollout {req.id}: replay capture failed: {got.error}")
        present = list(got.steps_present)
        if got.activations is not None:
            states = got.activations["replay"].astype(np.float32)
        else:  # nothing captured at all
            kept, _ = s.resolve(req.layer, engine.num_layers)
            states = np.zeros((len(s.steps), len(kept), engine.hidden_size), np.float32)
        out.append((states, present))
    return out


def activation_bytes(settings: CaptureSettings, hidden: int, layers_kept: int) -> int:
    """Bytes of raw activations per rollout: steered + replay [T, K, H] + pre [T, 1, H]."""
    item = np.dtype(settings.activation_dtype if settings.activation_dtype != "bfloat16"
                    else "float16").itemsize
    return len(settings.steps) * (2 * layers_kept + 1) * hidden * item


def run_rollouts(engine: SteeringEngine, requests: Sequence[RolloutRequest],
                 capture: CaptureSettings | None = None) -> list[RolloutResult]:
    """Generate every request in one continuous batch; results in request order."""
    if capture is not None:
        return run_with_capture(engine, requests, capture)
    outs = engine.generate(
        [{"prompt_token_ids": r.prompt_token_ids} for r in requests],
        [sampling_params(r) for r in requests],
        [r.steer() for r in requests],
    )
    return [result_from_output(r, o) for r, o in zip(requests, outs, strict=True)]
