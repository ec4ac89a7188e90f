"""Shared fixtures: the tiny world model and helpers to start engines on it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

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
    """User turns rendered as the build renders them (the default prompt format)."""
    from asteer_build.core.prompts import prompt_ids

    return [prompt_ids(model_path, q) for q in questions]


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
