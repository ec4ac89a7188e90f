"""Judges share one small interface so shard labelling does not care who grades.

An `Outcome` is either `ok` with a label or `failed` with an error; there is no third
way to leave a judge, and no code path here turns an error into a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from judge.pool import EndpointPool, PoolError
from judge.rubric import (
    DEFAULT_RUBRIC,
    JudgmentParseError,
    Rubric,
    parse_judgment,
    response_format,
)
from judge.rules import RULES_VERSION, rules_label
from judge.secrets import redact

__all__ = ["Outcome", "Judge", "LLMJudge", "RulesJudge"]


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | failed
    label: int | None = None
    explanation: str | None = None
    error: str | None = None


class Judge(Protocol):
    judge_model: str
    rubric_version: str

    async def judge(self, prompt: str, concept: str, response: str) -> Outcome: ...


class LLMJudge:
    """The rubric sent through an `EndpointPool`.

    An answer that cannot be parsed is a failed row, not a retry: at temperature 0 the
    same prompt gives the same answer, so retrying would only pay twice. Transport
    failures were already retried inside the pool.

    `max_tokens` / `temperature` of None are not sent at all (the server's defaults):
    reasoning models such as gpt-5-mini reject both, and the reference testbed's judge
    sent neither.
    """

    def __init__(
        self,
        pool: EndpointPool,
        judge_model: str,
        *,
        max_tokens: int | None = 200,
        temperature: float | None = 0.0,
        structured: bool = True,
        extra: dict[str, Any] | None = None,
        rubric: Rubric = DEFAULT_RUBRIC,
    ) -> None:
        self.pool = pool
        self.judge_model = judge_model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.structured = structured
        self.extra = extra or {}
        self.rubric = rubric
        self.rubric_version = rubric.version

    async def judge(self, prompt: str, concept: str, response: str) -> Outcome:
        sent = {k: v for k, v in (("max_tokens", self.max_tokens),
                                  ("temperature", self.temperature)) if v is not None}
        try:
            c = await self.pool.complete(
                self.rubric.messages(prompt, concept, response),
                response_format=response_format() if self.structured else None,
                **sent,
                **self.extra,
            )
        except PoolError as e:
            return Outcome("failed", error=str(e))
        try:
            j = parse_judgment(c.text)
        except JudgmentParseError as e:
            return Outcome(
                "failed", error=redact(f"unparsable answer (finish_reason={c.finish_reason}): {e}")
            )
        return Outcome("ok", j.label, j.explanation)


class RulesJudge:
    """The deterministic tiny-world judge (see `judge.rules`); never fails. Its rules
    are its rubric: `RULES_VERSION` is recorded with every label it gives."""

    judge_model = RULES_VERSION
    rubric_version = RULES_VERSION

    async def judge(self, prompt: str, concept: str, response: str) -> Outcome:
        j = rules_label(concept, response)
        return Outcome("ok", j.label, j.explanation)
