"""A pool of OpenAI-compatible endpoints that keeps all of them busy and survives their faults.

One judge run is up to 1.42M calls, so the pool has to saturate every endpoint it has,
and a flaky endpoint must cost retries, not rows. Policy, all in this file:

- Dispatch: each request goes to the healthy endpoint with the lowest in-flight / limit
  ratio; an endpoint never has more than `max_concurrency` requests in flight.
- Retries (the only retry loop for live calls; the OpenAI client's own is off; Batch API
  lines are resubmitted in `judge.batches`): 429, 5xx,
  408/409, timeouts, connection errors and unreadable response bodies are retried with
  exponential backoff and jitter, honouring `Retry-After` on 429. Other 4xx fail at once.
- Ejection: `failures_to_eject` consecutive transport failures (not 429s: a busy server
  is alive) take an endpoint out for a cooldown; afterwards it is probed back with a
  single request (half-open), and each failed probe doubles the cooldown.
- Structured output: `response_format` is sent until an endpoint rejects it with a 400;
  then that endpoint is asked without it and callers rely on tolerant parsing.

The pool knows nothing about judging, so the contrast-bank writer can use `complete` too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import openai

from judge.secrets import api_key_from_env, redact

__all__ = ["EndpointConfig", "RetryPolicy", "Completion", "PoolError", "EndpointPool"]

log = logging.getLogger(__name__)

# vLLM and OpenAI phrase "this server cannot do structured output" in several ways.
_STRUCTURED_HINTS = ("response_format", "json_schema", "structured", "guided")


@dataclass(frozen=True)
class EndpointConfig:
    base_url: str
    model: str | None = None  # name to send; defaults to the pool's model
    api_key_env: str | None = None  # the variable's name, never its value
    max_concurrency: int = 16


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    timeout_s: float = 60.0
    failures_to_eject: int = 3
    cooldown_s: float = 2.0
    max_cooldown_s: float = 120.0
    # A request that cannot get any endpoint for this long fails (every endpoint down).
    acquire_timeout_s: float = 600.0


@dataclass
class Completion:
    text: str | None
    finish_reason: str | None
    endpoint: str
    model: str
    attempts: int
    structured: bool


class PoolError(Exception):
    """A request that exhausted its retries or hit a permanent error.

    `kind` is a short machine-readable cause (`http_500`, `timeout`, `connection`, ...);
    the message is already redacted and is what lands in a row's `judge_error`.
    """

    def __init__(self, kind: str, message: str, attempts: int) -> None:
        super().__init__(redact(f"{kind} after {attempts} attempt(s): {message}"))
        self.kind = kind
        self.attempts = attempts


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, *, eject: bool, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.eject, self.retry_after = kind, eject, retry_after


class _Fatal(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class _Endpoint:
    cfg: EndpointConfig
    client: openai.AsyncOpenAI
    model: str
    in_flight: int = 0
    state: str = "healthy"  # healthy | down | probing
    consecutive_failures: int = 0
    down_until: float = 0.0
    cooldown_s: float = 0.0
    structured: bool = True
    stats: dict[str, int] = field(default_factory=lambda: {"ok": 0, "errors": 0, "ejected": 0})

    def limit(self) -> int:
        return 1 if self.state == "probing" else self.cfg.max_concurrency


class EndpointPool:
    def __init__(
        self,
        endpoints: list[EndpointConfig],
        *,
        model: str | None = None,
        retry: RetryPolicy | None = None,
        seed: int | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self.retry = retry or RetryPolicy()
        self._rng = random.Random(seed)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._eps: list[_Endpoint] = []
        for cfg in endpoints:
            name = cfg.model or model
            if not name:
                raise ValueError(f"no model name for endpoint {cfg.base_url}")
            # Local servers accept any key; the client library insists on a non-empty one.
            key = api_key_from_env(cfg.api_key_env) or "EMPTY"
            client = openai.AsyncOpenAI(
                base_url=cfg.base_url, api_key=key, max_retries=0, timeout=self.retry.timeout_s,
                http_client=_http_client(self.retry.timeout_s),
            )
            self._eps.append(_Endpoint(cfg=cfg, client=client, model=name))

    @property
    def capacity(self) -> int:
        """Requests the pool can have in flight at once: size producers by this."""
        return sum(ep.cfg.max_concurrency for ep in self._eps)

    def stats(self) -> list[dict[str, Any]]:
        return [
            {
                "base_url": ep.cfg.base_url,
                "state": ep.state,
                "structured": ep.structured,
                **ep.stats,
            }
            for ep in self._eps
        ]

    async def aclose(self) -> None:
        for ep in self._eps:
            await ep.client.close()

    async def __aenter__(self) -> EndpointPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- dispatch ---------------------------------------------------------------------

    def _pick(self) -> _Endpoint | None:
        """Least-loaded endpoint with a free slot, or None. Synchronous on purpose: the
        event loop is single-threaded, so no lock is needed and waiters cost nothing."""
        now = time.monotonic()
        best: _Endpoint | None = None
        for ep in self._eps:
            if ep.state == "down" and now >= ep.down_until:
                ep.state = "probing"
                log.info("probing endpoint %s back", ep.cfg.base_url)
            if ep.state == "down" or ep.in_flight >= ep.limit():
                continue
            if best is None or (
                ep.in_flight / ep.cfg.max_concurrency < best.in_flight / best.cfg.max_concurrency
            ):
                best = ep
        if best is not None:
            best.in_flight += 1
        return best

    def _wake(self, n: int | None = None) -> None:
        """Wake `n` waiters (all if None), first come first served."""
        while self._waiters and (n is None or n > 0):
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                if n is not None:
                    n -= 1

    async def _acquire(self) -> _Endpoint:
        if not self._waiters and (ep := self._pick()) is not None:
            return ep
        deadline = time.monotonic() + self.retry.acquire_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise _Retryable("no_endpoint", "no endpoint available", eject=False)
            wake = deadline - now
            downs = [ep.down_until - now for ep in self._eps if ep.state == "down"]
            if downs:  # nobody will release a slot: wake up in time to probe
                wake = min(wake, max(0.01, min(downs)))
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, timeout=wake)
            except TimeoutError:
                pass
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake(1)  # cancelled after being woken: pass the slot on
                raise
            finally:
                if not fut.done():
                    fut.cancel()
            if (ep := self._pick()) is not None:
                if self._waiters and any(e.in_flight < e.limit() for e in self._eps):
                    self._wake(1)  # more slots may be free (e.g. an endpoint came back)
                return ep

    def _release(self, ep: _Endpoint, error: _Retryable | None, *, neutral: bool = False) -> None:
        ep.in_flight -= 1
        was = ep.state
        if neutral:  # cancelled or a permanent client error: says nothing of health
            pass
        elif error is None:
            ep.stats["ok"] += 1
            ep.consecutive_failures = 0
            if ep.state == "probing":
                log.info("endpoint %s is back", ep.cfg.base_url)
            ep.state, ep.cooldown_s = "healthy", 0.0
        else:
            ep.stats["errors"] += 1
            if error.eject:
                ep.consecutive_failures += 1
                if ep.state == "probing" or (
                    ep.state == "healthy"
                    and ep.consecutive_failures >= self.retry.failures_to_eject
                ):
                    ep.cooldown_s = min(
                        self.retry.max_cooldown_s,
                        max(self.retry.cooldown_s, ep.cooldown_s * 2),
                    )
                    ep.state, ep.down_until = "down", time.monotonic() + ep.cooldown_s
                    ep.stats["ejected"] += 1
                    log.warning(
                        "endpoint %s out for %.1fs after %s",
                        ep.cfg.base_url,
                        ep.cooldown_s,
                        error.kind,
                    )
            elif ep.state == "probing":
                # A 429 proves the server is alive: count the probe as passed.
                ep.state, ep.cooldown_s, ep.consecutive_failures = "healthy", 0.0, 0
        # One freed slot wakes one waiter; an endpoint back in service wakes everyone.
        self._wake(None if (was != ep.state and ep.state == "healthy") else 1)

    # -- one call ---------------------------------------------------------------------

    async def _call(
        self,
        ep: _Endpoint,
        messages: list[dict[str, Any]],
        rf: dict[str, Any] | None,
        kw: dict[str, Any],
    ) -> tuple[str | None, str | None]:
        args = dict(kw)
        if rf is not None and ep.structured:
            args["response_format"] = rf
        try:
            # The generic `post` of the same client (auth, timeouts, error types) with a
            # plain JSON body: `chat.completions.create` runs its request transform and
            # response model per call, about half this client's CPU per judgment here,
            # which the streaming judge takes from the engines' front end.
            resp = await ep.client.post(
                "/chat/completions",
                body={"model": ep.model, "messages": messages, **args},
                cast_to=dict,
            )
        except openai.RateLimitError as e:
            raise _Retryable(
                "http_429", str(e), eject=False, retry_after=_retry_after(e.response)
            ) from e
        except openai.APITimeoutError as e:
            if not _timed_out(e):
                raise _Retryable("connection", str(e.__cause__ or e), eject=True) from e
            raise _Retryable(
                "timeout", f"no response within {self.retry.timeout_s}s", eject=True
            ) from e
        except openai.APIConnectionError as e:
            raise _Retryable("connection", str(e.__cause__ or e), eject=True) from e
        except openai.APIStatusError as e:
            code = e.status_code
            if code >= 500 or code in (408, 409):
                raise _Retryable(f"http_{code}", str(e), eject=code >= 500) from e
            text = str(e).lower()
            if (
                code == 400
                and "response_format" in args
                and any(h in text for h in _STRUCTURED_HINTS)
            ):
                ep.structured = False
                log.warning(
                    "endpoint %s rejects structured output; parsing text instead", ep.cfg.base_url
                )
                raise _Retryable(
                    "no_structured_output", str(e), eject=False, retry_after=0.0
                ) from e
            raise _Fatal(f"http_{code}", str(e)) from e
        except openai.APIError as e:  # body that is not a readable completion
            raise _Retryable("bad_response", str(e), eject=True) from e
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise _Retryable("bad_response", f"{type(e).__name__}: {e}", eject=True) from e
        try:
            choice = resp["choices"][0]
            return choice["message"]["content"], choice.get("finish_reason")
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise _Retryable("bad_response", f"unreadable completion body: {e}", eject=True) from e

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.retry.max_delay_s, retry_after)
        ceiling = min(self.retry.max_delay_s, self.retry.base_delay_s * 2 ** (attempt - 1))
        return ceiling * (0.5 + 0.5 * self._rng.random())  # jitter: spread the herd

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        response_format: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Completion:
        """One chat completion with the pool's dispatch and retry policy.

        Extra keywords (`max_tokens`, `temperature`, `seed`, ...) go to the server as is.
        Raises `PoolError` once retries are exhausted or the error is permanent.
        """
        last: _Retryable | None = None
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                ep = await self._acquire()
            except _Retryable as e:
                raise PoolError(e.kind, str(e), attempt) from None
            structured = response_format is not None and ep.structured
            err: _Retryable | None = None
            try:
                text, finish = await self._call(ep, messages, response_format, kw)
            except _Retryable as e:
                err = e
            except _Fatal as e:
                self._release(ep, None, neutral=True)
                raise PoolError(e.kind, str(e), attempt) from None
            except BaseException:
                self._release(ep, None, neutral=True)
                raise
            self._release(ep, err)
            if err is None:
                return Completion(text, finish, ep.cfg.base_url, ep.model, attempt, structured)
            last = err
            log.debug("attempt %d on %s failed: %s", attempt, ep.cfg.base_url, err.kind)
            if attempt < self.retry.max_attempts:
                await asyncio.sleep(self._backoff(attempt, err.retry_after))
        assert last is not None
        raise PoolError(last.kind, str(last), self.retry.max_attempts)


def _http_client(timeout_s: float) -> Any:
    """The client's aiohttp transport (`openai.DefaultAioHttpClient`, the openai package's
    own option for many concurrent calls) where aiohttp is installed, else its default.
    Measured over 2,304 calls against the loopback server (`bench_time_to_dataset`), it
    takes a third less CPU per call than the default transport; a live judge that runs
    while the engines generate takes that CPU from their front end."""
    try:
        return openai.DefaultAioHttpClient(timeout=timeout_s)
    except (AttributeError, RuntimeError, ImportError):
        return None


def _causes(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    c: BaseException | None = e.__cause__
    while c is not None and c not in out:
        out.append(c)
        c = c.__cause__
    return out


def _timed_out(e: openai.APITimeoutError) -> bool:
    """Whether a timeout error is one. The aiohttp transport maps every aiohttp
    connection error, a refused or dropped connection too, to a connect timeout; a real
    timeout (either transport) has a `TimeoutError` among its causes."""
    chain = _causes(e)
    return not chain or any(isinstance(c, TimeoutError) for c in chain)


def _retry_after(response: Any) -> float | None:
    try:
        value = response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
