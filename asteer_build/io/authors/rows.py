"""Converting the authors' result items into rows of our `rollouts` config: ids as the
builder makes them, their judgments (from the file, else their cache) as labels, their
failure-as-0 as a failed judgment, and the per-pair counts the card and build.json
report."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ...pipeline.plan import item_id
from .facts import (
    FAILURE_PREFIXES,
    JUDGE_MODEL,
    JUDGE_RUBRIC,
    N_PROMPTS,
    PROMPT_SEED,
    TOKEN_KEYS,
)
from .locate import AuthorsImportError, Pair, concept_level
from .read import iter_result_files, load_judgments, parse_judgment, parse_rel


@dataclass
class PairStats:
    rows: int = 0
    files: int = 0
    skipped_files: int = 0
    skipped_alpha0: int = 0
    from_cache: int = 0
    cache_disagreements: int = 0
    cache_unmatched: int = 0
    failed: int = 0
    pending: int = 0
    with_tokens: int = 0
    counted_tokens: int = 0
    tokenizer: str | None = None
    avg_response_tokens: float | None = None


def _float(v: Any, where: str, fld: str) -> float:
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise AuthorsImportError(f"{where}: {fld}: expected a number (got {v!r})") from None
    return out


def pair_rows(pair: Pair, concepts: dict[int, str], prompts: dict[int, dict[str, Any]],
              draw: list[dict[str, Any]] | None, stats: PairStats,
              tokenizer: Any | None = None) -> Iterator[list[dict[str, Any]]]:
    """Rows of the `rollouts` config, one list per result file (their 50 prompts).
    With a `tokenizer`, a row without a token count in the file gets the length of its
    response in that tokenizer's tokens, counted as their `include_token_stats` counts
    (`encode(response, add_special_tokens=False)`)."""
    cache: dict[tuple[int, float, int], int] = {}
    for layer, path in sorted(pair.judgments.items()):
        cache.update(load_judgments(path, pair, layer))
        blob_avg = json.loads(path.read_bytes()).get("avg_response_tokens")
        if isinstance(blob_avg, (int, float)):
            stats.avg_response_tokens = float(blob_avg)
    used: set[tuple[int, float, int]] = set()
    for where, rel, data in iter_result_files(pair):
        parsed = parse_rel(rel, where)
        if parsed is None:
            stats.skipped_files += 1
            continue
        cid, layer, alpha = parsed
        if alpha == 0.0:
            stats.skipped_alpha0 += 1
            continue
        if not isinstance(data, dict):
            raise AuthorsImportError(f"{where}: expected a JSON object with `results`")
        results = data.get("results")
        if not isinstance(results, list):
            raise AuthorsImportError(f"{where}: results: missing or not a list")
        meta = data.get("metadata") or {}
        if not isinstance(meta, dict):
            raise AuthorsImportError(f"{where}: metadata: expected an object")
        for fld, want in (("layer", layer), ("alpha", alpha), ("concept_id", cid)):
            if fld in meta and not math.isclose(_float(meta[fld], where, f"metadata.{fld}"),
                                                want, rel_tol=1e-9, abs_tol=1e-9):
                raise AuthorsImportError(f"{where}: metadata.{fld}: {meta[fld]!r} does not "
                                         f"match the path's {want!r}")
        if cid not in concepts:
            raise AuthorsImportError(f"{where}: concept_id {cid} is not in concepts.json")
        norm = meta.get("steering_vector_norm")
        norm = None if norm is None else _float(norm, where, "metadata.steering_vector_norm")
        level = concept_level(cid, where)
        stats.files += 1
        rows = []
        for i, item in enumerate(results):
            rows.append(_row(pair, item, i, where, cid, layer, alpha, level, norm, concepts,
                             prompts, draw, cache, used, stats))
        rows.sort(key=lambda r: int(r["prompt_id"]))
        if tokenizer is not None:
            _count_tokens(rows, tokenizer, stats)
        stats.rows += len(rows)
        yield rows
    stats.cache_unmatched = len(set(cache) - used)


def _count_tokens(rows: list[dict[str, Any]], tokenizer: Any, stats: PairStats) -> None:
    todo = [r for r in rows if r["response_tokens"] is None and r["response"] is not None]
    if not todo:
        return
    enc = tokenizer([r["response"] for r in todo], add_special_tokens=False)["input_ids"]
    for r, ids in zip(todo, enc, strict=True):
        r["response_tokens"] = len(ids)
    stats.counted_tokens += len(todo)


def _row(pair: Pair, item: Any, i: int, where: str, cid: int, layer: int, alpha: float,
         level: str, norm: float | None, concepts: dict[int, str],
         prompts: dict[int, dict[str, Any]], draw: list[dict[str, Any]] | None,
         cache: dict[tuple[int, float, int], int], used: set[tuple[int, float, int]],
         stats: PairStats) -> dict[str, Any]:
    f = f"results[{i}]"
    if not isinstance(item, dict):
        raise AuthorsImportError(f"{where}: {f}: expected an object")
    sid = item.get("sample_id")
    if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
        raise AuthorsImportError(f"{where}: {f}.sample_id: missing or not a whole number "
                                 f"(got {sid!r})")
    if "response_after" not in item and "error" not in item:
        raise AuthorsImportError(f"{where}: {f}.response_after: missing")
    instruction = item.get("instruction", item.get("prompt"))
    if not isinstance(instruction, str):
        raise AuthorsImportError(f"{where}: {f}.instruction: missing or not text")
    if draw is not None:
        if sid >= len(draw):
            raise AuthorsImportError(f"{where}: {f}.sample_id: {sid} is beyond the authors' "
                                     f"{len(draw)}-prompt draw")
        if draw[sid]["instruction"] != instruction:
            raise AuthorsImportError(
                f"{where}: {f}.instruction: differs from prompt {sid} of the authors' draw "
                f"(random.seed({PROMPT_SEED}); random.sample(alpaca_eval, {N_PROMPTS}))")
    prev = prompts.setdefault(sid, {"prompt": instruction, "dataset": item.get("dataset")})
    if prev["prompt"] != instruction:
        raise AuthorsImportError(f"{where}: {f}.instruction: sample_id {sid} has another "
                                 "text in an earlier file")
    response = item.get("response_after")
    if response is not None and not isinstance(response, str):
        raise AuthorsImportError(f"{where}: {f}.response_after: expected text or null")
    tokens = None
    for k in TOKEN_KEYS:
        if item.get(k) is not None:
            tokens = int(_float(item[k], where, f"{f}.{k}"))
            stats.with_tokens += 1
            break
    key = (cid, round(alpha, 2), sid)
    j = item.get("judgment")
    if j is not None:
        j = parse_judgment(j, where, f"{f}.judgment")
        if key in cache and cache[key] != j:
            stats.cache_disagreements += 1
    elif key in cache:
        j = cache[key]
        stats.from_cache += 1
    if key in cache:
        used.add(key)
    explanation = item.get("explanation")
    if explanation is not None and not isinstance(explanation, str):
        explanation = json.dumps(explanation)
    status, label, error = "pending", None, None
    if j is not None:
        if explanation and explanation.startswith(FAILURE_PREFIXES):
            status, error = "failed", explanation
            stats.failed += 1
        else:
            status, label = "ok", j
    else:
        stats.pending += 1
    pid = str(sid)
    return {
        "id": item_id(pair.model, pair.method, str(cid), pid, layer, alpha, 0),
        "model": pair.model,
        "method": pair.method,
        "concept_id": str(cid),
        "concept": concepts[cid],
        "concept_level": level,
        "prompt_id": pid,
        "prompt": instruction,
        "layer": layer,
        "alpha": alpha,
        "vector_norm": norm,
        "alpha_raw": alpha,  # their strengths are raw multiples of v
        "seed": None,
        "response": response,
        "response_tokens": tokens,
        "finish_reason": None,
        "label": label,
        "judge_model": JUDGE_MODEL if j is not None else None,
        "judge_status": status,
        "judge_explanation": None if status == "failed" else explanation,
        "judge_error": error,
        "judge_rubric": JUDGE_RUBRIC if j is not None else None,
        "authors_label": j,
    }
