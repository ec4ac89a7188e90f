"""The Batch API judge stage: submit, track, collect and resubmit, resumable after a kill.

The live judge's retry is in `judge.pool`; this module is the batch judge's retry (the
resubmission of lines that expired, were cancelled, failed or came back as error lines).

All state lives in one folder (`state_dir`, inside the run folder): `batches.json`
(written atomically after every step that matters), the request files it names
(`requests/<name>.jsonl`) and the downloaded results (`results/`). A record moves
through

    intent -> uploading -> uploaded -> creating -> submitted -> collected

and each move is persisted *before* the network call it announces. A process killed at
any instant therefore resumes without paying twice: a record found in `uploading` is
looked up among the server's files by the file name we gave it, one found in
`creating` among the server's batches by the metadata we attached (`asteer_tag`, a
random id of this state folder, and `asteer_name`), and only uploaded or created when
the server has none. Results go into the judgment cache as they are collected, so a
collected line is never asked again.

Lines of a batch that ended `expired`, `cancelled` or `failed`, and error lines (an
`error` object or a non-200 status), go out again in a new batch (`<name>-r<n>`), at
most `max_resubmits` times; after that they stay failed with their last error. An answer
that came back but cannot be parsed is failed at once (at the same settings the same
prompt gives the same answer, so sending it again only pays twice). Nothing is guessed:
a line without a valid answer is a failed row with its error.

Batches go out in waves: a batch is submitted only while the estimated input tokens of
the batches in flight stay under `enqueued_token_budget` (one batch always may). A cost
cap refuses to submit beyond `cost_cap_usd` (estimated, at batch prices) unless the
caller says yes. Control calls (upload, create, retrieve, download) use the `openai`
client's own retries; polling backs off from `poll_initial_s` to `poll_max_s`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from asteer_build.core import atomic
from judge.batchfile import _line_error, _request_line
from judge.cache import JudgmentCache, cache_key
from judge.config import BatchSettings, JudgeConfig, Prices
from judge.estimate import count_messages
from judge.judges import Outcome
from judge.label import Request, rows_to_judge
from judge.rubric import DEFAULT_RUBRIC, JudgmentParseError, Rubric, parse_judgment
from judge.secrets import api_key_from_env, redact

__all__ = ["BatchStage", "CostCapExceeded", "FailuresJudge", "split_lines",
           "requests_for_table", "make_client", "state_dir_for", "TERMINAL"]

log = logging.getLogger(__name__)

STATE_FILE = "batches.json"
TERMINAL = ("completed", "expired", "cancelled", "failed")
#: batch statuses whose missing lines are worth sending again
_RESUBMIT_STATUSES = ("expired", "cancelled", "failed", "completed")


class CostCapExceeded(RuntimeError):
    """Submitting would pass the configured cost cap; nothing was submitted."""


def state_dir_for(root: str | Path, model: str, rubric_version: str) -> Path:
    """One state folder per (judge model, rubric) under `root`: changing the judge starts
    new batches instead of mixing answers of two judges in one state."""
    return Path(root) / re.sub(r"[^A-Za-z0-9._-]", "_", f"{model}-{rubric_version}")


def split_lines(lines: Sequence[str], max_requests: int, max_bytes: int) -> list[list[str]]:
    """Consecutive chunks with at most `max_requests` lines and `max_bytes` bytes each
    (a line counts its newline). A single line over `max_bytes` cannot be sent."""
    chunks: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for line in lines:
        n = len(line.encode("utf-8")) + 1
        if n > max_bytes:
            cid = json.loads(line).get("custom_id")
            raise ValueError(f"request {cid}: {n} bytes, over judge.batch.max_bytes_per_file "
                             f"({max_bytes})")
        if cur and (len(cur) >= max_requests or size + n > max_bytes):
            chunks.append(cur)
            cur, size = [], 0
        cur.append(line)
        size += n
    if cur:
        chunks.append(cur)
    return chunks


def requests_for_table(table: pa.Table, model: str, rubric_version: str, *,
                       rerun_failed: bool = False) -> list[Request]:
    """The calls a label run of `table` would make (pending rows, failed ones if asked)."""
    cols = [table.column(c).to_pylist() for c in ("prompt", "concept", "response")]
    out = []
    for i in rows_to_judge(table, rerun_failed=rerun_failed):
        p, c, r = (col[i] or "" for col in cols)
        out.append(Request(cache_key(rubric_version, model, p, c, r), p, c, r))
    return out


def make_client(cfg: JudgeConfig) -> Any:
    """A synchronous `openai` client for the config's first endpoint."""
    import openai

    if not cfg.endpoints:
        raise ValueError("judge.endpoints: the openai-batch judge needs one endpoint")
    ep = cfg.endpoints[0]
    key = api_key_from_env(ep.api_key_env) or "EMPTY"
    return openai.OpenAI(base_url=ep.base_url, api_key=key, max_retries=5,
                         timeout=cfg.retry.timeout_s)


