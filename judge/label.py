"""Label a table of rollouts: table in, table out. The one place rows get their judgment.

`alabel_table` (async, for callers that already run an event loop, such as an endpoint
pool) and `label_table` (sync) take a rollouts table and return it with the dataset
contract's judge columns (`asteer_build.core.contract.JUDGE_COLUMNS`) set, rows in the same
order, nothing dropped, nothing duplicated. A failure is never written as a label: a row
whose judgment failed keeps `label` null, `judge_status` ``failed`` and its
`judge_error`. Where the table comes from and where it goes (a shard directory, a run
folder's store, memory) is the caller's business: `judge.shards` and the builder's judge
stage both sit on top of this.

Rows to judge are the `pending` ones (or without a status), plus the `failed` ones with
`rerun_failed`. Each is keyed by its content hash (`judge.cache.cache_key`); identical
rows share one judgment, and a key already in the cache costs no call. Every successful
judgment goes into the cache the moment it arrives (`on_done`), so an interrupted run
loses no paid work: rerunning the same table serves those rows from the cache.

Two kinds of judge fit behind it:

- `Judge` (per row): ``async judge(prompt, concept, response) -> Outcome``. The rules
  judge and the LLM judge over an `EndpointPool` are these; `alabel_table` runs them on
  `workers` bounded workers.
- `BatchJudge` (many rows at once): ``async judge_many(requests, on_done)``. It gets all
  the calls the table needs as `Request`s (their `key` is the cache key) and reports
  each `Outcome` through ``on_done(key, outcome)`` as it learns it, in any order. This is
  where a long-running batch judge sits: submit the requests (for instance as an OpenAI
  Batch API file, see `judge.batchfile`), poll for hours, collect, calling `on_done` per
  result. It should persist its submission handle under a name derived from the request
  keys, so a killed run that asks again re-attaches to the batch instead of paying for
  it twice; results already collected are in the cache and are not asked again at all.
  A request it never reports stays ``pending`` (a later run asks again); one it reports
  as failed is a failed row.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.parquet as pq

from asteer_build.core import contract
from judge.cache import JudgmentCache, cache_key
from judge.judges import Judge, Outcome

__all__ = [
    "REQUIRED_COLUMNS", "JUDGE_COLUMNS", "Request", "BatchJudge", "LabelReport",
    "rows_to_judge", "alabel_table", "label_table", "table_to_parquet", "table_from_parquet",
]

REQUIRED_COLUMNS = ("id", "prompt", "concept", "response")
#: the columns the judge sets, in order: the dataset contract's (asteer_build.core.contract)
JUDGE_COLUMNS: dict[str, pa.DataType] = contract.JUDGE_COLUMNS

OnDone = Callable[[str, Outcome], None]


@dataclass(frozen=True)
class Request:
    """One judgment to make; `key` is its content hash and the cache key."""

    key: str
    prompt: str
    concept: str
    response: str


@runtime_checkable
class BatchJudge(Protocol):
    """A judge that takes all of a table's calls at once (see the module docstring)."""

    judge_model: str
    rubric_version: str

    async def judge_many(self, requests: Sequence[Request], on_done: OnDone) -> None: ...


@dataclass
class LabelReport:
    """What labelling one table (a shard, where `name` says which) did: judge `calls`
    made in this run (after deduplication), rows served by the `cached` judgments, the
    statuses the table ends with, and `skipped` when a finished shard needed nothing."""

    name: str = ""
    rows: int = 0
    calls: int = 0
    cached: int = 0
    ok: int = 0
    failed: int = 0
    pending: int = 0
    skipped: bool = False


def _column(table: pa.Table, name: str, n: int) -> list:
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [None] * n


def _statuses(table: pa.Table) -> list[str]:
    return [s or "pending" for s in _column(table, "judge_status", table.num_rows)]


def rows_to_judge(table: pa.Table, *, rerun_failed: bool = False) -> list[int]:
    """Indices of the rows a label run would judge: pending, and failed if asked."""
    return [
        i
        for i, s in enumerate(_statuses(table))
        if s == "pending" or (s == "failed" and rerun_failed)
    ]


