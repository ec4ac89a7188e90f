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
`PARTITION_SEEN` (``id``), drawn by `partition_concepts`; seen concepts' prompts are
split by `prompt_splits`. Both are the authors' algorithms, so our unseen concepts and
splits are theirs; shared by `publish`, `train` and `asteer-build plan --json`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

from .feature_names import (
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
    "PARTITION_SCHEMES", "LEVEL_ORDER", "AUTHORS_LEVEL_RANGES",
    "authors_concept_level", "PROMPT_TEST_SIZE", "PROMPT_VAL_SIZE", "sort_ids",
    "partition_concepts", "prompt_split_sizes", "prompt_splits",
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
    pa.field("method", pa.string()),  # diffmean | probe | pca | file
    pa.field("concept_id", pa.string()),
    pa.field("concept", pa.string()),
    pa.field("concept_level", pa.string()),  # low | mid | high
    pa.field("prompt_id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("layer", pa.int32()),
    pa.field("alpha", pa.float64()),
    pa.field("vector_norm", pa.float32()),
    # the multiple of v the engine added: alpha with `alpha_units: raw` (the paper's),
    # alpha x m / ||v|| with `norm` (m: the banks' mean residual norm at the layer)
    pa.field("alpha_raw", pa.float64()),
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
#: `stratified`: the authors' per-level draw (default); `contiguous`: their legacy
#: static ranges (the last concepts in id order are unseen)
PARTITION_SCHEMES = ("stratified", "contiguous")
#: levels are drawn in this order (the authors' `LEVEL_POOLS` order); others after, sorted
LEVEL_ORDER = ("low", "mid", "high")
#: the authors' concept levels: id ranges, not a field of their concepts.json
#: (their `xgb/concept_partition.py`); the paper config says the same in `levels:`
AUTHORS_LEVEL_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "low": ((0, 39), (120, 129)),
    "mid": ((40, 79), (130, 139)),
    "high": ((80, 119), (140, 149)),
}


def authors_concept_level(cid: int) -> str | None:
    """The level of one of the authors' concept ids, None outside their 0-149."""
    for level, ranges in AUTHORS_LEVEL_RANGES.items():
        if any(lo <= cid <= hi for lo, hi in ranges):
            return level
    return None
#: the authors' per-concept prompt split: test = int(n * 0.3), val = int((n - test) * 0.2)
PROMPT_TEST_SIZE = 0.3
PROMPT_VAL_SIZE = 0.2


def sort_ids(ids: Iterable[str]) -> list[str]:
    """Ids in ascending numeric order when every id is an integer (the authors' concept
    and sample ids are ints; ours are their strings, and "10" < "9" as text), else in
    text order. Both draws below walk ids in this order, so it decides who is unseen."""
    ids = [str(i) for i in ids]
    try:
        keyed = [(int(i), i) for i in ids]
    except ValueError:
        return sorted(ids)
    return [i for _, i in sorted(keyed)]


def _n_unseen(n: int, unseen_fraction: float) -> int:
    k = int(round(unseen_fraction * n))
    if unseen_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return k


def partition_concepts(
    levels: Mapping[str, str],
    unseen_fraction: float = UNSEEN_FRACTION,
    seed: int = PARTITION_SEED,
    scheme: str = "stratified",
) -> list[str]:
    """Unseen concept ids (in `sort_ids` order) from {concept_id: concept_level}.

    `stratified` is the authors' draw (`xgb/concept_partition.py`), so a build of their
    concepts holds out the concepts they held out: one `numpy.random.default_rng(seed)`;
    per level in the order low, mid, high (then any other level, sorted), over the
    level's ids in `sort_ids` order, `order = rng.permutation(n)`; the ids in that order,
    of which the last round(`unseen_fraction` * n) are unseen (40 seen / 10 unseen of
    50). Small levels: at least one unseen per level of two or more, never all of it.

    `contiguous` is the authors' legacy static ranges (ids 0-119 seen, 120-149 unseen):
    the last round(`unseen_fraction` * N) of all N ids in `sort_ids` order.

    The published `partition` column, `train`'s split and `plan --json` all come from
    here.
    """
    import numpy as np  # the seeded draw; numpy comes with pyarrow's users anyway

    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"partition scheme: expected one of {PARTITION_SCHEMES} "
                         f"(got {scheme!r})")
    if not 0.0 <= unseen_fraction < 1.0:
        raise ValueError(f"unseen_fraction: must be in [0, 1) (got {unseen_fraction})")
    if scheme == "contiguous":
        ids = sort_ids(levels)
        k = _n_unseen(len(ids), unseen_fraction)
        return sort_ids(ids[len(ids) - k:]) if k else []
    rng = np.random.default_rng(seed)
    by_level: dict[str, list[str]] = {}
    for cid, lvl in levels.items():
        by_level.setdefault(str(lvl), []).append(str(cid))
    order = [lv for lv in LEVEL_ORDER if lv in by_level]
    order += sorted(lv for lv in by_level if lv not in LEVEL_ORDER)
    chosen: list[str] = []
    for lvl in order:
        members = sort_ids(by_level[lvl])
        n = len(members)
        shuffled = [members[i] for i in rng.permutation(n).tolist()]
        chosen += shuffled[n - _n_unseen(n, unseen_fraction):]
    return sort_ids(chosen)


def prompt_split_sizes(n: int, test_size: float = PROMPT_TEST_SIZE,
                       val_size: float = PROMPT_VAL_SIZE) -> tuple[int, int, int]:
    """(train, val, test) prompts per seen concept, as the authors count them
    (`xgb/train_weighted_search.py`): test = max(1, int(n * test_size)), val = max(1,
    int((n - test) * val_size)), train the rest: 28 / 7 / 15 of 50."""
    n_test = min(max(1, int(n * test_size)), n)
    n_val = min(max(1, int((n - n_test) * val_size)), n - n_test)
    return n - n_test - n_val, n_val, n_test


def prompt_splits(
    seen: Iterable[str],
    prompts: Iterable[str],
    seed: int = PARTITION_SEED,
    test_size: float = PROMPT_TEST_SIZE,
    val_size: float = PROMPT_VAL_SIZE,
) -> dict[tuple[str, str], str]:
    """{(concept_id, prompt_id): "train" | "val" | "test"} for the seen concepts, the
    authors' per-concept prompt split: one `numpy.random.RandomState(seed)` shared by
    all seen concepts, taken in `sort_ids` order; per concept `perm = arange(n)`,
    `rng.shuffle(perm)`; the first `test` positions are test, the next `val` val, the
    rest train. Position i is the i-th prompt in `sort_ids` order: the authors'
    `sample_id`, the position in their sampled list (the paper config's prompt ids)."""
    import numpy as np

    pids = sort_ids(dict.fromkeys(str(p) for p in prompts))
    n = len(pids)
    _, n_val, n_test = prompt_split_sizes(n, test_size, val_size)
    rng = np.random.RandomState(seed)
    out: dict[tuple[str, str], str] = {}
    for cid in sort_ids(dict.fromkeys(str(c) for c in seen)):
        perm = np.arange(n)
        rng.shuffle(perm)
        for rank, pos in enumerate(perm.tolist()):
            out[(cid, pids[pos])] = ("test" if rank < n_test else
                                     "val" if rank < n_test + n_val else "train")
    return out
