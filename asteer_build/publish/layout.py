"""The published folder's layout and contract: config names, file names, schemas of the
small configs, the concept partition, and the options and result of a publish.

Each config is one folder of `train-NNNNN.parquet` files (activations: one subfolder per
model); `train/` reads `<config>/**/*.parquet`. See the package docstring for the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

#: bump when the folder layout or Parquet writing changes: invalidates every file key
PUBLISH_FORMAT = 1
CONFIGS = ("rollouts", "features", "activations", "concepts", "prompts", "vectors")
#: activations can be hundreds of GB: published only when asked for
DEFAULT_CONFIGS = ("rollouts", "features", "concepts", "prompts", "vectors")
STATE_FILE = ".asteer-publish.json"
SPLIT = "train"
#: what the Hub upload skips: the state file and temp files of an interrupted publish
UPLOAD_IGNORE = [".*", "**/.*"]
UNSEEN_FRACTION = 0.2
PARTITION_SEED = 42

# The rollouts contract (ARCHITECTURE.md) plus the judge's `judge_error`, which says why
# a failed row has no label; a test keeps it in step with asteer_build.work.ROLLOUT_SCHEMA.
ROLLOUTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("concept_id", pa.string()),
        ("concept", pa.string()),
        ("concept_level", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("layer", pa.int32()),
        ("alpha", pa.float64()),
        ("vector_norm", pa.float32()),
        ("seed", pa.int64()),
        ("response", pa.string()),
        ("response_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("label", pa.int8()),
        ("judge_model", pa.string()),
        ("judge_status", pa.string()),
        ("judge_explanation", pa.string()),
        ("judge_error", pa.string()),
    ]
)
CONCEPTS_SCHEMA = pa.schema(
    [
        ("concept_id", pa.string()),
        ("concept", pa.string()),
        ("concept_level", pa.string()),
        ("partition", pa.string()),
    ]
)
PROMPTS_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("prompt", pa.string()), ("source", pa.string())]
)


class PublishError(ValueError):
    """The run folder cannot be published as asked; the message says why."""


@dataclass
class PublishOptions:
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    #: configs were asked for by name: a missing stage is an error, not a silent skip
    #: (by default a run built without capture simply publishes no `features`)
    explicit: bool = False
    folder: str | None = None
    #: output Parquet size target, estimated from the input shards' compressed bytes
    target_file_bytes: int = 256 << 20
    #: uncompressed bytes per row group (the dataset viewer pages by row group)
    row_group_bytes: int = 100 << 20
    row_group_max_rows: int = 100_000
    unseen_fraction: float = UNSEEN_FRACTION
    partition_seed: int = PARTITION_SEED
    #: called with each file's folder path right after it is committed (tests interrupt
    #: a publish from here; a progress bar could hook in too)
    on_file: Callable[[str], None] | None = None


@dataclass
class PublishResult:
    folder: str
    repo: str | None
    files: list[dict[str, Any]]
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    uploaded: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "repo": self.repo,
            "uploaded": self.uploaded,
            "counts": self.counts,
            "written": len(self.written),
            "skipped": len(self.skipped),
            "removed": self.removed,
            "bytes": sum(f["bytes"] for f in self.files),
            "files": self.files,
        }


def partition_concepts(
    levels: dict[str, str], unseen_fraction: float = UNSEEN_FRACTION, seed: int = PARTITION_SEED
) -> list[str]:
    """Unseen concept ids: per level, a seeded draw of `unseen_fraction` (at least one
    per level of two or more, never all of a level).

    The same draw as `train.splits.partition_concepts`' default, so a trainer that uses
    the published `partition` column and one that draws its own split agree (a test
    holds the two together); reimplemented so publishing does not need pandas.
    """
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    by_level: dict[str, list[str]] = {}
    for cid, lvl in levels.items():
        by_level.setdefault(str(lvl), []).append(str(cid))
    for lvl in sorted(by_level):
        members = sorted(by_level[lvl])
        n = int(round(unseen_fraction * len(members)))
        if unseen_fraction > 0 and len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        chosen += rng.permutation(members)[:n].tolist()
    return sorted(chosen)
