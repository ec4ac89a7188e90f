"""One rollout's records: the planned request, its sampling, the capture settings, the
replay (exact or the authors'), the typed capture records sent to the engine, and the
result row made from what came back.

Everything here is per rollout and runs no engine: the feeding state machine
(`feed.py`) and the runners in `rollouts.py` drive engines with it, so a field means the
same whichever path produced a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.contract import DEFAULT_OFFSETS, DEFAULT_STEPS, feature_names
from ..engine.spec import CapturePair, CaptureSpec, CollectResult, SteerSpec


@dataclass(frozen=True)
class RolloutRequest:
    """One planned rollout. `prompt_token_ids` is the chat-templated prompt; `prompt` the
    user turn's text, which only the authors' replay (`capture.replay: authors`) reads."""

    id: str
    prompt_token_ids: list[int]
    vector: str
    alpha: float
    layer: int
    positions: str = "all"
    seed: int | None = None
    max_tokens: int = 256
    temperature: float = 0.7
    #: 0 = off (vLLM's convention); a build fills both from `asteer_build.pipeline.sampling`
    top_k: int = 0
    top_p: float = 1.0
    prompt: str | None = None
    #: benchmarks only (`core.testseam` hook `bench_lengths`): run exactly `max_tokens` tokens
    ignore_eos: bool = False

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
        ignore_eos=req.ignore_eos,
    )


def result_from_output(req: RolloutRequest, out: Any) -> RolloutResult:
    """A rollout without capture from vLLM's final output; shared by every runner so a
    result's fields mean the same whichever path (batch, stream, feeder) produced it."""
    comp = out.outputs[0]
    return output_result(req, comp.text, comp.token_ids, comp.finish_reason)


#: `CaptureSettings.replay`: the exact replay (ours, the default) or the authors'
REPLAY_MODES = ("exact", "authors")


@dataclass(frozen=True)
class CaptureSettings:
    """The config's `capture:` section. `replay`: `exact` (the same token ids as the
    steered run) or `authors` (the reference code's untemplated re-tokenization; needs
    each request's prompt text)."""

    steps: tuple[int, ...] = DEFAULT_STEPS
    offsets: tuple[int, ...] = DEFAULT_OFFSETS
    features: bool = True
    activations: bool = True
    activation_dtype: str = "float16"
    extra_offsets: tuple[int, ...] = field(default=())  # e.g. (-1,): also capture L - 1
    replay: str = "exact"

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
        if self.replay not in REPLAY_MODES:
            raise ValueError(f"capture.replay: expected one of {', '.join(REPLAY_MODES)}, "
                             f"got {self.replay!r}")
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


#: chat-role markers the authors' code cuts a response after, if the model echoed them
_ECHO_MARKERS = ("\nmodel\n", "\nassistant\n")


def authors_response_text(text: str) -> str:
    """A decoded response as the authors stored it: cut after the first echoed role
    marker (the first marker of `_ECHO_MARKERS` found), then stripped."""
    for marker in _ECHO_MARKERS:
        at = text.find(marker)
        if at != -1:
            text = text[at + len(marker):]
            break
    return text.strip()


def authors_replay_prompt(tokenizer: Any, req: RolloutRequest, generated: Sequence[int],
                          steps: Sequence[int]) -> tuple[list[int], list[int], int]:
    """The authors' replay of one finished rollout: (token ids, steps it can capture,
    base position of step 0).

    Their raw pass tokenizes `prompt + response` (no separator, no chat template, the
    tokenizer's own special tokens, e.g. BOS) where the response is the whole generation
    decoded without special tokens and cleaned (`authors_response_text`); step t sits at
    position len(tokens(prompt)) - 1 + t. A step past the text's end is not captured
    (its feature cells are 0, as in theirs). The ids are cut after the last captured
    position: a causal model's states there do not depend on what follows.
    """
    if not req.prompt:
        raise ValueError(f"rollout {req.id}: capture.replay=authors needs the prompt text "
                         "(RolloutRequest.prompt), which this request does not carry")
    response = authors_response_text(tokenizer.decode(list(generated), skip_special_tokens=True))
    full = list(tokenizer(req.prompt + response, add_special_tokens=True)["input_ids"])
    base = len(tokenizer(req.prompt, add_special_tokens=True)["input_ids"]) - 1
    if base < 0:
        raise ValueError(f"rollout {req.id}: the prompt text tokenizes to no tokens")
    avail = [int(t) for t in steps if base + t < len(full)]
    last = max(avail) if avail else 0
    return [int(x) for x in full[: base + last + 1]], avail, base


