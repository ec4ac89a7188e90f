"""Keep API keys out of every log line, output file and cache entry.

Keys are only ever read from environment variables named in the config. Each value read
is registered here, and everything the judge writes that could carry text from a server
or an exception (log records, `judge_error` cells) passes through `redact` first: an
error message that echoes a header is the usual way keys leak.
"""

from __future__ import annotations

import logging
import os

__all__ = ["api_key_from_env", "redact", "RedactingFilter", "install_log_redaction"]

_SECRETS: set[str] = set()
MASK = "***"


def api_key_from_env(env_name: str | None, *, required: bool = False) -> str | None:
    """Read a key by variable name; the name may be logged, the value never is."""
    if not env_name:
        return None
    value = os.environ.get(env_name)
    if not value:
        if required:
            raise KeyError(f"environment variable {env_name} is not set")
        return None
    if len(value) >= 4:  # masking 1-3 character strings would mangle ordinary text
        _SECRETS.add(value)
    return value


def redact(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Formats the record once, then masks secrets in the final message text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            msg = redact(record.getMessage())
            record.msg, record.args = msg, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


def install_log_redaction() -> None:
    """Attach the filter to every root handler, where all library loggers end up."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
