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
    "Concept", "Prompt", "SourceError", "SourceUnavailable", "SourceList", "LEVELS",
    "tiny_concepts", "tiny_prompts", "load_concepts", "load_prompts", "source_count",
    "hub_commit",
]

LEVELS = ("low", "mid", "high")
BUILTIN = "builtin:tinyworld"
HUB = "hub:"


class SourceError(ValueError):
    pass


class SourceUnavailable(SourceError):
    """The source is not here: a file that does not exist, or a Hub file neither cached
    nor downloadable. `plan` then counts from the source's `expect:`; every other source
    error (a bad field, a bad row) is the config's fault and always fails."""


class SourceList(list):
    """A loaded source's rows (a plain list) plus `origin`: where they came from, for
    `build.json` (for a Hub file: repo, file, requested revision and resolved commit)."""

    origin: dict[str, Any] | None = None


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
    #: the prompt's row in its source file (before any `sample:`), when known
    source_index: int | None = None


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
        raise SourceUnavailable(f"{key}: file not found: {path}")
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
                                  f"(columns: {sorted(set(r) - {_INDEX})})")
            v = r[col]
            if v is None or not str(v).strip():
                raise SourceError(f"{where}: row {i}: empty {col!r}")
        k = str(r[id_col])
        if k in seen:
            raise SourceError(f"{where}: duplicate {id_col} {k!r} in rows {seen[k]} and {i}")
        seen[k] = i


_SPEC_FIELDS = {"path", "limit", "expect", "hub", "file", "config", "split", "columns",
                "sample", "seed", "revision", "levels"}
#: where each row was in its source file, carried through column mapping and sampling
_INDEX = "__source_index__"


def _rows(spec: Any, key: str, base_dir: str, origin: dict[str, Any] | None = None
          ) -> tuple[list[dict[str, Any]], str, int | None]:
    """Rows of a source after column mapping and sampling, each with its source row in
    `_INDEX`. `origin`, when given, is filled with where the rows came from."""
    limit = None
    origin = {} if origin is None else origin
    if isinstance(spec, str) and spec.startswith(HUB):
        spec = {"hub": spec[len(HUB):]}
    if isinstance(spec, dict):
        unknown = set(spec) - _SPEC_FIELDS
        if unknown:
            raise SourceError(f"{key}: unknown field(s) {sorted(unknown)} (known: "
                              f"{', '.join(sorted(_SPEC_FIELDS))})")
        if spec.get("path") and spec.get("hub"):
            raise SourceError(f"{key}: give either `path` or `hub`, not both")
        if spec.get("levels") is not None and key != "concepts":
            raise SourceError(f"{key}.levels: only a concepts source has levels")
        limit = spec.get("limit")
        if spec.get("hub"):
            rows, where = _hub_rows(spec, key, origin)
        elif spec.get("path") is not None:
            rows, where, _ = _rows(spec["path"], key, base_dir, origin)
        else:
            raise SourceError(f"{key}: a mapping needs `path` or `hub`")
        rows = [{**r, _INDEX: r.get(_INDEX, i)} for i, r in enumerate(rows)]
        origin["rows"] = len(rows)
        rows = _map_columns(rows, spec.get("columns"), where, key)
        if spec.get("sample") is not None:
            rows = _sample(rows, spec["sample"], spec.get("seed", 42), where, key)
            origin.update(sample=int(spec["sample"]), seed=int(spec.get("seed", 42)))
        _default_ids(rows, key)
        return rows, where, limit
    if isinstance(spec, list):
        return [{**(r if isinstance(r, dict) else {}), _INDEX: i}
                for i, r in enumerate(spec)], key, limit
    if not isinstance(spec, str):
        raise SourceError(f"{key}: expected {BUILTIN!r}, a file path or a list, got {spec!r}")
    path = Path(spec if os.path.isabs(spec) else os.path.join(base_dir, spec))
    origin.setdefault("path", str(path))
    return [{**r, _INDEX: i} for i, r in enumerate(_read_rows(path, key))], str(path), limit


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


#: Hub repos that failed to answer in this process: later files of the same repo are
#: looked up in the cache only (huggingface_hub retries an unreachable Hub for ~20 s
#: per file, and `plan` reads two files of one repo)
_UNREACHABLE: set[str] = set()


