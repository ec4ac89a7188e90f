"""The three-way steering rubric: the prompt the judge model sees and how its answer is read.

The default rubric carries every decision rule of the reference testbed's judge (the
authors' `submit_gpt_judgment.py`), in our words: three labels with an example each, the
concept woven in naturally for a success, strictness about coherence, whether the
concept suits the prompt, cultural and linguistic fit, empty or gibberish answers as
over-steer (2, never 0), and the reason asked for *before* the label (a model that
decides first and justifies after grades worse).

A `Rubric` is a name plus its text; its `version` (`name+<8 hex of the text's hash>`)
goes into every cache key and every labelled row (`judge_rubric`), so editing the
wording can never silently mix labels from two rubrics in one dataset. Any other rubric
text can be used from a file (`Rubric.from_file`, the judge config's `rubric_file`):
the whole file is the one user message, with the placeholders `{prompt}`, `{concept}`
and `{response}` replaced (only those three; other braces stay as written).

Parsing never invents a label: an answer that does not contain exactly one readable
label raises `JudgmentParseError`, and the caller records the row as failed. It reads
`{"explanation": ..., "label": n}` in either key order, and the authors' key
`judgment` for the label, so their answer format works through `rubric_file` too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RUBRIC_VERSION",
    "DEFAULT_RUBRIC",
    "PLACEHOLDERS",
    "LABELS",
    "JUDGMENT_SCHEMA",
    "Rubric",
    "RubricError",
    "Judgment",
    "JudgmentParseError",
    "build_messages",
    "response_format",
    "parse_judgment",
]

LABELS = {0: "under-steer", 1: "success", 2: "over-steer"}
EXPLANATION_MAX = 200
PLACEHOLDERS = ("prompt", "concept", "response")

SYSTEM_PROMPT = """\
You grade the output of a language model whose internal activations were pushed toward \
a target concept while it answered a user. You are given the user's original prompt, \
the target concept and the model's response. Decide whether the push did too little, \
worked, or did too much.

Labels
0 = under-steered. The response makes sense and deals with the prompt, but the target \
concept does not show up in it (or shows up only because the prompt itself asked for \
it). Example: the concept is "uses emojis" and the reply is a plain answer without a \
single emoji.
1 = steered successfully. The concept is clearly part of the response AND the response \
still makes sense, stays on the prompt and suits it. The concept is woven into the \
answer so that it reads naturally and the answer keeps its quality. Example: the \
concept is "humorous tone" and the reply answers the question while landing a few \
jokes that fit it.
2 = over-steered. The push was so strong that the response no longer answers the \
prompt: it is nonsensical, off-topic, unsuitable for the prompt, or taken over by the \
concept. Example: the concept is "uses emojis" and the reply is a stream of emojis \
that never gets to the question.

Rules for hard cases
- An empty response is 2.
- Gibberish, broken or endlessly repeated text that does not answer the prompt is 2, \
never 0, whether or not the concept appears in it.
- Hold coherence to a high bar: a response that does not make sense as an answer is 2, \
however clearly the concept shows.
- Ask whether the concept suits this prompt, and whether bringing it in improves the \
answer or spoils it: a forced insertion that damages the answer is not a success.
- Weigh cultural and linguistic appropriateness as part of quality.
- Grade the response alone; do not reward length or style for their own sake.

Answer format
Reason first, then decide. Reply with one JSON object and nothing else, its keys in \
this order:
{"explanation": "<a short justification pointing to concrete evidence in the \
response>", "label": <0, 1 or 2>}"""

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

_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


class RubricError(ValueError):
    """A rubric file that cannot be used (missing, empty, or without a placeholder)."""


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace the placeholders in one pass, so text inside a response that looks like
    a placeholder is never replaced in turn."""
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class Rubric:
    """A named rubric: an optional system message and the user message template."""

    name: str
    user_template: str
    system: str | None = None

    @property
    def version(self) -> str:
        """`name+<8 hex>`: the name says which rubric, the hash that its text is the
        same; recorded with every label and part of every cache key."""
        blob = json.dumps([self.system, self.user_template], ensure_ascii=False)
        return f"{self.name}+{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def messages(self, prompt: str, concept: str, response: str) -> list[dict[str, str]]:
        user = _fill(self.user_template,
                     {"prompt": prompt, "concept": concept, "response": response})
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": user}]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Rubric:
        """The whole file as the user message; named after the file's stem."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise RubricError(f"judge.rubric_file: cannot read {str(p)!r}: {e}") from None
        if not text.strip():
            raise RubricError(f"judge.rubric_file: {str(p)!r} is empty")
        missing = [f"{{{k}}}" for k in PLACEHOLDERS if f"{{{k}}}" not in text]
        if missing:
            raise RubricError(f"judge.rubric_file: {str(p)!r} lacks the placeholder(s) "
                              f"{', '.join(missing)} (each of {{prompt}}, {{concept}}, "
                              "{response} must appear)")
        return cls(p.stem, text)


DEFAULT_RUBRIC = Rubric("asteer-3way-v2", USER_TEMPLATE, SYSTEM_PROMPT)
RUBRIC_VERSION = DEFAULT_RUBRIC.version

JUDGMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        # the reason first: structured output generates the keys in this order
        "explanation": {"type": "string", "minLength": 1, "maxLength": EXPLANATION_MAX},
        "label": {"type": "integer", "enum": [0, 1, 2]},
    },
    "required": ["explanation", "label"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Judgment:
    label: int
    explanation: str


class JudgmentParseError(ValueError):
    """The judge answered, but no single valid label can be read from the answer."""


def build_messages(prompt: str, concept: str, response: str,
                   rubric: Rubric = DEFAULT_RUBRIC) -> list[dict[str, str]]:
    """The judge sees prompt, concept and steered response only (paper-notes, Labels)."""
    return rubric.messages(prompt, concept, response)


def response_format() -> dict[str, Any]:
    """OpenAI `response_format` for structured output; strict so servers enforce the enum."""
    return {
        "type": "json_schema",
        "json_schema": {"name": "steering_judgment", "schema": JUDGMENT_SCHEMA, "strict": True},
    }


_OBJECT_RE = re.compile(r"\{[^{}]*\}", re.S)
_LABEL_RE = re.compile(r"""["']?(?:label|judgment)["']?\s*[:=]\s*["']?(\d+)["']?""", re.I)
#: the label's key: ours, or the reference authors' (their rubric asks for `judgment`)
_LABEL_KEYS = ("label", "judgment")


def _from_obj(obj: Any) -> Judgment:
    keys = [k for k in _LABEL_KEYS if isinstance(obj, dict) and k in obj]
    if not keys:
        raise JudgmentParseError("no 'label' field")
    if len({json.dumps(obj[k]) for k in keys}) > 1:
        raise JudgmentParseError("'label' and 'judgment' disagree")
    raw = obj[keys[0]]
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
