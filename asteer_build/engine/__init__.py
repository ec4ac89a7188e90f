"""Per-request activation steering inside vLLM (see steering.py for the hook)."""

from .llm import AsyncSteeredEngine, SteeredEngine
from .spec import POSITION_MODES, SteerSpec

__all__ = ["AsyncSteeredEngine", "POSITION_MODES", "SteerSpec", "SteeredEngine"]
