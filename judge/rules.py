"""Deterministic rules judge for the tiny world, where no language model can grade.

The tiny world's responses are word soup from a small vocabulary, so "coherent" cannot
mean grammar. What steering visibly changes there is (a) how often the concept's words
appear and (b) whether output collapses into repetition. The three labels map onto
those two measures with fixed thresholds, documented here because a dataset card must
say how its labels were made:

- words: lowercase alphabetic runs (`[a-z]+`); the concept's words likewise.
- concept_rate = concept-word occurrences / words.
- distinct_2 = distinct word bigrams / bigrams (1.0 = no repeated bigram).
- top_share = share of the single most frequent word.

Label 2 (over-steer) if there are fewer than `MIN_WORDS` words (empty counts as
over-steer per the rubric), or concept_rate >= `OVER_CONCEPT_RATE` (the concept has
crowded out the answer), or distinct_2 < `MIN_DISTINCT_2` or top_share >
`MAX_TOP_SHARE` (degenerate repetition). Otherwise label 1 (success) if
concept_rate >= `SUCCESS_CONCEPT_RATE`, else 0 (under-steer).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from judge.rubric import Judgment

__all__ = [
    "RULES_VERSION",
    "MIN_WORDS",
    "SUCCESS_CONCEPT_RATE",
    "OVER_CONCEPT_RATE",
    "MIN_DISTINCT_2",
    "MAX_TOP_SHARE",
    "Measures",
    "measure",
    "rules_label",
]

RULES_VERSION = "rules-v1"
MIN_WORDS = 3
SUCCESS_CONCEPT_RATE = 0.02  # about one concept word per 50 words of answer
OVER_CONCEPT_RATE = 0.25  # one word in four is the concept: the answer is gone
MIN_DISTINCT_2 = 0.5
MAX_TOP_SHARE = 0.4

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Measures:
    n_words: int
    concept_rate: float
    distinct_2: float
    top_share: float


def measure(concept: str, response: str) -> Measures:
    words = _WORD.findall(response.lower())
    targets = set(_WORD.findall(concept.lower()))
    n = len(words)
    if n == 0:
        return Measures(0, 0.0, 0.0, 0.0)
    hits = sum(1 for w in words if w in targets)
    bigrams = list(zip(words, words[1:], strict=False))
    distinct_2 = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    top_share = Counter(words).most_common(1)[0][1] / n
    return Measures(n, hits / n, distinct_2, top_share)


def rules_label(concept: str, response: str) -> Judgment:
    m = measure(concept, response)
    stats = f"rate={m.concept_rate:.3f} d2={m.distinct_2:.2f} top={m.top_share:.2f}"
    if m.n_words < MIN_WORDS:
        return Judgment(2, f"empty or near-empty ({m.n_words} words)")
    if m.concept_rate >= OVER_CONCEPT_RATE:
        return Judgment(2, f"concept crowds out the answer; {stats}")
    if m.distinct_2 < MIN_DISTINCT_2 or m.top_share > MAX_TOP_SHARE:
        return Judgment(2, f"degenerate repetition; {stats}")
    if m.concept_rate >= SUCCESS_CONCEPT_RATE:
        return Judgment(1, f"concept present, varied text; {stats}")
    return Judgment(0, f"concept absent; {stats}")
