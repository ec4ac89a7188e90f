"""Steered rollouts as the pipeline consumes them: requests in, result rows out, with
early hidden-state capture, the exact unsteered replay and the features.

This is the contract between the engine and the build pipeline: the pipeline plans
`RolloutRequest`s, runs them through `feed.feed_engine` (both executors) or `run_rollouts`
(one batch), and writes the returned `RolloutResult`s into shards.
`CaptureSettings`, when given, add the features and raw activations.

Capture and replay, for each steered rollout:
1. the steered request carries a capture spec: the worker keeps the residual stream at
   decode steps t in `steps` (t = 0: the forward over the last prompt token; t = n: the
   forward consuming generated token n), after every block, and before the steering
   addition at the steered layer L;
2. once it finishes, a replay runs with no steering over exactly the same token ids
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
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..core.contract import DEFAULT_OFFSETS, DEFAULT_STEPS, feature_names
from ..engine import SteerSpec
from ..engine.collect import unwire
from ..engine.protocol import AsyncSteeringEngine, SteeringEngine


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
    #: benchmarks only (`work.BENCH_LENGTHS_ENV`): run exactly `max_tokens` tokens
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
    return RolloutResult(
        id=req.id,
        response=comp.text,
        response_token_ids=list(comp.token_ids),
        finish_reason=str(comp.finish_reason),
    )


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


def capture_pairs(reqs, keys, settings, num_layers):
    """What the capture buffer needs to pair each steered run with its replay: their
    request keys and the offsets/steps to keep. One builder for every runner, so the
    buffer sees one spec shape."""
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


def finish_result(req, out, collected, settings, num_layers) -> RolloutResult:
    """A rollout with what the capture buffer collected for it (features, activations,
    what was missing); a capture error fails the rollout loudly instead of writing a row
    without its features."""
    res = result_from_output(req, out)
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


def replay_sampling_params():
    """The replay's sampling: it exists only to run the unsteered prefill whose
    activations we capture."""
    from vllm import SamplingParams

    # One prefill; the sampled token is discarded (and never detokenized).
    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)


def check_features(settings: CaptureSettings) -> None:
    """Refuse a capture mix the feature columns cannot describe, before any generation."""
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

    check_features(settings)
    reqs = list(requests)
    check_replay(settings, reqs)
    authors = settings.replay == "authors"
    tok = engine.get_tokenizer() if authors else None
    keys = _keys(reqs)
    # The authors' replay decodes the whole response, so it waits for the rollout's end.
    need = float("inf") if authors else max(settings.steps) + 1
    nonce = keys[0][0].rsplit(":", 2)[1] if keys else ""
    tokens: list[list[int]] = [[] for _ in reqs]
    texts: list[list[str]] = [[] for _ in reqs]
    finish: list[Any] = [None] * len(reqs)
    replayed: set[int] = set()
    replay_params = replay_sampling_params()

    def submit_steered():
        # One unsteered prefill per distinct prompt whose steered prompt KV is salted
        # (mode `all`): its blocks are cached by the time the replays arrive, a few
        # steps later, so every replay of that prompt reuses them.
        warm = {tuple(r.prompt_token_ids) for r in reqs
                if r.positions == "all" and not authors}
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
        ids, cap = replay_spec(reqs[i], tokens[i], settings, keys[i][1], tok)
        return [(f"r{i}:{nonce}", {"prompt_token_ids": ids},
                 engine.decorate(replay_params, None, cap))]

    engine.stream(submit_steered(), on_output)
    outs = [
        SimpleNamespace(outputs=[SimpleNamespace(
            text="".join(texts[i]), token_ids=tokens[i], finish_reason=finish[i])])
        for i in range(len(reqs))
    ]
    collected = engine.collect(capture_pairs(reqs, keys, settings, engine.num_layers))
    return [
        finish_result(r, o, c, settings, engine.num_layers)
        for r, o, c in zip(reqs, outs, collected, strict=True)
    ]


def replay_spec(req: RolloutRequest, generated: Sequence[int], settings: CaptureSettings,
                 key: str, tokenizer: Any = None) -> tuple[list[int], dict[str, Any]]:
    """The replay's token ids and capture spec for one rollout, in the settings' mode."""
    if settings.replay == "authors":
        ids, avail, base = authors_replay_prompt(tokenizer, req, generated, settings.steps)
    else:
        ids, avail = _replay_prompt(req, list(generated), settings.steps)
        base = len(req.prompt_token_ids) - 1
    return ids, {"key": key, "steps": avail, "base": base}


async def run_one_with_capture_async(
    engine: AsyncSteeringEngine, req: RolloutRequest, settings: CaptureSettings
) -> RolloutResult:
    """The same for one request on an `AsyncSteeredEngine` (for asyncio callers)."""
    check_features(settings)
    check_replay(settings, [req])
    tok = engine.get_tokenizer() if settings.replay == "authors" else None
    ((sk, rk),) = _keys([req])
    out = await engine.generate_final(
        {"prompt_token_ids": req.prompt_token_ids}, sampling_params(req), req.steer(),
        request_id=sk, capture={"key": sk, "steps": list(settings.steps)},
    )
    ids, cap = replay_spec(req, list(out.outputs[0].token_ids), settings, rk, tok)
    await engine.generate_final(
        {"prompt_token_ids": ids}, replay_sampling_params(), None, request_id=rk, capture=cap,
    )
    (collected,) = await engine.collect(
        capture_pairs([req], [(sk, rk)], settings, engine.num_layers))
    return finish_result(req, out, collected, settings, engine.num_layers)


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
        kept, _ = s.resolve(req.layer, engine.num_layers)
        pairs.append({"steered": key, "replay": key, "vector": req.vector,
                      "alpha": float(req.alpha), "layer": int(req.layer), "offsets": kept,
                      "steps": list(s.steps), "features": False, "activations": True,
                      "activation_dtype": "float32"})
    engine.generate(prompts, [replay_sampling_params()] * len(prompts), None, capture=caps)
    out = []
    for req, got in zip(reqs, engine.collect(pairs), strict=True):
        if got.get("error"):
            raise RuntimeError(f"rollout {req.id}: replay capture failed: {got['error']}")
        present = [int(t) for t in got.get("steps_present", [])]
        if "activations" in got:
            states = unwire(got["activations"]["replay"]).astype(np.float32)
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
