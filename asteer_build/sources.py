"""Concepts and prompts: the built-in tiny-world sets and loaders for user files.

Item ids hash concept and prompt ids, so ids must be unique and stable; loaders reject
duplicates and empty fields with the file, row and column named, because a silent
duplicate would double-count items in every later stage.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Concept", "Prompt", "SourceError", "LEVELS", "tiny_concepts", "tiny_prompts",
    "load_concepts", "load_prompts", "source_count",
]

LEVELS = ("low", "mid", "high")
BUILTIN = "builtin:tinyworld"
HUB = "hub:"


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class Concept:
    concept_id: str
    concept: str
    concept_level: str = "mid"
    partition: str = "id"


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    prompt: str
    source: str = "builtin"


# The tiny world's concepts are single words of its vocabulary: the rules judge counts the
# concept's words in a response, so a concept name must be exactly what it looks for.
_TINY = {
    "low": ["emoji", "table", "upper", "poem"],
    "mid": ["ocean", "music", "coffee", "garden"],
    "high": ["robot", "dragon", "pirate", "planet"],
}
_TINY_PROMPTS = [
    "explain the ocean to a friend",
    "write a short story about a city",
    "why is sleep good for people",
    "list three reasons to travel",
    "how can we learn more in school",
    "what is a good plan for the day",
    "write about food and health",
    "explain money and work",
]


def tiny_concepts() -> list[Concept]:
    from .tinyworld import CONCEPT_WORDS

    out = []
    for level, words in _TINY.items():
        for i, w in enumerate(words):
            assert w in CONCEPT_WORDS, w
            # One concept per level is held out, like the paper's unseen partition.
            out.append(Concept(f"tw-{w}", w, level, "ood" if i == len(words) - 1 else "id"))
    return out


def tiny_prompts() -> list[Prompt]:
    return [Prompt(f"tw-p{i:02d}", p) for i, p in enumerate(_TINY_PROMPTS)]


def _read_rows(path: Path, key: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SourceError(f"{key}: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if isinstance(rows, dict) and rows and set(rows) <= set(LEVELS):
                rows = _level_rows(rows, str(path))
            elif isinstance(rows, dict):
                rows = rows.get(key, rows.get("data"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise SourceError(f"{path}: expected a list of objects (or {{{key!r}: [...]}})")
        return rows
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise SourceError(f"{path}: unsupported format {suffix!r} (use .json, .jsonl, .csv, "
                      ".parquet)")


def _check(rows: list[dict[str, Any]], where: str, id_col: str, text_col: str) -> None:
    if not rows:
        raise SourceError(f"{where}: no rows")
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        for col in (id_col, text_col):
            if col not in r:
                raise SourceError(f"{where}: row {i}: missing column {col!r} "
                                  f"(columns: {sorted(r)})")
            v = r[col]
            if v is None or not str(v).strip():
                raise SourceError(f"{where}: row {i}: empty {col!r}")
        k = str(r[id_col])
        if k in seen:
            raise SourceError(f"{where}: duplicate {id_col} {k!r} in rows {seen[k]} and {i}")
        seen[k] = i


_SPEC_FIELDS = {"path", "limit", "expect", "hub", "file", "config", "split", "columns",
                "sample", "seed", "revision"}


def _rows(spec: Any, key: str, base_dir: str) -> tuple[list[dict[str, Any]], str, int | None]:
    limit = None
    if isinstance(spec, str) and spec.startswith(HUB):
        spec = {"hub": spec[len(HUB):]}
    if isinstance(spec, dict):
        unknown = set(spec) - _SPEC_FIELDS
        if unknown:
            raise SourceError(f"{key}: unknown field(s) {sorted(unknown)} (known: "
                              f"{', '.join(sorted(_SPEC_FIELDS))})")
        if spec.get("path") and spec.get("hub"):
            raise SourceError(f"{key}: give either `path` or `hub`, not both")
        limit = spec.get("limit")
        if spec.get("hub"):
            rows, where = _hub_rows(spec, key)
        elif spec.get("path") is not None:
            rows, where, _ = _rows(spec["path"], key, base_dir)
        else:
            raise SourceError(f"{key}: a mapping needs `path` or `hub`")
        rows = _map_columns(rows, spec.get("columns"), where, key)
        if spec.get("sample") is not None:
            rows = _sample(rows, spec["sample"], spec.get("seed", 42), where)
        return rows, where, limit
    if isinstance(spec, list):
        return [dict(r) if isinstance(r, dict) else {} for r in spec], key, limit
    if not isinstance(spec, str):
        raise SourceError(f"{key}: expected {BUILTIN!r}, a file path or a list, got {spec!r}")
    path = Path(spec if os.path.isabs(spec) else os.path.join(base_dir, spec))
    return _read_rows(path, key), str(path), limit


def _level_rows(d: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """`{"low": [names], "mid": [...], "high": [...]}`: ids from level and position, which
    stay stable as long as the file does."""
    rows = []
    for level in LEVELS:
        names = d.get(level) or []
        if not isinstance(names, list):
            raise SourceError(f"{where}: {level!r}: expected a list of concept names")
        for i, name in enumerate(names):
            if isinstance(name, dict):
                rows.append({"concept_level": level, **name})
            else:
                rows.append({"concept_id": f"{level}-{i:03d}", "concept": name,
                             "concept_level": level})
    return rows


def _hub_rows(spec: dict[str, Any], key: str) -> tuple[list[dict[str, Any]], str]:
    """`hub: owner/name` (a dataset loaded with `datasets`, `config`/`split` optional) or
    `hub: owner/name/path/in/repo.json` (one file, downloaded with `huggingface_hub` and
    read like a local file). Errors name the dataset: a typo should not look like a
    network problem."""
    ref = str(spec["hub"]).strip().strip("/")
    parts = ref.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise SourceError(f"{key}: hub: expected owner/name[/file], got {ref!r}")
    repo = "/".join(parts[:2])
    file = spec.get("file") or ("/".join(parts[2:]) or None)
    where = f"hub:{repo}" + (f"/{file}" if file else "")
    if file:
        from huggingface_hub import hf_hub_download

        try:
            local = hf_hub_download(repo, file, repo_type="dataset",
                                    revision=spec.get("revision"))
        except Exception as e:  # noqa: BLE001 - any Hub failure becomes a source error
            raise SourceError(f"{key}: cannot download {where}: {type(e).__name__}: {e}") from e
        return _read_rows(Path(local), key), where
    import datasets

    try:
        ds = datasets.load_dataset(repo, spec.get("config"), split=spec.get("split") or "train",
                                   revision=spec.get("revision"))
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{key}: cannot load {where}: {type(e).__name__}: {e}") from e
    return ds.to_list(), where


def _map_columns(rows: list[dict[str, Any]], columns: Any, where: str, key: str
                 ) -> list[dict[str, Any]]:
    """`columns: {prompt: instruction}` renames source columns to ours. A named column that
    the source lacks is an error naming the columns it has. A source with no id column
    gets ids from its row positions (before sampling, so they do not depend on it)."""
    if columns is None:
        columns = {}
    if not isinstance(columns, dict):
        raise SourceError(f"{key}.columns: expected a mapping {{our name: source column}}")
    have = sorted({k for r in rows for k in r})
    for ours, theirs in columns.items():
        if theirs not in have:
            raise SourceError(f"{where}: column {theirs!r} (for {ours!r}) not found; "
                              f"columns: {have}")
    out = [{**r, **{ours: r[theirs] for ours, theirs in columns.items()}} for r in rows]
    id_col = "concept_id" if key == "concepts" else "prompt_id"
    if out and all(id_col not in r for r in out):
        prefix = "c" if key == "concepts" else "p"
        for i, r in enumerate(out):
            r[id_col] = f"{prefix}{i:04d}"
    return out


def _sample(rows: list[dict[str, Any]], k: Any, seed: Any, where: str) -> list[dict[str, Any]]:
    """Reference: 50 of AlpacaEval's 805 with seed 42; `random.Random(seed).sample`, so
    the same file and seed give the same prompts in the same order on any machine."""
    import random

    k = int(k)
    if not 0 < k <= len(rows):
        raise SourceError(f"{where}: sample: {k} rows asked, source has {len(rows)}")
    return random.Random(int(seed)).sample(rows, k)


def load_concepts(spec: Any = BUILTIN, base_dir: str = ".") -> list[Concept]:
    """`builtin:tinyworld`, a file (JSON/JSONL/CSV/Parquet), an inline list, or
    `{path: ..., limit: N}`; columns concept_id, concept, [concept_level, partition]."""
    if spec == BUILTIN or spec is None:
        return tiny_concepts()
    rows, where, limit = _rows(spec, "concepts", base_dir)
    _check(rows, where, "concept_id", "concept")
    out = []
    for i, r in enumerate(rows[:limit] if limit else rows):
        level = str(r.get("concept_level") or "mid")
        if level not in LEVELS:
            raise SourceError(f"{where}: row {i}: concept_level {level!r} not in {LEVELS}")
        part = str(r.get("partition") or "id")
        if part not in ("id", "ood"):
            raise SourceError(f"{where}: row {i}: partition {part!r} not in ('id', 'ood')")
        out.append(Concept(str(r["concept_id"]), str(r["concept"]), level, part))
    return out


def source_count(spec: Any, key: str, base_dir: str = ".") -> tuple[int, bool]:
    """How many rows a source has, and whether that was counted (True) or taken from its
    `expect:` because the file is not here (planning a cluster build on a laptop)."""
    if isinstance(spec, dict) and spec.get("expect") is not None and spec.get("hub"):
        return int(spec["expect"]), False
    if isinstance(spec, dict) and spec.get("expect") is not None and spec.get("path"):
        p = str(spec["path"])
        if not os.path.isfile(p if os.path.isabs(p) else os.path.join(base_dir, p)):
            return int(spec["expect"]), False
    loader = load_concepts if key == "concepts" else load_prompts
    return len(loader(spec, base_dir)), True


def load_prompts(spec: Any = BUILTIN, base_dir: str = ".") -> list[Prompt]:
    """Like `load_concepts`; columns prompt_id, prompt, [source]."""
    if spec == BUILTIN or spec is None:
        return tiny_prompts()
    rows, where, limit = _rows(spec, "prompts", base_dir)
    _check(rows, where, "prompt_id", "prompt")
    return [Prompt(str(r["prompt_id"]), str(r["prompt"]), str(r.get("source") or where))
            for r in (rows[:limit] if limit else rows)]
