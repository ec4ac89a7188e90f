"""A loopback server with the subset of the OpenAI Files and Batches endpoints that
`judge.batches` uses, processing each batch line with a deterministic canned judge.

Endpoints: POST /v1/files (multipart), GET /v1/files, GET /v1/files/{id}/content,
POST /v1/batches, GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.
A batch goes validating -> in_progress -> (after `polls_to_finish` retrieves, and only
while `hold` is clear) a terminal status, and its output and error files are written
then, as the real service does.

Knobs: `expire_batches` (names from our metadata: the batch expires after answering
only its first half, the rest go to the error file as `batch_expired`),
`fail_batches` (refused whole at validation, status `failed` with `errors`), and
`line_action(custom_id, attempt) -> ok | error | http500 | garbage` (attempt counts
from 0 over the batches that carried the line). The answer of an ok line is
`canned_label(custom_id)`, so a test can tell a real answer from a guessed one.

`finish_after_s` makes batches finish by time instead (that many seconds after their
creation, at the next retrieve), as the real service's do: a benchmark sets it to make
judging take as long as it wants. POST /v1/chat/completions is a live judge answering
after `chat_latency_s` with `canned_label` of the request's last message (so a row's
label depends on the row alone, whichever path judged it); `chat_times` records when
each call arrived.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import hashlib
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def batch_judge(url: str, key_env: str = "BATCH_TEST_KEY") -> dict[str, Any]:
    """A config's `judge:` for this server: judge-b, four requests per file, fast polls."""
    return {"kind": "openai-batch", "model": "judge-b",
            "endpoints": [{"base_url": url, "api_key_env": key_env}],
            "batch": {"max_requests_per_file": 4, "poll_initial_s": 0.05, "poll_max_s": 0.2}}


def canned_label(custom_id: str) -> int:
    return int(hashlib.sha256(custom_id.encode()).hexdigest(), 16) % 3


