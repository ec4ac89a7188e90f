"""Steered rollouts as the pipeline consumes them: requests in, result rows out, with
early hidden-state capture, the exact unsteered replay and the features.

This is the contract between the engine and the build pipeline: the pipeline plans
`RolloutRequest`s, calls `run_rollouts` (local, synchronous) or `run_rollout_async` (Ray
feeder, many in flight), and writes the returned `RolloutResult`s into shards.
`CaptureSettings`, when given, add the features and raw activations.

Capture and replay, for each steered rollout:
1. the steered request carries a capture spec: the worker keeps the residual stream at
   decode steps t in `steps` (t = 0: the forward over the last prompt token; t = n: the
   forward consuming generated token n), after every block, and before the steering
   addition at the steered layer L;
2. once it finishes, a replay runs with no steering over exactly the same token ids
   (chat-templated prompt + the first generated tokens up to the last capture step),
   one prefill, capturing the same positions. Its prompt blocks come from the prefix
   cache (unsteered KV of the same prompt), so it costs a few tokens per rollout;
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
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .contract import DEFAULT_OFFSETS, DEFAULT_STEPS, feature_names
from .engine import SteerSpec
from .engine.collect import unwire
from .engine.protocol import AsyncSteeringEngine, SteeringEngine


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
    #: 0 = off (vLLM's convention); a build fills both from `asteer_build.sampling`
    top_k: int = 0
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
    """Every sampling value explicitly from the request: vLLM's defaults for the rest
    (min_p 0, no penalties) are no truncation, and the engine does not merge the model's
    generation config into params it is given (only its stop tokens)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_k=req.top_k,
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


@dataclass(frozen=True)
class CaptureSettings:
    steps: tuple[int, ...] = DEFAULT_STEPS
    offsets: tuple[int, ...] = DEFAULT_OFFSETS
    features: bool = True
    activations: bool = True
    activation_dtype: str = "float16"
    extra_offsets: tuple[int, ...] = field(default=())  # e.g. (-1,): also capture L - 1

    def __post_init__(self) -> None:
        steps = tuple(int(t) for t in self.steps)
        if not steps or sorted(set(steps)) != list(steps) or steps[0] < 0 or steps[-1] > 63:
            raise ValueError(f"capture.steps: need increasing ints in 0..63, got {self.steps}")
        offs = tuple(int(k) for k in self.offsets)
        if not offs or offs[0] != 0 or sorted(set(offs)) != list(offs):
            raise ValueError(
                f"capture.offsets: need increasing ints starting at 0, got {self.offsets}"
            )
        if self.activation_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"capture.activation_dtype: {self.activation_dtype!r}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "offsets", offs)

    def resolve(self, layer: int, num_layers: int) -> tuple[list[int], list[int]]:
        """(kept offsets, dropped offsets) for a steered layer in a model of that depth."""
        kept = [k for k in self.offsets if layer + k < num_layers]
        dropped = [k for k in self.offsets if layer + k >= num_layers]
        return kept, dropped

    def feature_names(self, layer: int, num_layers: int) -> list[str]:
        return feature_names(self.steps, self.resolve(layer, num_layers)[0])


def _replay_prompt(req: RolloutRequest, generated: list[int], steps: Sequence[int]):
    """Token ids of the replay and the steps it can capture (those the rollout reached)."""
    avail = [t for t in steps if t <= len(generated) - 1]
    last = max(avail) if avail else 0
    return list(req.prompt_token_ids) + list(generated[:last]), avail


def _pairs(reqs, keys, settings, num_layers):
    out = []
    for req, (sk, rk) in zip(reqs, keys, strict=True):
        kept, _ = settings.resolve(req.layer, num_layers)
        offsets = sorted(set(kept) | {k for k in settings.extra_offsets if req.layer + k >= 0})
        out.append({
            "steered": sk, "replay": rk, "vector": req.vector, "alpha": float(req.alpha),
            "layer": int(req.layer), "offsets": kept if settings.features else offsets,
            "steps": list(settings.steps), "features": settings.features,
            "activations": settings.activations,
            "activation_dtype": settings.activation_dtype,
        })
        if settings.extra_offsets:
            out[-1]["offsets"] = offsets
            out[-1]["feature_offsets"] = kept
    return out


