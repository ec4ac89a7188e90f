"""Contrast banks: per concept, N positive texts that carry the concept and N negatives
that avoid it; the vectors stage pools them into DiffMean and LinearProbe vectors.

Reference setting: 50 + 50 texts per concept written by an instruction model at
temperature 0.8, at most 150 tokens; positives answer a seed instruction while working the
concept in, negatives answer a *different* instruction naturally (so the contrast is the
concept, not the question). Three writers share one request plan:

- `TemplateWriter`: tiny-world texts from templates, no model (tests, the demo).
- `EndpointWriter`: any OpenAI-compatible server through the judge's `EndpointPool`
  (its retries, backoff and ejection), asking for JSON `{"response": ...}`.
- `EngineWriter`: the local steered vLLM engine, offline, no API cost.

Writing 150 x 100 texts costs hours and money, so a bank is cached per concept and a
killed run loses at most the texts in flight: every finished text is appended (and
flushed) to `<concept>.partial.jsonl`; a complete bank is renamed into
`<concept>.jsonl` atomically. Both start with a header that records the writer, its model,
the prompt templates and sampling settings; a cache written under different settings is
refused rather than silently mixed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import atomic
from .sources import Concept

__all__ = [
    "SEED_INSTRUCTIONS", "BankError", "BankRequest", "Bank", "TemplateWriter",
    "EndpointWriter", "EngineWriter", "plan_requests", "bank_messages", "build_banks",
    "load_bank", "check_bank", "parse_response", "bank_path",
]

# Written for this project: generic questions in 7 topic groups, short enough that a
# 150-token answer is complete and broad enough that most concepts can be worked in.
SEED_INSTRUCTIONS: dict[str, list[str]] = {
    "daily_life": [
        "Describe a relaxing way to spend a Sunday afternoon.",
        "Give three tips for keeping a small apartment tidy.",
        "What makes a good breakfast before a busy day?",
    ],
    "science": [
        "Explain why the sky changes colour at sunset.",
        "How do vaccines help the body fight disease?",
        "Describe what happens to water when it freezes.",
    ],
    "work_and_money": [
        "How should someone prepare for a job interview?",
        "Suggest a simple way to start saving money each month.",
        "What are the benefits of working in a team?",
    ],
    "health": [
        "Why is regular sleep important for adults?",
        "Recommend an easy exercise routine for beginners.",
        "How can a person reduce stress during exams?",
    ],
    "travel_and_places": [
        "Plan a one-day visit to a city you have never seen.",
        "What should a traveller pack for a week in the mountains?",
        "Describe the atmosphere of a busy train station.",
    ],
    "learning": [
        "How can a student remember new vocabulary more easily?",
        "Explain how to learn a musical instrument as an adult.",
        "What is a good way to teach a child to read a map?",
    ],
    "creative": [
        "Write a short note thanking a neighbour for their help.",
        "Tell a brief story about a lost umbrella.",
        "Describe an invented holiday and how people celebrate it.",
    ],
}

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


class BankError(ValueError):
    """A bank that cannot be used or cached as asked; the message names the concept."""


@dataclass(frozen=True)
class BankRequest:
    kind: str  # "pos" | "neg"
    index: int
    instruction: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}{self.index}"


@dataclass
class Bank:
    concept_id: str
    positives: list[str]
    negatives: list[str]
    header: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """Identifies the texts, so cached vectors are tied to the bank they came from."""
        h = hashlib.sha256()
        for kind, texts in (("pos", self.positives), ("neg", self.negatives)):
            for t in texts:
                h.update(f"{kind}\0{t}\0".encode())
        return h.hexdigest()[:16]


class Writer(Protocol):
    name: str
    model: str

    def describe(self) -> dict[str, Any]: ...


def _instructions(instructions: Sequence[str] | dict[str, list[str]] | None) -> list[str]:
    if instructions is None:
        instructions = SEED_INSTRUCTIONS
    if isinstance(instructions, dict):
        flat = [q for group in instructions.values() for q in group]
    else:
        flat = list(instructions)
    if len(flat) < 2:
        raise BankError("contrast banks need at least 2 seed instructions (positives and "
                        "negatives use different ones)")
    return flat


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4],
                          "little") & 0x7FFFFFFF


def plan_requests(concept: Concept, n: int, seed: int = 0,
                  instructions: Sequence[str] | dict[str, list[str]] | None = None
                  ) -> list[BankRequest]:
    """The 2n texts to write for a concept. Instructions are shuffled per concept and split
    in halves, positives from one and negatives from the other, so no instruction is on
    both sides; request seeds are stable, so a resumed bank asks the same questions."""
    if n < 1:
        raise BankError(f"{concept.concept_id}: bank size must be >= 1 (got {n})")
    flat = _instructions(instructions)
    rng = random.Random(f"{seed}|{concept.concept_id}|instructions")
    order = flat[:]
    rng.shuffle(order)
    half = len(order) // 2
    sides = {"pos": order[:half], "neg": order[half:]}
    return [BankRequest(kind, i, sides[kind][i % len(sides[kind])],
                        _seed(seed, concept.concept_id, kind, i))
            for kind in ("pos", "neg") for i in range(n)]


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


# -- writers ----------------------------------------------------------------------------


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
        from .tinyworld import FILLER_WORDS

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
    plain-text answers (no JSON wrapper needed when we hold the decoder)."""

    name = "engine"

    def __init__(self, engine: Any, model: str, *, temperature: float = 0.8,
                 max_tokens: int = 150) -> None:
        self.engine, self.model = engine, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {"writer": self.name, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "prompt": _prompt_record(False)}

    def write(self, concept: Concept, reqs: Sequence[BankRequest]) -> Iterable[tuple[
            BankRequest, str]]:
        from vllm import SamplingParams

        tok = self.engine.get_tokenizer()
        prompts = [{"prompt_token_ids": list(tok.apply_chat_template(
            bank_messages(concept, r, json_reply=False), add_generation_prompt=True,
            tokenize=True, return_dict=False))} for r in reqs]
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


