"""The `judge:` section of a build config (or a standalone judge YAML).

Keys are named, not given: `api_key_env: OPENAI_API_KEY` says which environment variable
holds the key, so configs can be committed and shared without leaking anything.

    judge:
      model: gpt-5-mini            # the judge model; part of every cache key
      kind: llm                    # llm | rules | vllm (the builder serves `server:`)
      endpoints:
        - base_url: https://api.openai.com/v1
          api_key_env: OPENAI_API_KEY
          max_concurrency: 32
          model: null              # per-endpoint served name, if it differs
      max_tokens: 200              # null: not sent (reasoning models reject it)
      temperature: 0.0             # null: not sent (the server's default)
      structured: true
      rubric_file: null            # a text file with {prompt}, {concept}, {response};
                                   # relative to the config file; null: our rubric
      retry: {max_attempts: 6, timeout_s: 60, base_delay_s: 0.5, failures_to_eject: 3}
      cache: runs/judge-cache.jsonl
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .pool import EndpointConfig, RetryPolicy
from .rubric import DEFAULT_RUBRIC, Rubric

__all__ = ["JudgeConfig", "load_config"]


@dataclass
class JudgeConfig:
    model: str = "rules-v1"
    kind: str = "llm"
    endpoints: list[EndpointConfig] = field(default_factory=list)
    max_tokens: int | None = 200
    temperature: float | None = 0.0
    structured: bool = True
    #: another rubric's text (see `judge.rubric.Rubric.from_file`); None: the default
    rubric_file: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cache: str | None = None
    workers: int | None = None  # rows in flight; default 2x the pool's capacity
    #: kind vllm: what the builder serves (asteer_build.judge_servers.ServerSpec); the
    #: judge itself only ever sees the endpoints it gets
    server: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgeConfig:
        d = dict(d.get("judge", d))
        if "api_key" in d or any("api_key" in (e or {}) for e in d.get("endpoints", [])):
            raise ValueError("put API keys in the environment and name them with api_key_env")
        eps = [EndpointConfig(**e) for e in d.pop("endpoints", [])]
        retry_names = {f.name for f in fields(RetryPolicy)}
        retry_d = d.pop("retry", {}) or {}
        unknown = set(retry_d) - retry_names
        if unknown:
            raise ValueError(f"unknown retry settings: {sorted(unknown)}")
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"unknown judge settings: {sorted(bad)}")
        rf = d.get("rubric_file")
        if rf is not None and (not isinstance(rf, str) or not rf.strip()):
            raise ValueError(f"rubric_file: expected a path to a text file (got {rf!r})")
        return cls(endpoints=eps, retry=RetryPolicy(**retry_d), **d)

    def rubric(self, base_dir: str | os.PathLike[str] = ".") -> Rubric:
        """The rubric to grade with: `rubric_file` (relative to `base_dir`, the config
        file's folder) read and checked now, else the default rubric."""
        if not self.rubric_file:
            return DEFAULT_RUBRIC
        p = Path(os.path.expanduser(self.rubric_file))
        return Rubric.from_file(p if p.is_absolute() else Path(base_dir) / p)


def load_config(path: str | os.PathLike[str]) -> JudgeConfig:
    with open(Path(path), encoding="utf-8") as f:
        return JudgeConfig.from_dict(yaml.safe_load(f) or {})