def check_replay(settings: CaptureSettings, reqs: Sequence[RolloutRequest]) -> None:
    """Fail before generating anything when the authors' replay cannot apply."""
    if settings.replay != "authors":
        return
    bad = [r.id for r in reqs if not r.prompt]
    if bad:
        raise ValueError(f"capture.replay=authors needs each request's prompt text "
                         f"(RolloutRequest.prompt); missing for {len(bad)} request(s), "
                         f"e.g. {bad[:3]}")



def check_features(settings: CaptureSettings) -> None:
    """Refuse a capture mix the feature columns cannot describe, before any generation."""
    if settings.features and settings.extra_offsets:
        raise ValueError("capture.extra_offsets is for inspecting activations; turn features off")


def capture_keys(req: RolloutRequest, nonce: str) -> tuple[str, str]:
    """The capture keys of a rollout's steered run and its replay (unique per run)."""
    return f"{req.id}:{nonce}:s", f"{req.id}:{nonce}:r"


def steered_capture(settings: CaptureSettings, key: str) -> CaptureSpec:
    """The steered run's capture: every configured step, from its own last prompt token."""
    return CaptureSpec(key, settings.steps)


def replay_sampling_params():
    """The replay's sampling: it exists only to run the unsteered prefill whose
    activations we capture."""
    from vllm import SamplingParams

    # One prefill; the sampled token is discarded (and never detokenized).
    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)


def replay_spec(req: RolloutRequest, generated: Sequence[int], settings: CaptureSettings,
                key: str, tokenizer: Any = None) -> tuple[list[int], CaptureSpec]:
    """The replay's token ids and capture spec for one rollout, in the settings' mode."""
    if settings.replay == "authors":
        ids, avail, base = authors_replay_prompt(tokenizer, req, generated, settings.steps)
    else:
        ids, avail = _replay_prompt(req, list(generated), settings.steps)
        base = len(req.prompt_token_ids) - 1
    return ids, CaptureSpec(key, tuple(avail), base)


def capture_pair(req: RolloutRequest, keys: tuple[str, str], settings: CaptureSettings,
                 num_layers: int) -> CapturePair:
    """What the capture buffer needs to pair a steered run with its replay: their keys and
    the offsets/steps to keep. One builder for every runner, so the worker sees one shape."""
    kept, _ = settings.resolve(req.layer, num_layers)
    if settings.extra_offsets:
        offsets = sorted(set(kept) | {k for k in settings.extra_offsets if req.layer + k >= 0})
    else:
        offsets = kept
    return CapturePair(
        steered=keys[0], replay=keys[1], vector=req.vector, alpha=float(req.alpha),
        layer=int(req.layer), offsets=tuple(offsets), steps=settings.steps,
        features=settings.features, activations=settings.activations,
        activation_dtype=settings.activation_dtype)


def output_result(req: RolloutRequest, text: str, token_ids: Sequence[int],
                  finish_reason: Any) -> RolloutResult:
    """A rollout's row from its generated text, tokens and finish reason (no capture)."""
    return RolloutResult(id=req.id, response=text, response_token_ids=list(token_ids),
                         finish_reason=str(finish_reason))


def finish_result(req: RolloutRequest, res: RolloutResult, collected: CollectResult,
                  settings: CaptureSettings, num_layers: int) -> RolloutResult:
    """A rollout's row with what the capture buffer collected for it (features,
    activations, what was missing); a capture error fails the rollout loudly instead of
    writing a row without its features."""
    kept, dropped = settings.resolve(req.layer, num_layers)
    res.extra = {
        "dropped_offsets": dropped,
        "steps_missing": [t for t in settings.steps if t not in collected.steps_present],
        "capture_overflow": collected.overflow,
    }
    if collected.error:
        raise RuntimeError(f"rollout {req.id}: capture failed: {collected.error}")
    if settings.features and collected.features is not None:
        names = feature_names(settings.steps, kept)
        res.features = dict(zip(names, collected.features.tolist(), strict=True))
    if settings.activations and collected.activations is not None:
        res.activations = dict(collected.activations)
    return res