def _finish(req, out, collected, settings, num_layers) -> RolloutResult:
    res = _result(req, out)
    kept, dropped = settings.resolve(req.layer, num_layers)
    present = collected.get("steps_present", [])
    res.extra = {
        "dropped_offsets": dropped,
        "steps_missing": [t for t in settings.steps if t not in present],
        "capture_overflow": bool(collected.get("overflow")),
    }
    if collected.get("error"):
        raise RuntimeError(f"rollout {req.id}: capture failed: {collected['error']}")
    if settings.features and "features" in collected:
        values = unwire(collected["features"])
        names = feature_names(settings.steps, kept)
        res.features = dict(zip(names, values.tolist(), strict=True))
    if settings.activations and "activations" in collected:
        res.activations = {k: unwire(v) for k, v in collected["activations"].items()}
    return res


def _keys(reqs) -> list[tuple[str, str]]:
    nonce = uuid.uuid4().hex[:8]
    return [(f"{r.id}:{nonce}:s", f"{r.id}:{nonce}:r") for r in reqs]


def _replay_params():
    from vllm import SamplingParams

    # One prefill; the sampled token is discarded (and never detokenized).
    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)


def _check_features(settings: CaptureSettings) -> None:
    if settings.features and settings.extra_offsets:
        raise ValueError("capture.extra_offsets is for inspecting activations; turn features off")


def run_with_capture(
    engine: SteeringEngine, requests: Sequence[RolloutRequest], settings: CaptureSettings
) -> list[RolloutResult]:
    """Rollouts with capture, replay and features (synchronous `SteeredEngine`).

    Each rollout's replay is submitted as soon as the rollout has generated the tokens
    the replay needs (or finished), so replays run inside the same continuous batch as
    the remaining decoding instead of after it; a prefill of each distinct prompt runs
    first so the replays find its unsteered KV in the prefix cache.
    """
    from vllm.sampling_params import RequestOutputKind

    _check_features(settings)
    reqs = list(requests)
    keys = _keys(reqs)
    need = max(settings.steps) + 1
    nonce = keys[0][0].rsplit(":", 2)[1] if keys else ""
    tokens: list[list[int]] = [[] for _ in reqs]
    texts: list[list[str]] = [[] for _ in reqs]
    finish: list[Any] = [None] * len(reqs)
    replayed: set[int] = set()
    replay_params = _replay_params()

    def submit_steered():
        # One unsteered prefill per distinct prompt whose steered prompt KV is salted
        # (mode `all`): its blocks are cached by the time the replays arrive, a few
        # steps later, so every replay of that prompt reuses them.
        warm = {tuple(r.prompt_token_ids) for r in reqs if r.positions == "all"}
        for j, ids in enumerate(sorted(warm)):
            yield f"w{j}:{nonce}", {"prompt_token_ids": list(ids)}, replay_params
        for i, (r, (sk, _)) in enumerate(zip(reqs, keys, strict=True)):
            sp = sampling_params(r)
            sp.output_kind = RequestOutputKind.DELTA
            params = engine.decorate(sp, r.steer(), {"key": sk, "steps": list(settings.steps)})
            yield f"s{i}:{nonce}", {"prompt_token_ids": r.prompt_token_ids}, params

    def on_output(out):
        kind, i = out.request_id[0], int(out.request_id[1:].split(":")[0])
        if kind != "s":
            return ()
        comp = out.outputs[0]
        tokens[i].extend(comp.token_ids)
        texts[i].append(comp.text)
        if out.finished:
            finish[i] = comp.finish_reason
        if i in replayed or not (len(tokens[i]) >= need or out.finished):
            return ()
        replayed.add(i)
        r = reqs[i]
        ids, avail = _replay_prompt(r, tokens[i], settings.steps)
        cap = {"key": keys[i][1], "steps": avail, "base": len(r.prompt_token_ids) - 1}
        return [(f"r{i}:{nonce}", {"prompt_token_ids": ids},
                 engine.decorate(replay_params, None, cap))]

    engine.stream(submit_steered(), on_output)
    outs = [
        SimpleNamespace(outputs=[SimpleNamespace(
            text="".join(texts[i]), token_ids=tokens[i], finish_reason=finish[i])])
        for i in range(len(reqs))
    ]
    collected = engine.collect(_pairs(reqs, keys, settings, engine.num_layers))
    return [
        _finish(r, o, c, settings, engine.num_layers)
        for r, o, c in zip(reqs, outs, collected, strict=True)
    ]


