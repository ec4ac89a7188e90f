"""Prefix caching stays on and stays correct: salt the KV blocks a steering config touches.

A block's KV depends on a steering config exactly when the block holds a token position
at or past the config's first steered position (steering at block L changes every layer
above L there, and every later position through attention). Such blocks get the config's
fingerprint as an extra hash key; since block hashes chain, every later block is salted
too. Blocks wholly before the window hash as if unsteered, so for `generated` and
`last_prompt_and_generated` the prompt KV is shared by every config of the same prompt;
for `all` everything is salted from block 0.

vLLM builds block hashes in its scheduler (engine-core process) through
`kv_cache_utils.generate_block_hash_extra_keys`; modules that imported the function by
name get the wrapped one too.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

from .capture_buffer import CAP_KEY
from .spec import from_extra_args, steer_start

logger = logging.getLogger("asteer.engine")

_MODULES = (
    "vllm.v1.core.kv_cache_utils",
    "vllm.v1.core.block_pool",
    "vllm.v1.simple_kv_offload.manager",
)
_EXPECTED = ["request", "start_token_idx", "end_token_idx", "start_mm_idx"]


def steer_extra_keys(request: Any, end_token_idx: int) -> tuple[tuple[str, str], ...]:
    """Extra hash keys of the block ending at `end_token_idx` (exclusive) of `request`."""
    sp = getattr(request, "sampling_params", None)
    extra_args = sp.extra_args if sp is not None else None
    if not extra_args:
        return ()
    keys = []
    spec = from_extra_args(extra_args)
    if spec and spec.get("fp"):
        if end_token_idx > steer_start(spec.get("p", "all"), request.num_prompt_tokens):
            keys.append(("asteer", spec["fp"]))
    cap = extra_args.get(CAP_KEY)
    if cap and cap.get("steps"):
        # Blocks holding a capture position are private to the request, so a prefix hit
        # can never skip a token whose states must be captured (e.g. a replay's t = 0).
        base = cap.get("base")
        base = request.num_prompt_tokens - 1 if base is None else int(base)
        if end_token_idx > base + min(cap["steps"]):
            keys.append(("asteer-cap", str(cap["key"])))
    return tuple(keys)


PLUGIN_MISSING = (
    "asteer: the prefix-cache salting plugin is not active in the vLLM engine-core "
    "process{where}, and prefix caching is on: steered requests would reuse KV blocks "
    "computed without their steering (and captures would lose their first steps). The "
    "plugin is the `vllm.general_plugins` entry point `asteer` "
    "(asteer_build.engine.plugin:register): install the package (`pip install -e .`, "
    "not just a checkout on PYTHONPATH), keep `asteer` in VLLM_PLUGINS if you set it, "
    "or start the engine with enable_prefix_caching=False."
)


def installed() -> bool:
    """Whether this process's block hashing carries the steering salt."""
    try:
        utils = importlib.import_module("vllm.v1.core.kv_cache_utils")
    except ImportError:  # pragma: no cover - depends on install
        return False
    return bool(getattr(utils.generate_block_hash_extra_keys, "_asteer", False))


def plugin_will_load(environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """Whether vLLM processes started from this one will load the plugin.

    Checked by the client before starting an engine: the engine-core process inherits
    this environment and these installed distributions. Returns (ok, why not).
    """
    import os
    from importlib.metadata import entry_points

    env = os.environ if environ is None else environ
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "asteer"]
    if not eps:
        return False, " (no `asteer` entry point in vllm.general_plugins: package not installed)"
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and "asteer" not in allowed.split(","):
        return False, f" (VLLM_PLUGINS={allowed!r} leaves it out)"
    return True, ""


def install() -> bool:
    utils = importlib.import_module("vllm.v1.core.kv_cache_utils")
    orig = utils.generate_block_hash_extra_keys
    if getattr(orig, "_asteer", False):
        return True
    params = list(inspect.signature(orig).parameters)
    if params != _EXPECTED:
        raise RuntimeError(
            "asteer: unsupported vLLM: kv_cache_utils.generate_block_hash_extra_keys has "
            f"parameters {params}, expected {_EXPECTED}"
        )

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm = orig(request, start_token_idx, end_token_idx, start_mm_idx)
        extra = steer_extra_keys(request, end_token_idx)
        if not extra:
            return keys, next_mm
        return (*(keys or ()), *extra), next_mm

    generate_block_hash_extra_keys._asteer = True  # type: ignore[attr-defined]
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "generate_block_hash_extra_keys", None) is orig:
            mod.generate_block_hash_extra_keys = generate_block_hash_extra_keys
    return True