async def _run_per_row(judge: Judge, requests: Sequence[Request], workers: int,
                       on_done: OnDone) -> None:
    """Bounded workers over a queue, so a million-row table is not a million tasks."""
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for req in requests:
        queue.put_nowait(req)

    async def worker() -> None:
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                outcome = await judge.judge(req.prompt, req.concept, req.response)
            except Exception as e:  # a judge bug must cost a row's label, not the run
                outcome = Outcome("failed", error=f"{type(e).__name__}: {e}")
            on_done(req.key, outcome)

    await asyncio.gather(*(worker() for _ in range(max(1, min(workers, len(requests))))))


async def alabel_table(
    table: pa.Table,
    judge: Judge | BatchJudge,
    *,
    cache: JudgmentCache | None = None,
    rerun_failed: bool = False,
    cache_only: bool = False,
    workers: int = 64,
    external_failures: Mapping[str, str] | None = None,
    report: LabelReport | None = None,
) -> pa.Table:
    """`table` with the judge columns set (appended in contract order where missing).

    `cache` (optional) serves known judgments and stores new ones as they arrive.
    `cache_only` (batch-read) labels from the cache alone and leaves misses pending;
    `external_failures` maps cache keys to errors reported elsewhere (a batch result
    file) for rows the cache cannot label. `workers` bounds the concurrent calls of a
    per-row judge. `report`, if given, is filled in (its `name` names the table in
    errors).
    """
    rep = report if report is not None else LabelReport()
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{rep.name or 'table'}: missing columns {missing}")
    n = rep.rows = table.num_rows
    prompts = table.column("prompt").to_pylist()
    concepts = table.column("concept").to_pylist()
    responses = table.column("response").to_pylist()
    cols = {c: _column(table, c, n) for c in JUDGE_COLUMNS}
    status = _statuses(table)
    todo = rows_to_judge(table, rerun_failed=rerun_failed)

    keys: dict[int, str] = {}
    calls: dict[str, Request] = {}
    for i in todo:
        p, c, r = prompts[i] or "", concepts[i] or "", responses[i] or ""
        k = cache_key(judge.rubric_version, judge.judge_model, p, c, r)
        keys[i] = k
        if (cache is None or k not in cache) and not cache_only:
            calls.setdefault(k, Request(k, p, c, r))
    outcomes: dict[str, Outcome] = {}

    def on_done(key: str, o: Outcome) -> None:
        if o.status == "ok" and o.label is not None and cache is not None:
            cache.put(key, o.label, o.explanation or "", judge.judge_model, judge.rubric_version)
        outcomes[key] = o

    rep.calls = len(calls)
    if calls:
        if isinstance(judge, BatchJudge):
            await judge.judge_many(list(calls.values()), on_done)
        else:
            await _run_per_row(judge, list(calls.values()), workers, on_done)

    for i, k in keys.items():
        o = outcomes.get(k)
        hit = cache.get(k) if cache is not None else None
        if hit is None and o is not None and o.status == "ok" and o.label is not None:
            label, explanation, model = o.label, o.explanation or "", judge.judge_model
        elif hit is not None:
            if o is None:
                rep.cached += 1
            label, explanation, model = hit.label, hit.explanation, hit.judge_model
        elif o is not None or (external_failures and k in external_failures):
            err = o.error if o is not None else external_failures[k]  # type: ignore[index]
            cols["label"][i], cols["judge_explanation"][i] = None, None
            cols["judge_model"][i], cols["judge_error"][i] = judge.judge_model, err
            cols["judge_rubric"][i] = judge.rubric_version
            status[i] = "failed"
            continue
        else:  # a cache-only miss, or a request a batch judge never answered
            continue
        cols["label"][i], cols["judge_explanation"][i] = label, explanation
        cols["judge_model"][i], cols["judge_error"][i] = model, None
        # a cache hit has this rubric's version: it is part of the cache key
        cols["judge_rubric"][i] = judge.rubric_version
        status[i] = "ok"
    cols["judge_status"] = status

    for name, typ in JUDGE_COLUMNS.items():
        arr = pa.array(cols[name], type=typ)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    rep.ok, rep.failed = status.count("ok"), status.count("failed")
    rep.pending = status.count("pending")
    return table


def label_table(table: pa.Table, judge: Judge | BatchJudge, **kw) -> pa.Table:
    """`alabel_table` for callers without an event loop (it runs one)."""
    return asyncio.run(alabel_table(table, judge, **kw))


def table_to_parquet(table: pa.Table) -> bytes:
    """A labelled shard's bytes: the one set of Parquet writer options for them."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def table_from_parquet(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))
