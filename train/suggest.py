"""Online use of the predictor: probabilities per alpha and a suggested alpha.

``suggest`` works from feature rows that are already computed (one per alpha of the
grid), so it needs no engine. ``suggest_live`` is the only code in ``train`` that
touches the builder: it imports ``asteer_build.rollouts`` when called, never at import
time, so the training package stays installable without vLLM / Ray.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from train.model import Predictor

# What suggest_live needs from the builder (kept in one place so the message and the
# check cannot drift apart).
LIVE_FUNCTION = "probe_feature_rows"
LIVE_SIGNATURE = (
    f"asteer_build.rollouts.{LIVE_FUNCTION}(model, vector, prompts, alphas, layer, "
    "probe_tokens) -> pandas.DataFrame with columns prompt, alpha and the feature "
    "columns named as in the dataset"
)


class LiveSuggestError(RuntimeError):
    """The live-engine path cannot run in this installation; the message says why."""


@dataclass
class Suggestion:
    alphas: list[float]
    probs: np.ndarray  # (n_alphas, 3): P(under), P(success), P(over)
    suggested_alpha: float | None  # None when no alpha reaches tau
    p_success: float

    def to_dict(self) -> dict:
        return {
            "alphas": self.alphas,
            "p_under": self.probs[:, 0].tolist(),
            "p_success": self.probs[:, 1].tolist(),
            "p_over": self.probs[:, 2].tolist(),
            "suggested_alpha": self.suggested_alpha,
            "max_p_success": self.p_success,
        }


def suggest(
    predictor: Predictor,
    feature_rows_by_alpha: pd.DataFrame | Mapping[float, Mapping[str, float]],
    tau: float = 0.0,
) -> Suggestion:
    """P(under / success / over) per alpha and the alpha with the highest P(success)
    (ties: the smaller alpha, the gentler intervention); None if below ``tau``."""
    if isinstance(feature_rows_by_alpha, pd.DataFrame):
        rows = feature_rows_by_alpha
        if "alpha" not in rows.columns:
            raise ValueError("feature rows need an 'alpha' column")
    else:
        rows = pd.DataFrame(
            [{**dict(r), "alpha": float(a)} for a, r in feature_rows_by_alpha.items()]
        )
    if rows.empty:
        raise ValueError("no feature rows given")
    if rows["alpha"].duplicated().any():
        raise ValueError("several feature rows for one alpha; pass one item at a time")
    rows = rows.sort_values("alpha", kind="stable").reset_index(drop=True)
    probs = predictor.predict_proba(rows)
    alphas = rows["alpha"].astype(float).tolist()
    best = int(np.lexsort((np.asarray(alphas), -probs[:, 1]))[0])
    p = float(probs[best, 1])
    return Suggestion(alphas, probs, alphas[best] if p >= tau else None, p)


def _live_probe_function():
    try:
        import asteer_build.rollouts as rollouts  # lazy on purpose: pulls in the engine
    except ImportError as exc:
        raise LiveSuggestError(
            f"live suggest needs the builder package (asteer_build.rollouts): {exc}. "
            "Install asteer with the cpu or gpu extra, or use "
            "`asteer-train suggest --features FILE` with precomputed feature rows."
        ) from exc
    fn = getattr(rollouts, LIVE_FUNCTION, None)
    if not callable(fn):
        raise LiveSuggestError(
            f"asteer_build.rollouts has no callable `{LIVE_FUNCTION}`; live suggest needs "
            f"{LIVE_SIGNATURE}. Use `asteer-train suggest --features FILE` with "
            "precomputed feature rows meanwhile."
        )
    return fn


def dataset_prompt_format(predictor: Predictor) -> dict:
    """The prompt format of the predictor's training data, as `train` read it from the
    dataset's build.json; the build default for a predictor trained without the record
    (the authors' feature caches, older predictors)."""
    from asteer_build.core.prompts import PromptFormat

    rec = (predictor.metadata.get("dataset") or {}).get("prompt_format")
    return PromptFormat.parse(rec, "predictor metadata: dataset.prompt_format").as_dict()


def suggest_live(
    predictor: Predictor,
    model: str,
    vector: np.ndarray,
    prompts: Sequence[str],
    alphas: Sequence[float],
    layer: int = 10,
    probe_tokens: int = 6,
    tau: float = 0.0,
    *,
    sampling: dict | None = None,
    replay: str = "exact",
    prompt_format: dict | None = None,
) -> dict[str, Suggestion]:
    """Run the short steered probes and replays of the whole grid (one batch, on the
    builder's engine) and suggest an alpha per prompt. `sampling` (`temperature`,
    `top_k`, `top_p`) and `replay` should be the training dataset's (its build.json),
    since the predictor only knows features of rollouts sampled and replayed that way.
    Prompts are rendered as the dataset's were: `prompt_format` defaults to the record
    training read from its build.json (the predictor's `dataset` metadata)."""
    if prompt_format is None:
        prompt_format = dataset_prompt_format(predictor)
    probe = _live_probe_function()
    rows = probe(
        model=model,
        vector=vector,
        prompts=list(prompts),
        alphas=list(alphas),
        layer=layer,
        probe_tokens=probe_tokens,
        replay=replay,
        prompt_format=prompt_format,
        **(sampling or {}),
    )
    if not isinstance(rows, pd.DataFrame) or not {"prompt", "alpha"} <= set(rows.columns):
        raise LiveSuggestError(f"{LIVE_FUNCTION} must return {LIVE_SIGNATURE}")
    return {
        str(p): suggest(predictor, g.drop(columns=["prompt"]), tau)
        for p, g in rows.groupby("prompt", sort=False)
    }
