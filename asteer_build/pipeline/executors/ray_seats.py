"""The engine seats of a Ray build: one placement group per model replica, sized to
the model's tensor parallelism, and the driver's record of the actor in each.

A seat outlives its actors: a dead actor is replaced in the same placement group, and a
placement group whose node is lost is placed again by Ray when a node with the
resources joins, so the seat (not the actor) is what the driver waits on and, after
`ray.node_wait_s`, gives up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..plan import Shard

if TYPE_CHECKING:
    from ..config import ModelConfig

__all__ = ["Slot", "judge_room", "placement_groups", "short", "last_line"]


@dataclass
class Slot:
    """One engine seat: an actor (replaced when it dies) in its placement group."""

    key: str
    model: str
    pg: Any
    actor: Any = None
    ready: bool = False
    start_ref: Any = None
    started_at: float = 0.0
    placement_checked: float = 0.0
    inflight: dict[Any, tuple[Shard, float]] = field(default_factory=dict)
    restarts: int = 0
    shards: int = 0
    items: int = 0
    tokens: int = 0
    pid: int | None = None
    #: the actor's host name (`ShardRecord.host`)
    host: str = "?"
    health_ref: Any = None
    health_sent: float = 0.0
    t_first: float | None = None
    #: the engine's CPU niceness on its node (`_engine_priority`)
    niceness: int | None = None
    #: the Ray node id of its current (else last) actor
    node: str = "?"
    #: starts failed in a row (a start that succeeds resets it)
    start_failures: int = 0
    #: since when its placement group has had no node (its node lost), else None
    unplaced_since: float | None = None
    #: given up: no node came back within `node_wait_s`
    lost: bool = False


def short(node: str) -> str:
    return node[:12]


def last_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _resources(cluster: dict[str, float], tp: int, cpus: float) -> tuple[list[dict], dict]:
    if cluster.get("GPU", 0) >= 1:
        bundles = [{"GPU": 1.0, "CPU": 1.0} for _ in range(tp)]
        actor = {"num_gpus": 1.0 if tp == 1 else 0, "num_cpus": 1.0 if tp == 1 else 0}
    else:
        bundles = [{"CPU": cpus}]
        actor = {"num_cpus": cpus}
    return bundles, actor


def _replicas(model: ModelConfig, cluster: dict[str, float], cpus: float, n_shards: int) -> int:
    if model.replicas:
        return model.replicas
    if cluster.get("GPU", 0) >= 1:
        n = int(cluster["GPU"] // model.tensor_parallel_size)
    else:
        n = int(cluster.get("CPU", 1) // cpus)
    return max(1, min(n, n_shards))


def placement_groups(model: ModelConfig, cluster: dict[str, float], cpus: float,
                     n_shards: int) -> tuple[list[Any], dict[str, float]]:
    """One placement group per replica of `model` (its tensor-parallel GPUs as bundles,
    Ray's default PACK strategy: one node when one has room, else across nodes), and
    the options of the engine actor placed in it."""
    from ray.util.placement_group import placement_group

    bundles, actor_opts = _resources(cluster, model.tensor_parallel_size, cpus)
    n = _replicas(model, cluster, cpus, n_shards)
    return [placement_group(bundles) for _ in range(n)], actor_opts


def judge_room(cluster: dict[str, float], engines: list[tuple[ModelConfig, int]],
               cpus: float, judge_replicas: int, judge_gpus: int) -> str | None:
    """Whether self-hosted judge servers (`judge.kind: vllm`, `judge_replicas` of
    `judge_gpus` GPUs each, one CPU on a CPU cluster) fit beside the engines, so they can
    label while the engines generate: None if they do, else why not. Models run one
    after another, so the engines hold the largest model's seats (`engines`: each model
    with its planned shards) at a time."""
    gpu = cluster.get("GPU", 0) >= 1
    unit = "GPU" if gpu else "CPU"
    total = cluster.get(unit, 0)
    need = max((_replicas(m, cluster, cpus, n) * (m.tensor_parallel_size if gpu else cpus)
                for m, n in engines), default=0)
    want = judge_replicas * (judge_gpus if gpu else 1)
    if need + want <= total:
        return None
    return (f"the engines take {need:g} of the cluster's {total:g} {unit}s and the judge "
            f"servers need {want:g} more (set models[].replicas to leave them room)")
