"""Token counts for estimates (plan's judge cost, the batch stage's wave budget).

The judge model's own tokenizer is used where it can be had offline: `tiktoken` (in the
lock) when its encoding files are already in its cache (`TIKTOKEN_CACHE_DIR`, else its
default folder). tiktoken downloads a missing file on first use; estimates must never
go online, so its fetch is refused for the duration of the load.
Everywhere else the count is the documented rule of thumb of about 4 characters per
token for English text, and `method()` says which one was used, so a printed estimate
never claims more precision than it has.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["count_tokens", "count_messages", "method", "CHARS_PER_TOKEN", "MESSAGE_OVERHEAD"]

CHARS_PER_TOKEN = 4
#: chat-format tokens per message (role and separators), as the API counts them
MESSAGE_OVERHEAD = 4


@functools.lru_cache(maxsize=8)
def _encoding(model: str) -> Any:
    try:
        import tiktoken
        import tiktoken.load as tl
    except ImportError:
        return None
    fetch = tl.read_file

    def cached_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise OSError(f"{blobpath}: not in tiktoken's cache, and estimates stay offline")
        return fetch(blobpath)

    tl.read_file = cached_only
    try:
        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:  # a model tiktoken does not know: the current OpenAI encoding
            return tiktoken.get_encoding("o200k_base")
    except Exception:  # encoding files absent or unreadable: fall back, never download
        return None
    finally:
        tl.read_file = fetch


def method(model: str) -> str:
    """`tiktoken:<encoding>` or `chars/4`."""
    enc = _encoding(model)
    return f"tiktoken:{enc.name}" if enc is not None else f"chars/{CHARS_PER_TOKEN}"


def count_tokens(text: str, model: str) -> int:
    enc = _encoding(model)
    if enc is not None:
        return len(enc.encode(text, disallowed_special=()))
    return -(-len(text) // CHARS_PER_TOKEN)


def count_messages(messages: list[dict[str, Any]], model: str) -> int:
    """Input tokens of one chat request."""
    return sum(MESSAGE_OVERHEAD + count_tokens(str(m.get("content") or ""), model)
               for m in messages)
