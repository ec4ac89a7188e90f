"""`make demo`: the whole product on the tiny world, end to end, on a CPU.

vectors -> steered rollouts with capture, replay and features -> rules-judge labels ->
a dataset folder as it would be published -> the LightGBM predictor per (model, method)
-> strength search, with plots and a summary. Every number the summary prints is read
back from the result files it names, so the two cannot disagree.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .core.console import console

log = logging.getLogger("asteer_build")

DEFAULT_CONFIG = "demo"  # the packaged asteer_build/configs/demo.yaml (config.resolve_config)
LABELS = {0: "under", 1: "success", 2: "over"}


def _label_table(folder: Path):
    import pandas as pd
    import pyarrow.parquet as pq

    files = sorted((folder / "rollouts").glob("*.parquet"))
    cols = ["model", "method", "concept", "alpha", "label", "judge_status"]
    return pd.concat([pq.read_table(f, columns=cols).to_pandas() for f in files])


def concept_fraction_plot(frame, path: Path) -> Path:
    """Label fractions versus alpha, one panel per concept (the success windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concepts = sorted(frame["concept"].unique())
    cols = 4
    rows = (len(concepts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharey=True,
                             squeeze=False)
    for ax, c in zip(axes.flat, concepts, strict=False):
        sub = frame[frame["concept"] == c]
        frac = sub.groupby("alpha")["label"].value_counts(normalize=True).unstack(fill_value=0)
        for lab, name in LABELS.items():
            if lab in frac.columns:
                ax.plot(frac.index, frac[lab], marker="o", ms=2, label=name)
        ax.set_title(c, fontsize=9)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(concepts):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("alpha")
    fig.supylabel("fraction of rollouts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(
    out: str | Path = "demo_out",
    config: str | Path = DEFAULT_CONFIG,
    n_trials: int = 20,
    stages_only: bool = False,
) -> dict[str, Any]:
    from train.data import list_pairs
    from train.run import run_all

    from .io.publish.assemble import assemble
    from .pipeline.build import RunOptions, run_build
    from .pipeline.config import load_config

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = load_config(config)
    build = run_build(cfg, RunOptions(out=str(out / "build")))
    t_build = time.time() - t0
    folder = out / "dataset"
    console.say("demo: assembling the dataset folder")
    assemble(build["run"], str(folder), repo="local/asteer-demo")
    frame = _label_table(folder)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    console.say("demo: plotting label fractions")
    for method, sub in frame.groupby("method"):
        concept_fraction_plot(sub, plots / f"label_fraction_by_concept-{method}.png")
    counts = frame["label"].value_counts().to_dict()
    n = len(frame)
    summary: dict[str, Any] = {
        "rollouts": n,
        "judge_status": frame["judge_status"].value_counts().to_dict(),
        "labels": {LABELS[int(k)]: int(v) for k, v in sorted(counts.items())},
        "label_fractions": {LABELS[int(k)]: round(v / n, 4) for k, v in sorted(counts.items())},
        "build_seconds": round(t_build, 1),
        "dataset": str(folder),
        "predictors": {},
    }
    if not stages_only:
        for model, method in list_pairs(folder):
            tdir = out / "train" / f"{model}-{method}"
            console.say(f"demo: training and evaluating the predictor for {model}/{method} "
                        f"({n_trials} search trials)")
            res = run_all(folder, tdir, model=model, method=method, n_trials=n_trials)
            summary["predictors"][f"{model}/{method}"] = {
                "summary_file": str(tdir / "summary.json"),
                "macro_f1": res["macro_f1"],
                "search": res["search"],
            }
            for png in tdir.glob("*.png"):
                (plots / f"{model}-{method}-{png.name}").write_bytes(png.read_bytes())
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def summary_text(s: dict[str, Any]) -> str:
    """The human summary the demo ends with: every number in it is from `summary.json`."""
    lines = [f"\nasteer demo: {s['rollouts']} rollouts in {s['seconds']} s "
             f"(build {s['build_seconds']} s); dataset at {s['dataset']}",
             "labels: " + ", ".join(f"{k} {v} ({s['label_fractions'][k]:.0%})"
                                    for k, v in s["labels"].items())]
    for key, p in s["predictors"].items():
        lines.append(f"\n{key}: macro-F1 (seen-test / unseen)")
        seen = p["macro_f1"].get("seen_test", {})
        unseen = p["macro_f1"].get("unseen", {})
        for m in sorted(set(seen) | set(unseen)):
            a, b = seen.get(m), unseen.get(m)
            lines.append(f"  {m:<12} {a if a is None else f'{a:.3f}'} / "
                         f"{b if b is None else f'{b:.3f}'}")
        lines.append("  strength search: method, success rate, mean decoded tokens per item")
        for m, r in p["search"].items():
            lines.append(f"  {m:<14} {r['success_rate']:.3f} {r['mean_tokens']:>10.1f}")
    return "\n".join(lines)


def print_summary(s: dict[str, Any]) -> None:
    console.summary(summary_text(s))


def cmd_demo(a: Any) -> dict[str, Any]:
    """`asteer-build demo`: quiet unless --verbose; the log is OUT/logs/demo.log."""
    from .core.console import quiet_for

    with quiet_for(a, Path(a.out).resolve() / "logs" / "demo.log", "asteer-build demo"):
        return run_demo(a.out, a.config, n_trials=a.trials)


def add_demo_command(sub) -> None:
    sp = sub.add_parser("demo", help="the tiny world end to end (vectors to strength search)")
    sp.add_argument("--out", default="demo_out")
    sp.add_argument("--config", default=DEFAULT_CONFIG,
                    help="a config file, or a packaged config by name (default: demo)")
    sp.add_argument("--trials", type=int, default=20, help="search trials (the predictor's)")
    from .core.console import add_output_flags

    add_output_flags(sp)
    sp.set_defaults(fn=cmd_demo)
