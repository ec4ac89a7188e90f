"""Contrast banks: per concept, N positive texts that carry the concept and N negatives
that avoid it; the vectors stage pools them into DiffMean and LinearProbe vectors.

Reference setting: 50 + 50 texts per concept written by an instruction model at
temperature 0.8, at most 150 tokens; positives answer a seed instruction while working the
concept in, negatives answer a *different* instruction naturally (so the contrast is the
concept, not the question). This module holds the bank types, the request plan every
writer follows (`plan_requests`), and the bank cache; the writers (templates, an
OpenAI-compatible endpoint, the local vLLM engine) are in `writers.py`.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..core import atomic
from ..inputs.sources import Concept

__all__ = [
    "SEED_INSTRUCTIONS", "BankError", "BankRequest", "Bank", "Writer", "plan_requests",
    "build_banks", "load_bank", "check_bank", "bank_path", "safe_name",
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


# -- cache ------------------------------------------------------------------------------


def safe_name(cid: str) -> str:
    """A file name for a concept id (unsafe characters replaced, plus a hash if any were)."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", cid)
    return s if s == cid else f"{s}-{hashlib.sha256(cid.encode()).hexdigest()[:8]}"


def bank_path(cache_dir: str | Path, concept_id: str) -> Path:
    return Path(cache_dir) / f"{safe_name(concept_id)}.jsonl"


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
    with closing(_jobs(concepts, writer, cache, n, seed, flat, out, on_concept)) as jobs:
        for c, part, todo in jobs:
            for r, text in writer.write(c, todo):
                part.add(r, text)
    return out


async def _build_async(concepts: Sequence[Concept], writer: Any, cache: Path, n: int,
                       seed: int, flat: list[str],
                       on_concept: Callable[[str, Bank], None] | None) -> dict[str, Bank]:
    out: dict[str, Bank] = {}
    async with writer:
        with closing(_jobs(concepts, writer, cache, n, seed, flat, out, on_concept)) as jobs:
            for c, part, todo in jobs:
                async for r, text in writer.awrite(c, todo):
                    part.add(r, text)
    return out


def _jobs(concepts: Sequence[Concept], writer: Any, cache: Path, n: int, seed: int,
          flat: list[str], out: dict[str, Bank],
          on_concept: Callable[[str, Bank], None] | None
          ) -> Iterator[tuple[Concept, _Partial, list[BankRequest]]]:
    """The concepts whose banks still need texts, one at a time: the caller writes the
    requests into the partial file; asking for the next concept commits this one (a
    complete bank, renamed into place) and records it in `out`. Closing the generator
    early (the caller failed) closes the partial file and commits nothing."""
    for c in concepts:
        bank, part, todo = _start(c, writer, cache, n, seed, flat)
        if part is not None:
            try:
                yield c, part, todo
            finally:
                part.close()
            bank = _finish(c, part, cache, n)
        out[c.concept_id] = bank
        if on_concept:
            on_concept(c.concept_id, bank)


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
