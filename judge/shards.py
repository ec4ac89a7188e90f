"""Label a directory of rollout shards: idempotent, resumable, and honest about failures.

The labelling itself is `judge.label.alabel_table` (table in, table out); this module
adds files: it reads each shard, labels its table and commits the result atomically.

Every input row comes out in the same order with the judge columns set:
`label` (int8, null unless ok), `judge_model`, `judge_status` (ok | failed | pending),
`judge_explanation`, `judge_error` (only for failed rows), `judge_rubric` (the rubric
version, for ok and failed rows). Nothing is dropped, nothing
duplicated, and a failure is never written as a label.

Resumption has two layers. Each successful judgment is appended to the content-hash
cache the moment it arrives, so a run killed mid-shard loses no paid calls; each output
shard is written to a temporary name and renamed, so a reader never sees half a shard.
A rerun skips finished output shards, serves judged rows from the cache, and, with
`rerun_failed`, retries only rows whose status is failed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from asteer_build.core import atomic
from judge.cache import JudgmentCache
from judge.judges import Judge
from judge.label import (
    JUDGE_COLUMNS,
    REQUIRED_COLUMNS,
    BatchJudge,
    LabelReport,
    alabel_table,
    rows_to_judge,
    table_to_parquet,
)

__all__ = ["JUDGE_COLUMNS", "REQUIRED_COLUMNS", "ShardReport", "judge_shard", "judge_shards",
           "list_shards"]

log = logging.getLogger(__name__)

#: a shard's report is the label report of its table, named after the shard
ShardReport = LabelReport


def list_shards(directory: str | os.PathLike[str]) -> list[Path]:
    return sorted(p for p in Path(directory).glob("*.parquet") if not p.name.startswith("."))


async def judge_shard(
    src: Path,
    dest: Path,
    judge: Judge | BatchJudge,
    cache: JudgmentCache,
    *,
    rerun_failed: bool = False,
    cache_only: bool = False,
    workers: int = 64,
    external_failures: dict[str, str] | None = None,
) -> ShardReport:
    """Judge one shard file into `dest` (resuming from `dest` where it exists) through
    `judge.label.alabel_table`; the arguments are its."""
    resuming = dest.exists()
    table = pq.read_table(dest if resuming else src)
    if resuming and not rows_to_judge(table, rerun_failed=rerun_failed):
        statuses = table.column("judge_status").to_pylist()
        return ShardReport(src.name, table.num_rows, ok=statuses.count("ok"),
                           failed=statuses.count("failed"), skipped=True)
    rep = ShardReport(src.name)
    table = await alabel_table(table, judge, cache=cache, rerun_failed=rerun_failed,
                               cache_only=cache_only, workers=workers,
                               external_failures=external_failures, report=rep)
    atomic.write_bytes(dest, table_to_parquet(table))
    return rep


async def judge_shards(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    judge: Judge | BatchJudge,
    cache: JudgmentCache,
    **options: Any,
) -> list[ShardReport]:
    """Judge every shard of `in_dir` into `out_dir` (default: rewrite in place);
    `options` are `judge_shard`'s keywords (rerun_failed, cache_only, workers,
    external_failures), passed to each shard unchanged."""
    out = Path(out_dir) if out_dir is not None else Path(in_dir)
    reports = []
    for src in list_shards(in_dir):
        rep = await judge_shard(src, out / src.name, judge, cache, **options)
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
