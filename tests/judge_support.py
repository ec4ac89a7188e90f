"""Real components for the judge tests: a `vllm serve` of the tiny model, a fault-injecting
loopback proxy in front of it, and rollout shards. Nothing here is a mock: the proxy
forwards to the real server and only breaks the requests its plan tells it to."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VLLM_CLI = [sys.executable, str(HERE / "_vllm_cli.py")]
#: the variable that holds the session judge server's API key (conftest.judge_server)
KEY_ENV = "ASTEER_JUDGE_TEST_KEY"

# Flags the tiny model needs on CPU. Whitespace inside JSON is disabled because a random
# model otherwise emits whitespace until max_tokens and never closes the object. The
# rubric is ~1,300 tiny-world tokens (its tokenizer knows few English words) and the
# reason comes before the label, so the context is raised past the tiny model's 1,024
# positions (rotary: the positions are computed, not learned).
CPU_FLAGS = [
    "--dtype",
    "float32",
    "--enforce-eager",
    "--hf-overrides",
    '{"max_position_embeddings": 2560}',
    "--max-model-len",
    "2560",
    "--structured-outputs-config",
    '{"backend":"xgrammar","disable_any_whitespace":true}',
]


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # The steering plugin is another package's business; judge tests serve a
            # plain model, so load no vLLM plugins at all.
            "VLLM_PLUGINS": "",
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
        }
    )
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """The builder's own stop for a `vllm serve` process group."""
    from asteer_build.pipeline.judge_servers import stop_group

    stop_group(proc, grace)


@contextlib.contextmanager
def vllm_server(
    model: str, log_path: Path, api_key: str | None = None, max_num_seqs: int = 32
) -> Iterator[str]:
    """Yields the base URL (`http://127.0.0.1:PORT/v1`) of a ready `vllm serve`."""
    port = free_port()
    cmd = [
        *VLLM_CLI,
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(max_num_seqs),
        *CPU_FLAGS,
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("vllm serve did not become ready") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)


