"""The judge pool: label every rollout, lose none, fabricate none. No vLLM import here."""

from .rubric import RUBRIC_VERSION

__all__ = ["RUBRIC_VERSION"]
