"""A prepared build: the config, its plan, the run folder and the user's options.

It sits below `build` and the executors, so each can take a `Run` without importing the
other: `build` picks an executor by name (`executors.get_executor`) and hands it the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import BuildConfig
from .plan import Plan, Shard
from .shards import Manifest, Store

__all__ = ["STAGE_ORDER", "RunOptions", "Run", "pending_shards"]

#: user-facing stages; `rollouts` also writes features / activations when capturing
STAGE_ORDER = ("vectors", "rollouts", "judge")


@dataclass
class RunOptions:
    out: str | None = None
    #: a name in `executors.EXECUTORS`
    executor: str = "local"
    rerun_shards: list[int] = field(default_factory=list)
    rerun_failed: bool = False
    stages: tuple[str, ...] = STAGE_ORDER
    progress: bool = True
    #: submit Batch API judge work beyond `judge.batch.cost_cap_usd`
    yes: bool = False
    #: judge after the last rollouts shard, not as shards commit (`judge_stage`)
    sequential: bool = False


@dataclass
class Run:
    cfg: BuildConfig
    plan: Plan
    store: Store
    manifest: Manifest
    opts: RunOptions


def pending_shards(run: Run) -> list[Shard]:
    """The plan's shards whose rollouts the manifest does not hold yet (a rerun skips the
    rest)."""
    return [s for s in run.plan.shards if not run.manifest.is_committed("rollouts", s.name)]
