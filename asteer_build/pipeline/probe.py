"""Short steered probes for online prediction (`asteer-train suggest --live`).

The predictor only knows features of rollouts made the way its dataset's were, so a
probe renders prompts with the dataset's `PromptFormat` (its build.json, through the
predictor's metadata), samples with its `sampling` and replays with its `capture.replay`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..core.prompts import PromptFormat, prompt_ids
from ..engine.protocol import SteeringEngine
from .rollouts import CaptureSettings, RolloutRequest, run_with_capture

__all__ = ["probe_feature_rows"]


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
    replay: str = "exact",
    prompt_format: PromptFormat | Mapping[str, Any] | None = None,
):
    """Features of short steered probes (+ replays) for every (prompt, alpha), in one batch.

    For online prediction (`asteer-train suggest`): `model` is a running `SteeredEngine`
    or a model path/id to start one with `engine_args`; `vector` a registered name or a
    `[hidden]` array; prompts are user turns (the model's chat template is applied).
    Pass the build's effective `top_k` / `top_p` (build.json's `sampling`) to probe as
    its rollouts were sampled; the defaults are no truncation. `replay`: the replay mode
    the predictor's training data used (`capture.replay`). `prompt_format`: the
    dataset's (`PromptFormat.from_build` of its build.json, or that record as a mapping);
    None is the build's default.
    Returns a DataFrame with `prompt`, `alpha` and the feature columns.
    """
    import pandas as pd

    from ..engine import SteeredEngine

    fmt = (prompt_format if isinstance(prompt_format, PromptFormat)
           else PromptFormat.parse(prompt_format, "prompt_format"))
    engine = model if isinstance(model, SteeringEngine) else SteeredEngine(
        str(model), **(engine_args or {}))
    name = vector if isinstance(vector, str) else "asteer-suggest"
    if not isinstance(vector, str):
        engine.register_vectors({name: torch.as_tensor(vector, dtype=torch.float32)})
    tok = engine.get_tokenizer()
    settings = CaptureSettings(activations=False, replay=replay)
    if probe_tokens < max(settings.steps) + 1:
        raise ValueError(f"probe_tokens={probe_tokens}: need >= {max(settings.steps) + 1} "
                         f"to reach capture step {max(settings.steps)}")
    reqs, keys = [], []
    for i, p in enumerate(prompts):
        ids = prompt_ids(tok, p, fmt)
        for j, a in enumerate(alphas):
            reqs.append(RolloutRequest(
                id=f"suggest-{i}-{j}", prompt_token_ids=ids, vector=name, alpha=float(a),
                layer=int(layer), positions=positions, seed=seed + j,
                max_tokens=probe_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, prompt=p))
            keys.append((p, float(a)))
    rows = []
    for (p, a), res in zip(keys, run_with_capture(engine, reqs, settings), strict=True):
        rows.append({"prompt": p, "alpha": a, **(res.features or {})})
    return pd.DataFrame(rows)
