"""What every adapter shares; a module of its own so the adapters never import their
package (which imports them)."""

from __future__ import annotations

from typing import Any


class UnsupportedVLLMError(RuntimeError):
    pass


def new_request_prompt_len(new_req: Any) -> int:
    """Prompt length of a scheduler `NewRequestData`, across the field names runners use."""
    ids = getattr(new_req, "prompt_token_ids", None)
    if ids is None:
        ids = getattr(new_req, "prefill_token_ids", None) or []
    return len(ids)
