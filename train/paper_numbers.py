"""The reference paper's numbers the report puts beside ours, each with where it is from.

One data module so that every number the report compares against has one source line
(arXiv 2606.11599, "When is Your LLM Steerable?", and its authors' repository). Macro-F1
values are read off the paper's figure (two decimals); the strength-search numbers are
read off its figure for one configuration only (likely Qwen3-1.7B, DiffMean: the paper
does not say), so they are compared for that pair only and the report says so.
"""

from __future__ import annotations

SOURCE = 'arXiv 2606.11599 ("When is Your LLM Steerable?")'

#: the paper's model names -> the names of their feature caches and of our configs
#: (``asteer_build/configs/asteer-paper.yaml``); matching is case-insensitive
MODEL_ALIASES = {
    "Qwen3-1.7B": ("qwen3-1.7b", "Qwen/Qwen3-1.7B"),
    "gemma-2-2b-it": ("gemma-2-2b-it", "google/gemma-2-2b-it"),
    "Llama-3.2-3B": (
        "llama-3.2-3b-instruct",
        "Llama-3.2-3B-Instruct",
        "meta-llama/Llama-3.2-3B-Instruct",
    ),
}
#: the paper's method names -> ours
METHOD_ALIASES = {"DiffMean": ("diffmean",), "LinearProbe": ("probe", "linearprobe")}

#: macro-F1 (seen concepts' test prompts, unseen concepts), the paper's predictor figure
MACRO_F1 = {
    ("Qwen3-1.7B", "DiffMean"): {"seen": 0.80, "unseen": 0.70},
    ("Qwen3-1.7B", "LinearProbe"): {"seen": 0.74, "unseen": 0.69},
    ("gemma-2-2b-it", "DiffMean"): {"seen": 0.81, "unseen": 0.69},
    ("gemma-2-2b-it", "LinearProbe"): {"seen": 0.70, "unseen": 0.66},
    ("Llama-3.2-3B", "DiffMean"): {"seen": 0.80, "unseen": 0.72},
    ("Llama-3.2-3B", "LinearProbe"): {"seen": 0.68, "unseen": 0.65},
}
MACRO_F1_SOURCE = f"{SOURCE}, predictor macro-F1 figure (read off, two decimals)"

#: the strength-search figure: one configuration; success rate and decoded tokens per item
SEARCH_PAIR = ("Qwen3-1.7B", "DiffMean")
SEARCH = {
    "ours@K=20": {"success_rate": 0.846, "mean_tokens": 5900.0},
    "IGS": {"success_rate": 0.859, "mean_tokens": 51300.0},
    "TCGS": {"success_rate": 0.588},
    "CGS": {"success_rate": 0.689},
    "IGS-A": {"mean_tokens": 14200.0},
    "IGS-D": {"mean_tokens": 26700.0},
}
SEARCH_SOURCE = (
    f"{SOURCE}, strength-search figure (read off; one configuration, likely "
    "Qwen3-1.7B / DiffMean; mean response length ~1,140 tokens)"
)


def _norm(name: str) -> str:
    return name.strip().lower()


def paper_model(name: str) -> str | None:
    """The paper's name for one of our / their model names, or None if not in the paper."""
    n = _norm(name)
    for paper, aliases in MODEL_ALIASES.items():
        if n == _norm(paper) or n in {_norm(a) for a in aliases}:
            return paper
    return None


def paper_method(name: str) -> str | None:
    n = _norm(name)
    for paper, aliases in METHOD_ALIASES.items():
        if n == _norm(paper) or n in aliases:
            return paper
    return None


def paper_pair(model: str, method: str) -> tuple[str, str] | None:
    """(paper model, paper method) for our (model, method), or None when the paper has
    no row for it (a tiny-world model, say)."""
    m, me = paper_model(model), paper_method(method)
    return None if m is None or me is None else (m, me)
