"""The vectors stage's settings: one frozen dataclass, and the one place the config's
`vectors:` section maps onto it (`VectorSettings.from_section`).

`asteer_build.pipeline.config` checks the section with it when a config loads
(`BuildConfig.vectors`), so a bad field fails before any engine starts.

The section's keys are the dataclass's fields other than `layer` and `methods` (those
come from the config's top level):

    vectors:
      pool: vllm            # vllm (prefill-only pooling on the engine) | hf (the reference)
      banks:                # bank files in the authors' layout (`bankfiles.BankFiles`):
        hub: Fcr09/SteerBoost-data        # a Hub dataset (or `path: FOLDER`)
        pattern: "training/{concept_id}.json"
        revision: null      # a branch, tag or commit; null: main, pinned at first file
      bank_dir: null        # or a folder of banks written by `build_banks`
      file: null            # the `file` method's vectors: {path: FILE} or {hub: REPO,
                            # filename: NAME} (`vector_files`)
      bank_size: 32         # texts per side of the tiny world's template banks
      seed: 0               # template banks and the probe's init
      cache_dir: null       # per-concept vector cache, so a killed stage resumes
      probe_epochs: 10
      probe_lr: 0.005
      probe_weight_decay: 0.001
      probe_l2: 0.01        # weight of the penalty on ||w||_2 (the norm, not its square)
      device: null          # the HF reference's device (pool: hf); default cuda if present
      engine_args: null     # the pooling engine's arguments; null: the model's own
                            # (`models[i].engine_args`, filled in by the build)

Banks come from `banks` or `bank_dir` (at most one). With neither, the tiny world's
template banks are used, and only for a tiny-world model: a real model without banks is
refused (by the config and by the stage), since vectors from filler templates would
quietly stand in for the reference's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core.fields import reject_unknown

__all__ = ["ALPHA_UNITS", "METHODS", "POOLS", "ProbeSettings", "VectorSettings"]

METHODS = ("diffmean", "probe", "pca", "file")
#: the seed paper's two, the default where no methods are named
PAPER_METHODS = ("diffmean", "probe")
POOLS = ("vllm", "hf")
#: `raw`: the engine adds alpha x v; `norm`: alpha x m x v / ||v||, m the mean residual
#: norm at the layer over the contrast banks (the config's top-level `alpha_units`)
ALPHA_UNITS = ("raw", "norm")


@dataclass(frozen=True)
class ProbeSettings:
    """The LinearProbe trainer's hyper-parameters (`methods.train_probe`); `l2` weighs
    the penalty on the weight's norm ||w||_2 (the reference's, not the squared norm)."""

    epochs: int = 10
    lr: float = 5e-3
    weight_decay: float = 1e-3
    l2: float = 0.01
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(v: Any, where: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{where}: expected an integer >= {minimum} (got {v!r})")
    return v


def _float(v: Any, where: str) -> float:
    """A number >= 0; a numeric string too (YAML reads `5e-3` as a string)."""
    try:
        x = float(v) if isinstance(v, str) else v
    except ValueError:
        x = None
    if isinstance(x, bool) or not isinstance(x, int | float) or x != x or x < 0:
        raise ValueError(f"{where}: expected a number >= 0 (got {v!r})")
    return float(x)


def _path(v: Any, where: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str | os.PathLike) or not str(v).strip():
        raise ValueError(f"{where}: expected a folder path or null (got {v!r})")
    return str(v)


@dataclass(frozen=True)
class VectorSettings:
    """Everything that decides a model's vector files, besides the model, the concepts and
    (optionally) banks handed in directly. Invalid values raise `ValueError` naming the
    config field (`vectors.<field>`, or `methods`)."""

    layer: int
    methods: tuple[str, ...] = PAPER_METHODS
    pool: str = "vllm"
    bank_size: int = 32
    seed: int = 0
    banks: Any = None
    bank_dir: str | None = None
    file: Any = None
    cache_dir: str | None = None
    probe_epochs: int = 10
    probe_lr: float = 0.005
    probe_weight_decay: float = 0.001
    probe_l2: float = 0.01
    device: str | None = None
    engine_args: Mapping[str, Any] | None = field(default=None, hash=False)
    #: from the config's top level: `norm` also measures the banks' mean residual norm
    alpha_units: str = "raw"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"methods: unknown method(s) {bad} (known: {', '.join(METHODS)})")
        set_(self, "methods", methods)
        _int(self.layer, "layer", 0)
        if self.alpha_units not in ALPHA_UNITS:
            raise ValueError(f"alpha_units: expected raw or norm (got {self.alpha_units!r})")
        if self.pool not in POOLS:
            raise ValueError(f"vectors.pool: expected vllm or hf (got {self.pool!r})")
        _int(self.bank_size, "vectors.bank_size", 1)
        _int(self.seed, "vectors.seed", 0)
        _int(self.probe_epochs, "vectors.probe_epochs", 0)
        for name in ("probe_lr", "probe_weight_decay", "probe_l2"):
            set_(self, name, _float(getattr(self, name), f"vectors.{name}"))
        for name in ("bank_dir", "cache_dir"):
            set_(self, name, _path(getattr(self, name), f"vectors.{name}"))
        if self.banks is not None:
            from .bankfiles import BankFiles

            set_(self, "banks", BankFiles.from_section(self.banks))
            if self.bank_dir is not None:
                raise ValueError(f"vectors.banks and vectors.bank_dir are both set "
                                 f"({self.banks.where()}, {self.bank_dir}): keep one")
        if self.file is not None:
            from .vector_files import VectorFile

            set_(self, "file", VectorFile.from_section(self.file))
            if "file" not in methods:
                raise ValueError(f"vectors.file is set ({self.file.where()}) but methods "
                                 f"{list(methods)} has no 'file': add it, or drop vectors.file")
        elif "file" in methods:
            raise ValueError("vectors.file: required by method 'file': a safetensors file "
                             "with one vector per concept and layer, {path: FILE} or "
                             "{hub: REPO, filename: NAME}")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"vectors.device: expected a torch device name (got "
                             f"{self.device!r})")
        if self.engine_args is not None and not isinstance(self.engine_args, Mapping):
            raise ValueError(f"vectors.engine_args: expected a mapping (got "
                             f"{self.engine_args!r})")

    @property
    def has_banks(self) -> bool:
        """Whether banks are configured (else only the tiny world's templates apply)."""
        return self.banks is not None or self.bank_dir is not None

    @property
    def pooled_methods(self) -> tuple[str, ...]:
        """The methods computed from pooled contrast-bank states (all but `file`)."""
        return tuple(m for m in self.methods if m != "file")

    @property
    def probe(self) -> ProbeSettings:
        return ProbeSettings(self.probe_epochs, self.probe_lr, self.probe_weight_decay,
                             self.probe_l2, self.seed)

    @classmethod
    def section_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls)
                     if f.name not in ("layer", "methods", "alpha_units"))

    @classmethod
    def from_section(cls, section: Any, *, layer: int, methods: Sequence[str],
                     alpha_units: str = "raw") -> VectorSettings:
        """The config's `vectors:` section (a mapping, or None for all defaults)."""
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ValueError(f"vectors: expected a mapping (got {section!r})")
        reject_unknown(section, "vectors", cls.section_keys())
        return cls(layer=layer, methods=tuple(methods), alpha_units=alpha_units, **section)
