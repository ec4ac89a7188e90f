"""`.asteer-publish.json` in the dataset folder: the key and checksum of every finished
file, so a re-publish skips files whose inputs did not change and a torn one is redone."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core import atomic
from .layout import PUBLISH_FORMAT, STATE_FILE

#: what a scan learns from one rollouts shard: its model, concepts and prompts
ShardKeys = tuple[str | None, dict[str, tuple[str, str]], dict[str, str]]


@dataclass
class RunCache:
    """What one pass over a run and its folder learned, for the next pass (`follow`
    passes every poll, and re-reading every shard or re-hashing every finished file each
    time would grow with the run): each shard's keys by (path, checksum), the prompts'
    sources (possibly read from the Hub), and the checksum of each folder file this
    process has hashed, by path, valid while its size and mtime stay."""

    shards: dict[tuple[str, str], ShardKeys] = field(default_factory=dict)
    sources: dict[str, str] | None = None
    hashed: dict[str, tuple[int, int, str]] = field(default_factory=dict)


class State:
    """`.asteer-publish.json` in the folder: key and checksum of every finished file."""

    def __init__(self, folder: Path, cache: RunCache | None = None) -> None:
        self.hashed = cache.hashed if cache is not None else {}
        self.path = folder / STATE_FILE
        try:
            self.files: dict[str, dict[str, Any]] = json.loads(self.path.read_text())["files"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            self.files = {}

    def done(self, rel: str, key: str, folder: Path) -> dict[str, Any] | None:
        """The recorded entry if the file is there with this key and its bytes check out."""
        e = self.files.get(rel)
        p = folder / rel
        if e is None or e.get("key") != key or not p.is_file():
            return None
        st = p.stat()
        if st.st_size != e["bytes"]:
            return None
        memo = self.hashed.get(rel)
        if memo is None or memo[:2] != (st.st_size, st.st_mtime_ns):
            memo = (st.st_size, st.st_mtime_ns, sha256_file(p))
            self.hashed[rel] = memo
        return e if memo[2] == e["sha256"] else None

    def record(self, rel: str, entry: dict[str, Any]) -> None:
        self.files[rel] = entry
        self.save()

    def forget(self, rel: str) -> None:
        if self.files.pop(rel, None) is not None:
            self.save()

    def save(self) -> None:
        atomic.write_bytes(
            self.path,
            json.dumps(
                {"format": PUBLISH_FORMAT, "files": self.files}, indent=1, sort_keys=True
            ).encode(),
        )


def sha256_file(p: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
