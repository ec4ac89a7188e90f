"""The published folder's layout and contract: config names, file names, schemas of the
small configs, the concept partition, and the options and result of a publish.

Each config is one folder of `train-NNNNN.parquet` files (activations: one subfolder per
model); `train/` reads `<config>/**/*.parquet`. See the package docstring for the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...core import contract

#: bump when the folder layout or Parquet writing changes: invalidates every file key
#: (2: data files are fixed spans of planned shards, `boundaries`)
PUBLISH_FORMAT = 2
CONFIGS = ("rollouts", "features", "activations", "concepts", "prompts", "vectors")
#: activations can be hundreds of GB: published only when asked for
DEFAULT_CONFIGS = ("rollouts", "features", "concepts", "prompts", "vectors")
STATE_FILE = ".asteer-publish.json"
SPLIT = "train"
#: what the Hub upload skips: the state file and temp files of an interrupted publish
UPLOAD_IGNORE = [".*", "**/.*"]
# The schemas of the small configs, the rollouts schema and the concept partition are the
# dataset contract's (asteer_build/core/contract.py), shared with the builder, judge and train.
ROLLOUTS_SCHEMA = contract.ROLLOUTS_SCHEMA
CONCEPTS_SCHEMA = contract.CONCEPTS_SCHEMA
PROMPTS_SCHEMA = contract.PROMPTS_SCHEMA
UNSEEN_FRACTION = contract.UNSEEN_FRACTION
PARTITION_SEED = contract.PARTITION_SEED
PARTITION_SCHEMES = contract.PARTITION_SCHEMES
partition_concepts = contract.partition_concepts


class PublishError(ValueError):
    """The run folder cannot be published as asked; the message says why."""


@dataclass
class PublishOptions:
    configs: tuple[str, ...] = DEFAULT_CONFIGS
    #: configs were asked for by name: a missing stage is an error, not a silent skip
    #: (by default a run built without capture simply publishes no `features`)
    explicit: bool = False
    folder: str | None = None
    #: output Parquet size target; a file is a fixed span of planned shards sized to it
    #: from the build config's estimate of a shard (`boundaries`), not from its bytes
    target_file_bytes: int = 256 << 20
    #: uncompressed bytes per row group (the dataset viewer pages by row group)
    row_group_bytes: int = 100 << 20
    row_group_max_rows: int = 100_000
    unseen_fraction: float = UNSEEN_FRACTION
    partition_seed: int = PARTITION_SEED
    #: `stratified` (the authors' draw) or `contiguous` (their legacy static ranges)
    partition_scheme: str = "stratified"
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
