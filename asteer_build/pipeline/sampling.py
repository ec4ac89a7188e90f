"""Effective sampling per model: what each model's rollouts are really sampled with.

The reference testbed's authors call `generate(do_sample=True, temperature=0.7, ...)` and
nothing else, so transformers fills top-k and top-p from the model's
`generation_config.json`, and where that file is silent, from its own defaults (top_k 50,
top_p 1.0). To sample as they did, a build resolves, per model:

- `temperature`: always the config's `sampling.temperature`;
- `top_k` / `top_p`: the config's value when set; else the model's
  `generation_config.json`; else transformers' default. Unset is not "no truncation".

vLLM never applies the model's generation config to our requests on its own (it only
takes its stop tokens; its `generation_config` engine arg changes the defaults of
requests sent *without* sampling params, and we always send ours), so the values
resolved here are exactly the ones the engine samples with. They are recorded per model
in `build.json` and hashed into the plan, so a run folder refuses to resume once a
model's file (or the config) changes them.

Resolution reads a local folder directly and a Hugging Face id through
`huggingface_hub` (the cache first, so it works offline from a populated cache). Where
the file cannot be read (offline and uncached), the value stays unresolved: `plan`
shows that, `run` refuses to start, naming the model and the way out.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import BuildConfig, ModelConfig, Sampling

__all__ = ["EffectiveSampling", "SamplingUnresolved", "TRANSFORMERS_DEFAULTS",
           "FROM_CONFIG", "FROM_MODEL", "FROM_DEFAULT", "read_generation_config",
           "resolve_sampling", "resolve_all", "require_resolved"]

#: transformers' `GenerationConfig._get_default_generation_params()` for the two keys
TRANSFORMERS_DEFAULTS: dict[str, Any] = {"top_k": 50, "top_p": 1.0}
FROM_CONFIG = "config"
FROM_MODEL = "generation_config.json"
FROM_DEFAULT = "transformers default"
UNRESOLVED = "generation_config.json (unresolved)"
#: keys of generation_config.json that change sampling but that a build does not apply;
#: listed in the record when a model sets them, so nobody assumes they were used
_NOT_APPLIED = ("min_p", "typical_p", "repetition_penalty", "epsilon_cutoff", "eta_cutoff",
                "no_repeat_ngram_size")


class SamplingUnresolved(ValueError):
    """A model's generation_config.json is needed but cannot be read (a ValueError: the
    CLI reports it as a bad input, exit status 2, before any engine starts)."""


@dataclass(frozen=True)
class EffectiveSampling:
    """One model's sampling as the engine uses it (top_k 0 = off, vLLM's convention)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    #: key -> where its value came from: config | generation_config.json | transformers
    #: default | generation_config.json (unresolved)
    source: dict[str, str] = field(default_factory=dict)
    #: the file the model values came from (a path, or `hub:<id>@<revision>`), if any
    generation_config: str | None = None
    #: sampling keys the model's file sets that a build does not apply (name -> value)
    not_applied: dict[str, Any] = field(default_factory=dict)
    #: why the model's values could not be read (unresolved only)
    error: str | None = None

    @property
    def resolved(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hub_generation_config(repo_id: str, revision: str | None,
                           network: bool) -> tuple[dict | None, str]:
    """The file of a Hub model through huggingface_hub, cache first (offline-safe), the
    Hub only with `network`. Returns (None, where) when the repository has no such
    file."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    where = f"hub:{repo_id}@{revision or 'main'}"
    cached = try_to_load_from_cache(repo_id, "generation_config.json", revision=revision)
    if isinstance(cached, str):
        return _read_json(cached), where
    if cached is not None:  # the cache knows the file does not exist
        return None, where
    if not network:
        raise SamplingUnresolved(
            f"generation_config.json of {repo_id!r} is not in the local Hugging Face cache "
            "(`plan` never goes online; `run` reads it from the Hub)")
    try:
        path = hf_hub_download(repo_id, "generation_config.json", revision=revision)
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: first)
        raise SamplingUnresolved(
            f"cannot read generation_config.json of {repo_id!r} (revision "
            f"{revision or 'main'}): not in the Hugging Face cache and the Hub is not "
            f"reachable ({type(e).__name__}). Download the model once online, or set "
            "sampling.top_k and sampling.top_p in the config") from None
    except EntryNotFoundError:  # the repository has no generation_config.json
        return None, where
    except Exception as e:  # a gated or missing repository, a network error
        raise SamplingUnresolved(
            f"cannot read generation_config.json of {repo_id!r}: {type(e).__name__}: "
            f"{e}".strip()) from None
    return _read_json(path), where


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise SamplingUnresolved(f"{path}: expected a JSON object")
    return data


def read_generation_config(model: ModelConfig, *,
                           network: bool = True) -> tuple[dict | None, str | None]:
    """(the model's generation_config.json as a dict or None when it has none, where it
    was read). `tinyworld` reads the tiny model's folder (written on first use); a Hub
    id the Hugging Face cache, then (with `network`) the Hub."""
    from ..inputs.tinyworld import resolve_model_path

    path = resolve_model_path(model.path)
    if os.path.isdir(path):
        f = os.path.join(path, "generation_config.json")
        return (_read_json(f), f) if os.path.isfile(f) else (None, None)
    revision = model.engine_args.get("revision")
    data, where = _hub_generation_config(path, revision, network)
    return data, where if data is not None else None


def _check_model_value(key: str, v: Any, where: str | None) -> int | float:
    ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0 if key == "top_k"
          else isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1)
    if not ok:
        raise SamplingUnresolved(f"{where}: {key} = {v!r} is not usable "
                                 f"({'an int >= 0' if key == 'top_k' else 'in (0, 1]'})")
    return int(v) if key == "top_k" else float(v)


def resolve_sampling(sampling: Sampling, model: ModelConfig, *,
                     network: bool = True) -> EffectiveSampling:
    """The model's effective sampling; never raises for an unreadable file (the result
    is then unresolved and says why), so `plan` works offline. `network=False` reads
    local folders and the Hugging Face cache only (instant, for `plan`)."""
    explicit = {"top_k": sampling.top_k, "top_p": sampling.top_p}
    source = {"temperature": FROM_CONFIG}
    values: dict[str, Any] = {}
    gen: dict | None = None
    where: str | None = None
    error: str | None = None
    if any(v is None for v in explicit.values()):
        try:
            gen, where = read_generation_config(model, network=network)
        except (SamplingUnresolved, OSError, ValueError) as e:
            error = f"model {model.name!r}: {e}"
    for key, v in explicit.items():
        if v is not None:
            values[key], source[key] = v, FROM_CONFIG
        elif error is not None:
            values[key], source[key] = None, UNRESOLVED
        elif gen is not None and gen.get(key) is not None:
            try:
                values[key] = _check_model_value(key, gen[key], where)
            except SamplingUnresolved as e:
                error = f"model {model.name!r}: {e}"
                values[key], source[key] = None, UNRESOLVED
                continue
            source[key] = FROM_MODEL
        else:
            values[key], source[key] = TRANSFORMERS_DEFAULTS[key], FROM_DEFAULT
    not_applied = {k: gen[k] for k in _NOT_APPLIED
                   if gen and gen.get(k) is not None} if gen else {}
    return EffectiveSampling(float(sampling.temperature), values["top_k"], values["top_p"],
                             source, where, not_applied, error)


def resolve_all(cfg: BuildConfig, *, network: bool = True) -> dict[str, EffectiveSampling]:
    """Per model name, in config order."""
    return {m.name: resolve_sampling(cfg.sampling, m, network=network) for m in cfg.models}


def require_resolved(effective: dict[str, EffectiveSampling]) -> None:
    """Raise, naming every model, when any model's sampling is unresolved (a build must
    never sample with values it could not determine)."""
    bad = [e.error for e in effective.values() if not e.resolved]
    if bad:
        raise SamplingUnresolved("sampling: " + "; ".join(str(b) for b in bad))
