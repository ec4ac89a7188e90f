"""`make demo`'s build, end to end on the tiny world, and what it writes and shows on
the terminal (a quiet first run)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .pipeline_support import BIN, ROOT, env

PNG = b"\x89PNG\r\n\x1a\n"
# ~75 s on an idle 2-core machine; a shared, loaded one has taken over 15 minutes.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`asteer-build demo` as `make demo` runs it: a subprocess with its own settings (what
    it prints is what is checked) and vLLM's default log level, so the engine's INFO
    start-up lines exist and must land in the log file, not on the terminal."""
    out = tmp_path_factory.mktemp("demo")
    e = env()
    e.pop("VLLM_LOGGING_LEVEL", None)
    p = subprocess.run([str(BIN / "asteer-build"), "demo", "--out", str(out)], cwd=ROOT,
                       env=e, capture_output=True, timeout=1780)
    # bytes, decoded here: text mode would turn tqdm's `\r` redraws into newlines
    r = subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"),
                                    p.stderr.decode(errors="replace"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, r


def terminal_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a tqdm bar redraws itself with `\\r`, so only the
    last `\\r`-separated segment of each line stays on screen."""
    return [line.split("\r")[-1] for line in text.rstrip("\n").split("\n")] if text else []


def test_demo_terminal_is_short_and_the_engine_log_is_in_the_run_folder(demo):
    out, _, r = demo
    lines = terminal_lines(r.stdout) + terminal_lines(r.stderr)
    print(f"demo terminal: {len(lines)} lines")
    assert len(lines) < 60, "\n".join(lines)
    log = (out / "logs" / "demo.log").read_text()
    # vLLM's own start-up line, written by the engine-core child process: children
    # inherit the redirected stdout/stderr, so their output is in the log too.
    assert "Initializing a V1 LLM engine" in log
    assert "(EngineCore" in log
    assert "Initializing a V1 LLM engine" not in r.stdout + r.stderr
    assert "EngineCore" not in r.stdout + r.stderr
    # our stage lines are on the terminal and in the log, which the terminal names
    assert f"log: {out / 'logs' / 'demo.log'}" in r.stderr
    for stage in ("vectors: tiny", "rollouts: tiny", "judge:", "demo: training"):
        assert stage in r.stderr and stage in log, stage
    # no JSON without --json; the run folder's build has its own summary and log
    assert "{" not in r.stdout
    assert (out / "build" / "summary.json").exists()


def test_demo_writes_every_plot_as_a_png(demo):
    out, summary, _ = demo
    plots = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in plots}
    for method in ("diffmean", "probe"):
        assert f"label_fraction_by_concept-{method}.png" in names
        for kind in ("confusion", "importance", "label_fraction_vs_alpha", "search"):
            assert f"tiny-{method}-{kind}.png" in names
    for p in plots:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 2000, p.name


def test_demo_has_all_three_regimes(demo):
    _, summary, _ = demo
    assert summary["judge_status"] == {"ok": summary["rollouts"]}
    assert set(summary["label_fractions"]) == {"under", "success", "over"}
    for label, frac in summary["label_fractions"].items():
        assert frac > 0.10, (label, frac)


def test_summary_numbers_equal_the_result_files(demo):
    from asteer_build.demo import summary_text

    out, summary, r = demo
    # what the demo printed is summary.json's numbers, rendered
    assert summary_text(summary) in r.stdout
    import pyarrow.parquet as pq

    labels = []
    for f in sorted((out / "dataset" / "rollouts").glob("*.parquet")):
        labels += pq.read_table(f, columns=["label"]).column("label").to_pylist()
    assert len(labels) == summary["rollouts"]
    names = {0: "under", 1: "success", 2: "over"}
    assert {names[k]: labels.count(k) for k in names} == summary["labels"]
    assert len(summary["predictors"]) == 2
    for key, p in summary["predictors"].items():
        train_summary = json.loads(Path(p["summary_file"]).read_text())
        assert train_summary["macro_f1"] == p["macro_f1"]
        assert train_summary["search"] == p["search"]
        # on the builder's own data the predictor beats both baselines on unseen
        # concepts. On this default split; over 10 split seeds it does so on
        # average, not on every split (benchmarks/results/predictor_vs_baselines.json)
        unseen = p["macro_f1"]["unseen"]
        assert unseen["predictor"] > max(unseen["majority"], unseen["alpha_only"]), (key, unseen)


DIGESTS = Path(__file__).parent / "data" / "demo_dataset_digests.json"


def test_demo_dataset_bytes_are_unchanged(demo):
    """Moving code must not move numbers: the demo's data files (Parquet and vectors)
    are byte-identical to the digests recorded in tests/data. Not compared: README.md
    (the card names modules by path) and build.json (creation time); the state file
    lists the digests compared here. A change that moves numbers on purpose updates the
    JSON, with why, in its commit: `ASTEER_WRITE_DEMO_DIGESTS=1 .venv/bin/python -m pytest
    tests/test_demo.py -k bytes` records this machine's digests."""
    import hashlib

    import torch

    out, _, _ = demo
    ds = out / "dataset"
    cap = torch.backends.cpu.get_cpu_capability()
    recorded = json.loads(DIGESTS.read_text())
    if os.environ.get("ASTEER_WRITE_DEMO_DIGESTS") == "1":
        recorded[cap] = {p.relative_to(ds).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(ds.rglob("*"))
                         if p.is_file() and p.suffix in (".parquet", ".safetensors", ".json")
                         and p.name not in ("build.json", ".asteer-publish.json")}
        DIGESTS.write_text(json.dumps(recorded, indent=1) + "\n")
    want = recorded.get(cap)
    if want is None:
        pytest.skip(f"no recorded digests for CPU capability {cap} (recorded: "
                    f"{', '.join(k for k in recorded if not k.startswith('_'))})")
    have = {rel: hashlib.sha256((ds / rel).read_bytes()).hexdigest() for rel in want}
    assert sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*")
                  if p.is_file() and p.suffix in (".parquet", ".safetensors")) \
        == sorted(k for k in want if k.endswith((".parquet", ".safetensors")))
    changed = [rel for rel in want if have[rel] != want[rel]]
    assert not changed, f"demo dataset files changed bytes: {changed}"
