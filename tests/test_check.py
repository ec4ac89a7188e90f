"""`asteer-build check`, the pre-flight a researcher runs on their own model: it passes on
the tiny Qwen 3 and Gemma 2 (Llama 3.2 runs from the installed wheel in test_wheel.py),
and each of its checks fails under its own deliberate break (core.testseam's
`check_break`), so a pass means something.

Every run is the real CLI in a subprocess with the engine core in-process (one process:
each run costs an engine start of seconds, not three vLLM imports); the breaks skip the
throughput run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from asteer_build.core.testseam import CHECK_BREAKS, seam_env
from asteer_build.inputs.tinyworld import build_arch_model

from .pipeline_support import BIN, INPROCESS_ENGINE

CHECKS = {"steering_changes_output", "alpha_zero", "mixed_batch", "reference_tokens",
          "reference_states", "runner"}


def check(tmp: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "report.json"
    proc = subprocess.run(
        [str(BIN / "asteer-build"), "check", "demo", *args, "--out", str(out)],
        env={**os.environ, **INPROCESS_ENGINE, **env}, capture_output=True, text=True,
        timeout=300, cwd=tmp)
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc, report


@pytest.mark.slow  # an engine start, the HF reference and a throughput run (~20 s)
def test_check_passes_on_tiny_qwen3_with_the_default_report_place(tmp_path):
    """No --out: the report (and the log) land under $ASTEER_CACHE/check, nothing in
    the working directory; the throughput run feeds plan's projection."""
    model = str(build_arch_model("qwen3"))
    cache = tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [str(BIN / "asteer-build"), "check", "demo", "--model", model,
         "--throughput-requests", "16"],
        env={**os.environ, **INPROCESS_ENGINE, "ASTEER_CACHE": str(cache)},
        capture_output=True, text=True, timeout=300, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(work.iterdir()) == []
    (path,) = (cache / "check").glob("check-*.json")
    assert path.with_suffix(".log").is_file()
    report = json.loads(path.read_text())
    assert report["passed"] and report["failed"] == []
    assert set(report["checks"]) == CHECKS
    checks = report["checks"]
    assert checks["runner"]["adapter"] == ["cpu-v1"]
    assert checks["runner"]["graphs_captured"] is False  # the demo's engine is eager
    # greedy float32: every token agrees, and the states to float32 rounding
    assert checks["reference_tokens"]["first_divergence"] == [None] * 16
    assert checks["reference_states"]["max_rel_diff"]["steered"] < 1e-4
    assert checks["steering_changes_output"]["moved"] >= 8
    tp = report["throughput"]
    assert tp["requests"] == 16 and tp["generated_tokens"] == 16 * 32 and tp["tok_s"] > 0
    # plan's projection at the measured rate: the demo's 2,304 items x its expected tokens
    assert tp["engine_hours"]["tok_s"] == pytest.approx(tp["tok_s"], rel=1e-3)
    assert "this config: ~" in proc.stderr and "engine-hours on this machine" in proc.stderr


@pytest.mark.slow  # an engine start and the HF reference (~15 s)
def test_check_passes_on_tiny_gemma2(tmp_path):
    proc, report = check(tmp_path, "--model", "tinyworld:gemma2",
                         "--throughput-requests", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["passed"] and report["dtype"] == "float32"
    assert report["throughput"] is None
    assert report["num_layers"] == 6 and report["layer"] == 2  # the demo's layer


# Each break and the check it must fail; the checks it must leave passing show the
# break is caught where it is, not by a check that fails on everything.
BREAKS = {
    "addition": ("alpha_zero", {"mixed_batch", "runner"}),
    "position_mode": ("reference_tokens", {"alpha_zero", "mixed_batch"}),
    "capture_layer": ("reference_states", {"alpha_zero", "mixed_batch", "reference_tokens"}),
    "mixed_batch": ("mixed_batch", {"alpha_zero"}),
}


def test_every_break_has_a_check():
    assert set(BREAKS) == set(CHECK_BREAKS)


@pytest.mark.slow  # an engine start per break
@pytest.mark.parametrize("brk", sorted(BREAKS))
def test_each_check_fails_under_its_own_break(tmp_path, brk):
    failing, passing = BREAKS[brk]
    proc, report = check(tmp_path, "--model", "tinyworld:qwen3", "--throughput-requests", "0",
                         "--prompts", "2", **seam_env(check_break=brk))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "check failed: " in proc.stderr and failing in proc.stderr
    checks = report["checks"]
    assert not checks[failing]["pass"], checks[failing]
    assert all(checks[c]["pass"] for c in passing), {c: checks[c] for c in passing}
    assert failing in report["failed"] and not report["passed"]


def test_bad_layer_and_reference_only(tmp_path):
    """A layer past the model's depth is refused (exit 2, naming it) before any engine;
    `--reference-only` (a machine without vLLM) runs the HF half alone."""
    proc, _ = check(tmp_path, "--model", "tinyworld:qwen3", "--layer", "9")
    assert proc.returncode == 2
    assert "layer 9 is not a block of tinyworld:qwen3 (6 layers: 0..5)" in proc.stderr
    proc, report = check(tmp_path, "--model", "tinyworld:qwen3", "--reference-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["engine"] == {"run": False, "why": "--reference-only"}
    assert set(report["checks"]) == {"steering_changes_output"}
    assert report["reference"]["alpha_zero"]["pass"]
    assert report["reference"]["mixed_batch"]["pass"]
