"""Per-request activation steering inside vLLM (see steering.py for the hook).

The public names are loaded on first use (PEP 562), so importing a light submodule such
as `asteer_build.engine.feature_names` (the dataset contract's naming, which `judge` and
`train` load) does not pull in torch or vLLM through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .llm import AsyncSteeredEngine, SteeredEngine
    from .spec import POSITION_MODES, SteerSpec

__all__ = ["AsyncSteeredEngine", "POSITION_MODES", "SteerSpec", "SteeredEngine"]

_LAZY = {
    "AsyncSteeredEngine": ".llm",
    "SteeredEngine": ".llm",
    "POSITION_MODES": ".spec",
    "SteerSpec": ".spec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
