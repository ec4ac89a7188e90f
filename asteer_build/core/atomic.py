"""The one way a committed output reaches a local disk: temp file, fsync, rename, fsync
of the directory.

Every file a later run trusts (shards, manifests, dataset files, banks, vector caches,
batch files, the tiny world) goes through here, so a killed process or a power loss
leaves either the old file or the new one, never a torn one, and the rename itself is
durable. Temp names are dot-prefixed with `.tmp-` so readers skip them and cleaners
(`clean_temps`) find them. Append logs (the judge cache) are not committed this way: they
flush per batch instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["temp_path", "commit", "atomic_path", "write_bytes", "write_text",
           "commit_dir", "replace_dir", "fsync_dir", "clean_temps", "is_temp"]


def temp_path(dest: str | os.PathLike[str]) -> Path:
    """A unique temp name beside `dest` (same filesystem, so the rename is atomic)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")


def is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in `path` durable; a filesystem that cannot fsync a directory
    (some network mounts) is accepted as is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike[str], dest: str | os.PathLike[str],
           before_rename: Callable[[], None] | None = None) -> None:
    """fsync a finished temp file and rename it over `dest`. `before_rename` is the
    fault-injection seam of the shard commit tests."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, dest)
    fsync_dir(Path(dest).parent)


@contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path for a writer that wants a path (pyarrow, safetensors); on success
    commit it over `dest`, on error remove it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        yield tmp
        commit(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike[str], text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def commit_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a whole folder under a temp name beside `target`, then fsync its files and
    rename it into place. If another process committed `target` first, its folder is
    kept and ours dropped (both are the same content by construction of the caller)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put a finished folder `tmp` in place of `target`, replacing a folder already there
    (a reader sees the old folder or the new one, never a mix; a crash between the two
    renames leaves the old one beside it under a `.old-` name, not lost)."""
    tmp, target = Path(tmp), Path(target)
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)


def clean_temps(folder: str | os.PathLike[str]) -> None:
    """Remove what a killed writer left behind (files named by `temp_path`)."""
    for p in Path(folder).rglob(".*.tmp-*"):
        if p.is_file():
            p.unlink()
