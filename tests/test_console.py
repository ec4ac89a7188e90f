"""The quiet console: what reaches the terminal and what goes to the log file.

Seconds, no engine: a small script stands in for a run, with a child process writing to
its inherited stdout/stderr the way vLLM's engine core and Ray's workers do.
"""

from __future__ import annotations

import subprocess
import sys

from .pipeline_support import ROOT

SCRIPT = r"""
import logging, subprocess, sys
from asteer_build.core.console import console
logging.basicConfig(level="INFO", stream=sys.stderr)
log_path = sys.argv[1]
print("before", flush=True)
try:
    with console.quiet_to(log_path, "test"):
        console.say("stage one")
        print("library print", flush=True)
        logging.getLogger("vllm.fake").warning("library warning")
        subprocess.run([sys.executable, "-c",
                        "import sys; print('child out'); print('child err', file=sys.stderr)"],
                       check=True)
        for _ in console.progress(iterable=range(3), desc="bar"):
            pass
        console.summary("the summary")
        raise RuntimeError("boom")
except RuntimeError:
    pass
print("after", flush=True)
print("after err", file=sys.stderr, flush=True)
"""


def test_quiet_block_sends_children_and_libraries_to_the_log(tmp_path):
    log = tmp_path / "logs" / "run.log"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = log.read_text()
    for line in ("library print", "library warning", "child out", "child err",
                 "stage one", "the summary", "RuntimeError: boom"):
        assert line in text, line
    terminal = r.stdout + r.stderr
    for line in ("library print", "library warning", "child out", "child err", "boom"):
        assert line not in terminal, line
    # ours reach the terminal; the fds are back afterwards
    assert r.stdout.split() == ["before", "the", "summary", "after"]
    assert "stage one" in r.stderr and "bar: 100%" in r.stderr and f"log: {log}" in r.stderr
    assert r.stderr.rstrip().endswith("after err")
