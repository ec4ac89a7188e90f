"""Leakage-free splits: unseen concepts, then per-concept prompt splits of seen ones.

Two leaks matter. A concept in both seen and unseen would inflate the unseen score, and
alphas of one (concept, prompt) in different splits would let the model interpolate the
item's window instead of reading it from the hidden states. So concepts are partitioned
first (per level, so every level is represented in both), and the prompt split assigns
whole (concept, prompt) items. Both draws are the authors' (`asteer_build.core.contract`), so
a model trained on the paper testbed is tested on the concepts and prompts theirs was.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from asteer_build.core import contract

SPLITS = ("train", "val", "test", "unseen")
# Reference: 28 / 7 / 15 of 50 prompts per seen concept (test 0.3, val 0.2 of the rest).
DEFAULT_TEST_SIZE = contract.PROMPT_TEST_SIZE
DEFAULT_VAL_SIZE = contract.PROMPT_VAL_SIZE
DEFAULT_UNSEEN_FRACTION = contract.UNSEEN_FRACTION  # 10 of 50 per level
PARTITION_SCHEMES = contract.PARTITION_SCHEMES


class SplitError(ValueError):
    """A split request that cannot be honoured; the message says why."""


@dataclass
class Splits:
    """Which concepts are unseen and which split each (concept, prompt) item is in."""

    seen: list[str]
    unseen: list[str]
    items: dict[tuple[str, str], str]  # (concept_id, prompt_id) -> split name
    seed: int
    how: str  # "stratified", "contiguous", "explicit" or "partition-column"

    def assign(self, frame: pd.DataFrame) -> pd.Series:
        """Split name per row; a row of an unknown item is an error, not a silent drop."""
        keys = list(
            zip(frame["concept_id"].astype(str), frame["prompt_id"].astype(str), strict=True)
        )
        out = [self.items.get(k) for k in keys]
        missing = {k for k, v in zip(keys, out, strict=True) if v is None}
        if missing:
            raise SplitError(
                f"{len(missing)} (concept, prompt) items are not in the split, "
                f"e.g. {sorted(missing)[:3]}"
            )
        return pd.Series(out, index=frame.index, name="split")

    def to_dict(self) -> dict:
        counts: dict[str, int] = {s: 0 for s in SPLITS}
        for s in self.items.values():
            counts[s] += 1
        return {
            "seen": self.seen,
            "unseen": self.unseen,
            "seed": self.seed,
            "how": self.how,
            "items_per_split": counts,
            "items": [[c, p, s] for (c, p), s in sorted(self.items.items())],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Splits:
        return cls(
            seen=list(d["seen"]),
            unseen=list(d["unseen"]),
            items={(str(c), str(p)): s for c, p, s in d["items"]},
            seed=int(d["seed"]),
            how=str(d["how"]),
        )


def partition_concepts(
    concepts: pd.DataFrame,
    unseen_fraction: float = DEFAULT_UNSEEN_FRACTION,
    seed: int = contract.PARTITION_SEED,
    unseen: list[str] | None = None,
    use_partition_column: bool = False,
    scheme: str = "stratified",
) -> tuple[list[str], list[str], str]:
    """Seen / unseen concept ids.

    Precedence: an explicit ``unseen`` list, then the concepts config's ``partition``
    column (``ood`` = unseen), then the contract's draw ``scheme``
    (`asteer_build.core.contract.partition_concepts`): ``stratified``, the authors' per-level
    draw of ``unseen_fraction`` that publish writes into the ``partition`` column, or
    ``contiguous``, their legacy static ranges. Concepts without a level are never drawn.
    Ids come back in `contract.sort_ids` order (numeric when all are integers).
    """
    ids = [str(c) for c in concepts["concept_id"]]
    if len(set(ids)) != len(ids):
        raise SplitError("concepts table has duplicate concept_id values")
    if unseen is not None:
        unknown = sorted(set(unseen) - set(ids))
        if unknown:
            raise SplitError(f"unseen concepts not in the dataset: {unknown}")
        chosen, how = {str(u) for u in unseen}, "explicit"
    elif use_partition_column:
        if "partition" not in concepts.columns:
            raise SplitError("concepts config has no 'partition' column")
        part = concepts["partition"].astype(str)
        chosen = {i for i, p in zip(ids, part, strict=True) if p == contract.PARTITION_UNSEEN}
        how = "partition-column"
    else:
        if scheme not in PARTITION_SCHEMES:
            raise SplitError(f"partition: expected one of {PARTITION_SCHEMES}, got {scheme!r}")
        if not 0.0 <= unseen_fraction < 1.0:
            raise SplitError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
        levels = {
            i: lvl
            for i, lvl in zip(ids, concepts["concept_level"], strict=True)
            if not pd.isna(lvl)
        }
        chosen = set(contract.partition_concepts(levels, unseen_fraction, seed, scheme))
        how = scheme
    seen = contract.sort_ids(set(ids) - chosen)
    if not seen:
        raise SplitError("no seen concepts left to train on")
    return seen, contract.sort_ids(chosen), how


def make_splits(
    frame: pd.DataFrame,
    concepts: pd.DataFrame,
    unseen_fraction: float = DEFAULT_UNSEEN_FRACTION,
    seed: int = 42,
    unseen: list[str] | None = None,
    use_partition_column: bool = False,
    partition: str = "stratified",
    test_size: float = DEFAULT_TEST_SIZE,
    val_size: float = DEFAULT_VAL_SIZE,
) -> Splits:
    """Concept partition plus the authors' per-concept prompt split of the seen concepts
    (`asteer_build.core.contract.prompt_splits`: one seeded shuffle per concept, so a prompt
    being "hard" does not put it in test for every concept). The prompts are those of
    the frame, in `contract.sort_ids` order: for the paper testbed, their sample order.
    """
    for name, v in (("test_size", test_size), ("val_size", val_size)):
        if not 0.0 < v < 1.0:
            raise SplitError(f"{name} must be in (0, 1), got {v}")
    present = concepts[concepts["concept_id"].astype(str).isin(frame["concept_id"].astype(str))]
    seen, unseen_ids, how = partition_concepts(
        present, unseen_fraction, seed, unseen, use_partition_column, partition
    )
    pairs = frame[["concept_id", "prompt_id"]].astype(str).drop_duplicates()
    drawn = contract.prompt_splits(seen, pairs["prompt_id"], seed, test_size, val_size)
    unseen_set = set(unseen_ids)
    items: dict[tuple[str, str], str] = {}
    for c, p in zip(pairs["concept_id"], pairs["prompt_id"], strict=True):
        items[(c, p)] = "unseen" if c in unseen_set else drawn[(c, p)]
    return Splits(seen=seen, unseen=unseen_ids, items=items, seed=seed, how=how)
