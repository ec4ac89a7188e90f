"""Content-addressed judgment cache: a rerun never pays for the same judgment twice.

The key hashes everything that determines a judgment (rubric version, judge model,
prompt, concept, response) and nothing else, so identical rollouts in different shards
share one call and a rubric edit invalidates everything. Only successful judgments are
stored: a failure must be retried, never replayed.

Storage is one append-only JSONL file. Each entry is a single `write` on an O_APPEND
descriptor, so a process killed at any instant leaves whole lines plus at most one torn
tail; opening the file truncates that tail before appending. No API key or endpoint
address is ever part of an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["cache_key", "CachedJudgment", "JudgmentCache"]


def cache_key(
    rubric_version: str, judge_model: str, prompt: str, concept: str, response: str
) -> str:
    payload = json.dumps(
        [rubric_version, judge_model, prompt, concept, response], ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedJudgment:
    label: int
    explanation: str
    judge_model: str


class JudgmentCache:
    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        """`fsync` also survives power loss; a killed process needs only the append."""
        self.path = Path(path)
        self.fsync = fsync
        self._mem: dict[str, CachedJudgment] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._load_and_repair()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load_and_repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn last line from a killed writer
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for line in data[:end].splitlines():
            try:
                e = json.loads(line)
                self._mem[e["key"]] = CachedJudgment(
                    int(e["label"]), e["explanation"], e["judge_model"]
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a damaged line costs one repeat call, never a wrong label

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: str) -> bool:
        return key in self._mem

    def get(self, key: str) -> CachedJudgment | None:
        return self._mem.get(key)

    def put(
        self, key: str, label: int, explanation: str, judge_model: str, rubric_version: str
    ) -> None:
        if key in self._mem:
            return
        line = (
            json.dumps(
                {
                    "key": key,
                    "label": int(label),
                    "explanation": explanation,
                    "judge_model": judge_model,
                    "rubric_version": rubric_version,
                },
                ensure_ascii=False,
            )
            + "\n"
        )
        os.write(self._fd, line.encode("utf-8"))
        if self.fsync:
            os.fsync(self._fd)
        self._mem[key] = CachedJudgment(int(label), explanation, judge_model)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> JudgmentCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
