"""Feature-subset selection (ablations) over the builder's feature names.

The naming scheme itself (forming and parsing names such as ``sa_t0_k0``, ``da_t1_mean``,
``dn_k3_max``, ``ds_std``, ``alpha``, ``vector_norm``) is the dataset contract's
(`asteer_build.core.contract`, from `asteer_build.engine.feature_names`); it is re-exported
here so everything in `train` that depends on the scheme goes through
``parse_feature_name``.
"""

from __future__ import annotations

from asteer_build.core.contract import META_FEATURES, STATS, FeatureInfo, parse_feature_name

__all__ = ["STATS", "META_FEATURES", "FeatureInfo", "parse_feature_name", "select_features"]


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
