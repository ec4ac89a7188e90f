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


def alpaca_rows(n_prompts: int = 805) -> list[dict[str, str]]:
    """`alpaca_eval.json` as the authors ship it: instruction, dataset, output, generator."""
    return [
        {
            "instruction": instruction(i),
            "dataset": _DATASETS[i % len(_DATASETS)],
            "output": f"Synthetic reference answer {i}.",
            "generator": "text_davinci_003",
        }
        for i in range(n_prompts)
    ]


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
    (snap / "alpaca_eval.json").write_text(json.dumps(alpaca_rows(n_prompts), indent=2))
    for cid in ids:
        bank = {
            "positive": [f"A reply full of {concept_name(cid)}, example {k}."
                         for k in range(bank_size)],
            "negative": [f"A plain reply on another subject, example {k} for {cid}."
                         for k in range(bank_size)],
        }
        (snap / "training" / f"{cid}.json").write_text(json.dumps(bank))
    return commit


# ------------------------------------------------------------ result files and judgments
#: the explanation `process_judgment_results.py` stores next to a failure-as-0
FAILED_EXPLANATION = ("Evaluation error parsing response: Empty content received "
                      "(Finish reason: length)")


def prompt_draw(n_prompts: int = 805) -> list[dict[str, str]]:
    """The authors' 50 prompts: `random.seed(42); random.sample(rows, 50)` (`utils.py`)."""
    import random

    return random.Random(42).sample(alpaca_rows(n_prompts), 50)


def judgment(cid: int, alpha_index: int, sid: int) -> int:
    """A synthetic label that varies with concept, strength and prompt."""
    return (cid + alpha_index + sid) % 3


def result_file(method_dir: str, model_path: str, cid: int, layer: int, alpha: float,
                alpha_index: int, failed_sids: tuple[int, ...] = (),
                unjudged_sids: tuple[int, ...] = ()) -> dict:
    """One `{layer}-{alpha}.json` as `utils.save_results` writes it and
    `process_judgment_results.py` then fills (judgment, explanation per result)."""
    meta = {"method": method_dir, "model": model_path, "layer": layer, "alpha": alpha,
            "concept_id": cid, "num_samples": 50, "num_successful": 50,
            "timestamp": "2026-01-01T00:00:00"}
    if method_dir == "diffmean":
        meta["steering_vector_norm"] = 10.0 + cid / 8
    else:
        meta["classification_accuracy"] = 0.97
    results = []
    for sid, p in enumerate(prompt_draw()):
        r = {"sample_id": sid, "dataset": p["dataset"], "instruction": p["instruction"],
             "prompt": p["instruction"], "response_before": None,
             "response_after": f"Steered reply {cid}/{alpha}/{sid} about {concept_name(cid)}.",
             "alpha": alpha}
        if sid in failed_sids:
            r.update(judgment=0, explanation=FAILED_EXPLANATION)
        elif sid not in unjudged_sids:
            r.update(judgment=judgment(cid, alpha_index, sid),
                     explanation=f"Synthetic judge reason for sample {sid}.")
        results.append(r)
    return {"metadata": meta, "results": results}


def write_results(data_dir: str | Path, method_dir: str, model: str, cids: list[int],
                  alphas: list[float], layer: int = 10, **kw) -> Path:
    """`result/{method}/{model}/{cid}/{layer}-{alpha}.json` under `data_dir`."""
    base = Path(data_dir) / "result" / method_dir / model
    for cid in cids:
        (base / str(cid)).mkdir(parents=True, exist_ok=True)
        for k, alpha in enumerate(alphas):
            doc = result_file(method_dir, f"org/{model}", cid, layer, alpha, k, **kw)
            (base / str(cid) / f"{layer}-{alpha}.json").write_text(json.dumps(doc, indent=2))
    return base


def judgments_cache(method_dir: str, model: str, cids: list[int], alphas: list[float],
                    layer: int = 10) -> dict:
    """`cache/judgments__{method}__{model}__L{layer}.json` as
    `utils.build_judgment_cache_payload` writes it (alpha 0 excluded, keys strings)."""
    return {
        "format_version": 1, "layer": layer, "steering_method": method_dir, "llm": model,
        "result_dir": f"/data/result/{method_dir}/{model}",
        "alphas": sorted(round(a, 2) for a in alphas if a != 0),
        "judgments": {str(cid): {str(round(a, 2)): {str(sid): judgment(cid, k, sid)
                                                     for sid in range(50)}
                                 for k, a in enumerate(alphas) if a != 0}
                      for cid in cids},
    }


def write_judgments(data_dir: str | Path, method_dir: str, model: str, cids: list[int],
                    alphas: list[float], layer: int = 10) -> Path:
    p = Path(data_dir) / "cache" / f"judgments__{method_dir}__{model}__L{layer}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(judgments_cache(method_dir, model, cids, alphas, layer), indent=2))
    return p


def pack_results(data_dir: str | Path, method_dir: str, model: str, dest_dir: str | Path
                 ) -> Path:
    """`result__{method}__{model}.tar.zst` as `tools/upload_data.py` packs it (tar of
    `result/{method}/{model}` relative to the data folder, compressed with zstd)."""
    import subprocess

    out = Path(dest_dir) / f"result__{method_dir}__{model}.tar.zst"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "--use-compress-program=zstd -q", "-cf", str(out), "-C",
                    str(data_dir), f"result/{method_dir}/{model}"], check=True)
    return out
