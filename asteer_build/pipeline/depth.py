"""The config's steering layer against each model's depth, before any engine starts.

A layer past the last block is otherwise found by the engine's worker, after the model
has loaded, in a child process. `plan` and `run` read `num_hidden_layers` from each
model's `config.json` instead: a local folder (a tiny world is written on first use,
as for its sampling) or the Hugging Face cache, never the network. A model whose file is
not here is reported as unchecked, and the engine checks the layer when it starts.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .config import BuildConfig, ConfigError, ModelConfig

__all__ = ["check_layer", "model_depth"]

#: where configs keep the block count: transformers' name first, then older names
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _config_file(model: ModelConfig) -> str:
    """The model's config.json on this machine; OSError naming why when it is not."""
    from ..inputs.tinyworld import resolve_model_path

    path = resolve_model_path(model.path)
    if os.path.isdir(path):
        f = os.path.join(path, "config.json")
        if not os.path.isfile(f):
            raise OSError(f"{path} has no config.json")
        return f
    from huggingface_hub import try_to_load_from_cache

    revision = model.engine_args.get("revision")
    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise OSError(f"config.json of {path!r} (revision {revision or 'main'}) is not in "
                      "the local Hugging Face cache")
    return cached


def _depth(data: dict[str, Any]) -> int | None:
    for section in (data, data.get("text_config") or {}):
        for key in _DEPTH_KEYS:
            v = section.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def model_depth(model: ModelConfig) -> dict[str, Any]:
    """`{"num_hidden_layers": N, "config": FILE}`, or `{"num_hidden_layers": None,
    "unchecked": WHY}` when the file cannot be read offline or names no depth."""
    try:
        f = _config_file(model)
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        return {"num_hidden_layers": None, "unchecked": str(e)}
    n = _depth(data) if isinstance(data, dict) else None
    if n is None:
        return {"num_hidden_layers": None, "unchecked": f"{f} names no num_hidden_layers"}
    return {"num_hidden_layers": n, "config": f}


def check_layer(cfg: BuildConfig) -> dict[str, dict[str, Any]]:
    """Each model's depth (model name -> `model_depth`); raises ConfigError naming the
    field, the value and the range when `layer` is past a model's last block (steering
    and the capture at the steered layer both need that block), or when a
    `capture.extra_offsets` layer is (`capture.offsets` past it are dropped per result,
    as the capture documents)."""
    cap = cfg.capture
    extra = (cap.get("extra_offsets") if isinstance(cap, dict)
             else getattr(cap, "extra_offsets", None)) or ()
    out = {}
    for m in cfg.models:
        d = out[m.name] = model_depth(m)
        n = d["num_hidden_layers"]
        if n is None:
            continue
        blocks = f"for model {m.name!r} ({n} blocks: num_hidden_layers in {d['config']})"
        if not 0 <= cfg.layer < n:
            raise ConfigError(f"layer: out of range 0..{n - 1} {blocks} (got {cfg.layer})")
        past = [k for k in extra if cfg.layer + int(k) >= n]
        if past:  # asked for by name, unlike `offsets`, so never dropped quietly
            raise ConfigError(f"capture.extra_offsets: layer {cfg.layer} + {past[0]} is out "
                              f"of range 0..{n - 1} {blocks} (got {list(extra)})")
    return out