# -- cache ------------------------------------------------------------------------------


def _safe(cid: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]", "_", cid)
    return s if s == cid else f"{s}-{hashlib.sha256(cid.encode()).hexdigest()[:8]}"


def bank_path(cache_dir: str | Path, concept_id: str) -> Path:
    return Path(cache_dir) / f"{_safe(concept_id)}.jsonl"


def _header(concept: Concept, writer: Writer, n: int, seed: int,
            instructions: list[str]) -> dict[str, Any]:
    h = {"concept_id": concept.concept_id, "concept": concept.concept, "n": n, "seed": seed,
         "instructions": instructions, **writer.describe()}
    h["fingerprint"] = hashlib.sha256(json.dumps(h, sort_keys=True).encode()).hexdigest()[:16]
    return h


def _read_jsonl(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and records; a torn last line (killed mid-write) is dropped."""
    header, recs = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "header" in obj:
                header = obj["header"]
            else:
                recs.append(obj)
    return header, recs


def check_bank(concept_id: str, positives: Sequence[str], negatives: Sequence[str]) -> None:
    """Fail before pooling: an empty side gives a NaN mean and a useless probe."""
    if not positives:
        raise BankError(f"{concept_id}: contrast bank has no positives")
    if not negatives:
        raise BankError(f"{concept_id}: contrast bank has no negatives")
    for kind, texts in (("positive", positives), ("negative", negatives)):
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise BankError(f"{concept_id}: {kind} text {i} is empty")


def load_bank(path: str | Path) -> Bank:
    p = Path(path)
    header, recs = _read_jsonl(p)
    if header is None:
        raise BankError(f"{p}: not a contrast bank (no header line)")
    pos = [r["text"] for r in sorted(recs, key=lambda r: r["index"]) if r["kind"] == "pos"]
    neg = [r["text"] for r in sorted(recs, key=lambda r: r["index"]) if r["kind"] == "neg"]
    check_bank(header["concept_id"], pos, neg)
    return Bank(header["concept_id"], pos, neg, header)


class _Partial:
    """The append-only record of one concept's finished texts."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path, self.header = path, header
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            old, recs = _read_jsonl(path)
            if old and old.get("fingerprint") == header["fingerprint"]:
                self.done = {f"{r['kind']}{r['index']}": r for r in recs}
        # Rewrite what survived (drops a torn line), then append.
        lines = [json.dumps({"header": header}) + "\n"]
        lines += [json.dumps(r) + "\n" for r in self.done.values()]
        atomic.write_text(path, "".join(lines))
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish/close

    def add(self, r: BankRequest, text: str) -> None:
        if r.key in self.done:
            return
        rec = {**asdict(r), "text": text}
        self.done[r.key] = rec
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def build_banks(
    concepts: Sequence[Concept],
    writer: Any,
    cache_dir: str | Path,
    *,
    n: int = 50,
    seed: int = 0,
    instructions: Sequence[str] | dict[str, list[str]] | None = None,
    on_concept: Callable[[str, Bank], None] | None = None,
) -> dict[str, Bank]:
    """Write (or reuse) every concept's bank under `cache_dir`; returns them by id.

    Finished concepts are read back, half-written ones continue from their partial file,
    so a rerun after a crash or a kill asks the writer only for texts it never returned.
    `on_concept(concept_id, bank)` runs after each concept is committed.
    """
    ids = [c.concept_id for c in concepts]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise BankError(f"duplicate concept ids: {dup}")
    flat = _instructions(instructions)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if hasattr(writer, "awrite"):
        return asyncio.run(_build_async(concepts, writer, cache, n, seed, flat, on_concept))
    out: dict[str, Bank] = {}
    for c in concepts:
        bank, part, todo = _start(c, writer, cache, n, seed, flat)
        if part is not None:
            try:
                for r, text in writer.write(c, todo):
                    part.add(r, text)
            finally:
                part.close()
            bank = _finish(c, part, cache, n)
        out[c.concept_id] = bank
        if on_concept:
            on_concept(c.concept_id, bank)
    return out


async def _build_async(concepts: Sequence[Concept], writer: Any, cache: Path, n: int,
                       seed: int, flat: list[str],
                       on_concept: Callable[[str, Bank], None] | None) -> dict[str, Bank]:
    out: dict[str, Bank] = {}
    async with writer:
        for c in concepts:
            bank, part, todo = _start(c, writer, cache, n, seed, flat)
            if part is not None:
                try:
                    async for r, text in writer.awrite(c, todo):
                        part.add(r, text)
                finally:
                    part.close()
                bank = _finish(c, part, cache, n)
            out[c.concept_id] = bank
            if on_concept:
                on_concept(c.concept_id, bank)
    return out


def _start(c: Concept, writer: Any, cache: Path, n: int, seed: int, flat: list[str]
           ) -> tuple[Bank | None, _Partial | None, list[BankRequest]]:
    if not c.concept.strip():
        raise BankError(f"{c.concept_id}: empty concept name")
    header = _header(c, writer, n, seed, flat)
    final = bank_path(cache, c.concept_id)
    if final.exists():
        bank = load_bank(final)
        if bank.header.get("fingerprint") != header["fingerprint"]:
            raise BankError(
                f"{final}: cached bank for {c.concept_id!r} was written with different "
                f"settings (writer {bank.header.get('writer')}/{bank.header.get('model')}, "
                f"n={bank.header.get('n')}); delete it or use another bank cache folder")
        return bank, None, []
    part = _Partial(final.with_name(final.stem + ".partial.jsonl"), header)
    todo = [r for r in plan_requests(c, n, seed, flat) if r.key not in part.done]
    return None, part, todo


def _finish(c: Concept, part: _Partial, cache: Path, n: int) -> Bank:
    recs = sorted(part.done.values(), key=lambda r: (r["kind"] != "pos", r["index"]))
    keys = {f"{r['kind']}{r['index']}" for r in recs}
    missing = [f"{k}{i}" for k in ("pos", "neg") for i in range(n) if f"{k}{i}" not in keys]
    if missing:
        raise BankError(f"{c.concept_id}: writer left {len(missing)} text(s) unwritten "
                        f"({missing[:5]}...); rerun to resume")
    final = bank_path(cache, c.concept_id)
    atomic.write_text(final, "".join([json.dumps({"header": part.header}) + "\n"]
                                     + [json.dumps(r) + "\n" for r in recs]))
    part.path.unlink(missing_ok=True)
    return load_bank(final)
