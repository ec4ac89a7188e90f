"""`asteer-build publish`: turn a run folder into a Hugging Face dataset repository.

The run folder is organised for building (one small file per shard and stage, a manifest
that is rewritten after every commit); the Hub wants the opposite: a few hundred MB per
Parquet file, row groups the dataset viewer can page through, a card that declares every
config, and bytes that do not change when nothing changed. This package bridges the two:

    RUN_DIR (build.json + shards)  ──assemble──>  FOLDER  ──one call──>  Hub dataset repo

Folder layout (each config one folder; `train/` reads `<config>/**/*.parquet`)::

    README.md                         dataset card (YAML: configs, features, counts)
    build.json                        config, hashes, software, shard manifest, file list
    rollouts/train-00000.parquet      labelled rollouts (the default config)
    features/train-00000.parquet
    activations/<model>/train-00000.parquet   Array3D float16 columns (optional config)
    concepts/train-00000.parquet      concept_id, concept, concept_level, partition
    prompts/train-00000.parquet       prompt_id, prompt, source
    vectors/<model>/<method>.safetensors, vectors/<model>/index.json

Why it is idempotent and resumable: which input shards go to which output file is decided
from the manifest alone (a data file is a fixed span of the run's planned shards, sized
from the build config: `boundaries`), before any data is read and before the run has even
finished, so the same run always plans the same files. Every output file has a key (a hash of its
input checksums, row ranges and writer settings); a file whose key and sha256 match the
folder's state file is skipped, any other is written under a dot-prefixed temp name and
renamed. Parquet is written with fixed settings and no timestamps, rows in plan order
(model, method, concept, prompt, alpha, sample, as the shards hold them), so publishing
the same run twice produces identical bytes, and a killed publish picks up where it died.

The Hub token is read only inside `hub_upload` (from `HF_TOKEN` or the login cache) and
is never written, logged or put in `build.json`; every file is scanned for it before the
upload as a last guard.

Publishing as the run builds (`--follow`, `follow`): a data file goes up as soon as every
shard of its span is labelled, byte for byte the file a publish of the finished run
writes, in batched commits; the concepts, prompts, card and build.json once every planned
shard is labelled. Restarts skip what the repo already holds, by checksum.

Modules: `layout` (names, schemas, options), `boundaries` (which planned shards make up
each data file), `plan` (which shard rows go to which file and each config's schema),
`parquet` (writing one file), `state` (the folder's record of finished files),
`build_json` and `card` (the two documents), `assemble` (the folder, no network), `hub`
(token, upload, `publish`), `follow` (publishing a run as it builds), `cli`
(`asteer-build publish`). `authors` and `import_card`:
`asteer-build import`, the reference authors' released generations and judgments
converted into the same folder layout (rollouts, concepts, prompts, card) and uploaded by
the same `hub_upload`.
"""

from .assemble import assemble, default_folder
from .cli import add_publish_command
from .follow import FollowResult, follow
from .hub import check_no_secret, hub_upload, publish, resolve_dataset
from .layout import (
    CONFIGS,
    DEFAULT_CONFIGS,
    PUBLISH_FORMAT,
    ROLLOUTS_SCHEMA,
    STATE_FILE,
    PublishError,
    PublishOptions,
    PublishResult,
    partition_concepts,
)

__all__ = [
    "PUBLISH_FORMAT",
    "CONFIGS",
    "DEFAULT_CONFIGS",
    "ROLLOUTS_SCHEMA",
    "STATE_FILE",
    "PublishOptions",
    "PublishResult",
    "PublishError",
    "publish",
    "follow",
    "FollowResult",
    "assemble",
    "default_folder",
    "hub_upload",
    "check_no_secret",
    "partition_concepts",
    "add_publish_command",
    "resolve_dataset",
]
