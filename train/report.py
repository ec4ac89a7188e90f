"""The `asteer-train all` report: our numbers beside the paper's, as markdown and JSON.

Why a report and not just ``summary.json``: the question a reader of the authors' release
asks is "does this reproduce the paper?", so every (model, method) row shows the paper's
number (``train.paper_numbers``, each with its source), ours as mean and std over the
split seeds, and the difference ours - paper. Caveats that change how a number reads
(labels used as given, failures stored as under-steer, no response lengths in the
authors' feature caches) are written into the report itself, not left to a README.

Other parts of the evaluation add their own sections through ``add_section`` (a dict
with ``title``, ``markdown`` and optional ``data``); the transfer evaluation is meant to
use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from train import paper_numbers as paper

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
#: our split names in evaluation results -> the paper's
SPLITS = {"seen_test": "seen", "unseen": "unseen"}
AUTHORS_FORMAT = "authors-feature-cache"


def _pairs(summary: dict) -> dict[str, dict]:
    """The per-(model, method) summaries of a `run_all` summary (one pair or several)."""
    return summary["pairs"] if "pairs" in summary else {
        f"{summary['model']}__{summary['method']}": summary
    }


def _runs(pair: dict) -> list[dict]:
    return pair.get("runs") or [pair | {"predictor": "default", "seed": None}]


def mean_std(values: list[float]) -> dict:
    """Mean and (population) std over split seeds; std is null for a single seed."""
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()) if len(a) > 1 else None,
        "n_seeds": len(a),
        "values": [float(v) for v in a],
    }


def _macro_f1_rows(key: str, pair: dict) -> list[dict]:
    ref = paper.paper_pair(pair["model"], pair["method"])
    ref_f1 = paper.MACRO_F1.get(ref) if ref else None
    rows = []
    runs = _runs(pair)
    for option in dict.fromkeys(r["predictor"] for r in runs):
        mine = [r for r in runs if r["predictor"] == option]
        for split, paper_split in SPLITS.items():
            for model_name in ("predictor", "alpha_only"):
                vals = [r["macro_f1"][split][model_name] for r in mine if split in r["macro_f1"]]
                if not vals:
                    continue
                ours = mean_std(vals)
                p = ref_f1[paper_split] if ref_f1 and model_name == "predictor" else None
                rows.append(
                    {
                        "pair": key,
                        "model": pair["model"],
                        "method": pair["method"],
                        "paper_row": list(ref) if ref else None,
                        "predictor_option": option,
                        "classifier": model_name,
                        "split": paper_split,
                        "ours": ours,
                        "seeds": [r["seed"] for r in mine],
                        "paper": p,
                        "difference": None if p is None else ours["mean"] - p,
                    }
                )
    return rows


def _search_rows(key: str, pair: dict) -> tuple[list[dict], str | None]:
    """Strength-search rows where lengths are known; else the reason it was skipped."""
    runs = [r for r in _runs(pair) if "skipped" not in r["search"]]
    if not runs:
        return [], next(iter(_runs(pair)))["search"].get("skipped")
    ref = paper.paper_pair(pair["model"], pair["method"])
    ref_search = paper.SEARCH if ref == paper.SEARCH_PAIR else {}
    rows = []
    for option in dict.fromkeys(r["predictor"] for r in runs):
        mine = [r for r in runs if r["predictor"] == option]
        for method in mine[0]["search"]:
            for metric in ("success_rate", "mean_tokens"):
                vals = [r["search"][method][metric] for r in mine if method in r["search"]]
                p = ref_search.get(method, {}).get(metric)
                ours = mean_std(vals)
                rows.append(
                    {
                        "pair": key,
                        "predictor_option": option,
                        "search_method": method,
                        "metric": metric,
                        "ours": ours,
                        "paper": p,
                        "difference": None if p is None else ours["mean"] - p,
                    }
                )
    return rows, None


def build_report(summary: dict, extra_sections: list[dict] | None = None) -> dict:
    """The report as a dict (what ``report.json`` holds)."""
    pairs = _pairs(summary)
    f1, search, skipped, notes = [], [], {}, []
    authors = False
    for key, pair in pairs.items():
        f1 += _macro_f1_rows(key, pair)
        rows, why = _search_rows(key, pair)
        search += rows
        if why:
            skipped[key] = why
        authors |= pair.get("dataset", {}).get("source_format") == AUTHORS_FORMAT
        joined = pair.get("dataset", {}).get("lengths")
        if joined:
            notes.append(
                f"{key}: response lengths joined from {joined['source']} on "
                f"({', '.join(joined['key'])}): {joined['rows_matched']} rows matched, "
                f"{joined['rows_without_length']} without a length (their items are left "
                "out of the strength search)"
            )
        if paper.paper_pair(pair["model"], pair["method"]) is None:
            notes.append(f"{key}: the paper has no row for this (model, method)")
    if authors:
        notes.append(
            "Labels are the authors' as given. Their code stored a failed or unparsable "
            "judgment as label 0 (under-steer); those rows cannot be told apart from real "
            "under-steer in their feature caches, so under-steer counts include them."
        )
    if skipped:
        notes.append(
            "The authors' feature caches carry no response lengths, so the strength "
            "search (which charges decoded tokens) is not run on them; it needs our "
            "datasets or imported result files, which carry response_tokens."
        )
    report = {
        "dataset": summary.get("dataset"),
        "sources": {"macro_f1": paper.MACRO_F1_SOURCE, "search": paper.SEARCH_SOURCE},
        "macro_f1": f1,
        "search": search,
        "search_skipped": skipped,
        "search_paper_pair": list(paper.SEARCH_PAIR),
        "notes": notes,
        "sections": [],
    }
    for section in extra_sections or []:
        add_section(report, section)
    return report


def add_section(report: dict, section: dict) -> dict:
    """Append another part's section (``{"title", "markdown", "data"?}``) to a report;
    it appears in report.json under ``sections`` and in report.md after ours."""
    missing = [k for k in ("title", "markdown") if k not in section]
    if missing:
        raise ValueError(f"report section lacks {missing}: {sorted(section)}")
    report["sections"].append(dict(section))
    return report


def _fmt(ms: dict | None, digits: int = 3) -> str:
    if ms is None:
        return "-"
    std = "" if ms["std"] is None else f" ± {ms['std']:.{digits}f}"
    return f"{ms['mean']:.{digits}f}{std}"


def _num(v: float | None, fmt: str = "{:+.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def report_markdown(report: dict) -> str:
    md = ["# asteer-train report\n"]
    if report.get("dataset"):
        md.append(f"\nData: `{report['dataset']}`\n")
    md.append(
        "\n## Macro-F1, ours vs the paper\n\nOurs: mean ± std over split seeds (std "
        "blank for one seed); difference = ours - paper. Paper: "
        f"{report['sources']['macro_f1']}.\n\n"
        "| model / method | predictor option | classifier | split | ours | paper | "
        "difference | seeds |\n|---|---|---|---|---|---|---|---|\n"
    )
    for r in report["macro_f1"]:
        md.append(
            f"| {r['pair']} | {r['predictor_option']} | {r['classifier']} | {r['split']} | "
            f"{_fmt(r['ours'])} | {_num(r['paper'], '{:.2f}')} | {_num(r['difference'])} | "
            f"{r['ours']['n_seeds']} |\n"
        )
    md.append(
        "\n## Strength search\n\nThe paper gives numbers for one configuration "
        f"({' / '.join(report['search_paper_pair'])}): {report['sources']['search']}.\n"
    )
    if report["search"]:
        md.append(
            "\n| model / method | predictor option | search | metric | ours | paper | "
            "difference |\n|---|---|---|---|---|---|---|\n"
        )
        for r in report["search"]:
            digits = 3 if r["metric"] == "success_rate" else 0
            md.append(
                f"| {r['pair']} | {r['predictor_option']} | {r['search_method']} | "
                f"{r['metric']} | {_fmt(r['ours'], digits)} | "
                f"{_num(r['paper'], '{:.' + str(digits) + 'f}')} | "
                f"{_num(r['difference'], '{:+.' + str(digits) + 'f}')} |\n"
            )
    for key, why in report["search_skipped"].items():
        md.append(f"\n- {key}: not run ({why})")
    if report["search_skipped"]:
        md.append("\n")
    if report["notes"]:
        md.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in report["notes"]))
    for s in report["sections"]:
        md.append(f"\n## {s['title']}\n\n{s['markdown'].rstrip()}\n")
    return "".join(md)


def write_report(
    out_dir: str | Path, summary: dict, extra_sections: list[dict] | None = None
) -> dict:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(summary, extra_sections)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out / REPORT_MD).write_text(report_markdown(report))
    return report
