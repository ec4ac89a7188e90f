"""The config's `judge:`, `capture:` and `vectors:` sections as the settings their stages
take: `judge.config.JudgeConfig`, `CaptureSettings`, `VectorSettings`.

`asteer_build.pipeline.config` builds each once, when the config loads, and the stages
get them from `BuildConfig`; a bad field is a `ValueError` whose message starts with its
path in the file (`capture.steps`, `judge.endpoints[0]`), which the config reports as a
`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from ..core.fields import reject_unknown

if TYPE_CHECKING:
    from judge.config import JudgeConfig

    from ..vectors.settings import VectorSettings
    from .rollouts import CaptureSettings

__all__ = ["judge_section", "capture_section", "vectors_section"]


def judge_section(judge: Any, base_dir: str = ".") -> JudgeConfig:
    """Parsed by the judge package's own parser, so the two never disagree; a
    `rubric_file` (relative to the config file) is read and checked now, and so is what
    the kind needs: a `vllm` judge's `server:`, another's endpoints."""
    from judge.config import JudgeConfig

    if not isinstance(judge, dict):
        raise ValueError(f"judge: expected a mapping (got {judge!r})")
    try:
        jc = JudgeConfig.from_dict(judge)
        jc.rubric(base_dir)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("judge.") else f"judge: {msg}") from None
    if jc.kind == "vllm":
        # served by the builder (judge_servers): its `server:` is checked now, not after
        # the rollouts
        from .judge_servers import ServerSpec

        try:
            ServerSpec.from_dict(jc.server)
        except (TypeError, ValueError) as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("judge.") else f"judge.server: {msg}"
                             ) from None
    elif jc.kind != "rules" and not jc.endpoints:
        raise ValueError(f"judge.endpoints: the {jc.kind} judge needs at least one endpoint "
                         "(or set judge.kind: rules)")
    return jc


def capture_section(capture: Any) -> CaptureSettings | None:
    """None when capture is off (the section absent, null or empty)."""
    if capture is not None and not isinstance(capture, dict):
        raise ValueError(f"capture: expected a mapping or null (got {capture!r})")
    if not capture:
        return None
    from .rollouts import CaptureSettings

    reject_unknown(capture, "capture", sorted(f.name for f in dataclasses.fields(CaptureSettings)))
    try:
        return CaptureSettings(**capture)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("capture.") else f"capture: {msg}") from None


def vectors_section(section: Any, layer: int, methods: tuple[str, ...],
                    base_dir: str, alpha_units: str = "raw") -> VectorSettings:
    """With `layer` and `methods` from the config's top level; a bank folder and a vector
    file are relative to the config file, like `concepts:` and `prompts:`."""
    from ..vectors.settings import VectorSettings

    if not isinstance(section, dict):
        raise ValueError(f"vectors: expected a mapping (got {section!r})")
    for key in ("banks", "file"):  # a bank folder, the `file` method's file
        sub = section.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("path"), str):
            path = sub["path"]
            if "://" not in path and not os.path.isabs(path):
                path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))
            section = {**section, key: {**sub, "path": path}}
    return VectorSettings.from_section(section, layer=layer, methods=methods,
                                       alpha_units=alpha_units)
