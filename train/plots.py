"""PNG plots (matplotlib, Agg backend so it works headless on build machines)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from train.data import CLASS_NAMES  # noqa: E402


def confusion_plot(results: dict, path: str | Path, model: str = "predictor") -> Path:
    """Row-normalized confusion matrices of ``model``, one panel per split."""
    splits = [s for s in results if model in results[s]]
    fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(4.2 * max(len(splits), 1), 3.8))
    axes = np.atleast_1d(axes)
    for ax, split in zip(axes, splits, strict=False):
        r = results[split][model]
        m = np.asarray(r["confusion_normalized"])
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        for i in range(3):
            for j in range(3):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="white" if m[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(3), CLASS_NAMES)
        ax.set_yticks(range(3), CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{split}: macro-F1 {r['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def importance_heatmap(importance: dict, path: str | Path) -> Path:
    """Gain share per (decode step, layer offset) cell, plus group shares as bars."""
    hm = importance["heatmap"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    if hm["tokens"] and hm["layer_offsets"]:
        v = np.asarray(hm["values"])
        im = a1.imshow(v, cmap="viridis", aspect="auto")
        a1.set_xticks(range(len(hm["layer_offsets"])), [f"L+{k}" for k in hm["layer_offsets"]])
        a1.set_yticks(range(len(hm["tokens"])), [f"t={t}" for t in hm["tokens"]])
        fig.colorbar(im, ax=a1, label="gain share (per-cell features)")
    a1.set_title("importance: token x layer offset")
    groups = importance["by_group"]
    a2.barh(list(groups)[::-1], list(groups.values())[::-1])
    a2.set_xlabel("gain share")
    a2.set_title("importance by group")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def label_fraction_plot(frac: pd.DataFrame, path: str | Path) -> Path:
    """Fraction of under / success / over versus alpha."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for c in frac.columns:
        ax.plot(frac.index, frac[c], marker="o", ms=3, label=c)
    ax.set_xlabel("alpha")
    ax.set_ylabel("fraction of rollouts")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def search_plot(result: dict, path: str | Path, title: str = "") -> Path:
    """Success rate versus mean decoded tokens per item (log x)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ours = [r for r in result["table"] if r["method"].startswith("ours")]
    ax.plot(
        [r["mean_tokens"] for r in ours],
        [r["success_rate"] for r in ours],
        "o-",
        label="ours (K = " + ", ".join(str(r["k"]) for r in ours) + ")",
    )
    front = result["pareto"]
    if front:
        ax.plot(
            [r["mean_tokens"] for r in front],
            [r["success_rate"] for r in front],
            "--",
            color="grey",
            label="ours, Pareto front over tau",
        )
    for r in result["table"]:
        if not r["method"].startswith("ours"):
            ax.scatter(r["mean_tokens"], r["success_rate"], marker="s")
            ax.annotate(
                r["method"],
                (r["mean_tokens"], r["success_rate"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("decoded tokens per item")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "strength search")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
