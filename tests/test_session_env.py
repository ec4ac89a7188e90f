"""The suite does not depend on the caller's environment: conftest drops the Hugging Face,
AWS and Ray variables a caller may export (HF_HUB_OFFLINE=1 on an air-gapped cluster, a
token, an endpoint, an AWS profile, RAY_ADDRESS) before anything reads them. Proved by
running the loopback-Hub upload in a pytest subprocess with those variables exported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import CALLER_VARIABLES
from .hub_support import loopback_hub

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
    with loopback_hub() as (endpoint, log):
        with pytest.raises(Exception):  # noqa: B017 - the stand-in Hub 404s the upload
            hub_upload(str(folder), "asteer-org/env-test", private=True, token=TOKEN,
                       endpoint=endpoint)
    assert (log[0]["method"], log[0]["path"], log[0]["auth"]) == (
        "POST", "/api/repos/create", f"Bearer {TOKEN}")
    assert len(log) >= 2  # the upload itself was attempted against the loopback Hub


def test_suite_ignores_the_callers_hf_aws_and_ray_variables():
    env = {**os.environ, **CALLER_ENV}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_session_environment_is_pinned",
         f"{__file__}::test_hub_upload_reaches_the_loopback_hub"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout, r.stdout[-2000:]
