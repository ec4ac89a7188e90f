"""`build.json` of the dataset folder: the run's config (credentials scrubbed), hashes,
software of the build and of the publish, the input shard manifest and the file list."""

from __future__ import annotations

import json
import re
from typing import Any

from ...core.contract import LEVEL_ORDER, PROMPT_TEST_SIZE, PROMPT_VAL_SIZE
from ...pipeline.shards import software_versions
from .layout import PUBLISH_FORMAT, PublishOptions
from .plan import RunInfo

_SECRET_KEYS = re.compile(r"(token|secret|password|api_key)$", re.I)


def scrub(obj: Any) -> Any:
    """Drop anything that looks like a credential from the published config. The build
    config names environment variables (`api_key_env`) rather than holding keys, but a
    hand-edited manifest should not be able to leak one to the Hub."""
    if isinstance(obj, dict):
        return {
            k: scrub(v)
            for k, v in obj.items()
            if not (_SECRET_KEYS.search(str(k)) and not str(k).endswith("_env"))
        }
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def build_json(
    info: RunInfo, files: list[dict[str, Any]], configs: list[str], opts: PublishOptions
) -> bytes:
    d = info.manifest.data
    stages = {}
    for stage, ents in sorted(d.get("stages", {}).items()):
        stages[stage] = {
            n: {
                k: e[k]
                for k in (
                    "path",
                    "rows",
                    "sha256",
                    "bytes",
                    "config_hash",
                    "ok",
                    "failed",
                    "pending",
                    "judge_model",
                    "judge_rubric",
                    "parts",
                )
                if k in e
            }
            for n, e in sorted(ents.items())
        }
    out = {
        "format": d.get("format"),
        "publish_format": PUBLISH_FORMAT,
        "name": d.get("config", {}).get("name"),
        "config": scrub(d.get("config", {})),
        "config_hash": d.get("config_hash"),
        "plan_hash": d.get("plan_hash"),
        # each model's effective top-k / top-p / temperature and where each came from
        "sampling": d.get("sampling"),
        # the chat-template options every prompt was rendered with (`core.prompts`)
        "prompt_format": d.get("prompt_format"),
        "items": d.get("items"),
        "shards": d.get("shards"),
        "created": d.get("created"),
        "software": {"build": d.get("software", {}), "publish": _publish_versions()},
        "configs": configs,
        "partition": {
            "scheme": opts.partition_scheme,
            "unseen_fraction": opts.unseen_fraction,
            "seed": opts.partition_seed,
            "stratified_by": "concept_level" if opts.partition_scheme == "stratified"
            else None,
            "level_order": list(LEVEL_ORDER),
            "id_order": "numeric when every id is an integer, else text",
            "prompt_split": {"test_size": PROMPT_TEST_SIZE, "val_size": PROMPT_VAL_SIZE,
                             "seed": opts.partition_seed},
        },
        "sources": d.get("sources"),
        "stages": stages,
        "files": files,
    }
    return (json.dumps(out, indent=1, sort_keys=True, default=str) + "\n").encode()


def _publish_versions() -> dict[str, str]:
    from importlib.metadata import version

    out = dict(software_versions())
    for mod in ("datasets", "huggingface_hub", "safetensors", "numpy"):
        try:
            out[mod] = version(mod)
        except Exception:
            continue
    return dict(sorted(out.items()))
