"""The build config (YAML): parsed once into one typed tree and checked before any work.

A 1.4M-rollout build that dies an hour in because of a typo is expensive, so every check
that can run up front does, and every error names the field by its path in the file
(`models[1].path`, `alphas.probe.step`) and the offending value. The `judge:`,
`capture:` and `vectors:` sections become the settings their stages take
(`judge.config.JudgeConfig`, `CaptureSettings`, `VectorSettings`), built here and
handed down, never parsed again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from ..core.prompts import PromptFormat
from .sections import capture_section, judge_section, vectors_section

if TYPE_CHECKING:
    from judge.config import JudgeConfig

    from ..vectors.settings import VectorSettings
    from .rollouts import CaptureSettings

__all__ = [
    "ConfigError", "AlphaGrid", "ModelConfig", "Sampling", "RayOptions", "BuildConfig",
    "load_config", "parse_config", "check_output", "METHODS", "TINYWORLD",
]

#: the vector methods (vectors.settings.METHODS, kept here so a config parses without
#: importing the vectors stage)
METHODS = ("diffmean", "probe", "pca", "file")
TINYWORLD = "tinyworld"
SEED_POLICIES = ("item", "fixed", "none")
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A config problem, always phrased as `<field>: <what is wrong> (got <value>)`."""


def _err(where: str, msg: str, value: Any = ...) -> ConfigError:
    got = "" if value is ... else f" (got {value!r})"
    return ConfigError(f"{where}: {msg}{got}")


