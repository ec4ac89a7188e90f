"""Feature-name parsing and feature-subset selection (ablations).

The builder (asteer_build/engine/features.py) names every feature column self-describingly.
Everything here that depends on that scheme goes through ``parse_feature_name`` so a
change in the scheme is a change to one function. Assumed scheme:

- per-cell entry:         ``{group}_t{token}_k{layer_offset}``   e.g. ``SA_t0_k0``
- per-token statistic:    ``{group}_t{token}_{stat}``            e.g. ``DA_t1_mean``
- per-layer statistic:    ``{group}_k{layer_offset}_{stat}``     e.g. ``DN_k3_max``
- global statistic:       ``{group}_{stat}``                     e.g. ``DS_std``
- scalars:                ``alpha``, ``vector_norm``
Anything else parses as its own group with no token / layer.
"""

from __future__ import annotations

import re
from typing import NamedTuple

STATS = ("mean", "std", "max", "min")
META_FEATURES = ("alpha", "vector_norm")

_STAT = "|".join(STATS)
_CELL = re.compile(r"^(?P<group>.+?)_t(?P<token>\d+)_k(?P<k>-?\d+)$")
_TOKEN_STAT = re.compile(rf"^(?P<group>.+?)_t(?P<token>\d+)_(?P<stat>{_STAT})$")
_LAYER_STAT = re.compile(rf"^(?P<group>.+?)_k(?P<k>-?\d+)_(?P<stat>{_STAT})$")
_GLOBAL_STAT = re.compile(rf"^(?P<group>.+?)_(?P<stat>{_STAT})$")


class FeatureInfo(NamedTuple):
    name: str
    group: str
    token: int | None  # decode step t, None if the feature spans several or none
    layer_offset: int | None  # k in L + k, None if it spans several or none
    stat: str | None  # None for per-cell entries and scalars


def parse_feature_name(name: str) -> FeatureInfo:
    """The single place that knows the builder's feature naming scheme."""
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


def select_features(
    names: list[str],
    groups: list[str] | None = None,
    tokens: list[int] | None = None,
    no_alpha: bool = False,
) -> list[str]:
    """Subset for an ablation, keeping the original column order.

    ``groups`` keeps features of those groups (``vector_norm`` is its own group; ``alpha``
    is controlled only by ``no_alpha``). ``tokens`` keeps features computed *only* from
    those decode steps, so statistics pooled over all tokens (global and per-layer ones)
    are dropped: they would leak later steps into an "early-only" ablation.
    """
    out = []
    for name in names:
        info = parse_feature_name(name)
        if name == "alpha":
            if not no_alpha:
                out.append(name)
            continue
        if groups is not None and info.group not in groups:
            continue
        if tokens is not None and name not in META_FEATURES:
            if info.token is None or info.token not in tokens:
                continue
        out.append(name)
    if not out:
        raise ValueError(
            f"feature selection groups={groups} tokens={tokens} no_alpha={no_alpha} "
            "leaves no features"
        )
    return out
