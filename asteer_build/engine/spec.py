"""The per-request steering spec and its wire form in `SamplingParams.extra_args`.

A request carries only a vector *name*, alpha, layer and position mode (plus a
fingerprint): vectors are registered once per engine over RPC, never sent with requests.
The same module validates specs on the client, so bad input fails there with a message
naming the request, field and value, and never reaches (or kills) the engine.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

EXTRA_KEY = "asteer"
#: Key of the engine-level settings in vLLM's `additional_config`.
CONFIG_KEY = "asteer"
#: The steered worker, by qualified name: vLLM imports it inside each worker process.
WORKER_CLS = "asteer_build.engine.worker.SteeredWorker"

#: Where the delta is added, by token position p of the request (0-based, P = prompt
#: length; the forward at p = P - 1 produces generated token 0, the one at P consumes it):
#: `all` every prompt and generated token (the reference setting), `generated` p >= P,
#: `last_prompt_and_generated` p >= P - 1.
POSITION_MODES = ("all", "generated", "last_prompt_and_generated")


@dataclass(frozen=True)
class SteerSpec:
    """Add `alpha * vectors[vector]` to the residual stream at the output of block `layer`."""

    vector: str
    alpha: float
    layer: int
    positions: str = "all"

    def start_position(self, prompt_len: int) -> int:
        """First token position that receives the delta."""
        return steer_start(self.positions, prompt_len)


def steer_start(mode: str, prompt_len: int) -> int:
    if mode == "all":
        return 0
    if mode == "generated":
        return prompt_len
    if mode == "last_prompt_and_generated":
        return max(prompt_len - 1, 0)
    raise ValueError(f"unknown steering position mode {mode!r}; expected one of {POSITION_MODES}")


def fingerprint(vector_digest: str, alpha: float, layer: int, mode: str) -> str:
    """Identity of a steering config: equal fingerprints mean equal deltas everywhere.

    Used to share table rows between requests and to salt prefix-cache blocks whose KV
    depends on the config.
    """
    key = f"{vector_digest}|{float(alpha).hex()}|{int(layer)}|{mode}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def validate(
    spec: Any, index: int, vectors: dict[str, tuple[int, str]], num_layers: int, hidden: int
) -> SteerSpec | None:
    """Check one request's spec against the engine; raise ValueError naming the problem.

    `vectors` maps registered names to (dimension, digest).
    """
    if spec is None:
        return None
    where = f"steer[{index}]"
    if not isinstance(spec, SteerSpec):
        raise TypeError(f"{where}: expected SteerSpec or None, got {type(spec).__name__}")
    if spec.vector not in vectors:
        known = ", ".join(sorted(vectors)[:8]) or "none registered"
        raise ValueError(f"{where}.vector: unknown vector name {spec.vector!r} (known: {known})")
    dim, _ = vectors[spec.vector]
    if dim != hidden:
        raise ValueError(f"{where}.vector: {spec.vector!r} has dimension {dim}, model has {hidden}")
    if isinstance(spec.alpha, bool) or not isinstance(spec.alpha, int | float):
        raise ValueError(f"{where}.alpha: expected a number, got {spec.alpha!r}")
    if not math.isfinite(float(spec.alpha)):
        raise ValueError(f"{where}.alpha: must be finite, got {spec.alpha!r}")
    if isinstance(spec.layer, bool) or not isinstance(spec.layer, int):
        raise ValueError(f"{where}.layer: expected an int, got {spec.layer!r}")
    if not 0 <= spec.layer < num_layers:
        raise ValueError(
            f"{where}.layer: {spec.layer} out of range for a model with {num_layers} layers "
            f"(valid 0..{num_layers - 1})"
        )
    if spec.positions not in POSITION_MODES:
        raise ValueError(
            f"{where}.positions: unknown position mode {spec.positions!r}; "
            f"expected one of {POSITION_MODES}"
        )
    return spec


def to_extra_args(spec: SteerSpec, vector_digest: str) -> dict[str, Any]:
    """The compact dict that travels in `SamplingParams.extra_args[EXTRA_KEY]`."""
    return {
        "v": spec.vector,
        "a": float(spec.alpha),
        "l": int(spec.layer),
        "p": spec.positions,
        "fp": fingerprint(vector_digest, spec.alpha, spec.layer, spec.positions),
    }


def from_extra_args(extra_args: dict[str, Any] | None) -> dict[str, Any] | None:
    if not extra_args:
        return None
    return extra_args.get(EXTRA_KEY)
