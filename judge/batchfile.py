"""OpenAI Batch API files: the cheap path for large runs, and `vllm run-batch` input.

`write_requests` turns every row still to judge (`judge.label.rows_to_judge`) into one
`/v1/chat/completions` request line, deduplicated by the judgment cache key, which
doubles as `custom_id`: results map back to rows by content, so a row moved between
shards or repeated still gets its label.
Files are split at `max_per_file` lines (the Batch API caps a file at 50,000 requests).

`read_results` parses result files, puts each readable judgment into the cache and
returns the errors of the rest; `judge.shards` in cache-only mode then labels the rows.
A result that errored or cannot be parsed becomes a failed row with its error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from asteer_build.core import atomic
from judge.cache import JudgmentCache, cache_key
from judge.label import rows_to_judge
from judge.rubric import (
    DEFAULT_RUBRIC,
    JudgmentParseError,
    Rubric,
    parse_judgment,
    response_format,
)
from judge.secrets import redact
from judge.shards import list_shards

__all__ = ["write_requests", "read_results"]

MAX_PER_FILE = 50_000


def _request_line(
    key: str,
    prompt: str,
    concept: str,
    response: str,
    model: str,
    max_tokens: int | None,
    temperature: float | None,
    structured: bool,
    rubric: Rubric = DEFAULT_RUBRIC,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": rubric.messages(prompt, concept, response)}
    # None: not sent (gpt-5 models take neither; the reference's batch sent neither)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if structured:
        body["response_format"] = response_format()
    return {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_requests(
    in_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    model: str,
    cache: JudgmentCache | None = None,
    max_tokens: int | None = 200,
    temperature: float | None = 0.0,
    structured: bool = True,
    rerun_failed: bool = False,
    max_per_file: int = MAX_PER_FILE,
    out_dir: str | os.PathLike[str] | None = None,
    rubric: Rubric = DEFAULT_RUBRIC,
) -> list[Path]:
    """Write request files for rows still to judge; returns the files written.

    Row status is read from the labelled shard in `out_dir` where one exists (as
    `judge.shards` does), so failed rows are only requested again with `rerun_failed`.
    With more than `max_per_file` requests the files are `<stem>-00000<suffix>`, ...
    Rows already in `cache` are left out: they need no call.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    lines: list[str] = []
    for shard in list_shards(in_dir):
        done = Path(out_dir) / shard.name if out_dir is not None else shard
        t = pq.read_table(done if done.exists() else shard)
        prompts, concepts, responses = (
            t.column(c).to_pylist() for c in ("prompt", "concept", "response")
        )
        for i in rows_to_judge(t, rerun_failed=rerun_failed):
            p, c, r = prompts[i] or "", concepts[i] or "", responses[i] or ""
            key = cache_key(rubric.version, model, p, c, r)
            if key in seen or (cache is not None and key in cache):
                continue
            seen.add(key)
            lines.append(
                json.dumps(
                    _request_line(key, p, c, r, model, max_tokens, temperature, structured,
                                  rubric),
                    ensure_ascii=False,
                )
            )
    chunks = [lines[i : i + max_per_file] for i in range(0, len(lines), max_per_file)] or [[]]
    paths = (
        [out]
        if len(chunks) == 1
        else [out.with_name(f"{out.stem}-{i:05d}{out.suffix}") for i in range(len(chunks))]
    )
    for path, chunk in zip(paths, chunks, strict=True):
        atomic.write_text(path, "".join(line + "\n" for line in chunk))
    return paths


def read_results(
    paths: list[str | os.PathLike[str]],
    cache: JudgmentCache,
    *,
    model: str,
    rubric: Rubric = DEFAULT_RUBRIC,
) -> tuple[dict[str, str], dict[str, int]]:
    """Load result files into the cache (under `rubric`'s version, the one the requests
    were written with). Returns (failures by custom_id, counts)."""
    failures: dict[str, str] = {}
    counts = {"ok": 0, "failed": 0}
    for path in paths:
        for raw in Path(path).read_text(encoding="utf-8").splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                key = line["custom_id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # no custom_id: cannot be matched to a row; stays pending
            err = _line_error(line)
            if err is None:
                try:
                    text = line["response"]["body"]["choices"][0]["message"]["content"]
                    j = parse_judgment(text)
                except (KeyError, IndexError, TypeError) as e:
                    err = f"unreadable result body: {type(e).__name__}"
                except JudgmentParseError as e:
                    err = f"unparsable answer: {e}"
                else:
                    cache.put(key, j.label, j.explanation, model, rubric.version)
                    failures.pop(key, None)
                    counts["ok"] += 1
                    continue
            if key not in cache:
                failures[key] = redact(f"batch: {err}")
                counts["failed"] += 1
    return failures, counts


def _line_error(line: dict[str, Any]) -> str | None:
    if line.get("error"):
        return json.dumps(line["error"])[:300]
    resp = line.get("response") or {}
    code = resp.get("status_code")
    if code is not None and code != 200:
        return f"http_{code}: {json.dumps(resp.get('body'))[:300]}"
    if not resp:
        return "no response in result line"
    return None
