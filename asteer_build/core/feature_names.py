"""The feature-name scheme: how the 414 feature columns are named, and how a name is read.

Pure Python (no torch, no vLLM), so the dataset contract (`asteer_build.core.contract`), which
`judge` and `train` import, can share it with the tensor maths in `features.py` without
either side holding a copy; the engine package imports its heavy modules lazily, so
importing this one loads nothing else.

- per-cell entry:         ``{group}_t{step}_k{offset}``     e.g. ``sa_t0_k0``
- global statistic:       ``{group}_{stat}``               (mean, std, max, min)
- per-token statistic:    ``{group}_t{step}_{stat}``        (mean, std, max)
- per-layer statistic:    ``{group}_k{offset}_{stat}``      (mean, std, max)
- scalars:                ``alpha``, ``vector_norm``
Anything else parses as its own group with no step, offset or statistic.

The reference authors' code names the same columns differently, with absolute layers
(their `xgb/train.py` `build_feature_names`); `authors_name(name, layer)` maps one of ours
to theirs for a steered layer L, `authors_columns` lists theirs in their column order:

- families: ``dn`` MagDiff, ``ds`` CosSim, ``da`` SteerAlign, ``sa`` SteerProj,
  ``dnr`` MagDiffRatio, ``dsd`` CosSimDelta, ``dad`` SteerAlignDelta;
- entry ``{g}_t{t}_k{k}`` -> ``{G}_T{t}_L{L+k}`` (``dn_t1_k1`` at L = 10: ``MagDiff_T1_L11``);
- global ``{g}_{stat}`` -> ``{G}_{Stat}_Global``; per token ``{g}_t{t}_{stat}`` ->
  ``{G}_{Stat}_T{t}_AllLayers``; per layer ``{g}_k{k}_{stat}`` ->
  ``{G}_{Stat}_L{L+k}_AllTokens`` (``..._AllNonZeroTokens`` for the dynamics families);
- ``vector_norm`` -> ``InterventionMag`` (theirs is ||after - before|| at (t0, L) / alpha,
  ||v_c|| up to the model dtype's rounding), ``alpha`` -> ``Alpha``.
Their column order is ours except the tail: ``InterventionMag`` then ``Alpha``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

#: the builder's seven feature families (order of the columns)
GROUPS = ("dn", "ds", "da", "sa", "dnr", "dsd", "dad")
#: statistics of a whole token x layer matrix; per token / per layer ones drop `min`
STATS = ("mean", "std", "max", "min")
ROW_STATS = STATS[:3]
META_FEATURES = ("alpha", "vector_norm")
#: the capture defaults: decode steps t and layer offsets k (4 x 7 -> 414 features)
DEFAULT_STEPS = (0, 1, 3, 5)
DEFAULT_OFFSETS = (0, 1, 2, 3, 5, 10, 15)


def layout(steps: Sequence[int], offsets: Sequence[int]) -> dict[str, tuple[list, list]]:
    """(steps, offsets) of each family's matrix: the dynamics (dnr, dsd, dad) drop the
    first step, the alignments with the change (da, dad) drop offset 0."""
    ks_all = list(offsets)
    ks_no0 = [k for k in ks_all if k != 0]
    ts_all = list(steps)
    ts_dyn = ts_all[1:]
    return {
        "dn": (ts_all, ks_all), "ds": (ts_all, ks_all), "da": (ts_all, ks_no0),
        "sa": (ts_all, ks_all), "dnr": (ts_dyn, ks_all), "dsd": (ts_dyn, ks_all),
        "dad": (ts_dyn, ks_no0),
    }


def group_names(group: str, steps: Sequence[int], offsets: Sequence[int]) -> list[str]:
    """One family's columns: entries (step-major), global, per-token, per-layer stats."""
    names = [f"{group}_t{t}_k{k}" for t in steps for k in offsets]
    names += [f"{group}_{stat}" for stat in STATS]
    names += [f"{group}_t{t}_{stat}" for t in steps for stat in ROW_STATS]
    names += [f"{group}_k{k}_{stat}" for k in offsets for stat in ROW_STATS]
    return names


def feature_names(
    steps: Sequence[int] = DEFAULT_STEPS, offsets: Sequence[int] = DEFAULT_OFFSETS
) -> list[str]:
    """The builder's feature columns, in the order `features.compute` returns values."""
    if list(offsets)[:1] != [0]:
        raise ValueError(f"layer offsets must start with 0 (the steered layer), got {offsets}")
    names: list[str] = []
    for g, (ts, ks) in layout(steps, offsets).items():
        names += group_names(g, ts, ks)
    return names + list(META_FEATURES)


