"""A loopback S3 API for tests and benchmarks: moto's S3 (state in memory) behind a
request counter, and a TCP proxy in front of it that can cut the link or make it slow.

What the counter records is what an object store bills and what the builder promises
about: one upload per committed shard, no CopyObject or DeleteObject (an object store
has no rename), manifest bytes per commit. The proxy forwards bytes, not HTTP, so
whatever the AWS SDK sends (keep-alive, multipart, retries) goes through unchanged; a
cut closes every open connection and refuses new ones, as a network outage does, while
the server behind it keeps its objects (restarting moto would lose them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["S3Server", "S3Request", "LinkProxy", "s3_env", "s3_server"]

BUCKET = "asteer-test"


def s3_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the loopback S3 API, and nothing that leaves the
    machine: without AWS_EC2_METADATA_DISABLED the SDK probes the instance-metadata
    address for credentials."""
    return {"AWS_ACCESS_KEY_ID": "asteer-test-key", "AWS_SECRET_ACCESS_KEY": "asteer-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass(frozen=True)
class S3Request:
    """One request the server answered: the S3 operation, the key it names, its body size."""

    op: str
    bucket: str
    key: str
    bytes: int
    status: int


def _operation(method: str, key: str, query: dict[str, list[str]], copy: bool) -> str:
    if method == "PUT":
        if "partNumber" in query:
            return "UploadPart"
        if copy:
            return "CopyObject"
        return "CreateBucket" if not key else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        if "delete" in query:
            return "DeleteObjects"
        return "Post"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    if method == "HEAD":
        return "HeadObject" if key else "HeadBucket"
    if method == "GET":
        return "GetObject" if key else "ListObjects"
    return method


class S3Server:
    """moto's S3 in a thread on 127.0.0.1, every answered request recorded in order."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.requests: list[S3Request] = []
        self._lock = threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ, start_response):
            path = urllib.parse.unquote(environ.get("PATH_INFO", ""))
            bucket, _, key = path.lstrip("/").partition("/")
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""),
                                          keep_blank_values=True)
            op = _operation(environ["REQUEST_METHOD"], key, query,
                            "HTTP_X_AMZ_COPY_SOURCE" in environ)
            size = int(environ.get("CONTENT_LENGTH") or 0)
            status = [0]

            def start(st, headers, *a):
                status[0] = int(st.split()[0])
                return start_response(st, headers, *a)

            out = app(environ, start)
            with self._lock:
                self.requests.append(S3Request(op, bucket, key, size, status[0]))
            return out

        self._srv = make_server("127.0.0.1", 0, counted, threaded=True)
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mark(self) -> int:
        """Where the log is now: `since(mark)` gives what came after."""
        with self._lock:
            return len(self.requests)

    def since(self, mark: int = 0) -> list[S3Request]:
        with self._lock:
            return list(self.requests[mark:])

    def ops(self, mark: int = 0, prefix: str = "") -> collections.Counter[str]:
        return collections.Counter(r.op for r in self.since(mark) if r.key.startswith(prefix))

    def close(self) -> None:
        self._srv.shutdown()
        self._thread.join(10)


class LinkProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port).

    `cut()` closes every open connection and refuses new ones until `restore()`.
    `latency_s` delays each forwarded chunk; `bandwidth` (bytes/s, shared by all
    connections in the client-to-server direction) paces uploads, as a thin uplink does.
    """

    def __init__(self, upstream_port: int, *, latency_s: float = 0.0,
                 bandwidth: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.latency_s, self.bandwidth = latency_s, bandwidth
        self.down = False
        self.refused = 0
        self.uploaded = 0
        self._conns: set[asyncio.StreamWriter] = set()
        self._next_free = 0.0  # the shared uplink's next free instant (monotonic)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("link proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upload: bool) -> None:
        try:
            while data := await reader.read(65536):
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if upload and self.bandwidth:
                    now = time.monotonic()
                    start = max(now, self._next_free)
                    self._next_free = start + len(data) / self.bandwidth
                    await asyncio.sleep(self._next_free - now)
                if upload:
                    self.uploaded += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_w))
        try:
            await asyncio.gather(self._pipe(reader, up_w, True), self._pipe(up_r, writer, False))
        finally:
            self._conns.difference_update((writer, up_w))

    def cut(self) -> None:
        def _cut() -> None:
            self.down = True
            for w in list(self._conns):
                w.transport.abort()

        self._loop.call_soon_threadsafe(_cut)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "down", False)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for w in list(self._conns):
                w.transport.abort()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def s3_server(*, proxy: bool = False, **link: float | None) -> Iterator[tuple[S3Server, str]]:
    """A loopback S3 server with the test bucket made; yields (server, endpoint URL the
    clients use): the server itself, or a `LinkProxy` in front of it (`.proxy` on the
    server) when `proxy` or any link setting is given."""
    srv = S3Server()
    lp = None
    try:
        import boto3

        boto3.client("s3", endpoint_url=srv.url, region_name="us-east-1",
                     aws_access_key_id="k", aws_secret_access_key="s").create_bucket(
            Bucket=BUCKET)
        if proxy or any(v for v in link.values()):
            lp = LinkProxy(srv.port, **link)
        srv.proxy = lp  # type: ignore[attr-defined]
        yield srv, (lp.url if lp else srv.url)
    finally:
        if lp is not None:
            lp.close()
        srv.close()