def _only(d: Any, where: str, known: set[str], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(d, dict):
        raise _err(where, "expected a mapping", d)
    for k in d:
        if k not in known:
            raise _err(f"{where}.{k}" if where else str(k),
                       f"unknown field (known: {', '.join(sorted(known))})")
    for k in required:
        if d.get(k) in (None, ""):
            raise _err(f"{where}.{k}" if where else k, "required field is missing")
    return d


def _num(v: Any, where: str, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _err(where, "expected a finite number", v)
    if positive and v <= 0:
        raise _err(where, "must be > 0", v)
    if nonneg and v < 0:
        raise _err(where, "must be >= 0", v)
    return float(v)


def _int(v: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(where, "expected an integer", v)
    if minimum is not None and v < minimum:
        raise _err(where, f"must be >= {minimum}", v)
    return int(v)


@dataclass(frozen=True)
class AlphaGrid:
    """Steering strengths, stored as the explicit list so ids never depend on float drift."""

    values: tuple[float, ...]

    @staticmethod
    def parse(v: Any, where: str) -> AlphaGrid:
        if isinstance(v, list):
            if not v:
                raise _err(where, "alpha list is empty")
            vals = tuple(_num(x, f"{where}[{i}]", nonneg=True) for i, x in enumerate(v))
        else:
            d = _only(v, where, {"start", "stop", "step"}, ("start", "stop", "step"))
            start = _num(d["start"], f"{where}.start", nonneg=True)
            stop = _num(d["stop"], f"{where}.stop", nonneg=True)
            step = _num(d["step"], f"{where}.step")
            if step <= 0:
                raise _err(f"{where}.step", "alpha grid step must be > 0", d["step"])
            if stop < start:
                raise _err(f"{where}.stop", f"must be >= start ({start})", d["stop"])
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            vals = tuple(round(start + i * step, 10) for i in range(n))
        if len(set(vals)) != len(vals):
            raise _err(where, "alpha values repeat", list(vals))
        return AlphaGrid(vals)


@dataclass(frozen=True)
class ModelConfig:
    #: short name: the `model` column and part of every item id
    name: str
    #: `tinyworld` (or `tinyworld[:ARCH][:seed=N]`, another tiny model), a Hugging Face
    #: id, or a local folder
    path: str
    engine_args: dict[str, Any] = field(default_factory=dict)
    tensor_parallel_size: int = 1
    #: engines (Ray actors) for this model; None = as many as the cluster fits
    replicas: int | None = None
    alphas: dict[str, AlphaGrid] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampling:
    """What the config says; `asteer_build.pipeline.sampling` resolves each model's effective
    values (unset top_k / top_p come from the model's generation_config.json, else
    transformers' defaults, as `generate()` does for the reference testbed)."""

    temperature: float = 0.7
    #: None: the model's generation_config.json, else transformers' default (50);
    #: an int >= 1 keeps that many tokens; 0 turns top-k off
    top_k: int | None = None
    #: None: the model's generation_config.json, else transformers' default (1.0);
    #: else a probability mass in (0, 1] (1.0 turns top-p off)
    top_p: float | None = None
    max_tokens: int = 256
    #: item: a seed derived from the item id (reproducible, batch-independent);
    #: fixed: `seed` for every item; none: unseeded (the reference authors' setting)
    seed_policy: str = "item"
    seed: int = 0
    samples: int = 1
    #: the mean response length expected, in tokens: only for estimates (`plan`'s
    #: engine-hours and judge tokens), never sent to the engine nor part of the plan hash;
    #: None: half of `max_tokens`
    expected_response_tokens: int | None = None

    @property
    def expected_tokens(self) -> int:
        """The mean response length estimates should assume."""
        return self.expected_response_tokens or max(1, self.max_tokens // 2)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None
    #: CPUs per engine actor when the cluster has no GPUs
    num_cpus_per_engine: float = 1.0
    max_shard_retries: int = 3
    shard_timeout_s: float = 3600.0
    health_check_s: float = 30.0
    #: shards handed to one actor ahead of time, so its feeder never drains
    shards_in_flight: int = 2
    in_flight_factor: float = 1.1
    #: how long a replica whose node is gone keeps its seat (its placement group is
    #: placed again if a node with the resources joins) before the build goes on
    #: without it; a preempted node often comes back within minutes
    node_wait_s: float = 300.0
    #: consecutive failed starts of one engine actor that stop the build: a start that
    #: fails again and again (a model path missing on the nodes, a bad engine argument)
    #: will not heal, and retrying it for good would hide the cause
    max_start_failures: int = 3

    #: settings added after run folders recorded their config hash: left out of the
    #: record while at their default, so those folders' hash does not move
    UNRECORDED_DEFAULTS: ClassVar[tuple[str, ...]] = ("node_wait_s", "max_start_failures")


@dataclass
class BuildConfig:
    name: str
    models: list[ModelConfig]
    methods: tuple[str, ...]
    layer: int
    concepts: Any
    prompts: Any
    sampling: Sampling
    output: str | None
    shard_size: int
    judge: JudgeConfig
    #: None: no capture (the section absent or empty)
    capture: CaptureSettings | None
    #: with `layer` and `methods` from the top level; a bank folder resolved against
    #: the config's folder
    vectors: VectorSettings
    ray: RayOptions = field(default_factory=RayOptions)
    positions: str = "all"
    #: `raw` (the paper's): the engine adds alpha x v; `norm`: alpha x m x v / ||v||, m
    #: the mean residual norm at the layer over the contrast banks (`vectors.stage`),
    #: so one alpha grid means the same push on models and layers of any scale
    alpha_units: str = "raw"
    #: how prompts are rendered (`asteer_build.core.prompts`); recorded in build.json
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    #: the file this came from, for relative paths; not part of the hash
    base_dir: str = "."
    #: the `judge`, `capture` and `vectors` sections as the file gave them: `as_dict`
    #: (the run folder's record) and `config_hash` (what a resumed run must match) are
    #: over these, so neither moves when the typed settings change shape
    written: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def alphas(self, model: ModelConfig, method: str) -> tuple[float, ...]:
        return model.alphas[method].values

    def as_dict(self) -> dict[str, Any]:
        d = asdict(dataclasses.replace(self, **self.written, written={}))
        d.pop("base_dir")
        d.pop("written")
        if self.prompt_format.is_default:  # unset: a config's hash as without the key
            d.pop("prompt_format")
        if self.alpha_units == "raw":  # likewise
            d.pop("alpha_units")
        for f in dataclasses.fields(RayOptions):  # likewise
            if f.name in RayOptions.UNRECORDED_DEFAULTS and d["ray"][f.name] == f.default:
                del d["ray"][f.name]
        return d

    def config_hash(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def resolve(self, p: str) -> str:
        """A path relative to the config file's folder, unless absolute or a URI."""
        if "://" in p or os.path.isabs(p):
            return p
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(p)))


_TOP = {
    "name", "models", "methods", "layer", "concepts", "prompts", "alphas", "sampling",
    "capture", "judge", "output", "shard_size", "vectors", "ray", "positions",
    "prompt_format", "alpha_units",
}


def _model_path(v: Any, where: str, base_dir: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _err(where, "required: `tinyworld`, a Hugging Face id or a local folder", v)
    if v == TINYWORLD:
        return v
    if v.startswith(TINYWORLD + ":"):  # tinyworld[:ARCH][:seed=N]: several tiny models
        from ..inputs.tinyworld import parse_tiny_name

        try:
            parse_tiny_name(v)
        except ValueError as e:
            raise _err(where, str(e), v) from None
        return v
    local = v if os.path.isabs(v) else os.path.join(base_dir, os.path.expanduser(v))
    if os.path.isdir(local):
        return os.path.abspath(local)
    looks_local = v.startswith(("/", ".", "~")) or v.count("/") != 1
    if looks_local or not _HF_ID.match(v):
        raise _err(where, "model path does not exist and is not a Hugging Face id", v)
    return v


def _alpha_map(d: Any, where: str, methods: tuple[str, ...]) -> dict[str, AlphaGrid]:
    d = _only(d, where, set(METHODS))
    return {m: AlphaGrid.parse(g, f"{where}.{m}") for m, g in d.items() if m in methods}


def _top_k(v: Any) -> int:
    k = _int(v, "sampling.top_k")
    if k < 0:
        raise _err("sampling.top_k", "must be an int >= 1, or 0 for no top-k (leave it "
                   "unset to take the model's generation_config.json)", v)
    return k


def parse_config(raw: Any, base_dir: str = ".") -> BuildConfig:
    d = _only(raw, "", _TOP, ("models", "methods", "layer"))
    methods = d["methods"]
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        raise _err("methods", f"expected a non-empty list of {METHODS}", methods)
    for i, m in enumerate(methods):
        if m not in METHODS:
            raise _err(f"methods[{i}]", f"unknown method (known: {', '.join(METHODS)})", m)
    methods = tuple(dict.fromkeys(methods))
    layer = _int(d["layer"], "layer", minimum=0)
    shared_alphas = _alpha_map(d.get("alphas") or {}, "alphas", methods)

    if not isinstance(d["models"], list) or not d["models"]:
        raise _err("models", "expected a non-empty list", d["models"])
    models = []
    for i, m in enumerate(d["models"]):
        w = f"models[{i}]"
        m = _only(m, w, {"name", "path", "engine_args", "tensor_parallel_size", "replicas",
                         "alphas"})
        path = _model_path(m.get("path"), f"{w}.path", base_dir)
        name = m.get("name") or (
            path.replace(":", "-").replace("=", "")
            if path.startswith(TINYWORLD) else os.path.basename(path)
        )
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise _err(f"{w}.name", "must be letters, digits, '.', '_' or '-'", name)
        ea = m.get("engine_args") or {}
        if not isinstance(ea, dict):
            raise _err(f"{w}.engine_args", "expected a mapping", ea)
        if "tensor_parallel_size" in ea:
            raise _err(f"{w}.engine_args.tensor_parallel_size",
                       f"set {w}.tensor_parallel_size instead")
        tp = _int(m.get("tensor_parallel_size", 1), f"{w}.tensor_parallel_size", minimum=1)
        reps = m.get("replicas")
        if reps is not None:
            reps = _int(reps, f"{w}.replicas", minimum=1)
        alphas = {**shared_alphas, **_alpha_map(m.get("alphas") or {}, f"{w}.alphas", methods)}
        for meth in methods:
            if meth not in alphas:
                raise _err(f"{w}.alphas.{meth}", "no alpha grid for this method (set "
                           f"alphas.{meth} or {w}.alphas.{meth})")
        models.append(ModelConfig(name, path, dict(ea), tp, reps, alphas))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise _err("models", "model names repeat; give each a distinct `name`", names)

    s = _only(d.get("sampling") or {}, "sampling",
              {"temperature", "top_k", "top_p", "max_tokens", "seed_policy", "seed",
               "samples", "expected_response_tokens"})
    top_k, top_p = s.get("top_k"), s.get("top_p")
    sampling = Sampling(
        temperature=_num(s.get("temperature", 0.7), "sampling.temperature", nonneg=True),
        top_k=None if top_k is None else _top_k(top_k),
        top_p=None if top_p is None else _num(top_p, "sampling.top_p", positive=True),
        max_tokens=_int(s.get("max_tokens", 256), "sampling.max_tokens", minimum=1),
        seed_policy=s.get("seed_policy", "item"),
        seed=_int(s.get("seed", 0), "sampling.seed", minimum=0),
        samples=_int(s.get("samples", 1), "sampling.samples", minimum=1),
        expected_response_tokens=(
            None if s.get("expected_response_tokens") is None
            else _int(s["expected_response_tokens"], "sampling.expected_response_tokens",
                      minimum=1)),
    )
    if (sampling.expected_response_tokens or 0) > sampling.max_tokens:
        raise _err("sampling.expected_response_tokens", "must be <= sampling.max_tokens",
                   sampling.expected_response_tokens)
    if sampling.seed_policy not in SEED_POLICIES:
        raise _err("sampling.seed_policy", f"expected one of {SEED_POLICIES}",
                   sampling.seed_policy)
    if sampling.top_p is not None and sampling.top_p > 1:
        raise _err("sampling.top_p", "must be <= 1", sampling.top_p)

    r = _only(d.get("ray") or {}, "ray", {
        "address", "num_cpus_per_engine", "max_shard_retries", "shard_timeout_s",
        "health_check_s", "shards_in_flight", "in_flight_factor", "node_wait_s",
        "max_start_failures"})
    ray = RayOptions(
        address=r.get("address"),
        num_cpus_per_engine=_num(r.get("num_cpus_per_engine", 1.0),
                                 "ray.num_cpus_per_engine", positive=True),
        max_shard_retries=_int(r.get("max_shard_retries", 3), "ray.max_shard_retries",
                               minimum=0),
        shard_timeout_s=_num(r.get("shard_timeout_s", 3600.0), "ray.shard_timeout_s",
                             positive=True),
        health_check_s=_num(r.get("health_check_s", 30.0), "ray.health_check_s",
                            positive=True),
        shards_in_flight=_int(r.get("shards_in_flight", 2), "ray.shards_in_flight",
                              minimum=1),
        in_flight_factor=_num(r.get("in_flight_factor", 1.1), "ray.in_flight_factor",
                              positive=True),
        node_wait_s=_num(r.get("node_wait_s", 300.0), "ray.node_wait_s", nonneg=True),
        max_start_failures=_int(r.get("max_start_failures", 3), "ray.max_start_failures",
                                minimum=1),
    )

    written = copy.deepcopy({"judge": d.get("judge") or {"kind": "rules"},
                             "capture": d.get("capture"), "vectors": d.get("vectors") or {}})
    try:
        judge = judge_section(written["judge"], base_dir)
        capture = capture_section(written["capture"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    output = d.get("output")
    if output is not None and (not isinstance(output, str) or not output.strip()):
        raise _err("output", "expected a path or URI", output)
    positions = d.get("positions", "all")
    from ..engine.spec import POSITION_MODES

    if positions not in POSITION_MODES:
        raise _err("positions", f"expected one of {POSITION_MODES}", positions)
    name = d.get("name", "build")
    if not isinstance(name, str) or not name:
        raise _err("name", "expected a non-empty string", name)
    for key in ("concepts", "prompts"):
        if key in d and d[key] in (None, ""):
            raise _err(key, "expected `builtin:tinyworld`, a file path, or a list", d[key])
    shard_size = _int(d.get("shard_size", 256), "shard_size", minimum=1)
    alpha_units = d.get("alpha_units", "raw")
    from ..vectors.settings import ALPHA_UNITS

    if alpha_units not in ALPHA_UNITS:
        raise _err("alpha_units", f"expected one of {ALPHA_UNITS}", alpha_units)
    try:  # a bad `vectors:` field fails now, before any engine
        vectors = vectors_section(written["vectors"], layer, methods, base_dir, alpha_units)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        prompt_format = PromptFormat.parse(d.get("prompt_format"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg = BuildConfig(
        name=name, models=models, methods=methods, layer=layer,
        concepts=d.get("concepts", "builtin:tinyworld"),
        prompts=d.get("prompts", "builtin:tinyworld"),
        sampling=sampling, output=output, shard_size=shard_size,
        judge=judge, capture=capture, vectors=vectors, ray=ray, positions=positions,
        alpha_units=alpha_units, prompt_format=prompt_format, base_dir=base_dir,
        written=written,
    )
    # `file` alone needs no banks, unless strengths are in norm units (measured on them)
    if not vectors.has_banks and (vectors.pooled_methods or alpha_units == "norm"):
        from ..inputs.tinyworld import is_tiny_model

        real = [m.name for m in models if not is_tiny_model(m.path)]
        if real:
            raise _err("vectors.banks", f"required for model(s) {real}: the built-in "
                       "template banks are for the tiny world only; set vectors.banks "
                       "(e.g. {hub: Fcr09/SteerBoost-data, pattern: "
                       "'training/{concept_id}.json'} or {path: FOLDER}) or "
                       "vectors.bank_dir")
    return cfg


def packaged_configs() -> dict[str, Path]:
    """The configs shipped in the package (`asteer_build/configs/*.yaml`), by name."""
    from importlib.resources import files

    root = files("asteer_build.configs")
    return {e.name.removesuffix(".yaml"): Path(str(e)) for e in root.iterdir()
            if e.name.endswith(".yaml")}


def resolve_config(path: str | os.PathLike[str]) -> Path:
    """A config file by path, or a packaged one by name (`asteer-paper`,
    `asteer-paper.yaml` or `configs/asteer-paper.yaml` where no such file exists), so the
    README's commands work from an installed wheel in any directory. A file that exists
    always wins over the packaged config of the same name."""
    p = Path(path)
    if p.is_file():
        return p
    known = packaged_configs()
    name = p.name.removesuffix(".yaml")
    if name in known and (len(p.parts) == 1 or p.parent.name == "configs"):
        return known[name]
    raise ConfigError(f"config: file not found (got {str(path)!r}); packaged configs: "
                      f"{', '.join(sorted(known))}")


def load_config(path: str | os.PathLike[str]) -> BuildConfig:
    p = resolve_config(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config: not valid YAML: {e}") from None
    return parse_config(raw, base_dir=str(p.resolve().parent))


def check_output(location: str | None, where: str = "output") -> str:
    """Make sure the output location exists and takes writes; return it normalized.

    Runs before any engine starts: an unwritable bucket or read-only folder must not cost
    a model load.
    """
    if not location:
        raise _err(where, "no output location: set `output:` in the config or pass --out")
    from .shards import open_store

    try:
        store = open_store(location)
        store.probe_write()
    except Exception as e:  # any filesystem error means "unreachable" to the user
        raise _err(where, f"output location is unreachable or not writable: {e}",
                   location) from None
    return store.uri