def served_model(base_url: str, api_key: str | None = None) -> str:
    req = urllib.request.Request(f"{base_url}/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["data"][0]["id"]


# -- fault-injecting proxy ----------------------------------------------------------------


def row_key(body: dict) -> str:
    """Identify a judge request by its user message: one per distinct rollout."""
    msgs = body.get("messages") or []
    user = next((m.get("content", "") for m in reversed(msgs) if m.get("role") == "user"), "")
    return hashlib.sha256(str(user).encode()).hexdigest()[:16]


Plan = Callable[[str, int, dict], str]  # (row key, attempt number from 0, body) -> action


class FaultProxy:
    """HTTP/1.1 loopback proxy with one request per connection.

    Actions: pass, drop (connection closed, no response), http500, http429, slow (no
    answer before the client's timeout), malformed (200 with a truncated JSON body),
    garbage (real completion whose text is replaced by prose with no label),
    echo_auth (500 whose body echoes the request's Authorization header), reject_rf (400
    if the request asks for response_format), and holding (see `hold_after`).

    `forwarded[key]` counts requests the upstream server answered with 200, which is
    the server-side count of judgments made for that row.
    """

    def __init__(self, upstream: str, plan: Plan | None = None, slow_s: float = 5.0) -> None:
        host_port = upstream.split("//", 1)[1].split("/", 1)[0]
        self.up_host, up_port = host_port.split(":")
        self.up_port = int(up_port)
        self.plan: Plan = plan or (lambda k, n, b: "pass")
        self.slow_s = slow_s
        self.attempts: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.hold_after: int | None = None
        self.held = 0
        # requests let through to the server (counted when admitted, not when answered,
        # so concurrent requests cannot slip past `hold_after`)
        self.admitted = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._release: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._release = asyncio.Event()
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def release_held(self) -> None:
        """Held requests are answered 503 and never reach the server."""
        self._loop.call_soon_threadsafe(self._release.set)  # type: ignore[union-attr]

    def reset(self, plan: Plan | None = None) -> None:
        with self._lock:
            self.plan = plan or (lambda k, n, b: "pass")
            self.attempts.clear()
            self.forwarded.clear()
            self.injected.clear()
            self.hold_after, self.held, self.admitted = None, 0, 0

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, dict, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return lines[0].encode("latin-1"), headers, body

    async def _forward(self, start: bytes, headers: dict, body: bytes) -> bytes:
        r, w = await asyncio.open_connection(self.up_host, self.up_port)
        hdrs = {k: v for k, v in headers.items() if k not in ("host", "connection")}
        hdrs.update(
            {
                "host": f"{self.up_host}:{self.up_port}",
                "connection": "close",
                "content-length": str(len(body)),
            }
        )
        w.write(
            start
            + b"\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()).encode("latin-1")
            + b"\r\n"
            + body
        )
        await w.drain()
        data = await r.read()
        w.close()
        return data

    @staticmethod
    def _response(code: int, reason: str, body: bytes, extra: str = "") -> bytes:
        return (
            f"HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
        ).encode() + body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            start, headers, raw = await self._read_request(reader)
            body = json.loads(raw) if raw else {}
            is_chat = b"/chat/completions" in start
            action = "pass"
            if is_chat:
                key = row_key(body)
                with self._lock:
                    n = self.attempts[key]
                    self.attempts[key] += 1
                    action = self.plan(key, n, body)
                    if self.hold_after is not None and self.admitted >= self.hold_after:
                        action = "hold"
                        self.held += 1
                    elif action == "pass":
                        self.admitted += 1
                    if action != "pass":
                        self.injected[action] += 1
            if action == "hold":
                await self._release.wait()  # type: ignore[union-attr]
                writer.write(self._response(503, "Service Unavailable", b'{"error":"held"}'))
            elif action == "drop":
                writer.transport.abort()
                return
            elif action == "slow":
                await asyncio.sleep(self.slow_s)
                writer.transport.abort()
                return
            elif action == "http500":
                writer.write(
                    self._response(
                        500, "Internal Server Error", b'{"error":{"message":"injected 500"}}'
                    )
                )
            elif action == "echo_auth":
                msg = json.dumps(
                    {"error": {"message": "bad auth header: " + headers.get("authorization", "")}}
                ).encode()
                writer.write(self._response(500, "Internal Server Error", msg))
            elif action == "http429":
                writer.write(
                    self._response(
                        429,
                        "Too Many Requests",
                        b'{"error":{"message":"slow down"}}',
                        "retry-after: 0\r\n",
                    )
                )
            elif action == "malformed":
                writer.write(self._response(200, "OK", b'{"id":"chatcmpl-1","choices":[{"mes'))
            elif action == "reject_rf" and "response_format" in body:
                writer.write(
                    self._response(
                        400,
                        "Bad Request",
                        b'{"error":{"message":"response_format json_schema is not supported"}}',
                    )
                )
            else:
                resp = await self._forward(start, headers, raw)
                head, _, payload = resp.partition(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                if is_chat and status == 200:
                    with self._lock:
                        self.forwarded[row_key(body)] += 1
                    if action == "garbage":
                        doc = json.loads(payload)
                        doc["choices"][0]["message"]["content"] = "I am not sure, it depends."
                        payload = json.dumps(doc).encode()
                        resp = self._response(200, "OK", payload)
                writer.write(resp)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


# -- shards -------------------------------------------------------------------------------


def make_rows(n: int, seed: int = 0, prefix: str = "r") -> list[dict]:
    """Rollout rows in the `rollouts` schema, with tiny-world word-soup responses."""
    from asteer_build.inputs.tinyworld import CONCEPT_WORDS, WORDS

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        concept = CONCEPT_WORDS[i % len(CONCEPT_WORDS)]
        k = rng.randint(0, 30)
        resp = " ".join(rng.choice(WORDS) for _ in range(k))
        rows.append(
            {
                "id": f"{prefix}{seed}-{i:04d}",
                "model": "tiny",
                "method": "diffmean",
                "concept_id": f"c{i % len(CONCEPT_WORDS)}",
                "concept": concept,
                "concept_level": "mid",
                "prompt_id": f"p{i}",
                "prompt": f"question {i}: {rng.choice(WORDS)} {rng.choice(WORDS)}?",
                "layer": 2,
                "alpha": float(i % 5),
                "response": resp,
            }
        )
    return rows


def write_shard(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def read_dir(path: Path) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(path.glob("*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def run_cli(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "judge.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