class FeatureInfo(NamedTuple):
    name: str
    group: str
    token: int | None  # decode step t, None if the feature spans several or none
    layer_offset: int | None  # k in L + k, None if it spans several or none
    stat: str | None  # None for per-cell entries and scalars


_STAT = "|".join(STATS)
_CELL = re.compile(r"^(?P<group>.+?)_t(?P<token>\d+)_k(?P<k>-?\d+)$")
_TOKEN_STAT = re.compile(rf"^(?P<group>.+?)_t(?P<token>\d+)_(?P<stat>{_STAT})$")
_LAYER_STAT = re.compile(rf"^(?P<group>.+?)_k(?P<k>-?\d+)_(?P<stat>{_STAT})$")
_GLOBAL_STAT = re.compile(rf"^(?P<group>.+?)_(?P<stat>{_STAT})$")


def parse_feature_name(name: str) -> FeatureInfo:
    """The inverse of `group_names` / `feature_names`."""
    if name in META_FEATURES:
        return FeatureInfo(name, name, None, None, None)
    m = _CELL.match(name)
    if m:
        return FeatureInfo(name, m["group"], int(m["token"]), int(m["k"]), None)
    m = _TOKEN_STAT.match(name)
    if m:
        return FeatureInfo(name, m["group"], int(m["token"]), None, m["stat"])
    m = _LAYER_STAT.match(name)
    if m:
        return FeatureInfo(name, m["group"], None, int(m["k"]), m["stat"])
    m = _GLOBAL_STAT.match(name)
    if m:
        return FeatureInfo(name, m["group"], None, None, m["stat"])
    return FeatureInfo(name, name, None, None, None)


def feature_family(name: str) -> str | None:
    """The builder family (one of `GROUPS`) a column belongs to, or None (keys, scalars)."""
    group = parse_feature_name(name).group
    return group if group in GROUPS else None


#: our family -> the authors' metric name
AUTHORS_GROUPS = {
    "dn": "MagDiff", "ds": "CosSim", "da": "SteerAlign", "sa": "SteerProj",
    "dnr": "MagDiffRatio", "dsd": "CosSimDelta", "dad": "SteerAlignDelta",
}
#: our scalar -> theirs
AUTHORS_SCALARS = {"vector_norm": "InterventionMag", "alpha": "Alpha"}
_DYNAMICS = ("dnr", "dsd", "dad")


def authors_name(name: str, layer: int) -> str:
    """The reference authors' name of one of our feature columns, for steered layer
    `layer` (their names carry absolute layers). Raises ValueError for a name that is
    not one of the builder's features."""
    if name in AUTHORS_SCALARS:
        return AUTHORS_SCALARS[name]
    info = parse_feature_name(name)
    metric = AUTHORS_GROUPS.get(info.group)
    if metric is None:
        raise ValueError(f"feature {name!r}: not a builder feature (families {GROUPS})")
    if info.stat is None:
        if info.token is None or info.layer_offset is None:
            raise ValueError(f"feature {name!r}: not a builder feature")
        return f"{metric}_T{info.token}_L{layer + info.layer_offset}"
    stat = info.stat.capitalize()
    if info.token is not None:
        return f"{metric}_{stat}_T{info.token}_AllLayers"
    if info.layer_offset is not None:
        over = "AllNonZeroTokens" if info.group in _DYNAMICS else "AllTokens"
        return f"{metric}_{stat}_L{layer + info.layer_offset}_{over}"
    return f"{metric}_{stat}_Global"


def authors_names(
    layer: int, steps: Sequence[int] = DEFAULT_STEPS, offsets: Sequence[int] = DEFAULT_OFFSETS
) -> dict[str, str]:
    """Ours -> theirs for every column of `feature_names(steps, offsets)`, in our order."""
    return {n: authors_name(n, layer) for n in feature_names(steps, offsets)}


def authors_columns(
    layer: int, steps: Sequence[int] = DEFAULT_STEPS, offsets: Sequence[int] = DEFAULT_OFFSETS
) -> list[str]:
    """The authors' column order (their feature cache's), as their names: ours, with the
    two scalars swapped to ``InterventionMag``, ``Alpha``. Their layout always starts at
    step 0, so `steps` must too."""
    if list(steps)[:1] != [0]:
        raise ValueError(f"the authors' layout starts at step 0, got steps {list(steps)}")
    names = [authors_name(n, layer) for n in feature_names(steps, offsets)
             if n not in AUTHORS_SCALARS]
    return names + ["InterventionMag", "Alpha"]
