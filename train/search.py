"""Strength search: how to find a working alpha per (concept, prompt) item, and at
what cost in decoded tokens. All search strategies and the cost model live here.

The dataset's labels are the oracle: "fully decoding alpha a for item i" means looking
up the label of row (i, a). An item succeeds if a decoded alpha has label 1.

Cost model (decoded tokens per item, exact and simple so a toy grid can be checked by
hand):
- predictor-guided: |grid| x probe_tokens (the short steered probe of every alpha;
  the unsteered replay is a prefill, not decoding) + rollouts tried x length;
  an item skipped by the threshold tau still pays the probes.
- baselines: rollouts tried x length, no probes.
- length = ``mean``: the mean ``response_tokens`` over all rows handed to the search
  (the reference's convention), or a given ``mean_length``;
  length = ``actual``: the ``response_tokens`` of the very rows that were decoded.
Rates and costs are averaged over all items, skipped ones included (as failures).
Ties: ranking by P(success) breaks ties by smaller alpha; "best alpha" choices of TCGS
and CGS break ties by smaller alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

DEFAULT_KS = (5, 10, 15, 20)
DEFAULT_PROBE_TOKENS = 6


@dataclass
class Item:
    concept_id: str
    prompt_id: str
    alphas: np.ndarray  # ascending
    labels: np.ndarray
    lengths: np.ndarray  # tokens charged per full rollout (mean or actual)
    p_success: np.ndarray


def build_items(
    rows: pd.DataFrame, length: str = "mean", mean_length: float | None = None
) -> tuple[list[Item], float]:
    """Per-item arrays sorted by alpha, plus the mean length used for charging."""
    need = {"concept_id", "prompt_id", "alpha", "label", "response_tokens"}
    missing = need - set(rows.columns)
    if missing:
        raise ValueError(f"search rows lack columns {sorted(missing)}")
    if length not in ("mean", "actual"):
        raise ValueError(f"length must be 'mean' or 'actual', got {length!r}")
    if mean_length is None and rows["response_tokens"].isna().all():
        # e.g. the authors' feature caches: they carry no response lengths, and a search
        # charged in NaN tokens would print numbers that mean nothing
        raise ValueError("search rows have no response_tokens (all missing): the strength "
                         "search charges decoded tokens; use a dataset with rollouts or "
                         "pass a mean length")
    if mean_length is None:
        mean_length = float(rows["response_tokens"].mean())
    items = []
    p_col = (
        rows["p_success"] if "p_success" in rows.columns else pd.Series(np.nan, index=rows.index)
    )
    rows = rows.assign(p_success=p_col.to_numpy())
    for (c, p), g in rows.groupby(["concept_id", "prompt_id"], sort=True):
        g = g.sort_values("alpha", kind="stable")
        if g["alpha"].duplicated().any():
            raise ValueError(f"item ({c}, {p}) has several rows for one alpha")
        lengths = (
            np.full(len(g), mean_length, dtype=float)
            if length == "mean"
            else g["response_tokens"].to_numpy(dtype=float)
        )
        items.append(
            Item(
                str(c),
                str(p),
                g["alpha"].to_numpy(float),
                g["label"].to_numpy(np.int64),
                lengths,
                g["p_success"].to_numpy(float),
            )
        )
    return items, float(mean_length)


def _first_success_cost(order: np.ndarray, item: Item, limit: int) -> tuple[bool, int, float]:
    """Decode alphas in ``order`` up to ``limit``; stop at the first success."""
    tried, cost = 0, 0.0
    for idx in order[:limit]:
        tried += 1
        cost += item.lengths[idx]
        if item.labels[idx] == 1:
            return True, tried, cost
    return False, tried, cost


def _summary(
    name: str, success: list[bool], tokens: list[float], rollouts: list[int], **extra
) -> dict:
    n = len(success)
    return {
        "method": name,
        **extra,
        "items": n,
        "success_rate": float(np.mean(success)) if n else 0.0,
        "mean_tokens": float(np.mean(tokens)) if n else 0.0,
        "mean_rollouts": float(np.mean(rollouts)) if n else 0.0,
    }


def predictor_guided(
    items: list[Item], k: int, tau: float = 0.0, probe_tokens: int = DEFAULT_PROBE_TOKENS
) -> dict:
    """Ours: rank by P(success), decode the top k in order, stop at the first success;
    skip the item (no rollout) when no alpha reaches P(success) >= tau."""
    s, t, r, attempted = [], [], [], 0
    for it in items:
        if np.isnan(it.p_success).any():
            raise ValueError(f"item ({it.concept_id}, {it.prompt_id}) lacks p_success")
        probes = len(it.alphas) * probe_tokens
        if it.p_success.max() < tau:
            s.append(False)
            t.append(float(probes))
            r.append(0)
            continue
        attempted += 1
        order = np.lexsort((it.alphas, -it.p_success))
        ok, tried, cost = _first_success_cost(order, it, k)
        s.append(ok)
        t.append(probes + cost)
        r.append(tried)
    return _summary(
        f"ours@K={k}",
        s,
        t,
        r,
        k=k,
        tau=tau,
        attempted_fraction=attempted / len(items) if items else 0.0,
    )


def igs(items: list[Item]) -> dict:
    """Item-level grid search: decode every alpha (upper bound on success)."""
    return _summary(
        "IGS",
        [bool((it.labels == 1).any()) for it in items],
        [float(it.lengths.sum()) for it in items],
        [len(it.alphas) for it in items],
    )


def igs_ordered(items: list[Item], descending: bool) -> dict:
    """Grid in ascending (IGS-A) or descending (IGS-D) alpha, stop at first success."""
    s, t, r = [], [], []
    for it in items:
        order = np.arange(len(it.alphas))[::-1] if descending else np.arange(len(it.alphas))
        ok, tried, cost = _first_success_cost(order, it, len(order))
        s.append(ok)
        t.append(cost)
        r.append(tried)
    return _summary("IGS-D" if descending else "IGS-A", s, t, r)


def _best_alpha(rows: pd.DataFrame) -> float | None:
    if rows.empty:
        return None
    rate = (rows["label"] == 1).groupby(rows["alpha"]).mean()
    best = rate.max()
    return float(min(a for a, v in rate.items() if v == best))


def _single_alpha(
    name: str, items: list[Item], chosen: dict[tuple[str, str], float | None]
) -> dict:
    s, t, r = [], [], []
    for it in items:
        a = chosen[(it.concept_id, it.prompt_id)]
        hit = np.flatnonzero(np.isclose(it.alphas, a)) if a is not None else np.array([])
        if len(hit) == 0:  # no choice possible or alpha off this item's grid
            idx = len(it.alphas) // 2
        else:
            idx = int(hit[0])
        s.append(bool(it.labels[idx] == 1))
        t.append(float(it.lengths[idx]))
        r.append(1)
    return _summary(name, s, t, r)


def tcgs(items: list[Item], calibration: pd.DataFrame) -> dict:
    """Per-concept best alpha from calibration rows of the same concept on *other*
    prompts (seen concepts: their training prompts; unseen: their other prompts),
    one rollout per item. Without calibration rows, the grid's middle alpha."""
    cal = calibration.assign(
        concept_id=calibration["concept_id"].astype(str),
        prompt_id=calibration["prompt_id"].astype(str),
    )
    by_concept = dict(iter(cal.groupby("concept_id")))
    chosen = {}
    for it in items:
        rows = by_concept.get(it.concept_id, cal.iloc[:0])
        chosen[(it.concept_id, it.prompt_id)] = _best_alpha(rows[rows["prompt_id"] != it.prompt_id])
    return _single_alpha("TCGS", items, chosen)


