"""Leakage-free splits: unseen concepts, then per-concept prompt splits of seen ones.

Two leaks matter. A concept in both seen and unseen would inflate the unseen score, and
alphas of one (concept, prompt) in different splits would let the model interpolate the
item's window instead of reading it from the hidden states. So concepts are partitioned
first (per level, so every level is represented in both), and the prompt split assigns
whole (concept, prompt) items.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from asteer_build import contract

SPLITS = ("train", "val", "test", "unseen")
# Reference: 28 / 7 / 15 of 50 prompts per seen concept.
DEFAULT_PROMPT_FRACTIONS = (0.56, 0.14, 0.30)
DEFAULT_UNSEEN_FRACTION = contract.UNSEEN_FRACTION  # 10 of 50 per level


class SplitError(ValueError):
    """A split request that cannot be honoured; the message says why."""


@dataclass
class Splits:
    """Which concepts are unseen and which split each (concept, prompt) item is in."""

    seen: list[str]
    unseen: list[str]
    items: dict[tuple[str, str], str]  # (concept_id, prompt_id) -> split name
    seed: int
    how: str  # "fraction", "explicit" or "partition-column"

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
) -> tuple[list[str], list[str], str]:
    """Seen / unseen concept ids, stratified by ``concept_level``.

    Precedence: an explicit ``unseen`` list, then the concepts config's ``partition``
    column (``ood`` = unseen), then the contract's seeded per-level draw of
    ``unseen_fraction`` (`asteer_build.contract.partition_concepts`: rounded, at least one
    per level with two or more concepts, never all of a level), the one publish draws the
    ``partition`` column with. Concepts without a level are never drawn.
    """
    ids = [str(c) for c in concepts["concept_id"]]
    if len(set(ids)) != len(ids):
        raise SplitError("concepts table has duplicate concept_id values")
    if unseen is not None:
        unknown = sorted(set(unseen) - set(ids))
        if unknown:
            raise SplitError(f"unseen concepts not in the dataset: {unknown}")
        chosen, how = set(unseen), "explicit"
    elif use_partition_column:
        if "partition" not in concepts.columns:
            raise SplitError("concepts config has no 'partition' column")
        part = concepts["partition"].astype(str)
        chosen = {i for i, p in zip(ids, part, strict=True) if p == contract.PARTITION_UNSEEN}
        how = "partition-column"
    else:
        if not 0.0 <= unseen_fraction < 1.0:
            raise SplitError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
        levels = {
            i: lvl
            for i, lvl in zip(ids, concepts["concept_level"], strict=True)
            if not pd.isna(lvl)
        }
        chosen = set(contract.partition_concepts(levels, unseen_fraction, seed))
        how = "fraction"
    seen = sorted(set(ids) - chosen)
    if not seen:
        raise SplitError("no seen concepts left to train on")
    return seen, sorted(chosen), how


def _prompt_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    if n >= 3:  # every split must exist for early stopping and testing
        n_val = max(n_val, 1)
        n_train = max(min(n_train, n - n_val - 1), 1)
    n_test = n - n_train - n_val
    return n_train, n_val, n_test


def make_splits(
    frame: pd.DataFrame,
    concepts: pd.DataFrame,
    unseen_fraction: float = DEFAULT_UNSEEN_FRACTION,
    seed: int = 42,
    unseen: list[str] | None = None,
    use_partition_column: bool = False,
    prompt_fractions: tuple[float, float, float] = DEFAULT_PROMPT_FRACTIONS,
) -> Splits:
    """Concept partition plus a per-concept prompt split of the seen concepts.

    Each concept gets its own prompt permutation (seeded by ``seed`` and the concept id)
    so that a prompt being "hard" does not put it in test for every concept.
    """
    if abs(sum(prompt_fractions) - 1.0) > 1e-6:
        raise SplitError(f"prompt fractions must sum to 1, got {prompt_fractions}")
    present = concepts[concepts["concept_id"].astype(str).isin(frame["concept_id"].astype(str))]
    seen, unseen_ids, how = partition_concepts(
        present, unseen_fraction, seed, unseen, use_partition_column
    )
    items: dict[tuple[str, str], str] = {}
    pairs = frame[["concept_id", "prompt_id"]].astype(str).drop_duplicates()
    by_concept = pairs.groupby("concept_id")["prompt_id"]
    unseen_set = set(unseen_ids)
    for concept, prompts in by_concept:
        prompts = sorted(prompts)
        if concept in unseen_set:
            items.update({(concept, p): "unseen" for p in prompts})
            continue
        rng = np.random.default_rng([seed, zlib.crc32(concept.encode())])
        order = rng.permutation(prompts).tolist()
        n_train, n_val, _ = _prompt_counts(len(order), prompt_fractions)
        for i, p in enumerate(order):
            items[(concept, p)] = (
                "train" if i < n_train else "val" if i < n_train + n_val else "test"
            )
    return Splits(seen=seen, unseen=unseen_ids, items=items, seed=seed, how=how)
