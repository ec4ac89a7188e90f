"""Token counts for estimates (plan's judge cost, the batch stage's wave budget).

The judge model's own tokenizer is used where it can be had offline: `tiktoken` (in the
lock) when `TIKTOKEN_CACHE_DIR` names a folder holding its encoding files, since
tiktoken otherwise downloads them on first use and estimates must never go online.
Everywhere else the count is the documented rule of thumb of about 4 characters per
token for English text, and `method()` says which one was used, so a printed estimate
never claims more precision than it has.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["count_tokens", "count_messages", "method", "CHARS_PER_TOKEN", "MESSAGE_OVERHEAD"]

CHARS_PER_TOKEN = 4
#: chat-format tokens per message (role and separators), as the API counts them
MESSAGE_OVERHEAD = 4


@functools.lru_cache(maxsize=8)
def _encoding(model: str) -> Any:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache or not os.path.isdir(cache):
        return None
    try:
        import tiktoken

        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:  # a model tiktoken does not know: the current OpenAI encoding
            return tiktoken.get_encoding("o200k_base")
    except Exception:  # encoding files absent or unreadable: fall back, never download
        return None


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
