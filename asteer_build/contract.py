"""The dataset contract between the builder, `judge`, `publish` and `train`, in one place.

Light on purpose: pyarrow and the standard library only (numpy for the seeded partition
draw), so `judge` and `train` import it without vLLM, Ray or torch. The feature-name
scheme lives in `asteer_build.engine.feature_names` (pure Python, shared with the tensor
maths that computes the features, since the engine may not import the pipeline) and is
re-exported here.

Rollouts, one base plus named additions rather than copies:

- `ROLLOUT_FIELDS`: what the builder knows about a rollout (keys, steering, response);
- `LABEL_FIELDS`: the judgment, written by the builder as placeholders (`label` null,
  `judge_status` ``pending``) and filled by the judge;
- `JUDGE_ERROR_FIELD`: why a failed judgment failed, appended by the judge only;
- `JUDGE_RUBRIC_FIELD`: the rubric version of the judgment, appended by the judge only.

`ROLLOUTS_SHARD_SCHEMA` (base + label) is a builder shard, `ROLLOUTS_SCHEMA` (base + label
+ judge error + judge rubric) a judged shard and a published row; `JUDGE_COLUMNS` are the judge's.

`features`: the keys `FEATURES_KEY_FIELDS` then one float32 column per feature name
(`features_schema(names)`). `concepts` and `prompts`: `CONCEPTS_SCHEMA`,
`PROMPTS_SCHEMA`; a concept's `partition` is `PARTITION_UNSEEN` (``ood``) or
`PARTITION_SEEN` (``id``), drawn by `partition_concepts`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

from .engine.feature_names import (
    DEFAULT_OFFSETS,
    DEFAULT_STEPS,
    GROUPS,
    META_FEATURES,
    ROW_STATS,
    STATS,
    FeatureInfo,
    feature_family,
    feature_names,
    group_names,
    parse_feature_name,
)

__all__ = [
    "LABEL_NAMES", "JUDGE_STATUSES", "ROLLOUT_FIELDS", "LABEL_FIELDS", "JUDGE_ERROR_FIELD",
    "JUDGE_RUBRIC_FIELD", "JUDGE_FIELDS", "JUDGE_COLUMNS",
    "ROLLOUTS_SHARD_SCHEMA", "ROLLOUTS_SCHEMA", "FEATURES_KEY_FIELDS", "FEATURE_KEYS",
    "FEATURE_TYPE", "features_schema", "CONCEPTS_SCHEMA", "PROMPTS_SCHEMA",
    "PARTITION_SEEN", "PARTITION_UNSEEN", "UNSEEN_FRACTION", "PARTITION_SEED",
    "partition_concepts",
    # the feature-name scheme (asteer_build.engine.feature_names)
    "GROUPS", "STATS", "ROW_STATS", "META_FEATURES", "DEFAULT_STEPS", "DEFAULT_OFFSETS",
    "FeatureInfo", "feature_names", "group_names", "parse_feature_name", "feature_family",
]

# ------------------------------------------------------------------------------ rollouts

#: `label` values 0, 1, 2
LABEL_NAMES = ("under", "success", "over")
JUDGE_STATUSES = ("ok", "failed", "pending")

ROLLOUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string()),  # hash of model/method/concept/prompt/layer/alpha/sample
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),  # diffmean | probe
    pa.field("concept_id", pa.string()),
    pa.field("concept", pa.string()),
    pa.field("concept_level", pa.string()),  # low | mid | high
    pa.field("prompt_id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("layer", pa.int32()),
    pa.field("alpha", pa.float64()),
    pa.field("vector_norm", pa.float32()),
    pa.field("seed", pa.int64()),
    pa.field("response", pa.string()),
    pa.field("response_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
)
LABEL_FIELDS: tuple[pa.Field, ...] = (
    pa.field("label", pa.int8()),  # 0 under, 1 success, 2 over; null unless judged ok
    pa.field("judge_model", pa.string()),
    pa.field("judge_status", pa.string()),  # ok | failed | pending
    pa.field("judge_explanation", pa.string()),
)
JUDGE_ERROR_FIELD = pa.field("judge_error", pa.string())
#: the rubric's version (`judge.rubric.Rubric.version`, or the rules judge's
#: `rules-v1`) for ok and failed rows, null while pending: which grading produced a label
JUDGE_RUBRIC_FIELD = pa.field("judge_rubric", pa.string())
JUDGE_FIELDS: tuple[pa.Field, ...] = (*LABEL_FIELDS, JUDGE_ERROR_FIELD, JUDGE_RUBRIC_FIELD)
#: the columns the judge sets, in order (name -> type)
JUDGE_COLUMNS: dict[str, pa.DataType] = {f.name: f.type for f in JUDGE_FIELDS}

#: a rollouts shard as the builder writes it (judgment pending)
ROLLOUTS_SHARD_SCHEMA = pa.schema([*ROLLOUT_FIELDS, *LABEL_FIELDS])
#: a judged rollouts shard, and a row of the published `rollouts` config
ROLLOUTS_SCHEMA = pa.schema([*ROLLOUT_FIELDS, *JUDGE_FIELDS])

# ------------------------------------------------------------------------------ features

FEATURES_KEY_FIELDS: tuple[pa.Field, ...] = (
    pa.field("id", pa.string()),
    pa.field("model", pa.string()),
    pa.field("method", pa.string()),
    pa.field("concept_id", pa.string()),
    pa.field("prompt_id", pa.string()),
    # a key *and* a feature: float32 like every feature (the rollouts' float64 is exact)
    pa.field("alpha", pa.float32()),
)
#: key columns that are not features
FEATURE_KEYS = tuple(f.name for f in FEATURES_KEY_FIELDS if f.name not in META_FEATURES)
FEATURE_TYPE = pa.float32()


def features_schema(names: Iterable[str]) -> pa.Schema:
    """A `features` table: the keys (`alpha` among them), then one float32 column per
    other feature name, in the order given."""
    keys = {f.name for f in FEATURES_KEY_FIELDS}
    return pa.schema(
        [*FEATURES_KEY_FIELDS, *(pa.field(n, FEATURE_TYPE) for n in names if n not in keys)]
    )


# ------------------------------------------------------------------- concepts and prompts

PARTITION_SEEN = "id"
PARTITION_UNSEEN = "ood"
CONCEPTS_SCHEMA = pa.schema(
    [
        ("concept_id", pa.string()),
        ("concept", pa.string()),
        ("concept_level", pa.string()),
        ("partition", pa.string()),  # PARTITION_SEEN | PARTITION_UNSEEN
    ]
)
PROMPTS_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("prompt", pa.string()), ("source", pa.string())]
)

UNSEEN_FRACTION = 0.2  # 10 of 50 per level
PARTITION_SEED = 42


def partition_concepts(
    levels: Mapping[str, str],
    unseen_fraction: float = UNSEEN_FRACTION,
    seed: int = PARTITION_SEED,
) -> list[str]:
    """Unseen concept ids (sorted) from {concept_id: concept_level}: per level (levels in
    sorted order), a seeded permutation of the sorted members, of which the first
    round(`unseen_fraction` * n) are unseen (at least one per level of two or more,
    never all of a level). The published `partition` column and `train`'s own draw both
    come from here."""
    import numpy as np  # the seeded draw; numpy comes with pyarrow's users anyway

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