async def run_one_with_capture_async(
    engine: AsyncSteeringEngine, req: RolloutRequest, settings: CaptureSettings
) -> RolloutResult:
    """The same for one request on an `AsyncSteeredEngine` (the Ray feeder's unit)."""
    _check_features(settings)
    ((sk, rk),) = _keys([req])
    out = await engine.generate_final(
        {"prompt_token_ids": req.prompt_token_ids}, sampling_params(req), req.steer(),
        request_id=sk, capture={"key": sk, "steps": list(settings.steps)},
    )
    ids, avail = _replay_prompt(req, list(out.outputs[0].token_ids), settings.steps)
    await engine.generate_final(
        {"prompt_token_ids": ids}, _replay_params(), None, request_id=rk,
        capture={"key": rk, "steps": avail, "base": len(req.prompt_token_ids) - 1},
    )
    (collected,) = await engine.collect(_pairs([req], [(sk, rk)], settings, engine.num_layers))
    return _finish(req, out, collected, settings, engine.num_layers)


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
    return [_result(r, o) for r, o in zip(requests, outs, strict=True)]


async def run_rollout_async(engine: AsyncSteeringEngine, req: RolloutRequest,
                            capture: CaptureSettings | None = None) -> RolloutResult:
    """One request on an `AsyncSteeredEngine`; the feeder keeps many of these in flight."""
    if capture is not None:
        return await run_one_with_capture_async(engine, req, capture)
    out = await engine.generate_final(
        {"prompt_token_ids": req.prompt_token_ids}, sampling_params(req), req.steer(), req.id
    )
    return _result(req, out)


def probe_feature_rows(
    model: SteeringEngine | str,
    vector: Any,
    prompts: Sequence[str],
    alphas: Sequence[float],
    layer: int,
    probe_tokens: int = 6,
    *,
    positions: str = "all",
    temperature: float = 0.7,
    seed: int = 0,
    engine_args: dict[str, Any] | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Features of short steered probes (+ replays) for every (prompt, alpha), in one batch.

    For online prediction (`asteer-train suggest`): `model` is a running `SteeredEngine`
    or a model path/id to start one with `engine_args`; `vector` a registered name or a
    `[hidden]` array; prompts are user turns (the model's chat template is applied).
    Pass the build's effective `top_k` / `top_p` (build.json's `sampling`) to probe as
    its rollouts were sampled; the defaults are no truncation.
    Returns a DataFrame with `prompt`, `alpha` and the feature columns.
    """
    import pandas as pd

    from .engine import SteeredEngine

    engine = model if isinstance(model, SteeringEngine) else SteeredEngine(
        str(model), **(engine_args or {}))
    name = vector if isinstance(vector, str) else "asteer-suggest"
    if not isinstance(vector, str):
        engine.register_vectors({name: torch.as_tensor(vector, dtype=torch.float32)})
    tok = engine.get_tokenizer()
    settings = CaptureSettings(activations=False)
    if probe_tokens < max(settings.steps) + 1:
        raise ValueError(f"probe_tokens={probe_tokens}: need >= {max(settings.steps) + 1} "
                         f"to reach capture step {max(settings.steps)}")
    reqs, keys = [], []
    for i, p in enumerate(prompts):
        ids = list(tok.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=False))
        for j, a in enumerate(alphas):
            reqs.append(RolloutRequest(
                id=f"suggest-{i}-{j}", prompt_token_ids=ids, vector=name, alpha=float(a),
                layer=int(layer), positions=positions, seed=seed + j,
                max_tokens=probe_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p))
            keys.append((p, float(a)))
    rows = []
    for (p, a), res in zip(keys, run_with_capture(engine, reqs, settings), strict=True):
        rows.append({"prompt": p, "alpha": a, **(res.features or {})})
    return pd.DataFrame(rows)