def hub_commit(local_path: str | os.PathLike[str]) -> str | None:
    """The commit a file from `hf_hub_download` belongs to: its snapshot folder's name
    (`.../snapshots/<commit>/<file>`), which is what the Hub resolved the revision to,
    online or from the cache."""
    parts = Path(local_path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "snapshots":
            return parts[i + 1]
    return None


def _hub_download(repo: str, file: str, revision: str | None, key: str) -> str:
    """One file of a Hub dataset through `huggingface_hub`, so the Hugging Face cache
    (`HF_HUB_CACHE`, `HF_HOME`) and offline mode (`HF_HUB_OFFLINE=1`) work as they do for
    every other Hub file. A Hub that cannot be reached with nothing cached is
    `SourceUnavailable`; a missing repo, file or revision says which."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"hub:{repo}/{file}" + (f"@{revision}" if revision else "")
    try:
        return hf_hub_download(repo, file, repo_type="dataset", revision=revision,
                               local_files_only=repo in _UNREACHABLE)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        # (EntryNotFoundError also covers a file the cache marked as absent)
        if isinstance(e, LocalEntryNotFoundError):
            from huggingface_hub import constants

            _UNREACHABLE.add(repo)
            why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode()
                   else "the Hub cannot be reached")
            raise SourceUnavailable(f"{key}: {where} is not in the Hugging Face cache and "
                                    f"{why}") from e
        raise SourceError(f"{key}: cannot download {where}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0]}") from e
    except OfflineModeIsEnabled as e:
        _UNREACHABLE.add(repo)
        raise SourceUnavailable(f"{key}: {where} is not in the Hugging Face cache and "
                                "HF_HUB_OFFLINE is set") from e
    except Exception as e:  # noqa: BLE001 - any other Hub failure becomes a source error
        raise SourceError(f"{key}: cannot download {where}: {type(e).__name__}: {e}") from e


def _hub_rows(spec: dict[str, Any], key: str, origin: dict[str, Any]
              ) -> tuple[list[dict[str, Any]], str]:
    """`hub: owner/name` (a dataset loaded with `datasets`, `config`/`split` optional) or
    `hub: owner/name/path/in/repo.json` (one file, downloaded with `huggingface_hub` and
    read like a local file; `file:` names it too). `revision:` pins a branch, tag or
    commit; the commit it resolved to goes into `origin`. Errors name the dataset: a typo
    should not look like a network problem."""
    ref = str(spec["hub"]).strip().strip("/")
    parts = ref.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise SourceError(f"{key}: hub: expected owner/name[/file], got {ref!r}")
    repo = "/".join(parts[:2])
    file = spec.get("file") or ("/".join(parts[2:]) or None)
    revision = spec.get("revision")
    if revision is not None:
        revision = str(revision)
    where = f"hub:{repo}" + (f"/{file}" if file else "")
    origin.update(hub=repo, file=file, revision=revision or "main")
    if file:
        local = _hub_download(repo, file, revision, key)
        origin["commit"] = hub_commit(local)
        return _read_rows(Path(local), key), where
    import datasets

    try:
        ds = datasets.load_dataset(repo, spec.get("config"), split=spec.get("split") or "train",
                                   revision=revision)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"{key}: cannot load {where}: {type(e).__name__}: {e}") from e
    return ds.to_list(), where


def _map_columns(rows: list[dict[str, Any]], columns: Any, where: str, key: str
                 ) -> list[dict[str, Any]]:
    """`columns: {prompt: instruction}` renames source columns to ours. A named column that
    the source lacks is an error naming the columns it has."""
    if columns is None:
        columns = {}
    if not isinstance(columns, dict):
        raise SourceError(f"{key}.columns: expected a mapping {{our name: source column}}")
    have = sorted({k for r in rows for k in r} - {_INDEX})
    for ours, theirs in columns.items():
        if theirs not in have:
            raise SourceError(f"{where}: column {theirs!r} (for {ours!r}) not found; "
                              f"columns: {have}")
    return [{**r, **{ours: r[theirs] for ours, theirs in columns.items()}} for r in rows]


def _default_ids(rows: list[dict[str, Any]], key: str) -> None:
    """A source with no id column gets ids from positions in the final list (after
    `sample:`): "0", "1", ... For the reference prompts that is the authors' `sample_id`,
    the position in their sampled list, so our (concept_id, prompt_id) is theirs
    (concept_id, sample_id) and their per-concept prompt split (by position) follows
    from the ids alone; the file row stays in `source_index`."""
    id_col = "concept_id" if key == "concepts" else "prompt_id"
    if rows and all(id_col not in r for r in rows):
        for i, r in enumerate(rows):
            r[id_col] = str(i)


def _sample(rows: list[dict[str, Any]], k: Any, seed: Any, where: str, key: str
            ) -> list[dict[str, Any]]:
    """The authors' prompts: `random.seed(42); random.sample(rows, 50)` over AlpacaEval's
    805 (their `utils.py`). `random.Random(seed).sample` is the same generator state and
    the same call, so the same file and seed give their prompts in their order on any
    machine."""
    import random

    if isinstance(k, bool) or not isinstance(k, int):
        raise SourceError(f"{key}.sample: expected a whole number of rows (got {k!r})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SourceError(f"{key}.seed: expected an integer (got {seed!r})")
    if k <= 0:
        raise SourceError(f"{key}.sample: must be >= 1 (got {k})")
    if k > len(rows):
        raise SourceError(f"{key}.sample: {k} rows asked, but {where} has only "
                          f"{len(rows)} rows")
    return random.Random(seed).sample(rows, k)


def _level_ranges(levels: Any) -> list[tuple[str, int, int]]:
    """`levels: {low: [[0, 39], [120, 129]], ...}` as (level, first, last), inclusive."""
    if not isinstance(levels, dict) or not levels:
        raise SourceError("concepts.levels: expected a mapping {level: [[first, last], "
                          f"...]}} with levels from {LEVELS} (got {levels!r})")
    out = []
    for lvl, ranges in levels.items():
        if lvl not in LEVELS:
            raise SourceError(f"concepts.levels.{lvl}: unknown level (known: "
                              f"{', '.join(LEVELS)})")
        if not isinstance(ranges, list) or not ranges:
            raise SourceError(f"concepts.levels.{lvl}: expected a list of [first, last] id "
                              f"ranges (got {ranges!r})")
        for j, r in enumerate(ranges):
            ok = (isinstance(r, list | tuple) and len(r) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                  and r[0] <= r[1])
            if not ok:
                raise SourceError(f"concepts.levels.{lvl}[{j}]: expected [first, last] "
                                  f"integer ids with first <= last (got {r!r})")
            out.append((str(lvl), int(r[0]), int(r[1])))
    return out


def _level_of(cid: str, ranges: list[tuple[str, int, int]], where: str, row: int) -> str:
    """The one level whose ranges hold this concept id; anything else names the id."""
    try:
        n = int(cid)
    except ValueError:
        raise SourceError(f"{where}: row {row}: concept_id {cid!r} is not an integer, but "
                          "concepts.levels gives levels by integer id ranges") from None
    hits = sorted({lvl for lvl, a, b in ranges if a <= n <= b})
    if not hits:
        desc = "; ".join(f"{lvl} {a}-{b}" for lvl, a, b in ranges)
        raise SourceError(f"{where}: row {row}: concept_id {n} is outside every range of "
                          f"concepts.levels ({desc})")
    if len(hits) > 1:
        raise SourceError(f"{where}: row {row}: concept_id {n} is in the ranges of several "
                          f"levels of concepts.levels: {', '.join(hits)}")
    return hits[0]


def load_concepts(spec: Any = BUILTIN, base_dir: str = ".") -> SourceList:
    """`builtin:tinyworld`, a file (JSON/JSONL/CSV/Parquet), an inline list, or a mapping
    (`path:` or `hub:` plus `file`, `revision`, `columns`, `levels`, `limit`, `expect`);
    columns concept_id, concept, [concept_level, partition]. `levels:` gives each
    concept's level from inclusive ranges of its integer id (the authors' concepts.json
    has no level column) and takes precedence over a `concept_level` column."""
    out = SourceList()
    if spec == BUILTIN or spec is None:
        out.extend(tiny_concepts())
        return out
    origin: dict[str, Any] = {}
    rows, where, limit = _rows(spec, "concepts", base_dir, origin)
    ranges = _level_ranges(spec["levels"]) if isinstance(spec, dict) and \
        spec.get("levels") is not None else None
    _check(rows, where, "concept_id", "concept")
    for i, r in enumerate(rows[:limit] if limit else rows):
        cid = str(r["concept_id"])
        if ranges is not None:
            level = _level_of(cid, ranges, where, i)
        else:
            level = str(r.get("concept_level") or "mid")
        if level not in LEVELS:
            raise SourceError(f"{where}: row {i}: concept_level {level!r} not in {LEVELS}")
        part = str(r.get("partition") or "id")
        if part not in ("id", "ood"):
            raise SourceError(f"{where}: row {i}: partition {part!r} not in ('id', 'ood')")
        out.append(Concept(cid, str(r["concept"]), level, part))
    out.origin = origin or None
    return out


def _expect(spec: Any) -> int | None:
    return int(spec["expect"]) if isinstance(spec, dict) and spec.get("expect") is not None \
        else None


def source_count(spec: Any, key: str, base_dir: str = ".") -> tuple[int, bool]:
    """How many rows a source has, and whether that was counted (True) or taken from its
    `expect:` because the source is not here (a file absent, a Hub file neither cached
    nor reachable: planning a cluster build on a laptop)."""
    loader = load_concepts if key == "concepts" else load_prompts
    try:
        return len(loader(spec, base_dir)), True
    except SourceUnavailable:
        if _expect(spec) is None:
            raise
        return _expect(spec), False


def load_prompts(spec: Any = BUILTIN, base_dir: str = ".") -> SourceList:
    """Like `load_concepts`; columns prompt_id, prompt, [source]; plus `sample: N` and
    `seed:` (the authors' `random.sample`). Each prompt keeps its row in the source file
    as `source_index`."""
    out = SourceList()
    if spec == BUILTIN or spec is None:
        out.extend(tiny_prompts())
        return out
    origin: dict[str, Any] = {}
    rows, where, limit = _rows(spec, "prompts", base_dir, origin)
    _check(rows, where, "prompt_id", "prompt")
    out.extend(Prompt(str(r["prompt_id"]), str(r["prompt"]), str(r.get("source") or where),
                      r.get(_INDEX))
               for r in (rows[:limit] if limit else rows))
    out.origin = origin or None
    return out
