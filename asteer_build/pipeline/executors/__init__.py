"""Executors by name: `get_executor("local")`, `get_executor("ray")`.

Each entry imports its module only when asked for, so naming the local executor never
imports Ray. A new executor is one subclass of `Executor` and one line here.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Executor, OnCommit, RolloutTally, ShardRecord

__all__ = ["EXECUTORS", "get_executor", "Executor", "OnCommit", "RolloutTally", "ShardRecord"]


def _local() -> type[Executor]:
    from .local import LocalExecutor

    return LocalExecutor


def _ray() -> type[Executor]:
    from .ray import RayExecutor

    return RayExecutor


#: executor name -> its class, loaded on demand
EXECUTORS: dict[str, Callable[[], type[Executor]]] = {"local": _local, "ray": _ray}


def get_executor(name: str) -> type[Executor]:
    """The executor class called `name`; a ValueError naming the known ones otherwise."""
    load = EXECUTORS.get(name) if isinstance(name, str) else None
    if load is None:
        raise ValueError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    return load()
