"""The places where the environment reaches product code: the cache root
(`core.paths.cache_dir`) and the one test seam (`core.testseam`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------- the test seam

def test_seam_is_off_unless_set(monkeypatch):
    from asteer_build.core import testseam

    monkeypatch.delenv(testseam.ENV_VAR, raising=False)
    assert [testseam.hook(h) for h in testseam.HOOKS] == [None] * 4
    monkeypatch.setenv(testseam.ENV_VAR, "")
    assert testseam.hook("commit_delay_s") is None


def test_seam_reads_an_object_or_a_file(tmp_path, monkeypatch):
    from asteer_build.core import testseam

    env = testseam.seam_env(commit_delay_s=0.5, actor_pid_dir="/x/pids")
    assert list(env) == ["ASTEER_TEST_SEAM"]
    monkeypatch.setenv(testseam.ENV_VAR, env[testseam.ENV_VAR])
    assert testseam.hook("commit_delay_s") == 0.5
    assert testseam.hook("actor_pid_dir") == "/x/pids"
    assert testseam.hook("bench_lengths") is None
    f = tmp_path / "seam.json"
    f.write_text('{"bench_lengths": "/x/lengths.json"}')
    monkeypatch.setenv(testseam.ENV_VAR, str(f))  # read at each call, not frozen at import
    assert testseam.hook("bench_lengths") == "/x/lengths.json"
    assert testseam.hook("commit_delay_s") is None


@pytest.mark.parametrize("value,message", [
    ("{nope", "ASTEER_TEST_SEAM: not valid JSON"),
    ("[1, 2]", "ASTEER_TEST_SEAM: expected a JSON object {hook: value} (got list)"),
    ('{"commit_delay": 0.5}', "ASTEER_TEST_SEAM: unknown hook 'commit_delay' (hooks: "
                              "commit_delay_s, actor_pid_dir, bench_lengths, "
                              "check_break)"),
    ('{"check_break": "steer"}', "ASTEER_TEST_SEAM: check_break: expected one of addition, "
                                 "position_mode, capture_layer, mixed_batch (got 'steer')"),
    ('{"commit_delay_s": "0.5"}', "ASTEER_TEST_SEAM: commit_delay_s: expected a number of "
                                  "seconds (got '0.5')"),
    ('{"commit_delay_s": true}', "ASTEER_TEST_SEAM: commit_delay_s: expected a number of "
                                 "seconds (got True)"),
    ('{"actor_pid_dir": 3}', "ASTEER_TEST_SEAM: actor_pid_dir: expected a folder path (got 3)"),
    ("/no/such/seam.json", "ASTEER_TEST_SEAM: '/no/such/seam.json' is neither a JSON object "
                           "nor a readable file (FileNotFoundError: No such file or directory)"),
])
def test_a_malformed_seam_is_refused_by_name(monkeypatch, value, message):
    """A typo in a fault test's hook must fail the test, not run it without its fault."""
    from asteer_build.core import testseam

    monkeypatch.setenv(testseam.ENV_VAR, value)
    with pytest.raises(ValueError) as e:
        testseam.hook("commit_delay_s")
    assert str(e.value).startswith(message), str(e.value)


def test_seam_env_and_hook_refuse_unknown_names():
    from asteer_build.core import testseam

    with pytest.raises(ValueError, match=r"ASTEER_TEST_SEAM=\{\"pid_dir\": \"x\"\}: unknown "
                                         r"hook 'pid_dir'"):
        testseam.seam_env(pid_dir="x")
    with pytest.raises(KeyError, match="testseam: no hook 'delay'"):
        testseam.hook("delay")


def test_product_code_reads_no_other_asteer_variable():
    """Test and fault hooks go through the seam; the other variables are the user's, and
    one is the product's own parent-to-child channel (`engine/startup.py`: where vLLM's
    child processes write why a start failed). ASTEER_STORE_RETRY_S is the user's: how
    long a store outage is waited out (`pipeline/shards.py`)."""
    names = set()
    for d in ("asteer_build", "judge", "train"):
        for f in (ROOT / d).rglob("*.py"):
            names |= set(re.findall(r"ASTEER_[A-Z_]+", f.read_text()))
    assert names == {"ASTEER_ALLOW_UNTESTED_VLLM", "ASTEER_CACHE", "ASTEER_REQUIRE_LOCK",
                     "ASTEER_TEST_SEAM", "ASTEER_ENGINE_START_ERRORS", "ASTEER_STORE_RETRY_S"}


def test_commit_delay_hook_holds_the_temp_file_before_the_rename(tmp_path, monkeypatch):
    """The seam reaches the shard commit: with the hook set, a committed file sits under
    its temp name for the delay; without it, the commit does not wait."""
    import threading
    import time

    from asteer_build.core import testseam
    from asteer_build.pipeline.shards import open_store

    store = open_store(str(tmp_path / "run"))
    monkeypatch.setenv(testseam.ENV_VAR, testseam.seam_env(commit_delay_s=1.0)[
        testseam.ENV_VAR])
    seen: list[list[str]] = []
    t = threading.Thread(target=store.write_bytes_atomic, args=("rollouts/x.bin", b"data"))
    t0 = time.monotonic()
    t.start()
    time.sleep(0.3)
    seen.append(sorted(p.name for p in (tmp_path / "run" / "rollouts").iterdir()))
    t.join()
    held = time.monotonic() - t0
    assert len(seen[0]) == 1 and seen[0][0].startswith(".") and held >= 1.0
    assert (tmp_path / "run" / "rollouts" / "x.bin").read_bytes() == b"data"
    monkeypatch.delenv(testseam.ENV_VAR)
    t0 = time.monotonic()
    store.write_bytes_atomic("rollouts/y.bin", b"data")
    assert time.monotonic() - t0 < 0.5
