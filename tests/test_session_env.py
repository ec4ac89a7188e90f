"""The suite does not depend on the caller's environment: conftest drops the Hugging Face,
AWS and Ray variables a caller may export (HF_HUB_OFFLINE=1 on an air-gapped cluster, a
token, an endpoint, an AWS profile, RAY_ADDRESS) before anything reads them. Proved by
running the loopback-Hub upload in a pytest subprocess with those variables exported."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from .conftest import CALLER_VARIABLES

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_FAKEsessionENVtoken0123456789"

#: what an air-gapped cluster's login shell may export; each would break a test that
#: expects the suite's own loopback Hub, stores or Ray cluster
CALLER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_TOKEN": "hf_callerTOKENthatMustNotBeUsed",
    "HF_ENDPOINT": "http://127.0.0.1:9",
    "RAY_ADDRESS": "127.0.0.1:9",
    "AWS_PROFILE": "caller-profile-that-does-not-exist",
    "AWS_ACCESS_KEY_ID": "AKIACALLER",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
}


class _Hub(http.server.BaseHTTPRequestHandler):
    """A loopback Hub that creates the repo and refuses the rest (as test_publish's)."""

    log: list[tuple[str, str, str | None]] = []

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self.log.append((self.command, self.path, self.headers.get("Authorization")))
        if self.command == "POST" and self.path == "/api/repos/create":
            out = json.dumps({"url": f"http://{self.headers['Host']}/datasets/asteer-org/x",
                              "name": "asteer-org/x"}).encode()
            self.send_response(200)
        else:
            out = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def log_message(self, *args) -> None:
        pass


def test_session_environment_is_pinned():
    leaked = [k for k in (*CALLER_VARIABLES, *CALLER_ENV) if k != "HF_HOME" and k in os.environ]
    assert not leaked
    assert Path(os.environ["HF_HOME"]).name.startswith("asteer-test-hf-home-")
    from huggingface_hub import constants, get_token

    assert constants.HF_HUB_OFFLINE is False
    assert constants.ENDPOINT == constants._HF_DEFAULT_ENDPOINT
    assert get_token() is None


def test_hub_upload_reaches_the_loopback_hub(tmp_path):
    """test_publish's upload test in small: the repo-create call reaches the loopback Hub
    with the token given, not the caller's."""
    import pytest

    from asteer_build.io.publish import hub_upload

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# test\n")
    _Hub.log = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Exception):  # noqa: B017 - the stand-in Hub 404s the upload
            hub_upload(str(folder), "asteer-org/env-test", private=True, token=TOKEN,
                       endpoint=f"http://127.0.0.1:{srv.server_port}")
    finally:
        srv.shutdown()
        srv.server_close()
    assert _Hub.log[0] == ("POST", "/api/repos/create", f"Bearer {TOKEN}")
    assert len(_Hub.log) >= 2  # the upload itself was attempted against the loopback Hub


def test_suite_ignores_the_callers_hf_aws_and_ray_variables():
    env = {**os.environ, **CALLER_ENV}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_session_environment_is_pinned",
         f"{__file__}::test_hub_upload_reaches_the_loopback_hub"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout, r.stdout[-2000:]