class BatchServer:
    def __init__(self, api_key: str, polls_to_finish: int = 1,
                 finish_after_s: float | None = None, chat_latency_s: float = 0.0,
                 niceness: int = 0, cpus: set[int] | None = None) -> None:
        self.api_key = api_key
        #: the CPUs its request threads may run on (None: any): a benchmark keeps the
        #: stand-in for a remote service off the engine's core
        self.cpus = cpus
        #: the request threads' CPU niceness. A benchmark's server stands for a remote
        #: service, whose turnaround does not depend on the load of the machine it
        #: serves: below 0 it answers at once instead of waiting out the time slices
        #: of the build's threads (its little CPU then comes out of the build's share);
        #: without the privilege a negative niceness needs, it runs at the default
        self.niceness = niceness
        self.polls_to_finish = polls_to_finish
        self.finish_after_s = finish_after_s
        self.chat_latency_s = chat_latency_s
        self.chat_times: list[float] = []
        self.hold = threading.Event()  # set: batches stay in_progress
        self.expire_batches: set[str] = set()
        self.fail_batches: set[str] = set()  # refused whole at validation
        self.line_action: Callable[[str, int], str] = lambda cid, attempt: "ok"
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.submitted: Counter[str] = Counter()  # custom_id -> batches that carried it
        self.retrieves = 0
        self.max_active = 0
        self.auth_failures = 0
        self._lock = threading.Lock()
        self._n = 0

    # -- helpers ----------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n:05d}"

    def _add_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        fid = self._id("file")
        f = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
             "filename": filename, "purpose": purpose, "status": "processed", "_data": data}
        self.files[fid] = f
        return f

    @staticmethod
    def _public(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not k.startswith("_")}

    def _active(self) -> int:
        return sum(b["status"] in ("validating", "in_progress", "finalizing", "cancelling")
                   for b in self.batches.values())

    def _advance(self, b: dict[str, Any]) -> None:
        if b["status"] == "cancelling":
            self._finish(b, "cancelled", answer=0)
            return
        if b["status"] == "validating":
            if (b.get("metadata") or {}).get("asteer_name") in self.fail_batches:
                b["status"] = "failed"
                b["errors"] = {"object": "list", "data": [
                    {"code": "invalid_file", "message": "canned refusal", "line": None}]}
            else:
                b["status"] = "in_progress"
            return
        if b["status"] != "in_progress" or self.hold.is_set():
            return
        b["_polls"] += 1
        if self.finish_after_s is not None:
            if time.time() - b["_created"] < self.finish_after_s:
                return
        elif b["_polls"] < self.polls_to_finish:
            return
        lines = b["_lines"]
        if (b.get("metadata") or {}).get("asteer_name") in self.expire_batches:
            self._finish(b, "expired", answer=len(lines) // 2)
        else:
            self._finish(b, "completed", answer=len(lines))

    def _finish(self, b: dict[str, Any], status: str, answer: int) -> None:
        out, err = [], []
        for i, line in enumerate(b["_lines"]):
            cid = line["custom_id"]
            rid = f"req-{cid[:8]}-{b['id']}"
            if i >= answer:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                err.append({"id": rid, "custom_id": cid, "response": None,
                            "error": {"code": code, "message": f"not processed: {status}"}})
                continue
            act = self.line_action(cid, b["_attempts"][cid])
            if act == "error":
                err.append({"id": rid, "custom_id": cid, "response": None,
                            "error": {"code": "server_error", "message": "canned failure"}})
            elif act == "http500":
                out.append({"id": rid, "custom_id": cid, "error": None,
                            "response": {"status_code": 500, "request_id": rid,
                                         "body": {"error": {"message": "internal"}}}})
            else:
                text = (json.dumps({"explanation": "canned", "label": canned_label(cid)})
                        if act == "ok" else "I would rather not say.")
                out.append({"id": rid, "custom_id": cid, "error": None,
                            "response": {"status_code": 200, "request_id": rid, "body": {
                                "id": rid, "object": "chat.completion", "model": "canned",
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant",
                                                         "content": text}}]}}})
        b["status"] = status
        for key, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                data = "".join(json.dumps(r) + "\n" for r in rows).encode()
                b[key] = self._add_file(f"{b['id']}-{key}.jsonl", "batch_output", data)["id"]
        b["request_counts"] = {"total": len(b["_lines"]), "completed": len(out),
                               "failed": len(err)}

    def _chat(self, req: dict[str, Any]) -> dict[str, Any]:
        """A live judgment: the canned label of the last message, after the latency
        (outside the lock: calls overlap as on a real endpoint)."""
        with self._lock:
            self.chat_times.append(time.time())
        time.sleep(self.chat_latency_s)
        text = json.dumps({"explanation": "canned",
                           "label": canned_label(req["messages"][-1]["content"])})
        return {"id": f"chat-{len(self.chat_times)}", "object": "chat.completion",
                "model": req.get("model", "canned"), "created": int(time.time()),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    # -- HTTP -------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            self.auth_failures += 1
            return 401, {"error": {"message": "bad key"}}
        path = path.split("?")[0]
        if method == "POST" and path == "/v1/chat/completions":
            return 200, self._chat(json.loads(body))
        with self._lock:
            if method == "POST" and path == "/v1/files":
                msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                    b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                parts = {p.get_param("name", header="content-disposition"): p
                         for p in msg.iter_parts()}
                fpart = parts["file"]
                purpose = parts["purpose"].get_content().strip()
                return 200, self._public(self._add_file(fpart.get_filename(), purpose,
                                                        fpart.get_payload(decode=True)))
            if method == "GET" and path == "/v1/files":
                return 200, {"object": "list", "has_more": False,
                             "data": [self._public(f) for f in self.files.values()]}
            m = re.fullmatch(r"/v1/files/([^/]+)/content", path)
            if method == "GET" and m:
                return 200, self.files[m.group(1)]["_data"]
            if method == "POST" and path == "/v1/batches":
                req = json.loads(body)
                lines = [json.loads(x) for x in
                         self.files[req["input_file_id"]]["_data"].decode().splitlines()]
                attempts = {}
                for line in lines:
                    attempts[line["custom_id"]] = self.submitted[line["custom_id"]]
                    self.submitted[line["custom_id"]] += 1
                bid = self._id("batch")
                b = {"id": bid, "object": "batch", "endpoint": req["endpoint"],
                     "input_file_id": req["input_file_id"],
                     "completion_window": req["completion_window"], "status": "validating",
                     "created_at": int(time.time()), "metadata": req.get("metadata"),
                     "output_file_id": None, "error_file_id": None,
                     "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                     "_lines": lines, "_attempts": attempts, "_polls": 0,
                     "_created": time.time()}
                self.batches[bid] = b
                self.max_active = max(self.max_active, self._active())
                return 200, self._public(b)
            if method == "GET" and path == "/v1/batches":
                return 200, {"object": "list", "has_more": False,
                             "data": [self._public(b) for b in self.batches.values()]}
            m = re.fullmatch(r"/v1/batches/([^/]+)(/cancel)?", path)
            if m and m.group(1) in self.batches:
                b = self.batches[m.group(1)]
                if m.group(2) and method == "POST":
                    if b["status"] in ("validating", "in_progress"):
                        b["status"] = "cancelling"
                elif method == "GET":
                    self.retrieves += 1
                    self._advance(b)
                return 200, self._public(b)
        return 404, {"error": {"message": f"no route {method} {path}"}}


def _handler(server: BatchServer) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out as two writes: with Nagle on, the body waits for the
        # client's delayed ACK of the headers (~40 ms a call on loopback keep-alive)
        disable_nagle_algorithm = True

        def log_message(self, *a: Any) -> None:  # quiet
            pass

        def _go(self, method: str) -> None:
            if server.niceness:
                with contextlib.suppress(PermissionError):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                                   server.niceness)
            if server.cpus:
                os.sched_setaffinity(threading.get_native_id(), server.cpus)
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            code, payload = server.handle(method, self.path, self.headers, body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream"
                             if isinstance(payload, bytes) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._go("GET")

        def do_POST(self) -> None:
            self._go("POST")

    return H


@contextlib.contextmanager
def batch_server(api_key: str, **kw: Any) -> Iterator[tuple[BatchServer, str]]:
    """Yields (server state, base URL `http://127.0.0.1:PORT/v1`)."""
    state = BatchServer(api_key, **kw)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
