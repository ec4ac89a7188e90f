"""The one check every config section makes of its keys: a typo is an error naming the
field (`section.key`) and the fields that section knows, before anything runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["reject_unknown"]


def reject_unknown(section: Mapping[str, Any], where: str, known: Sequence[str]) -> None:
    """ValueError at the first key of `section` not in `known` (listed in the order
    given)."""
    for k in section:
        if k not in known:
            raise ValueError(f"{where}.{k}: unknown field (known: {', '.join(known)})")
