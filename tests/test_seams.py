"""The places where the environment reaches product code: the cache root
(`core.paths.cache_dir`) and the one test seam (`core.testseam`)."""

from __future__ import annotations

import re
from pathlib import Path

from asteer_build.core.paths import cache_dir

ROOT = Path(__file__).resolve().parent.parent


def test_cache_dir_honours_asteer_cache_and_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTEER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.setenv("ASTEER_CACHE", "")  # empty is unset, as a shell's `X= cmd` means
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "asteer"
    monkeypatch.delenv("ASTEER_CACHE")
    assert cache_dir() == tmp_path / "home" / ".cache" / "asteer"


def test_the_cache_root_is_computed_in_one_place():
    """Every other module asks `cache_dir()`, so `ASTEER_CACHE` moves them all."""
    pat = re.compile(r"ASTEER_CACHE\"|\.cache\"\s*/\s*\"asteer")
    hits = sorted(str(f.relative_to(ROOT)) for d in ("asteer_build", "benchmarks", "judge",
                                                     "train")
                  for f in (ROOT / d).rglob("*.py") if pat.search(f.read_text()))
    assert hits == ["asteer_build/core/paths.py"]
