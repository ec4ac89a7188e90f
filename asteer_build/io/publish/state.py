"""`.asteer-publish.json` in the dataset folder: the key and checksum of every finished
file, so a re-publish skips files whose inputs did not change and a torn one is redone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ...core import atomic
from .layout import PUBLISH_FORMAT, STATE_FILE


class State:
    """`.asteer-publish.json` in the folder: key and checksum of every finished file."""

    def __init__(self, folder: Path) -> None:
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
        if p.stat().st_size != e["bytes"] or sha256_file(p) != e["sha256"]:
            return None
        return e

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
