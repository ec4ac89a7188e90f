"""The dataset contract (asteer_build/core/contract.py): its types, that what the builder, the
judge and the synthetic dataset write conforms to it, that `train` and `datasets` read it,
the feature-name scheme and the concept partition."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asteer_build.core import contract as C

# ARCHITECTURE.md, "Dataset schema": the published rollouts row, in order.
ROLLOUT_TYPES = [
    ("id", pa.string()), ("model", pa.string()), ("method", pa.string()),
    ("concept_id", pa.string()), ("concept", pa.string()), ("concept_level", pa.string()),
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("layer", pa.int32()),
    ("alpha", pa.float64()), ("vector_norm", pa.float32()), ("alpha_raw", pa.float64()),
    ("seed", pa.int64()),
    ("response", pa.string()), ("response_tokens", pa.int32()),
    ("finish_reason", pa.string()), ("label", pa.int8()), ("judge_model", pa.string()),
    ("judge_status", pa.string()), ("judge_explanation", pa.string()),
    ("judge_error", pa.string()), ("judge_rubric", pa.string()),
]


def test_rollouts_types_and_the_named_additions():
    assert C.ROLLOUTS_SCHEMA.equals(pa.schema(ROLLOUT_TYPES))
    assert C.ROLLOUTS_SCHEMA.metadata is None
    assert all(f.nullable for f in C.ROLLOUTS_SCHEMA)
    # the builder's shard is the same row without the judge's `judge_error` and
    # `judge_rubric`
    assert C.ROLLOUTS_SHARD_SCHEMA.equals(pa.schema(ROLLOUT_TYPES[:-2]))
    assert list(C.JUDGE_COLUMNS) == [
        "label", "judge_model", "judge_status", "judge_explanation", "judge_error",
        "judge_rubric",
    ]
    assert C.ROLLOUTS_SCHEMA.names[-len(C.JUDGE_COLUMNS):] == list(C.JUDGE_COLUMNS)
    for name, typ in C.JUDGE_COLUMNS.items():
        assert C.ROLLOUTS_SCHEMA.field(name).type == typ


def test_features_concepts_prompts_types():
    s = C.features_schema(["dn_t0_k0", "alpha", "vector_norm"])
    assert s.names == [
        "id", "model", "method", "concept_id", "prompt_id", "alpha", "dn_t0_k0", "vector_norm",
    ]
    # alpha is a key and a feature: float32 like the others (the rollouts hold it exactly)
    assert s.field("alpha").type == s.field("dn_t0_k0").type == pa.float32()
    assert s.field("vector_norm").type == pa.float32()
    assert C.ROLLOUTS_SCHEMA.field("alpha").type == pa.float64()
    assert C.FEATURE_KEYS == ("id", "model", "method", "concept_id", "prompt_id")
    assert C.CONCEPTS_SCHEMA.equals(pa.schema([
        ("concept_id", pa.string()), ("concept", pa.string()),
        ("concept_level", pa.string()), ("partition", pa.string()),
    ]))
    assert C.PROMPTS_SCHEMA.equals(pa.schema([
        ("prompt_id", pa.string()), ("prompt", pa.string()), ("source", pa.string()),
    ]))
    assert (C.PARTITION_SEEN, C.PARTITION_UNSEEN) == ("id", "ood")


def test_the_contract_and_its_readers_load_without_torch_vllm_or_ray():
    code = (
        "import sys\n"
        "import asteer_build.core.contract, judge.shards, train.data, train.splits, "
        "train.synthetic, train.feature_names\n"
        "heavy = [m for m in ('torch', 'vllm', 'ray') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------ feature names


def test_default_feature_names_count_and_round_trip():
    names = C.feature_names()
    assert len(names) == 414 == len(set(names))
    assert C.feature_names(C.DEFAULT_STEPS, C.DEFAULT_OFFSETS) == names
    assert names[-2:] == ["alpha", "vector_norm"]
    cells = 0
    for name in names:
        info = C.parse_feature_name(name)
        if name in C.META_FEATURES:
            assert info == (name, name, None, None, None)
            assert C.feature_family(name) is None
            continue
        assert info.group in C.GROUPS and C.feature_family(name) == info.group
        # the parsed parts form the name again
        t = "" if info.token is None else f"_t{info.token}"
        k = "" if info.layer_offset is None else f"_k{info.layer_offset}"
        s = "" if info.stat is None else f"_{info.stat}"
        assert f"{info.group}{t}{k}{s}" == name
        if info.stat is None:
            cells += 1
            assert info.token in C.DEFAULT_STEPS and info.layer_offset in C.DEFAULT_OFFSETS
        else:
            assert info.stat in (C.STATS if info.token is None and info.layer_offset is None
                                 else C.ROW_STATS)
    assert cells == 4 * 7 * 3 + 4 * 6 + 3 * 7 * 2 + 3 * 6  # dn ds sa, da, dnr dsd, dad
    for key in C.FEATURE_KEYS:
        assert C.feature_family(key) is None
    with pytest.raises(ValueError, match="start with 0"):
        C.feature_names((0, 1), (1, 2))


def test_one_scheme_for_builder_and_synthetic_names():
    from asteer_build.core import feature_names as N
    from train.synthetic import feature_columns

    assert C.feature_names is N.feature_names and C.parse_feature_name is N.parse_feature_name
    cols = feature_columns(groups=("SA",), tokens=(0, 2), offsets=(0, 1))
    assert cols == [*C.group_names("SA", (0, 2), (0, 1)), "vector_norm"]
    assert C.parse_feature_name("SA_t2_k1") == ("SA_t2_k1", "SA", 2, 1, None)
    assert C.parse_feature_name("SA_k1_max") == ("SA_k1_max", "SA", None, 1, "max")
    assert C.feature_family("SA_t0_k0") is None  # not one of the builder's families


# ---------------------------------------------------------------------------- partition


# The authors' own output, obtained by running their `xgb/concept_partition.py`
# (`build_stratified_shuffle_partition`) and the prompt split of their
# `xgb/train_weighted_search.py` (seed 42, 50 prompts) on their 150 concept ids.
AUTHORS_UNSEEN_42 = [0, 1, 2, 8, 12, 13, 14, 33, 36, 41, 52, 57, 69, 71, 79, 81, 85, 89, 93,
                     99, 101, 103, 108, 115, 128, 130, 131, 132, 139, 148]
AUTHORS_UNSEEN_7 = [2, 5, 11, 21, 23, 25, 31, 34, 40, 53, 60, 62, 69, 70, 71, 74, 77, 81, 83,
                    90, 97, 105, 121, 123, 131, 142, 144, 145, 147, 148]
AUTHORS_SPLIT_42 = {  # seen concept -> (test prompts, val prompts)
    3: ([3, 4, 8, 12, 13, 17, 19, 25, 26, 30, 32, 37, 39, 45, 48], [6, 9, 15, 16, 41, 46, 47]),
    149: ([2, 9, 17, 18, 23, 24, 26, 27, 28, 32, 34, 36, 41, 45, 48],
          [0, 7, 10, 12, 19, 25, 49]),
}
PAPER_LEVELS = {str(i): lvl for lvl, ranges in (("low", ((0, 39), (120, 129))),
                                                ("mid", ((40, 79), (130, 139))),
                                                ("high", ((80, 119), (140, 149))))
                for a, b in ranges for i in range(a, b + 1)}


def test_partition_is_the_authors_draw():
    assert C.partition_concepts(PAPER_LEVELS) == [str(i) for i in AUTHORS_UNSEEN_42]
    assert C.partition_concepts(PAPER_LEVELS, seed=7) == [str(i) for i in AUTHORS_UNSEEN_7]
    # order-free in the mapping; ids walked in numeric order ("10" after "9")
    assert C.partition_concepts(dict(reversed(PAPER_LEVELS.items()))) == \
        C.partition_concepts(PAPER_LEVELS)
    # their legacy static ranges: 0-119 seen, 120-149 unseen
    assert C.partition_concepts(PAPER_LEVELS, scheme="contiguous") == \
        [str(i) for i in range(120, 150)]
    with pytest.raises(ValueError, match="partition scheme: expected one of"):
        C.partition_concepts(PAPER_LEVELS, scheme="static")


def test_partition_of_text_ids_and_small_levels():
    import numpy as np

    # Text ids: text order; levels low, mid, high (not alphabetical), one generator.
    levels = {f"c{i:03d}": ("low", "mid", "high")[i % 3] for i in range(150)}
    rng = np.random.default_rng(42)
    want = []
    for lvl in ("low", "mid", "high"):
        pool = sorted(c for c, v in levels.items() if v == lvl)
        want += [pool[i] for i in rng.permutation(50)][40:]
    assert C.partition_concepts(levels) == sorted(want)
    # at least one per level of two or more, never a whole level, none of a singleton
    small = {"a": "low", "b": "low", "c": "mid"}
    assert len(C.partition_concepts(small)) == 1 and "c" not in C.partition_concepts(small)
    assert C.partition_concepts(small, unseen_fraction=0.0) == []


def test_sort_ids_is_numeric_for_integer_ids():
    assert C.sort_ids(["10", "9", "100"]) == ["9", "10", "100"]
    assert C.sort_ids(["b", "10", "9"]) == ["10", "9", "b"]


def test_prompt_split_is_the_authors():
    seen = [c for c in C.sort_ids(PAPER_LEVELS) if int(c) not in AUTHORS_UNSEEN_42]
    split = C.prompt_splits(seen, [str(i) for i in range(50)], seed=42)
    assert C.prompt_split_sizes(50) == (28, 7, 15)
    for cid, (test, val) in AUTHORS_SPLIT_42.items():
        got = {s: sorted(int(p) for (c, p), v in split.items() if c == str(cid) and v == s)
               for s in ("test", "val", "train")}
        assert got["test"] == test and got["val"] == val
        assert got["train"] == sorted(set(range(50)) - set(test) - set(val))


def test_train_draws_the_contract_partition():
    pd = pytest.importorskip("pandas")
    from train.splits import partition_concepts

    frame = pd.DataFrame(
        {"concept_id": [f"c{i:02d}" for i in range(30)],
         "concept_level": ["low", "mid", "high"] * 10}
    )
    levels = dict(zip(frame.concept_id, frame.concept_level, strict=True))
    for seed in (0, 42):
        _, unseen, how = partition_concepts(frame, seed=seed)
        assert how == "stratified" and unseen == C.partition_concepts(levels, seed=seed)
    _, unseen, how = partition_concepts(frame, scheme="contiguous")
    assert how == "contiguous" and unseen == [f"c{i:02d}" for i in range(24, 30)]


# ---------------------------------------------------------- writers conform, readers read


def _items(n: int):
    from asteer_build.pipeline.plan import Item, Shard

    items = [
        Item(id=f"r{i}", model="tiny", method="diffmean", concept_id=f"c{i % 2}",
             concept=f"concept {i % 2}", concept_level="low", prompt_id=f"p{i}",
             prompt=f"prompt {i}", layer=1, alpha=0.5 * i, sample=0, seed=i)
        for i in range(n)
    ]
    return Shard(0, "tiny", "diffmean", items)


def test_a_builder_shard_conforms_and_the_judge_completes_it(tmp_path):
    pytest.importorskip("torch")
    from asteer_build.pipeline.rollouts import RolloutResult
    from asteer_build.pipeline.shards import Store
    from asteer_build.pipeline.work import ROLLOUT_SCHEMA, write_shard
    from judge.cache import JudgmentCache
    from judge.judges import Outcome
    from judge.shards import JUDGE_COLUMNS, judge_shards

    assert ROLLOUT_SCHEMA is C.ROLLOUTS_SHARD_SCHEMA and JUDGE_COLUMNS == C.JUDGE_COLUMNS

    shard = _items(4)
    names = C.feature_names((0, 1), (0, 1))
    results = [
        RolloutResult(it.id, f"text {j}", [1, 2, 3], "length",
                      {n: float(j) for n in names[:-2]} | {"alpha": it.alpha,
                                                            "vector_norm": 2.0})
        for j, it in enumerate(shard.items)
    ]
    store = Store(str(tmp_path / "run"))
    files = write_shard(store, shard, results, {"diffmean/c0": 2.0, "diffmean/c1": 3.0})
    paths = {f.stage: store.path(f.path) for f in files}
    rollouts = pq.read_table(paths["rollouts"])
    assert rollouts.schema.equals(C.ROLLOUTS_SHARD_SCHEMA)
    assert set(rollouts.column("judge_status").to_pylist()) == {"pending"}
    assert pq.read_schema(paths["features"]).equals(C.features_schema(names))

    class HalfFails:
        judge_model = rubric_version = "half-v1"

        async def judge(self, prompt, concept, response):
            if response.endswith(("0", "2")):
                return Outcome("ok", 1, "fine")
            return Outcome("failed", error="no verdict")

    with JudgmentCache(tmp_path / "cache.jsonl") as cache:
        reports = asyncio.run(judge_shards(tmp_path / "run/rollouts", tmp_path / "labelled",
                                           HalfFails(), cache, workers=2))
    assert [(r.ok, r.failed) for r in reports] == [(2, 2)]
    judged = pq.read_table(tmp_path / "labelled" / "shard-000000.parquet")
    assert judged.schema.equals(C.ROLLOUTS_SCHEMA)
    assert judged.column("judge_status").to_pylist() == ["ok", "failed", "ok", "failed"]
    assert judged.column("judge_error").to_pylist() == [None, "no verdict", None, "no verdict"]
    assert set(judged.column("judge_status").to_pylist()) <= set(C.JUDGE_STATUSES)


def test_synthetic_dataset_is_the_contract_and_train_reads_it(tmp_path):
    pytest.importorskip("pandas")
    from train.data import CLASS_NAMES, FEATURE_KEYS, ROLLOUT_COLUMNS, load_dataset
    from train.synthetic import feature_columns, generate, write_dataset

    tables = generate(n_concepts=6, n_prompts=4)
    assert tables["rollouts"].schema.equals(C.ROLLOUTS_SCHEMA)
    assert tables["features"].schema.equals(C.features_schema(feature_columns()))
    assert tables["concepts"].schema.equals(C.CONCEPTS_SCHEMA)
    assert tables["prompts"].schema.equals(C.PROMPTS_SCHEMA)
    assert set(ROLLOUT_COLUMNS) <= set(C.ROLLOUTS_SCHEMA.names)
    assert FEATURE_KEYS == C.FEATURE_KEYS and CLASS_NAMES == C.LABEL_NAMES

    data = load_dataset(write_dataset(tmp_path, tables))
    assert data.report["rows_used"] > 0
    assert data.feature_names == ["alpha", *feature_columns()]
    assert set(data.concepts.partition) == {C.PARTITION_SEEN, C.PARTITION_UNSEEN}


def test_datasets_loads_contract_tables_with_the_card_types(tmp_path):
    datasets = pytest.importorskip("datasets")
    from train.synthetic import generate, write_dataset

    folder = write_dataset(tmp_path, generate(n_concepts=3, n_prompts=2))
    # The card's YAML `features` of each config are `Features.from_arrow_schema` of the
    # contract schema (publish embeds them); `load_dataset` reads the files back as them.
    for config, schema in (("rollouts", C.ROLLOUTS_SCHEMA), ("concepts", C.CONCEPTS_SCHEMA),
                           ("prompts", C.PROMPTS_SCHEMA)):
        features = datasets.Features.from_arrow_schema(schema)
        ds = datasets.load_dataset("parquet", data_files=str(folder / config / "*.parquet"),
                                   split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.features == features, config
    yaml = {f["name"]: f["dtype"]
            for f in datasets.Features.from_arrow_schema(C.ROLLOUTS_SCHEMA)._to_yaml_list()}
    assert yaml["label"] == "int8" and yaml["vector_norm"] == "float32"
    assert yaml["layer"] == yaml["response_tokens"] == "int32"
    assert yaml["alpha"] == "float64" and yaml["seed"] == "int64"
    assert yaml["judge_error"] == "string"


def test_authors_level_ranges_are_the_paper_configs():
    """One statement of the authors' level ranges (the contract) serves train's cache reader
    and the importer; the paper config states them again for the builder: they must agree."""
    import yaml

    from asteer_build.configs import __file__ as configs_init

    paper = yaml.safe_load((Path(configs_init).parent / "asteer-paper.yaml").read_text())
    levels = {k: tuple(tuple(r) for r in v) for k, v in paper["concepts"]["levels"].items()}
    assert levels == C.AUTHORS_LEVEL_RANGES
    assert [C.authors_concept_level(i) for i in (0, 39, 40, 119, 120, 135, 149)] == [
        "low", "low", "mid", "high", "low", "mid", "high"]
    assert C.authors_concept_level(150) is None
