"""`benchmarks/gpu_check.py --device cpu`: our hooks under torch.compile equal eager, and
the check is not vacuous (a hook broken on purpose makes it fail).

CI traces with the `aot_eager` backend (Dynamo + AOTAutograd functionalization, as
Inductor sees the graph, without C++ codegen: seconds instead of a minute on 2 cores);
the committed benchmarks/results/gpu_check-cpu.json is the Inductor run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """The pre-flight check as a user runs it (a subprocess, no `--engine`), once for the
    module: the tests below read its exit status and report."""
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check-cpu.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--backend", "aot_eager",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow  # the whole pre-flight check in a subprocess (~10-20 s)
def test_gpu_check_cpu_passes(cpu_run):
    _, report = cpu_run
    assert report["passed"] and all(report["reference_sanity"].values())
    checks = report["checks"]["compile"]
    assert set(checks) == {"steered_outputs", "captured_rows", "pooled_means"}
    assert all(c["pass"] for c in checks.values())


@pytest.mark.parametrize("brk,failing", [
    ("steer", "steered_outputs"),  # the hook skips the addition
    ("capture-branch", "captured_rows"),  # eager form traced at a step with no rows
])
def test_gpu_check_fails_when_a_hook_is_broken(tmp_path, brk, failing):
    from benchmarks.gpu_check import main

    out = tmp_path / f"broken-{brk}.json"
    rc = main(["--device", "cpu", "--backend", "aot_eager", "--break", brk,
               "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 1 and not report["passed"]
    assert not report["checks"]["compile"][failing]["pass"]


@pytest.mark.slow  # reads the module's pre-flight run
def test_engine_smoke_is_opt_in_and_reports_into_the_same_json(cpu_run, tmp_path):
    """Without `--engine` the JSON has no engine part; with it, a smoke that cannot run
    (here: no such model folder, refused before any engine starts) is a failed check in
    the report and exit status 1, not a traceback. The smoke itself (three vLLM engine
    starts, one compiling) is too slow for CI; tests/test_engine_compiled.py covers the
    compiled engine here."""
    from benchmarks.gpu_check import main

    assert cpu_run[1]["engine_smoke"] is None  # the run without `--engine`
    out = tmp_path / "smoke.json"
    rc = main(["--device", "cpu", "--backend", "aot_eager", "--engine",
               "--engine-model", str(tmp_path / "no-such-model"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 1 and not report["passed"]
    smoke = report["engine_smoke"]
    assert not smoke["passed"] and "no-such-model" in smoke["checks"]["runs"]["error"]


def test_default_report_goes_to_the_cache_not_the_checkout(tmp_path, monkeypatch):
    """The README's pre-flight check (no `--out`) writes under `$ASTEER_CACHE`, and the
    committed reports in benchmarks/results/ keep their bytes."""
    from benchmarks.gpu_check import main

    committed = {p: p.read_bytes() for p in (ROOT / "benchmarks" / "results").glob("gpu_check*")}
    assert committed  # the check below compares something
    monkeypatch.setenv("ASTEER_CACHE", str(tmp_path / "cache"))
    assert main(["--device", "cpu", "--backend", "aot_eager"]) == 0
    report = json.loads((tmp_path / "cache" / "gpu_check" / "gpu_check-cpu.json").read_text())
    assert report["passed"] and report["backend"] == "aot_eager"
    assert {p: p.read_bytes() for p in committed} == committed
    assert sorted((ROOT / "benchmarks" / "results").glob("gpu_check*")) == sorted(committed)
