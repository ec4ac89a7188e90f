"""The per-request steering spec and its wire form in `SamplingParams.extra_args`.

A request carries only a vector *name*, alpha, layer and position mode (plus a
fingerprint): vectors are registered once per engine over RPC, never sent with requests.
The same module validates specs on the client, so bad input fails there with a message
naming the request, field and value, and never reaches (or kills) the engine.

The capture records live here too: `CaptureSpec` (which decode steps of a request the
worker keeps), `CapturePair` (a steered run and its replay, to collect) and
`CollectResult` (what the workers return). They are typed on both sides and become dicts
only on the wire: `SamplingParams.extra_args` and the `asteer_collect` RPC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

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


# ---- the typed capture records (client side), dicts only on the wire --------------------
#: Highest decode step a capture may ask for: the worker keeps steps in a 64-bit mask.
MAX_CAPTURE_STEP = 63
ACTIVATION_DTYPES = ("float16", "bfloat16", "float32")


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: expected an int, got {value!r}")
    return int(value)


def _increasing(where: str, values: Any, *, empty: bool, lo: int | None = None,
                hi: int | None = None) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ValueError(f"{where}: expected a sequence of ints, got {values!r}")
    out = tuple(_int(where, v) for v in values)
    if not out and not empty:
        raise ValueError(f"{where}: must not be empty")
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"{where}: must be strictly increasing, got {list(out)}")
    if out and ((lo is not None and out[0] < lo) or (hi is not None and out[-1] > hi)):
        raise ValueError(f"{where}: values must lie in {lo}..{hi}, got {list(out)}")
    return out


def _fields(cls: type, wire: Any, where: str) -> dict[str, Any]:
    """A wire dict's fields, refusing what the record does not have (a misspelt key
    would otherwise fall back to a default without a word)."""
    if not isinstance(wire, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(wire).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(wire) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} (known: {sorted(known)})")
    return dict(wire)


@dataclass(frozen=True)
class CaptureSpec:
    """Which decode steps of one request the worker keeps (`capture_buffer.py`).

    Rows are filed under `key`; step t is token position `base + t`, `base` defaulting
    to the last prompt token. A replay passes its own base, since its prompt already
    holds the first generated tokens. Empty `steps` is allowed: a replay of a rollout
    too short for any step captures nothing.
    """

    key: str
    steps: tuple[int, ...]
    base: int | None = None

    def __post_init__(self) -> None:
        _name("capture.key", self.key)
        object.__setattr__(self, "steps", _increasing(
            "capture.steps", self.steps, empty=True, lo=0, hi=MAX_CAPTURE_STEP))
        if self.base is not None and _int("capture.base", self.base) < 0:
            raise ValueError(f"capture.base: must be >= 0, got {self.base}")

    def to_wire(self) -> dict[str, Any]:
        """The dict in `SamplingParams.extra_args` (the engine core serializes it)."""
        out: dict[str, Any] = {"key": self.key, "steps": list(self.steps)}
        if self.base is not None:
            out["base"] = int(self.base)
        return out

    @classmethod
    def from_wire(cls, wire: Any) -> CaptureSpec:
        return cls(**_fields(cls, wire, "capture"))


@dataclass(frozen=True)
class CapturePair:
    """A steered run and its replay, by capture key, and what `collect` computes from
    them: features over `offsets` (layers `layer + k`) at `steps`, and/or the raw
    activations in `activation_dtype`. `steered == replay` collects one run only (a
    replay compared with another replay elsewhere)."""

    steered: str
    replay: str
    vector: str
    alpha: float
    layer: int
    offsets: tuple[int, ...]
    steps: tuple[int, ...]
    features: bool = True
    activations: bool = False
    activation_dtype: str = "float16"

    def __post_init__(self) -> None:
        for f in ("steered", "replay", "vector"):
            _name(f"pair.{f}", getattr(self, f))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) \
                or not math.isfinite(float(self.alpha)):
            raise ValueError(f"pair.alpha: expected a finite number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if _int("pair.layer", self.layer) < 0:
            raise ValueError(f"pair.layer: must be >= 0, got {self.layer}")
        object.__setattr__(self, "layer", int(self.layer))
        offsets = _increasing("pair.offsets", self.offsets, empty=False)
        if self.layer + offsets[0] < 0:
            raise ValueError(f"pair.offsets: layer {self.layer} + offset {offsets[0]} is "
                             "below block 0")
        if self.features and 0 not in offsets:
            raise ValueError(f"pair.offsets: features need offset 0 (the steered layer), "
                             f"got {list(offsets)}")
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "steps", _increasing(
            "pair.steps", self.steps, empty=False, lo=0, hi=MAX_CAPTURE_STEP))
        for f in ("features", "activations"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"pair.{f}: expected a bool, got {getattr(self, f)!r}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"pair.activation_dtype: expected one of {ACTIVATION_DTYPES}, "
                             f"got {self.activation_dtype!r}")

    def to_wire(self) -> dict[str, Any]:
        """The dict sent to the workers in `collective_rpc("asteer_collect")`."""
        out = dataclasses.asdict(self)
        out["offsets"], out["steps"] = list(self.offsets), list(self.steps)
        return out

    @classmethod
    def from_wire(cls, wire: Any) -> CapturePair:
        return cls(**_fields(cls, wire, "pair"))


def _array_wire(arr: np.ndarray) -> dict[str, Any]:
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "data": arr.tobytes()}


def _array(wire: Any, where: str) -> np.ndarray:
    import numpy as np

    try:
        arr = np.frombuffer(wire["data"], dtype=wire["dtype"])
        return arr.reshape([int(n) for n in wire["shape"]]).copy()
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a wired array ({e})") from e


@dataclass(frozen=True, eq=False)
class CollectResult:
    """What the workers return for one `CapturePair`: the steps both runs reached, whether
    the capture buffer overflowed, the float32 feature row, and the raw activations
    (`steered`, `replay` `[T, K, H]`, `steered_pre` `[T, 1, H]`). `error` says why a
    pair has no features (e.g. its vector is not registered in the worker)."""

    steps_present: tuple[int, ...] = ()
    overflow: bool = False
    features: np.ndarray | None = None
    activations: Mapping[str, np.ndarray] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps_present", _increasing(
            "collected.steps_present", self.steps_present, empty=True, lo=0,
            hi=MAX_CAPTURE_STEP))
        object.__setattr__(self, "overflow", bool(self.overflow))

    def to_wire(self) -> dict[str, Any]:
        """The dict a worker returns over RPC: arrays as raw bytes with their shape and
        dtype, which every vLLM serializer carries."""
        out: dict[str, Any] = {"steps_present": list(self.steps_present),
                               "overflow": self.overflow}
        if self.error is not None:
            out["error"] = self.error
        if self.features is not None:
            out["features"] = _array_wire(self.features)
        if self.activations is not None:
            out["activations"] = {k: _array_wire(v) for k, v in self.activations.items()}
        return out

    @classmethod
    def from_wire(cls, wire: Any) -> CollectResult:
        got = _fields(cls, wire, "collected")
        if "features" in got:
            got["features"] = _array(got["features"], "collected.features")
        if "activations" in got:
            got["activations"] = {k: _array(v, f"collected.activations.{k}")
                                  for k, v in got["activations"].items()}
        return cls(**got)
