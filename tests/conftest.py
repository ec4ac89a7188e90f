"""Shared fixtures: the tiny world model and helpers to start engines on it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

#: what a caller may export that would point the suite's Hub, object-store or Ray steps
#: somewhere else (or nowhere): HF_HUB_OFFLINE=1, usual on air-gapped clusters, stops the
#: loopback Hub upload before it is sent; a user's token or endpoint would go with it;
#: RAY_ADDRESS would attach a test's driver to the caller's cluster. Dropped at import,
#: before huggingface_hub or Ray read them, whatever was exported.
CALLER_VARIABLES = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME",
    "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_DISABLE_XET",
)
#: every AWS_* and RAY_* variable goes: credentials, profile, endpoint, region, a cluster
#: address or token, Ray's internal settings
CALLER_PREFIXES = ("AWS_", "RAY_")


def _pin_environment() -> None:
    for name in list(os.environ):
        if name in CALLER_VARIABLES or name.startswith(CALLER_PREFIXES):
            del os.environ[name]
    # A fresh Hugging Face home: no token file or hub cache of the caller's is read.
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="asteer-test-hf-home-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


_pin_environment()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `datasets` caches a local folder's Arrow files under a key that ignores the folder's
# path and times, so a "load it back" test could read another run's cache: one fresh
# cache per test session.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="asteer-test-hf-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PROMPTS = [
    "explain the ocean to a friend",
    "write a short story about a robot",
    "why is coffee good for people",
    "list three reasons to travel",
    "how can we learn music in school",
    "what is a good plan for the day",
    "write a poem about winter",
    "explain money",
]


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The product's tiny world (steerable; greedy decoding repeats one token)."""
    from asteer_build.inputs.tinyworld import build_tiny_model

    return str(build_tiny_model())


@pytest.fixture(scope="session")
def varied_model() -> str:
    """A tiny world with varied greedy text, for engine equalities that must not be
    vacuous (see tinyworld.VARIED)."""
    from asteer_build.inputs.tinyworld import VARIED, build_tiny_model

    return str(build_tiny_model(VARIED))


def chat_ids(model_path: str, questions: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": q}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for q in questions
    ]


def engine_args(**over):
    args = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=64,
        seed=0,
        kv_cache_memory_bytes=512 << 20,
        block_size=32,
    )
    args.update(over)
    return args
