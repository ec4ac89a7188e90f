"""The three-way steering rubric: the prompt the judge model sees and how its answer is read.

The rubric text is versioned because the cache key includes `RUBRIC_VERSION`: editing the
wording without bumping the version would silently mix labels from two different rubrics
in one dataset. Parsing never invents a label: an answer that does not contain exactly one
readable label raises `JudgmentParseError`, and the caller records the row as failed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RUBRIC_VERSION",
    "LABELS",
    "JUDGMENT_SCHEMA",
    "Judgment",
    "JudgmentParseError",
    "build_messages",
    "response_format",
    "parse_judgment",
]

RUBRIC_VERSION = "asteer-3way-v1"
LABELS = {0: "under-steer", 1: "success", 2: "over-steer"}
EXPLANATION_MAX = 60

SYSTEM_PROMPT = """\
You grade one response produced by a language model whose activations were steered \
toward a concept. You see the user's prompt, the target concept, and the response. \
Choose exactly one label:

0 = under-steer: the response is coherent and addresses the prompt, but the concept \
is absent (or only appears because the prompt itself asked for it).
1 = success: the concept is clearly present AND the response is still coherent and \
relevant to the prompt.
2 = over-steer: the response does not answer the prompt: it is nonsensical, \
repetitive, off-topic, empty, or talks only about the concept. Gibberish is always 2, \
never 0, even when the concept word is missing.

Judge the response only; do not reward length or style. Answer with a JSON object \
{"label": 0|1|2, "explanation": "<one short sentence>"} and nothing else."""

USER_TEMPLATE = """\
Concept: {concept}

Prompt:
<<<
{prompt}
>>>

Response:
<<<
{response}
>>>"""

JUDGMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "integer", "enum": [0, 1, 2]},
        "explanation": {"type": "string", "minLength": 1, "maxLength": EXPLANATION_MAX},
    },
    "required": ["label", "explanation"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Judgment:
    label: int
    explanation: str


class JudgmentParseError(ValueError):
    """The judge answered, but no single valid label can be read from the answer."""


def build_messages(prompt: str, concept: str, response: str) -> list[dict[str, str]]:
    """The judge sees prompt, concept and steered response only (paper-notes, Labels)."""
    user = USER_TEMPLATE.format(concept=concept, prompt=prompt, response=response)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def response_format() -> dict[str, Any]:
    """OpenAI `response_format` for structured output; strict so servers enforce the enum."""
    return {
        "type": "json_schema",
        "json_schema": {"name": "steering_judgment", "schema": JUDGMENT_SCHEMA, "strict": True},
    }


_OBJECT_RE = re.compile(r"\{[^{}]*\}", re.S)
_LABEL_RE = re.compile(r"""["']?label["']?\s*[:=]\s*["']?(\d+)["']?""", re.I)


def _from_obj(obj: Any) -> Judgment:
    if not isinstance(obj, dict) or "label" not in obj:
        raise JudgmentParseError("no 'label' field")
    raw = obj["label"]
    # bool is an int subclass: `true` must not become label 1.
    if isinstance(raw, bool):
        raise JudgmentParseError(f"label is not an integer: {raw!r}")
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int) or raw not in LABELS:
        raise JudgmentParseError(f"label out of range: {raw!r}")
    expl = obj.get("explanation", "")
    return Judgment(int(raw), str(expl if expl is not None else "")[:500])


def parse_judgment(text: str | None) -> Judgment:
    """Read a judgment from a model answer, strictly first, tolerantly second.

    Tolerance covers servers without structured output (prose around the JSON, code
    fences, single quotes). Ambiguity is an error, not a guess: two different labels in
    one answer, or none at all, raise `JudgmentParseError`.
    """
    if text is None or not text.strip():
        raise JudgmentParseError("empty answer")
    try:
        return _from_obj(json.loads(text))
    except (json.JSONDecodeError, TypeError):
        pass
    candidates: list[Judgment] = []
    for m in _OBJECT_RE.finditer(text):
        try:
            candidates.append(_from_obj(json.loads(m.group(0))))
        except (json.JSONDecodeError, JudgmentParseError):
            continue
    if not candidates:
        labels = {int(m.group(1)) for m in _LABEL_RE.finditer(text)}
        if len(labels) == 1 and (lab := labels.pop()) in LABELS:
            return Judgment(lab, "")
        snippet = text.strip()[:80]
        raise JudgmentParseError(f"no readable label in answer: {snippet!r}")
    if len({c.label for c in candidates}) > 1:
        raise JudgmentParseError("answer contains conflicting labels")
    return candidates[0]
