"""The `judge:` section of a build config (or a standalone judge YAML).

Keys are named, not given: `api_key_env: OPENAI_API_KEY` says which environment variable
holds the key, so configs can be committed and shared without leaking anything.

    judge:
      model: gpt-5-mini            # the judge model; part of every cache key
      kind: llm                    # llm | rules | openai-batch | vllm (served by the builder)
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
      # kind: openai-batch (judge.batches): the Batch API through the first endpoint
      batch: {max_requests_per_file: 50000, max_bytes_per_file: 200000000,
              max_resubmits: 2, enqueued_token_budget: null, cost_cap_usd: null,
              poll_initial_s: 30, poll_max_s: 600, completion_window: 24h}
      # USD per million tokens, for `asteer-build plan` and the batch cost cap
      prices: {input_per_mtok: 0.25, output_per_mtok: 2.0, batch_discount: 0.5,
               output_tokens_per_call: 600}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from judge.pool import EndpointConfig, RetryPolicy
from judge.rubric import DEFAULT_RUBRIC, Rubric

__all__ = ["JudgeConfig", "BatchSettings", "Prices", "load_config"]

#: the judge kinds a config may name (`judge.kinds` runs them; `vllm` needs the builder,
#: which starts the servers)
KINDS = ("llm", "rules", "openai-batch", "vllm")


@dataclass(frozen=True)
class BatchSettings:
    """How `judge.batches` splits, submits and polls Batch API work. The per-file
    limits default to the API's documented ones (50,000 requests, 200 MB per file)."""

    max_requests_per_file: int = 50_000
    max_bytes_per_file: int = 200_000_000
    #: how many times a line that expired, was cancelled, failed or errored is sent again
    max_resubmits: int = 2
    #: estimated input tokens allowed in flight at once (the org's enqueued-token
    #: limit); None: no limit. A wave always holds at least one batch.
    enqueued_token_budget: int | None = None
    #: refuse to submit beyond this estimated spend (USD, batch prices) without --yes
    cost_cap_usd: float | None = None
    poll_initial_s: float = 30.0
    poll_max_s: float = 600.0
    completion_window: str = "24h"

    def __post_init__(self) -> None:
        for name in ("max_requests_per_file", "max_bytes_per_file", "poll_initial_s",
                     "poll_max_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise ValueError(f"judge.batch.{name}: expected a positive number (got {v!r})")
        if not isinstance(self.max_resubmits, int) or self.max_resubmits < 0:
            raise ValueError(f"judge.batch.max_resubmits: expected an integer >= 0 "
                             f"(got {self.max_resubmits!r})")
        for name in ("enqueued_token_budget", "cost_cap_usd"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or v <= 0):
                raise ValueError(f"judge.batch.{name}: expected a positive number or null "
                                 f"(got {v!r})")


@dataclass(frozen=True)
class Prices:
    """USD per million tokens; `batch_discount` multiplies both for Batch API calls;
    `output_tokens_per_call` is the judge's expected answer length (reasoning included)."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    batch_discount: float = 0.5
    output_tokens_per_call: int = 200

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok", "output_tokens_per_call"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ValueError(f"judge.prices.{name}: expected a number >= 0 (got {v!r})")
        d = self.batch_discount
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d <= 1:
            raise ValueError(f"judge.prices.batch_discount: expected a fraction in (0, 1] "
                             f"(got {d!r})")


def _section(cls: type, d: Any, name: str) -> Any:
    d = d or {}
    if not isinstance(d, dict):
        raise ValueError(f"judge.{name}: expected a mapping (got {d!r})")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"judge.{name}: unknown settings {sorted(unknown)}")
    return cls(**d)


def _endpoints(v: Any) -> list[EndpointConfig]:
    """`judge.endpoints`, each entry checked field by field, so a typo names itself."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError(f"judge.endpoints: expected a list of endpoints (got {v!r})")
    known = [f.name for f in fields(EndpointConfig)]
    out = []
    for i, e in enumerate(v):
        where = f"judge.endpoints[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected a mapping with base_url (got {e!r})")
        if "api_key" in e:
            raise ValueError(f"{where}.api_key: put API keys in the environment and name "
                             "them with api_key_env")
        for k in e:
            if k not in known:
                raise ValueError(f"{where}: unknown field {k!r} (known: {', '.join(known)})")
        url = e.get("base_url")
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"{where}.base_url: required: the endpoint's URL (got {url!r})")
        for k in ("model", "api_key_env"):
            if e.get(k) is not None and not isinstance(e[k], str):
                raise ValueError(f"{where}.{k}: expected a string (got {e[k]!r})")
        mc = e.get("max_concurrency", EndpointConfig.max_concurrency)
        if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
            raise ValueError(f"{where}.max_concurrency: expected an integer >= 1 (got {mc!r})")
        out.append(EndpointConfig(**e))
    return out


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
    batch: BatchSettings = field(default_factory=BatchSettings)
    prices: Prices | None = None
    #: kind vllm: what the builder serves (asteer_build.pipeline.judge_servers.ServerSpec); the
    #: judge itself only ever sees the endpoints it gets
    server: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgeConfig:
        if not isinstance(d, dict) or not isinstance(d.get("judge", d), dict):
            raise ValueError(f"judge: expected a mapping of judge settings (got {d!r})")
        d = dict(d.get("judge", d))
        if "api_key" in d:
            raise ValueError("judge.api_key: put API keys in the environment and name them "
                             "with api_key_env")
        eps = _endpoints(d.pop("endpoints", None))
        kind = d.get("kind", "llm")
        if kind not in KINDS:
            raise ValueError(f"judge.kind: unknown kind {kind!r} (known: "
                             f"{', '.join(sorted(KINDS))})")
        batch = _section(BatchSettings, d.pop("batch", None), "batch")
        prices = _section(Prices, d.pop("prices"), "prices") if d.get("prices") else None
        d.pop("prices", None)
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
        return cls(endpoints=eps, retry=RetryPolicy(**retry_d), batch=batch, prices=prices,
                   **d)

    def rubric(self, base_dir: str | os.PathLike[str] = ".") -> Rubric:
        """The rubric to grade with: `rubric_file` (relative to `base_dir`, the config
        file's folder) read and checked now, else the default rubric."""
        if not self.rubric_file:
            return DEFAULT_RUBRIC
        p = Path(os.path.expanduser(self.rubric_file))
        return Rubric.from_file(p if p.is_absolute() else Path(base_dir) / p)


def load_config(path: str | os.PathLike[str]) -> JudgeConfig:
    """A judge YAML (a `judge:` section, or its settings at the top); errors name the
    file and the field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config: no such file {str(p)!r}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {e}") from None
    return JudgeConfig.from_dict(raw or {})
