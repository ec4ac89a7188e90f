"""Label a directory of rollout shards: idempotent, resumable, and honest about failures.

Every input row comes out in the same order with the judge columns set:
`label` (int8, null unless ok), `judge_model`, `judge_status` (ok | failed | pending),
`judge_explanation`, `judge_error` (only for failed rows). Nothing is dropped, nothing
duplicated, and a failure is never written as a label.

Resumption has two layers. Each successful judgment is appended to the content-hash
cache the moment it arrives, so a run killed mid-shard loses no paid calls; each output
shard is written to a temporary name and renamed, so a reader never sees half a shard.
A rerun skips finished output shards, serves judged rows from the cache, and, with
`rerun_failed`, retries only rows whose status is failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from asteer_build import atomic, contract

from .cache import JudgmentCache, cache_key
from .judges import Judge, Outcome

__all__ = ["JUDGE_COLUMNS", "REQUIRED_COLUMNS", "ShardReport", "judge_shards", "list_shards"]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "prompt", "concept", "response")
#: the columns the judge sets, in order: the dataset contract's (asteer_build.contract)
JUDGE_COLUMNS: dict[str, pa.DataType] = contract.JUDGE_COLUMNS


@dataclass
class ShardReport:
    name: str
    rows: int
    calls: int = 0  # judge calls made in this run (after in-shard deduplication)
    cached: int = 0  # rows served by the cache in this run
    ok: int = 0
    failed: int = 0
    pending: int = 0
    skipped: bool = False


def list_shards(directory: str | os.PathLike[str]) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith("."))


def _column(table: pa.Table, name: str, n: int) -> list:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * n


async def _run_calls(
    judge: Judge,
    items: dict[str, tuple[str, str, str]],
    workers: int,
    on_done: Callable[[str, Outcome], None],
) -> None:
    """Bounded workers over a queue, so a million-row shard is not a million tasks."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in items:
        queue.put_nowait(key)

    async def worker() -> None:
        while True:
            try:
                key = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                outcome = await judge.judge(*items[key])
            except Exception as e:  # a judge bug must cost a row's label, not the run
                outcome = Outcome("failed", error=f"{type(e).__name__}: {e}")
            on_done(key, outcome)

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(items))))))


async def judge_shard(
    src: Path,
    dest: Path,
    judge: Judge,
    cache: JudgmentCache,
    *,
    rerun_failed: bool = False,
    cache_only: bool = False,
    workers: int = 64,
    external_failures: dict[str, str] | None = None,
) -> ShardReport:
    """Judge one shard. `cache_only` (batch-read) labels from the cache and leaves misses
    pending; `external_failures` maps cache keys to errors reported by a batch file."""
    resuming = dest.exists()
    table = pq.read_table(dest if resuming else src)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{src.name}: missing columns {missing}")
    n = table.num_rows
    report = ShardReport(src.name, n)
    prompts = table.column("prompt").to_pylist()
    concepts = table.column("concept").to_pylist()
    responses = table.column("response").to_pylist()
    cols = {c: _column(table, c, n) for c in JUDGE_COLUMNS}
    status = [s or "pending" for s in cols["judge_status"]]

    todo = [i for i, s in enumerate(status) if s == "pending" or (s == "failed" and rerun_failed)]
    if resuming and not todo:
        report.skipped = True
        report.ok = status.count("ok")
        report.failed = status.count("failed")
        return report

    keys: dict[int, str] = {}
    calls: dict[str, tuple[str, str, str]] = {}
    for i in todo:
        p, c, r = prompts[i] or "", concepts[i] or "", responses[i] or ""
        k = cache_key(judge.rubric_version, judge.judge_model, p, c, r)
        keys[i] = k
        if k not in cache and not cache_only:
            calls.setdefault(k, (p, c, r))
    outcomes: dict[str, Outcome] = {}

    def on_done(key: str, o: Outcome) -> None:
        if o.status == "ok" and o.label is not None:
            cache.put(key, o.label, o.explanation or "", judge.judge_model, judge.rubric_version)
        outcomes[key] = o

    report.calls = len(calls)
    if calls:
        await _run_calls(judge, calls, workers, on_done)

    for i, k in keys.items():
        hit = cache.get(k)
        o = outcomes.get(k)
        if hit is not None:
            if o is None:
                report.cached += 1
            cols["label"][i], cols["judge_explanation"][i] = hit.label, hit.explanation
            cols["judge_model"][i], cols["judge_error"][i] = hit.judge_model, None
            status[i] = "ok"
        elif o is not None or (external_failures and k in external_failures):
            err = o.error if o is not None else external_failures[k]  # type: ignore[index]
            cols["label"][i], cols["judge_explanation"][i] = None, None
            cols["judge_model"][i], cols["judge_error"][i] = judge.judge_model, err
            status[i] = "failed"
        # else: cache_only miss stays pending
    cols["judge_status"] = status

    for name, typ in JUDGE_COLUMNS.items():
        arr = pa.array(cols[name], type=typ)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(dest) as tmp:
        pq.write_table(table, tmp)
    report.ok, report.failed = status.count("ok"), status.count("failed")
    report.pending = status.count("pending")
    return report


async def judge_shards(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    judge: Judge,
    cache: JudgmentCache,
    *,
    rerun_failed: bool = False,
    cache_only: bool = False,
    workers: int = 64,
    external_failures: dict[str, str] | None = None,
) -> list[ShardReport]:
    """Judge every shard of `in_dir` into `out_dir` (default: rewrite in place)."""
    out = Path(out_dir) if out_dir is not None else Path(in_dir)
    reports = []
    for src in list_shards(in_dir):
        rep = await judge_shard(
            src,
            out / src.name,
            judge,
            cache,
            rerun_failed=rerun_failed,
            cache_only=cache_only,
            workers=workers,
            external_failures=external_failures,
        )
        log.info(
            "%s: %d rows, %d calls, %d cached, ok=%d failed=%d pending=%d%s",
            rep.name,
            rep.rows,
            rep.calls,
            rep.cached,
            rep.ok,
            rep.failed,
            rep.pending,
            " (already done)" if rep.skipped else "",
        )
        reports.append(rep)
    return reports
