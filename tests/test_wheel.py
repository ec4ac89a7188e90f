"""The CLI works from a built wheel, not only from the checkout: configs ship as package
data and nothing reads files relative to the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip wheel` of the checkout, installed with --no-deps into a bare target folder
    (the locked venv supplies the dependencies, as a user's environment would)."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist, target, src = tmp / "dist", tmp / "target", tmp / "src"
    # A clean copy: setuptools builds in-tree, and a stale build/ would hide a file the
    # wheel no longer ships.
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "demo_out", "runs", "__pycache__",
        ".pytest_cache", ".ruff_cache", ".work"))
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300)
    wheels = list(dist.glob("asteer-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheels[0])], check=True, capture_output=True, timeout=300)
    return target


def _run(target: Path, cwd: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    # the wheel ahead of .venv's editable install
    env = dict(os.environ, PYTHONPATH=str(target), **extra_env)
    env.pop("PYTHONSAFEPATH", None)
    # The paper config reads the authors' files from the Hub: no network in tests, and a
    # cache miss then counts from `expect:` (tests/test_paper_sources.py reads a cache).
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HUB_CACHE"] = str(cwd / "hf-hub-cache")
    return subprocess.run([str(target / "bin" / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_wheel_ships_the_configs(installed):
    shipped = sorted(p.name for p in (installed / "asteer_build" / "configs").glob("*.yaml"))
    assert shipped == ["asteer-paper.yaml", "demo.yaml"]


@pytest.mark.parametrize("arg,items", [("asteer-paper", "1,417,500"),
                                       ("configs/asteer-paper.yaml", "1,417,500"),
                                       ("demo", "2,304")])
def test_installed_cli_plans_packaged_configs_outside_the_checkout(installed, tmp_path,
                                                                   arg, items):
    r = _run(installed, tmp_path, "asteer-build", "plan", arg)
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("config: "), r.stderr
    used = Path(first.removeprefix("config: "))
    # Read from the installed package, never from the source tree.
    assert used.is_relative_to(installed.resolve()), (used, installed)
    assert not used.is_relative_to(ROOT), used
    assert f"{items} rollouts" in r.stderr


def test_installed_modules_are_the_wheels(installed, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(installed))
    out = subprocess.run(
        [PY, "-c", "import asteer_build, judge, train; "
                   "print(asteer_build.__file__, judge.__file__, train.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True)
    for f in out.stdout.split():
        assert Path(f).is_relative_to(installed), f


def test_installed_train_cli_and_a_missing_config(installed, tmp_path):
    r = _run(installed, tmp_path, "asteer-train", "--help")
    assert r.returncode == 0 and "usage: asteer-train" in r.stdout, r.stderr
    r = _run(installed, tmp_path, "asteer-build", "plan", "configs/no-such.yaml")
    assert r.returncode == 2
    assert "file not found (got 'configs/no-such.yaml'); packaged configs: asteer-paper, demo" \
        in r.stderr


@pytest.mark.slow  # an engine start and the HF reference (~15 s)
def test_installed_check_passes_on_tiny_llama3(installed, tmp_path):
    """The pre-flight from the wheel, outside the checkout: its third tiny architecture
    (tests/test_check.py runs the other two and the breaks from the checkout)."""
    from asteer_build.inputs.tinyworld import build_arch_model

    from .pipeline_support import INPROCESS_ENGINE

    model = str(build_arch_model("llama3"))
    r = _run(installed, tmp_path, "asteer-build", "check", "demo", "--model", model,
             "--throughput-requests", "8", "--out", "check.json", **INPROCESS_ENGINE)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] and report["versions"]["asteer"]
    assert report["checks"]["reference_tokens"]["first_divergence"] == [None] * 16
    log = (tmp_path / "check.log").read_text()
    assert "cpu-v1 adapter" in log  # the engine's own lines went to the log
