"""A Hugging Face hub cache holding the authors' dataset `Fcr09/SteerBoost-data` in its
exact file layout, with synthetic text, so tests read "the authors' data" offline.

Layout written (what `huggingface_hub` looks up with `HF_HUB_OFFLINE=1`):

    HUB_CACHE/datasets--Fcr09--SteerBoost-data/
        refs/main                               the commit (40 hex digits)
        snapshots/<commit>/concepts.json        [{"concept_id": 0, "concept_name": ...}, ...]
        snapshots/<commit>/alpaca_eval.json     [{"instruction", "dataset", "output",
                                                  "generator"}, ...]
        snapshots/<commit>/training/{cid}.json  {"positive": [...], "negative": [...]}

Files sit in the snapshot folder itself rather than as links into `blobs/` (the layout
`huggingface_hub` also uses where links are unavailable); lookups are the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

REPO = "Fcr09/SteerBoost-data"
_TOPICS = ("rivers", "clocks", "pianos", "lanterns", "glaciers", "orchards", "comets",
           "harbors", "meadows", "bridges")
_DATASETS = ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna")


def repo_folder(hub_cache_dir: str | Path, repo: str = REPO) -> Path:
    return Path(hub_cache_dir) / ("datasets--" + repo.replace("/", "--"))


def concept_name(cid: int) -> str:
    return f"writing that mentions {_TOPICS[cid % len(_TOPICS)]} (synthetic concept {cid})"


def instruction(i: int) -> str:
    return f"Synthetic instruction {i}: describe {_TOPICS[(i * 7) % len(_TOPICS)]} briefly."


def write_authors_cache(
    hub_cache_dir: str | Path,
    n_concepts: int = 150,
    n_prompts: int = 805,
    bank_size: int = 50,
    revision: str = "main",
    concept_ids: list[int] | None = None,
) -> str:
    """Write the authors' files into a hub cache folder; return the commit they sit at.

    `concept_ids` overrides the ids 0..n_concepts-1 (a bad-input test puts one outside
    the level ranges). The commit is derived from the arguments, so the same call gives
    the same commit.
    """
    ids = list(range(n_concepts)) if concept_ids is None else list(concept_ids)
    commit = hashlib.sha1(f"{ids}|{n_prompts}|{bank_size}".encode()).hexdigest()
    root = repo_folder(hub_cache_dir)
    snap = root / "snapshots" / commit
    (snap / "training").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    concepts = [{"concept_id": cid, "concept_name": concept_name(cid)} for cid in ids]
    (snap / "concepts.json").write_text(json.dumps(concepts, indent=2))
    rows = [
        {
            "instruction": instruction(i),
            "dataset": _DATASETS[i % len(_DATASETS)],
            "output": f"Synthetic reference answer {i}.",
            "generator": "text_davinci_003",
        }
        for i in range(n_prompts)
    ]
    (snap / "alpaca_eval.json").write_text(json.dumps(rows, indent=2))
    for cid in ids:
        bank = {
            "positive": [f"A reply full of {concept_name(cid)}, example {k}."
                         for k in range(bank_size)],
            "negative": [f"A plain reply on another subject, example {k} for {cid}."
                         for k in range(bank_size)],
        }
        (snap / "training" / f"{cid}.json").write_text(json.dumps(bank))
    return commit
