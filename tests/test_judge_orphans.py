"""A builder SIGKILLed while it runs a local `vllm serve` judge leaves no server behind.

The judge stage starts its server through `judge_servers.served_judge`, in its own
process group (so that stopping it kills the engine core too), which is exactly why a
killed builder used to orphan it: nothing else would ever stop that group. Here a
process starts the tiny model's judge server through that same context manager, as the
local executor's judge stage does, reports the server's pid once it answers `/health`,
and is SIGKILLed; the parent-death signal must then take down the API server and its
engine core.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from .judge_support import VLLM_CLI, vllm_env
from .pipeline_support import ROOT, free_port

pytestmark = pytest.mark.timeout(400)

STARTER = """
import json, sys, time
from asteer_build.pipeline.judge_servers import ServerSpec, served_judge
spec = ServerSpec.from_dict(json.loads(sys.argv[1]))
with served_judge(spec, "orphan-test", executor="local", log_dir=sys.argv[2]) as servers:
    print(json.dumps(servers[0]), flush=True)
    time.sleep(3600)
"""


@pytest.mark.slow  # one `vllm serve` of the tiny model (~40-60 s here)
def test_sigkilled_builder_leaves_no_judge_server(tmp_path, tiny_model):
    port = free_port()
    spec = {"model": tiny_model, "command": VLLM_CLI, "host": "127.0.0.1",
            "port_range": [port, port + 50], "start_timeout_s": 300,
            "engine_args": {"dtype": "float32", "enforce_eager": True, "max_model_len": 512},
            "env": {k: vllm_env()[k] for k in ("VLLM_TARGET_DEVICE", "VLLM_CPU_KVCACHE_SPACE",
                                               "VLLM_PLUGINS", "TOKENIZERS_PARALLELISM")}}
    builder = subprocess.Popen([sys.executable, "-c", STARTER, json.dumps(spec),
                                str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    info: dict = {}
    try:
        info = json.loads(builder.stdout.readline())
        server = psutil.Process(info["pid"])
        group = [server, *server.children(recursive=True)]
        assert len(group) >= 2, group  # the API server and its engine core at least
        assert os.getpgid(server.pid) == server.pid != os.getpgid(builder.pid)
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait(10)
        t0 = time.monotonic()
        _, alive = psutil.wait_procs(group, timeout=60)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert time.monotonic() - t0 < 60
    finally:
        if builder.poll() is None:
            builder.kill()
        if info:  # never leave a server behind for the rest of the suite
            with contextlib.suppress(ProcessLookupError):
                os.killpg(info["pid"], signal.SIGKILL)
