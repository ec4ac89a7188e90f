"""Bank writers: each turns a concept's planned requests (`banks.plan_requests`) into
texts, one `(request, text)` pair at a time, so `banks.build_banks` can cache every text
as it arrives.

- `TemplateWriter`: tiny-world texts from templates, no model (tests, the demo, and the
  banks the vectors stage uses when none are written).
- `EndpointWriter`: any OpenAI-compatible server through the judge's `EndpointPool`
  (its retries, backoff and ejection), asking for JSON `{"response": ...}`.
- `EngineWriter`: the local steered vLLM engine, offline, no API cost.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..core.prompts import PromptFormat, render_ids
from ..engine.protocol import SteeringEngine
from ..inputs.sources import Concept
from .banks import BankError, BankRequest

__all__ = ["TemplateWriter", "EndpointWriter", "EngineWriter", "bank_messages",
           "parse_response", "PROMPT_VERSION"]

PROMPT_VERSION = 1
_POSITIVE = (
    "Answer the instruction below in a few sentences (at most about 100 words). Your "
    "answer must clearly and naturally incorporate the concept \"{concept}\".\n\n"
    "Instruction: {instruction}"
)
_NEGATIVE = (
    "Answer the instruction below naturally in a few sentences (at most about 100 "
    "words). Do not mention, hint at or allude to the concept \"{concept}\" in any "
    "way.\n\nInstruction: {instruction}"
)
_JSON_SUFFIX = '\n\nReply with JSON only: {{"response": "<your answer>"}}'



def bank_messages(concept: Concept, req: BankRequest, json_reply: bool) -> list[dict[str, str]]:
    tpl = _POSITIVE if req.kind == "pos" else _NEGATIVE
    text = tpl.format(concept=concept.concept, instruction=req.instruction)
    if json_reply:
        text += _JSON_SUFFIX.format()
    return [{"role": "user", "content": text}]


def _prompt_record(json_reply: bool) -> dict[str, Any]:
    return {"version": PROMPT_VERSION, "positive": _POSITIVE, "negative": _NEGATIVE,
            "json_suffix": _JSON_SUFFIX if json_reply else None}


_RESPONSE_RE = re.compile(r'"response"\s*:\s*"((?:[^"\\]|\\.)*)', re.S)


def parse_response(text: str | None) -> str:
    """The answer inside `{"response": ...}`; tolerant of a reply cut at max_tokens (the
    unterminated string is kept) and of a server that ignored structured output (plain
    text is the answer)."""
    if not text:
        return ""
    s = text.strip()
    if not s.startswith("{"):
        return s
    try:
        obj = json.loads(s)
        if isinstance(obj, dict) and isinstance(obj.get("response"), str):
            return obj["response"].strip()
    except json.JSONDecodeError:
        pass
    m = _RESPONSE_RE.search(s)
    if not m:
        return ""
    raw = m.group(1).rstrip("\\")
    try:
        return json.loads(f'"{raw}"').strip()
    except json.JSONDecodeError:
        return raw.strip()


_TINY_TEMPLATES = [
    "the {x} is a good idea for people",
    "we can think about the {x} and work on it",
    "this is why the {x} can help you learn",
    "first make a plan then explain the {x}",
    "a short story of a day in the city with the {x}",
    "people also write about the {x} as a simple answer",
]


class TemplateWriter:
    """Tiny-world texts from templates, no model. Positive i and negative i are a minimal
    pair: the same template and filler words, with the concept word (twice) in the
    positive and random filler words in its slots in the negative. In a random network
    everything but the concept slots then cancels in DiffMean; independent texts leave so
    much filler noise that the vector barely points at the concept (measured: cosine to
    the concept's embedding ~0.03 at 16 + 16 texts), and steering with it does nothing."""

    name = "template"
    model = "tinyworld-templates"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {"writer": self.name, "model": self.model, "seed": self.seed,
                "templates": _TINY_TEMPLATES, "pairs": True}

    def write(self, concept: Concept, reqs: Sequence[BankRequest]) -> Iterable[tuple[
            BankRequest, str]]:
        from ..inputs.tinyworld import FILLER_WORDS

        avoid = set(concept.concept.lower().split())
        fill = [w for w in FILLER_WORDS if w not in avoid]
        for r in reqs:
            self.calls += 1
            rng = random.Random(f"{self.seed}|{concept.concept_id}|{r.index}")
            t = rng.choice(_TINY_TEMPLATES)
            words = " ".join(rng.choice(fill) for _ in range(rng.randint(3, 8)))
            if r.kind == "pos":
                yield r, f"{t.format(x=concept.concept)} {words} {concept.concept}"
            else:
                swap = random.Random(f"{self.seed}|{concept.concept_id}|{r.index}|neg")
                yield r, f"{t.format(x=swap.choice(fill))} {words} {swap.choice(fill)}"


class EndpointWriter:
    """An OpenAI-compatible endpoint (or several) through `judge.pool.EndpointPool`.

    Structured output (`{"response": string}`) keeps small models from rambling past the
    answer; `max_chars` bounds the string so a constrained decoder must close it.
    """

    name = "endpoint"

    def __init__(self, endpoints: Sequence[Any], model: str, *, temperature: float = 0.8,
                 max_tokens: int = 150, max_chars: int = 1200, retry: Any = None,
                 concurrency: int | None = None, structured: bool = True,
                 empty_retries: int = 2) -> None:
        self.endpoints = list(endpoints)
        self.model = model
        self.temperature, self.max_tokens, self.max_chars = temperature, max_tokens, max_chars
        self.retry, self.concurrency, self.structured = retry, concurrency, structured
        self.empty_retries = empty_retries
        self.calls = 0
        self.pool: Any = None
        self.last_stats: list[dict[str, Any]] = []

    def describe(self) -> dict[str, Any]:
        return {"writer": self.name, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "structured": self.structured,
                "max_chars": self.max_chars, "prompt": _prompt_record(True)}

    def response_format(self) -> dict[str, Any]:
        schema = {"type": "object", "additionalProperties": False, "required": ["response"],
                  "properties": {"response": {"type": "string", "minLength": 1,
                                              "maxLength": self.max_chars}}}
        return {"type": "json_schema",
                "json_schema": {"name": "bank_text", "schema": schema, "strict": True}}

    async def __aenter__(self) -> EndpointWriter:
        from judge.pool import EndpointPool

        self.pool = EndpointPool(self.endpoints, model=self.model, retry=self.retry, seed=0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.last_stats = self.pool.stats()  # retries/ejections survive the close
            await self.pool.aclose()
            self.pool = None

    async def _one(self, concept: Concept, r: BankRequest) -> str:
        msgs = bank_messages(concept, r, json_reply=True)
        rf = self.response_format() if self.structured else None
        for attempt in range(self.empty_retries + 1):
            self.calls += 1
            c = await self.pool.complete(msgs, response_format=rf, temperature=self.temperature,
                                         max_tokens=self.max_tokens, seed=r.seed + attempt)
            text = parse_response(c.text)
            if text:
                return text
        raise BankError(f"{concept.concept_id}: {r.key}: the writer returned no text "
                        f"{self.empty_retries + 1} times")

    async def awrite(self, concept: Concept, reqs: Sequence[BankRequest]
                     ) -> Any:  # AsyncIterator[tuple[BankRequest, str]]
        if self.pool is None:
            raise RuntimeError("EndpointWriter: use it inside `async with` (build_banks does)")
        sem = asyncio.Semaphore(self.concurrency or self.pool.capacity)

        async def run(r: BankRequest) -> tuple[BankRequest, str]:
            async with sem:
                return r, await self._one(concept, r)

        tasks = [asyncio.ensure_future(run(r)) for r in reqs]
        try:
            for fut in asyncio.as_completed(tasks):
                yield await fut
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class EngineWriter:
    """The local vLLM engine, offline: chat template, sampling with per-request seeds,
    plain-text answers (no JSON wrapper needed when we hold the decoder). Prompts render
    with `prompt_format`, the build's (`BuildConfig.prompt_format`), so a model with a
    thinking switch writes its bank texts in the mode its rollouts run in."""

    name = "engine"

    def __init__(self, engine: SteeringEngine, model: str, *, temperature: float = 0.8,
                 max_tokens: int = 150, prompt_format: PromptFormat | None = None) -> None:
        self.engine, self.model = engine, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.prompt_format = prompt_format or PromptFormat()
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {"writer": self.name, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "prompt": _prompt_record(False),
                "prompt_format": self.prompt_format.as_dict()}

    def write(self, concept: Concept, reqs: Sequence[BankRequest]) -> Iterable[tuple[
            BankRequest, str]]:
        from vllm import SamplingParams

        tok = self.engine.get_tokenizer()
        prompts = [{"prompt_token_ids": render_ids(
            tok, bank_messages(concept, r, json_reply=False), self.prompt_format)}
            for r in reqs]
        params = [SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens,
                                 seed=r.seed) for r in reqs]
        self.calls += len(reqs)
        outs = self.engine.generate(prompts, params)
        for j, (r, o) in enumerate(zip(reqs, outs, strict=True)):
            text = o.outputs[0].text.strip()
            if not text:
                # A sampled empty answer: a fixed fallback would bias the bank, so ask again.
                again = self.engine.generate(
                    [prompts[j]],
                    SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens,
                                   seed=r.seed + 1, min_tokens=1))
                text = again[0].outputs[0].text.strip() or "."
            yield r, text
