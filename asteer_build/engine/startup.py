"""Why an engine failed to start, in the exception its caller sees.

vLLM starts its engine core (and, with tensor parallelism, its workers) in child
processes. When one of them fails while starting, the parent only learns that it died:
"Engine core initialization failed. See root cause above". The cause is in the child's
stderr, which a quiet `asteer-build run` sends to `logs/build.log`, so the terminal would
show a sentence pointing at nothing.

So around a start, `reporting_start_errors` names a fresh folder in the environment
(`START_ERRORS_ENV`, inherited by the children: a channel from parent to child, not a
setting), and the `asteer` plugin, which vLLM loads in every engine-core and worker
process, adds `FirstErrorHandler` to vLLM's logger there. vLLM logs a failed start with
its exception ("EngineCore failed to start.", "WorkerProc failed to start."); the handler
writes the first such exception's first line into the folder, and the parent raises
`EngineStartError` with it. Once the start is over the folder is gone, so a child that
fails later writes nothing anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

__all__ = ["START_ERRORS_ENV", "EngineStartError", "FirstErrorHandler", "install_reporter",
           "reporting_start_errors", "start_with_cause"]

START_ERRORS_ENV = "ASTEER_ENGINE_START_ERRORS"
_FIRST = "first-error.txt"
_lock = threading.Lock()
T = TypeVar("T")


class EngineStartError(RuntimeError):
    """An engine did not start; the message carries the child process's own error."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class FirstErrorHandler(logging.Handler):
    """Writes the first logged exception of this process into the start's folder."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        folder = os.environ.get(START_ERRORS_ENV)
        exc = record.exc_info[1] if record.exc_info else None
        if not folder or exc is None:
            return
        try:  # O_EXCL: the first error of any process wins, as the first cause
            fd = os.open(os.path.join(folder, _FIRST), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o600)
        except OSError:  # already written, or the start is over (folder removed)
            return
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(first_line(exc))


def install_reporter() -> None:
    """Called by the plugin in every vLLM process; idempotent (a forked child inherits
    the parent's handler)."""
    log = logging.getLogger("vllm")
    if not any(isinstance(h, FirstErrorHandler) for h in log.handlers):
        log.addHandler(FirstErrorHandler())


@contextlib.contextmanager
def reporting_start_errors() -> Iterator[Callable[[], str | None]]:
    """For the block of one engine start: yields a function returning the first error
    line a process reported (None if none did). One start at a time per process, since
    the environment is shared."""
    with _lock:
        folder = tempfile.mkdtemp(prefix="asteer-start-")
        old = os.environ.get(START_ERRORS_ENV)
        os.environ[START_ERRORS_ENV] = folder

        def cause() -> str | None:
            p = Path(folder) / _FIRST
            return p.read_text(encoding="utf-8").strip() or None if p.is_file() else None

        try:
            yield cause
        finally:
            if old is None:
                os.environ.pop(START_ERRORS_ENV, None)
            else:
                os.environ[START_ERRORS_ENV] = old
            shutil.rmtree(folder, ignore_errors=True)


def start_with_cause(start: Callable[[], T]) -> T:
    """`start()` (an engine constructor); a failure whose message lacks the cause a
    child process reported is raised again as `EngineStartError` naming that cause."""
    install_reporter()  # an in-process engine core logs in this process
    with reporting_start_errors() as cause:
        try:
            return start()
        except Exception as e:
            why = cause()
            if why is None or why in str(e):
                raise
            raise EngineStartError(f"engine start failed: {why}") from e
