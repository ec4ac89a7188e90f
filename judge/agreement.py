"""Agreement between two judges, and a sample for humans to check them.

The reference judge reached Cohen's kappa 0.74 against a stronger model and 0.83 against
humans on 600 samples; `agree` reports the same statistic so a new judge can be held to
that bar. Rows either judge failed on (label null) are excluded and counted, never
coerced to a class: a kappa computed over defaulted labels would flatter the judge.
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from judge.rubric import LABELS

__all__ = [
    "confusion_matrix",
    "cohen_kappa",
    "AgreementReport",
    "compare",
    "load_labels",
    "stratified_sample",
    "write_sample_csv",
]

CLASSES = tuple(sorted(LABELS))


def confusion_matrix(
    a: Sequence[int], b: Sequence[int], classes: Sequence[int] = CLASSES
) -> list[list[int]]:
    """Rows are judge A's labels, columns judge B's."""
    if len(a) != len(b):
        raise ValueError("label sequences differ in length")
    idx = {c: i for i, c in enumerate(classes)}
    m = [[0] * len(classes) for _ in classes]
    for x, y in zip(a, b, strict=True):
        m[idx[x]][idx[y]] += 1
    return m


def cohen_kappa(a: Sequence[int], b: Sequence[int], classes: Sequence[int] = CLASSES) -> float:
    """(p_o - p_e) / (1 - p_e); 1.0 when both judges agree perfectly on a single class."""
    m = confusion_matrix(a, b, classes)
    n = sum(map(sum, m))
    if n == 0:
        raise ValueError("no rows to compare")
    p_o = sum(m[i][i] for i in range(len(classes))) / n
    rows = [sum(r) / n for r in m]
    cols = [sum(m[i][j] for i in range(len(classes))) / n for j in range(len(classes))]
    p_e = sum(r * c for r, c in zip(rows, cols, strict=True))
    if p_e == 1.0:
        return 1.0
    return (p_o - p_e) / (1 - p_e)


def load_labels(path: str | os.PathLike[str], column: str = "label") -> pa.Table:
    """A shard directory or one Parquet file, with `id`, the label column and context."""
    p = Path(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    tables = [pq.read_table(f) for f in files if not f.name.startswith(".")]
    if not tables:
        raise FileNotFoundError(f"no parquet files in {path}")
    t = pa.concat_tables(tables, promote_options="default")
    if column not in t.column_names:
        raise ValueError(f"{path}: no column {column!r}")
    return t


@dataclass
class AgreementReport:
    n: int
    excluded: int  # rows where either label is null, or ids only on one side
    kappa: float
    accuracy: float
    confusion: list[list[int]]

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "excluded": self.excluded,
            "kappa": self.kappa,
            "accuracy": self.accuracy,
            "classes": list(CLASSES),
            "confusion_rows_a_cols_b": self.confusion,
        }


def _by_id(t: pa.Table, column: str) -> dict[str, int | None]:
    return dict(zip(t.column("id").to_pylist(), t.column(column).to_pylist(), strict=True))


def compare(
    a: pa.Table, b: pa.Table, col_a: str = "label", col_b: str = "label"
) -> AgreementReport:
    la, lb = _by_id(a, col_a), _by_id(b, col_b)
    ids = sorted(set(la) | set(lb))
    xs, ys = [], []
    for i in ids:
        x, y = la.get(i), lb.get(i)
        if x is not None and y is not None:
            xs.append(int(x))
            ys.append(int(y))
    m = confusion_matrix(xs, ys)
    agree = sum(1 for x, y in zip(xs, ys, strict=True) if x == y)
    return AgreementReport(len(xs), len(ids) - len(xs), cohen_kappa(xs, ys), agree / len(xs), m)


def stratified_sample(
    t: pa.Table, n: int, strata: Sequence[str] = ("label",), seed: int = 0
) -> list[dict]:
    """`n` rows spread evenly over strata (a small stratum gives all it has and its
    unused share goes to the others), so rare classes get reviewed at all."""
    rows = t.to_pylist()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(s) for s in strata)].append(r)
    rng = random.Random(seed)
    for g in groups.values():
        rng.shuffle(g)
    keys = sorted(groups, key=repr)
    take = dict.fromkeys(keys, 0)
    remaining = min(n, len(rows))
    while remaining > 0:
        open_keys = [k for k in keys if take[k] < len(groups[k])]
        share = max(1, remaining // len(open_keys))
        for k in open_keys:
            add = min(share, len(groups[k]) - take[k], remaining)
            take[k] += add
            remaining -= add
            if remaining == 0:
                break
    return [r for k in keys for r in groups[k][: take[k]]]


SAMPLE_FIELDS = [
    "id",
    "concept",
    "prompt",
    "response",
    "label_a",
    "label_b",
    "human_label",
    "notes",
]


def write_sample_csv(
    rows: list[dict], path: str | os.PathLike[str], col_a: str = "label", col_b: str | None = None
) -> None:
    """CSV with empty `human_label` / `notes` columns for reviewers to fill."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SAMPLE_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    "id": r.get("id"),
                    "concept": r.get("concept"),
                    "prompt": r.get("prompt"),
                    "response": r.get("response"),
                    "label_a": r.get(col_a),
                    "label_b": r.get(col_b) if col_b else "",
                    "human_label": "",
                    "notes": "",
                }
            )
