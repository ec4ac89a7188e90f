"""What `asteer-build run` and `demo` show on the terminal, and where the rest goes.

vLLM, Ray, transformers and friends print hundreds of lines per engine start, many of
them from child processes (vLLM's engine core and workers, Ray's log monitor) that no
Python `logging` setting of ours reaches. So a quiet run redirects the file descriptors
1 and 2 themselves to a log file in the run folder: children inherit them and write
there too. Our own output (stage lines, progress bars, the short human summary) goes
through this module to duplicates of the terminal's descriptors taken before the
redirect. Everything that talks to the user goes through `console`, so there is one
place that decides where a line goes.

Without a `quiet()` block (`--verbose`, the library used from Python, tests calling
`run_build` in-process) the console writes to `sys.stderr` / `sys.stdout` as before.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["Console", "console", "LOG_FORMAT"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("asteer_build")


class Console:
    """The terminal, as seen by our own code, whether or not fds 1/2 are redirected."""

    def __init__(self) -> None:
        self._out: IO[str] | None = None  # the terminal's stdout while quiet
        self._err: IO[str] | None = None  # the terminal's stderr while quiet
        #: the log file of the current (or last) quiet block: named in error messages
        self.log_path: Path | None = None
        #: `--json`: stdout is for the summary JSON only; the human summary moves to stderr
        self.json = False

    @property
    def quiet(self) -> bool:
        return self._err is not None

    @property
    def err(self) -> IO[str]:
        """Stage lines and progress bars: the terminal's stderr."""
        return self._err or sys.stderr

    @property
    def out(self) -> IO[str]:
        """The human summary: the terminal's stdout, or stderr with `--json` (scripts
        read stdout then, and want JSON only)."""
        if self.json:
            return self.err
        return self._out or sys.stdout

    def say(self, msg: str, level: int = logging.INFO) -> None:
        """A short line for the user (stage started/done, a lost Ray actor).

        It also goes to the log file while quiet, so the log reads as a complete story;
        when not quiet the terminal *is* the log and it is written once."""
        print(msg, file=self.err, flush=True)
        if self.quiet:
            log.log(level, msg)

    def summary(self, text: str) -> None:
        """The short human summary at the end of a command (also kept in the log)."""
        print(text, file=self.out, flush=True)
        if self.quiet:
            print(text, file=sys.stdout, flush=True)

    def progress(self, **kw: Any) -> Any:
        """A tqdm bar on the terminal (other libraries' bars go to the log file)."""
        from tqdm import tqdm

        return tqdm(file=self.err, **kw)

    @contextlib.contextmanager
    def quiet_to(self, log_path: str | Path, header: str = "") -> Iterator[Path]:
        """Send fds 1 and 2, and the root logger, to `log_path` (appended) for the block.

        Restores everything on exit. An exception leaving the block has its traceback
        written to the log first; the caller prints the one-line error to the terminal
        (see `cli.main`), naming `self.log_path`.
        """
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        root = logging.getLogger()
        old_handlers = root.handlers[:]
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        try:
            self._out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8",
                                  errors="replace")
            self._err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8",
                                  errors="replace")
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            self.log_path = path
            root.handlers = [handler]
            print(f"log: {path} (--verbose shows it here instead)", file=self._err)
            print(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} "
                  f"{header}".rstrip(), file=sys.stderr, flush=True)
            try:
                yield path
            except BaseException:
                traceback.print_exc(file=sys.stderr)
                raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.handlers = old_handlers
            handler.close()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in (self._out, self._err):
                if f is not None:
                    f.close()
            self._out = self._err = None
            for d in (*saved, fd):
                os.close(d)

    def log_hint(self) -> str:
        """` (full log: PATH)` after an error message, when a quiet block wrote one."""
        return f" (full log: {self.log_path})" if self.log_path else ""


#: the process's one console
console = Console()


def add_output_flags(sp: argparse.ArgumentParser) -> None:
    """`--verbose` and `--json` of the long commands (`run`, `demo`)."""
    sp.add_argument("--verbose", action="store_true",
                    help="show every log line (vLLM, Ray, ...) here instead of in the run "
                         "folder's log file")
    sp.add_argument("--json", action="store_true",
                    help="also print the full summary as JSON on stdout (it is always in the "
                         "run folder's summary.json)")


def quiet_for(args: argparse.Namespace, log_path: str | os.PathLike[str], what: str
              ) -> contextlib.AbstractContextManager[Any]:
    """The block of a long command whose output goes to `log_path`, unless `--verbose`."""
    if args.verbose:
        return contextlib.nullcontext()
    return console.quiet_to(log_path, what)
