"""A loopback stand-in for the Hugging Face Hub, shared by the upload tests: it records
every request; repo creation and YAML validation succeed, the rest answer 404 (so an
upload is seen starting, against the right repo, with the right token)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator


class RecordingHub(http.server.BaseHTTPRequestHandler):
    log: list[dict] = []

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        self.log.append({"method": self.command, "path": self.path,
                         "auth": self.headers.get("Authorization"), "body": body})
        if self.command == "POST" and self.path == "/api/repos/create":
            out = json.dumps({"url": f"http://{self.headers['Host']}/datasets/asteer-org/x",
                              "name": "asteer-org/x"}).encode()
            self.send_response(200)
        elif self.path == "/api/validate-yaml":
            out = b'{"errors": [], "warnings": []}'
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


@contextlib.contextmanager
def loopback_hub() -> Iterator[tuple[str, list[dict]]]:
    """(endpoint URL, the request log) of a fresh stand-in Hub on 127.0.0.1."""
    log: list[dict] = []
    handler = type("Hub", (RecordingHub,), {"log": log})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", log
    finally:
        srv.shutdown()
        srv.server_close()
