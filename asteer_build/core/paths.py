"""Where asteer keeps files that belong to no run folder: the tiny world's model
folders, judge scratch for remote runs, build logs of remote runs, publish folders and
`benchmarks/gpu_check.py`'s reports.

One function so that `ASTEER_CACHE` moves all of them together: a test session or a
shared machine points it elsewhere and nothing lands in the user's home.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "ASTEER_CACHE"


def cache_dir() -> Path:
    """`$ASTEER_CACHE` when set and non-empty, else `~/.cache/asteer`; read at each call,
    so a process that sets the variable after import still gets it."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "asteer")