def cgs(items: list[Item]) -> dict:
    """Oracle per-concept alpha chosen on the evaluated prompts themselves."""
    rows = pd.DataFrame(
        [
            (it.concept_id, a, lab)
            for it in items
            for a, lab in zip(it.alphas, it.labels, strict=True)
        ],
        columns=["concept_id", "alpha", "label"],
    )
    best = {c: _best_alpha(g) for c, g in rows.groupby("concept_id")}
    return _single_alpha(
        "CGS", items, {(it.concept_id, it.prompt_id): best[it.concept_id] for it in items}
    )


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated by one with fewer or equal tokens and higher or equal
    success (strictly better in one)."""
    front = []
    for p in points:
        dominated = any(
            q["mean_tokens"] <= p["mean_tokens"]
            and q["success_rate"] >= p["success_rate"]
            and (q["mean_tokens"] < p["mean_tokens"] or q["success_rate"] > p["success_rate"])
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["mean_tokens"])


def evaluate_search(
    rows: pd.DataFrame,
    calibration: pd.DataFrame,
    ks: tuple[int, ...] = DEFAULT_KS,
    taus: tuple[float, ...] | None = None,
    probe_tokens: int = DEFAULT_PROBE_TOKENS,
    length: str = "mean",
    mean_length: float | None = None,
) -> dict:
    """All strategies on the items in ``rows`` (which need ``p_success``).

    Returns the table (ours at tau = 0 for every K, then the baselines), the tau sweep
    and its Pareto front, each row with success and tokens relative to IGS."""
    items, mean_len = build_items(rows, length, mean_length)
    if not items:
        raise ValueError("no items to search")
    table = [predictor_guided(items, k, 0.0, probe_tokens) for k in ks]
    table += [
        tcgs(items, calibration),
        cgs(items),
        igs(items),
        igs_ordered(items, descending=False),
        igs_ordered(items, descending=True),
    ]
    if taus is None:
        maxp = np.array([it.p_success.max() for it in items])
        taus = tuple(sorted(set(np.round(np.quantile(maxp, np.linspace(0, 0.9, 10)), 6))))
    sweep = [predictor_guided(items, k, float(tau), probe_tokens) for k in ks for tau in taus]
    ref = next(r for r in table if r["method"] == "IGS")
    for r in table + sweep:
        r["success_vs_igs"] = (
            r["success_rate"] / ref["success_rate"] if ref["success_rate"] else 0.0
        )
        r["tokens_vs_igs"] = r["mean_tokens"] / ref["mean_tokens"] if ref["mean_tokens"] else 0.0
    return {
        "cost_model": {
            "probe_tokens": probe_tokens,
            "length": length,
            "mean_length": mean_len,
            "grid_sizes": sorted({len(i.alphas) for i in items}),
        },
        "items": len(items),
        "table": table,
        "tau_sweep": sweep,
        "pareto": pareto_front(sweep),
    }


def search_markdown(result: dict) -> str:
    head = [
        "method",
        "success",
        "tokens / item",
        "rollouts / item",
        "success vs IGS",
        "tokens vs IGS",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["table"]:
        lines.append(
            f"| {r['method']} | {r['success_rate']:.3f} | {r['mean_tokens']:.1f} | "
            f"{r['mean_rollouts']:.2f} | {r['success_vs_igs']:.3f} | {r['tokens_vs_igs']:.3f} |"
        )
    return "\n".join(lines) + "\n"