class FailuresJudge:
    """The batch stage's verdict as a `judge.label.BatchJudge`: labelling after the
    stage finds answers in the cache; this reports the final failures and leaves any
    other row pending (never labelled by guess)."""

    def __init__(self, model: str, rubric_version: str, failures: dict[str, str]) -> None:
        self.judge_model, self.rubric_version, self.failures = model, rubric_version, failures

    async def judge_many(self, requests: Sequence[Request],
                         on_done: Callable[[str, Outcome], None]) -> None:
        for r in requests:
            if r.key in self.failures:
                on_done(r.key, Outcome("failed", error=self.failures[r.key]))


@dataclass
class _Answer:
    ok: bool
    error: str | None
    resubmit: bool


class BatchStage:
    def __init__(self, client: Any, state_dir: str | Path, cache: JudgmentCache, *,
                 model: str, settings: BatchSettings | None = None,
                 prices: Prices | None = None, rubric: Rubric = DEFAULT_RUBRIC,
                 max_tokens: int | None = None, temperature: float | None = None,
                 structured: bool = True, sleep: Callable[[float], None] = time.sleep,
                 on_save: Callable[[], None] | None = None) -> None:
        """`on_save`: called after each state write, before the step it records is
        acted on (a build mirrors the state folder into a remote run folder there, so a
        driver on another machine resumes exactly where this one stopped)."""
        self.client, self.cache, self.model, self.rubric = client, cache, model, rubric
        self.on_save = on_save
        self.settings = settings or BatchSettings()
        self.prices = prices
        self.body_opts = (max_tokens, temperature, structured)
        self.sleep = sleep
        self.dir = Path(state_dir)
        (self.dir / "requests").mkdir(parents=True, exist_ok=True)
        (self.dir / "results").mkdir(parents=True, exist_ok=True)
        path = self.dir / STATE_FILE
        if path.exists():
            self.state = json.loads(path.read_text(encoding="utf-8"))
            if (self.state["model"], self.state["rubric"]) != (model, rubric.version):
                raise ValueError(f"{path}: batches of judge {self.state['model']} / rubric "
                                 f"{self.state['rubric']}, not {model} / {rubric.version}; "
                                 f"use another state folder")
        else:
            self.state = {"tag": uuid.uuid4().hex[:16], "model": model,
                          "rubric": rubric.version, "next": 0, "committed_cost_usd": 0.0,
                          "batches": [], "failures": {}}
            self._save()

    @classmethod
    def from_config(cls, cfg: JudgeConfig, state_dir: str | Path, cache: JudgmentCache,
                    rubric: Rubric, client: Any = None, **kw: Any) -> BatchStage:
        return cls(client if client is not None else make_client(cfg), state_dir, cache,
                   model=cfg.model, settings=cfg.batch, prices=cfg.prices, rubric=rubric,
                   max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                   structured=cfg.structured, **kw)

    # -- state ------------------------------------------------------------------------

    def _save(self) -> None:
        atomic.write_text(self.dir / STATE_FILE, json.dumps(self.state, indent=1))
        if self.on_save is not None:
            self.on_save()

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.state["batches"]

    @property
    def failures(self) -> dict[str, str]:
        return self.state["failures"]

    def _req_path(self, name: str) -> Path:
        return self.dir / "requests" / f"{name}.jsonl"

    def _lines(self, rec: dict[str, Any]) -> list[str]:
        return self._req_path(rec["name"]).read_text(encoding="utf-8").splitlines()

    def _covered(self) -> set[str]:
        keys: set[str] = set()
        for rec in self.records:
            keys.update(json.loads(x)["custom_id"] for x in self._lines(rec))
        return keys

    def _cost(self, tokens: int, n: int) -> float:
        p = self.prices
        if p is None:
            return 0.0
        return p.batch_discount * (tokens * p.input_per_mtok
                                   + n * p.output_tokens_per_call * p.output_per_mtok) / 1e6

    def _new_record(self, name: str, lines: list[str], attempt: int) -> dict[str, Any]:
        atomic.write_text(self._req_path(name), "".join(x + "\n" for x in lines))
        tokens = sum(count_messages(json.loads(x)["body"]["messages"], self.model)
                     for x in lines)
        rec = {"name": name, "attempt": attempt, "state": "intent", "requests": len(lines),
               "tokens": tokens, "cost_usd": round(self._cost(tokens, len(lines)), 6),
               "file_id": None, "batch_id": None, "status": None, "output_file_id": None,
               "error_file_id": None, "cancel_requested": False}
        self.records.append(rec)
        return rec

    # -- adding work ------------------------------------------------------------------

    def add(self, requests: Iterable[Request], *, rerun_failed: bool = False) -> int:
        """Queue the requests not yet answered nor queued; returns how many were queued.
        Failed keys are queued again only with `rerun_failed`."""
        covered = self._covered()
        if rerun_failed:
            for k in list(self.failures):
                covered.discard(k)
        new: dict[str, str] = {}
        max_tokens, temperature, structured = self.body_opts
        for r in requests:
            if r.key in covered or r.key in new or r.key in self.cache:
                continue
            if r.key in self.failures and not rerun_failed:
                continue
            self.failures.pop(r.key, None)
            new[r.key] = json.dumps(_request_line(r.key, r.prompt, r.concept, r.response,
                                                  self.model, max_tokens, temperature,
                                                  structured, self.rubric),
                                    ensure_ascii=False)
        s = self.settings
        for chunk in split_lines(list(new.values()), s.max_requests_per_file,
                                 s.max_bytes_per_file):
            self._new_record(f"b{self.state['next']:05d}", chunk, 0)
            self.state["next"] += 1
        self._save()
        return len(new)

    # -- submitting -------------------------------------------------------------------

    def _active(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["state"] == "submitted"
                and r["status"] not in TERMINAL]

    def _unsent(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["state"] in ("intent", "uploading", "uploaded",
                                                          "creating")]

    def submit(self, *, yes: bool = False) -> list[str]:
        """Submit queued batches while the wave budget allows; returns the names sent.
        Raises `CostCapExceeded` (before any call) when the next batch would pass the
        cost cap and `yes` is false."""
        sent: list[str] = []
        budget = self.settings.enqueued_token_budget
        cap = self.settings.cost_cap_usd
        for rec in self._unsent():
            if rec["cancel_requested"]:
                continue
            in_flight = sum(r["tokens"] for r in self._active())
            if budget is not None and in_flight and in_flight + rec["tokens"] > budget:
                break
            if (rec["state"] == "intent" and cap is not None and not yes
                    and self.state["committed_cost_usd"] + rec["cost_usd"] > cap):
                raise CostCapExceeded(
                    f"judge.batch.cost_cap_usd: submitting {rec['name']} "
                    f"({rec['requests']} requests, ~${rec['cost_usd']:.2f}) would bring the "
                    f"estimated spend to ${self.state['committed_cost_usd'] + rec['cost_usd']:.2f},"
                    f" over the cap of ${cap:.2f}; pass --yes or raise the cap")
            self._upload(rec)
            self._create(rec)
            sent.append(rec["name"])
        return sent

    def _filename(self, rec: dict[str, Any]) -> str:
        return f"asteer-{self.state['tag']}-{rec['name']}.jsonl"

    def _upload(self, rec: dict[str, Any]) -> None:
        if rec["state"] == "uploading":  # killed during the upload: did it arrive?
            for f in self.client.files.list(purpose="batch"):
                if f.filename == self._filename(rec):
                    rec["file_id"], rec["state"] = f.id, "uploaded"
                    log.info("batch %s: found its uploaded file %s", rec["name"], f.id)
                    break
        if rec["state"] in ("intent", "uploading"):
            if rec["state"] == "intent":
                self.state["committed_cost_usd"] += rec["cost_usd"]
            rec["state"] = "uploading"
            self._save()
            data = self._req_path(rec["name"]).read_bytes()
            f = self.client.files.create(file=(self._filename(rec), data), purpose="batch")
            rec["file_id"], rec["state"] = f.id, "uploaded"
            self._save()

    def _create(self, rec: dict[str, Any]) -> None:
        if rec["state"] == "creating":  # killed during the create: does the batch exist?
            for b in self.client.batches.list():
                md = b.metadata or {}
                if md.get("asteer_tag") == self.state["tag"] and md.get("asteer_name") == \
                        rec["name"]:
                    rec["batch_id"], rec["status"], rec["state"] = b.id, b.status, "submitted"
                    log.info("batch %s: found it on the server as %s", rec["name"], b.id)
                    break
        if rec["state"] in ("uploaded", "creating"):
            rec["state"] = "creating"
            self._save()
            b = self.client.batches.create(
                input_file_id=rec["file_id"], endpoint="/v1/chat/completions",
                completion_window=self.settings.completion_window,
                metadata={"asteer_tag": self.state["tag"], "asteer_name": rec["name"]})
            rec["batch_id"], rec["status"], rec["state"] = b.id, b.status, "submitted"
            log.info("batch %s submitted as %s (%d requests, ~%d input tokens)",
                     rec["name"], b.id, rec["requests"], rec["tokens"])
        self._save()

    # -- polling and collecting -------------------------------------------------------

    def poll(self) -> bool:
        """Refresh every batch in flight; True if any status changed."""
        changed = False
        for rec in self._active():
            b = self.client.batches.retrieve(rec["batch_id"])
            if b.status != rec["status"]:
                log.info("batch %s (%s): %s", rec["name"], rec["batch_id"], b.status)
                changed = True
            rec["status"] = b.status
            rec["output_file_id"], rec["error_file_id"] = b.output_file_id, b.error_file_id
            errs = getattr(getattr(b, "errors", None), "data", None) or []
            if errs:  # why a batch failed as a whole (e.g. its file was refused)
                rec["error"] = redact("; ".join(f"{e.code}: {e.message}" for e in errs))[:300]
            rc = getattr(b, "request_counts", None)
            if rc is not None:
                rec["counts"] = {"total": rc.total, "completed": rc.completed,
                                 "failed": rc.failed}
        if changed:
            self._save()
        return changed

    def _download(self, file_id: str | None, dest: Path) -> list[str]:
        if not file_id:
            return []
        if not dest.exists():
            atomic.write_bytes(dest, self.client.files.content(file_id).read())
        return dest.read_text(encoding="utf-8").splitlines()

    def _read(self, raw: str) -> tuple[str | None, _Answer | None]:
        try:
            line = json.loads(raw)
            key = line["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None, None
        err = _line_error(line)
        if err is not None:
            return key, _Answer(False, redact(f"batch: {err}"), True)
        try:
            text = line["response"]["body"]["choices"][0]["message"]["content"]
            j = parse_judgment(text)
        except (KeyError, IndexError, TypeError) as e:
            return key, _Answer(False, f"batch: unreadable result body: {type(e).__name__}",
                                True)
        except JudgmentParseError as e:
            return key, _Answer(False, redact(f"batch: unparsable answer: {e}"), False)
        self.cache.put(key, j.label, j.explanation, self.model, self.rubric.version)
        return key, _Answer(True, None, False)

    def collect(self) -> list[str]:
        """Apply every finished batch not yet collected: answers into the cache, lines
        to send again into a new batch, the rest into `failures`. Returns names."""
        done = []
        for rec in self.records:
            if rec["state"] != "submitted" or rec["status"] not in TERMINAL:
                continue
            res = self.dir / "results"
            answers: dict[str, _Answer] = {}
            for raw in (self._download(rec["output_file_id"], res / f"{rec['name']}.output.jsonl")
                        + self._download(rec["error_file_id"],
                                         res / f"{rec['name']}.errors.jsonl")):
                key, a = self._read(raw)
                if key is None or a is None:
                    continue
                prev = answers.get(key)
                if prev is None or not prev.ok:
                    answers[key] = a
            again: list[str] = []
            for raw in self._lines(rec):
                key = json.loads(raw)["custom_id"]
                a = answers.get(key) or _Answer(
                    False, f"batch {rec['batch_id']} {rec['status']}: no result for this line"
                    + (f" ({rec['error']})" if rec.get("error") else ""),
                    rec["status"] in _RESUBMIT_STATUSES)
                if a.ok or key in self.cache:
                    continue
                if a.resubmit and not rec["cancel_requested"] \
                        and rec["attempt"] < self.settings.max_resubmits:
                    again.append(raw)
                else:
                    self.failures[key] = a.error or "batch: no answer"
            if again:
                base = rec["name"].split("-r")[0]
                nxt = self._new_record(f"{base}-r{rec['attempt'] + 1}", again,
                                       rec["attempt"] + 1)
                log.info("batch %s: %d line(s) to send again as %s", rec["name"], len(again),
                         nxt["name"])
            rec["state"] = "collected"
            self._save()
            done.append(rec["name"])
        return done

    def cancel(self) -> list[str]:
        """Cancel every batch in flight and every one not yet sent; their unanswered
        lines end failed (not resubmitted). Returns names."""
        names = []
        for rec in self.records:
            if rec["state"] == "collected" or rec["status"] in TERMINAL:
                continue
            rec["cancel_requested"] = True
            if rec["state"] == "submitted":
                b = self.client.batches.cancel(rec["batch_id"])
                rec["status"] = b.status
            else:  # never created: nothing to pay for; its lines fail as cancelled
                rec["state"], rec["status"] = "submitted", "cancelled"
            names.append(rec["name"])
        self._save()
        return names

    # -- the whole stage --------------------------------------------------------------

    def done(self) -> bool:
        return all(r["state"] == "collected" for r in self.records)

    def run(self, *, yes: bool = False, max_wait_s: float | None = None) -> None:
        """Submit, poll with backoff, collect and resubmit until every line is answered
        or failed (or `max_wait_s` passes)."""
        t0 = time.monotonic()
        delay = self.settings.poll_initial_s
        while True:
            self.submit(yes=yes)
            changed = self.poll()
            if self.collect():
                changed = True
            if self.done():
                return
            if max_wait_s is not None and time.monotonic() - t0 > max_wait_s:
                return
            delay = self.settings.poll_initial_s if changed else min(
                self.settings.poll_max_s, delay * 2)
            self.sleep(delay)

    def summary(self) -> dict[str, Any]:
        by_state: dict[str, int] = {}
        for r in self.records:
            k = r["status"] if r["state"] == "submitted" else r["state"]
            by_state[k or r["state"]] = by_state.get(k or r["state"], 0) + 1
        return {"state_dir": str(self.dir), "batches": len(self.records), "by_state": by_state,
                "queued_requests": sum(r["requests"] for r in self._unsent()),
                "in_flight_requests": sum(r["requests"] for r in self._active()),
                "failed_lines": len(self.failures),
                "estimated_cost_usd": round(self.state["committed_cost_usd"], 4),
                "done": self.done()}
