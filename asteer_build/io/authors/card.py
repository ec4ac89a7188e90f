"""The dataset card of an imported authors' release (`asteer-build import`): the same
YAML header `publish` writes (configs, features, counts), then a body that names the
source dataset, its license as the authors state it, the paper, and every way the
folder differs from one we build (no features or activations, their replay, their
failure-as-0 labels, what is null)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from ..publish.card import _HEADER_ORDER, _size_category
from ..publish.layout import SPLIT


def _features_yaml(config: str) -> list[dict[str, Any]]:
    import datasets

    from ...core import contract
    from .facts import IMPORT_SCHEMA

    schema = {"rollouts": IMPORT_SCHEMA, "concepts": contract.CONCEPTS_SCHEMA,
              "prompts": contract.PROMPTS_SCHEMA}[config]
    return datasets.Features.from_arrow_schema(schema)._to_yaml_list()


def _header(license_id: str, entries: list[dict[str, Any]], counts: dict[str, int]) -> str:
    from huggingface_hub import DatasetCardData

    configs, infos = [], []
    for name in ("rollouts", "concepts", "prompts"):
        entry: dict[str, Any] = {"config_name": name,
                                 "data_files": [{"split": SPLIT, "path": f"{name}/*.parquet"}]}
        if name == "rollouts":
            entry["default"] = True
        configs.append(entry)
        mine = [e for e in entries if e["config"] == name]
        size = sum(e["bytes"] for e in mine)
        infos.append({"config_name": name, "features": _features_yaml(name),
                      "splits": [{"name": SPLIT, "num_bytes": size,
                                  "num_examples": counts[name]}],
                      "download_size": size, "dataset_size": size})
    meta = DatasetCardData(
        license=license_id,
        language=["en"],
        pretty_name="ASTEER reference testbed (the authors' release, imported)",
        task_categories=["text-classification"],
        tags=["activation-steering", "steering-vectors", "interpretability", "steerability"],
        size_categories=[_size_category(counts["rollouts"])],
        configs=configs,
        dataset_info=infos,
    )
    return meta.to_yaml(original_order=_HEADER_ORDER)


def import_card(source: dict[str, Any], entries: list[dict[str, Any]],
                counts: dict[str, int], labels: list[dict[str, Any]],
                pairs: list[dict[str, Any]], concepts: pa.Table) -> str:
    from .facts import (
        AUTHORS_CODE,
        FAILURE_PREFIXES,
        JUDGE_MODEL,
        JUDGE_RUBRIC,
        N_PROMPTS,
        PAPER,
        PROMPT_SEED,
    )

    lic = source.get("license")
    where = (f"the Hub dataset `{source['repo']}` (revision `{source.get('revision')}`, "
             f"commit `{source.get('commit')}`)" if "repo" in source
             else "a local copy of the authors' files (folder "
             f"`{Path(str(source.get('folder'))).name}`)")
    per_level = concepts.group_by(["concept_level", "partition"]).aggregate(
        [("concept_id", "count")]).sort_by([("concept_level", "ascending"),
                                            ("partition", "ascending")]).to_pylist()
    levels = ", ".join(f"{r['concept_level']}/{r['partition']}: {r['concept_id_count']}"
                       for r in per_level)
    out = ["---", _header(lic or "unknown", entries, counts), "---", ""]
    out += [
        "# ASTEER reference testbed: the authors' generations as a dataset",
        "",
        f"The steered generations and judge labels of {PAPER}, converted by "
        "`asteer-build import` from " + where + " into the layout `asteer-build publish` "
        "writes, so they load with `datasets.load_dataset` (the release ships them as "
        "tarballs of JSON).",
        "",
        f"- Source: {where}; code that made it: {AUTHORS_CODE}.",
        f"- License of the source, as stated in its card: **{lic or 'not stated'}**. "
        "This folder carries the same terms.",
        f"- Paper: {PAPER}.",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'rollouts = load_dataset("FOLDER_OR_REPO", "rollouts", split="train")',
        'concepts = load_dataset("FOLDER_OR_REPO", "concepts", split="train")',
        "```",
        "",
        "## Counts",
        "",
        "| config | rows | files | bytes |",
        "|---|---|---|---|",
    ]
    for name in ("rollouts", "concepts", "prompts"):
        mine = [e for e in entries if e["config"] == name]
        out.append(f"| `{name}` | {counts[name]:,} | {len(mine)} | "
                   f"{sum(e['bytes'] for e in mine):,} |")
    out += ["", f"Concepts: {counts['concepts']} ({levels}; `ood` = unseen); prompts: "
            f"{counts['prompts']}.", "", "## Labels", "",
            "| model | method | rows | alphas | under (0) | success (1) | over (2) | failed "
            "| pending |", "|---|---|---|---|---|---|---|---|---|"]
    for r in labels:
        out.append(f"| {r['model']} | {r['method']} | {r['rows']:,} | {r['alphas']} "
                   f"({r['alpha_min']:g}..{r['alpha_max']:g}) | {r['under']:,} | "
                   f"{r['success']:,} | {r['over']:,} | {r['failed']:,} | {r['pending']:,} |")
    out += [
        "",
        f"Judge: the authors' `{JUDGE_MODEL}` with their rubric (`judge_rubric` = "
        f"`{JUDGE_RUBRIC}`), labels used as given.",
        "",
        "## What differs from a dataset asteer builds",
        "",
        "- **No `features`, `activations` or `vectors` configs.** The authors did not "
        "publish hidden states (>500 GB); their feature caches are read by `asteer-train` "
        "directly (`--data Fcr09/SteerBoost-data`).",
        "- **Their replay.** Their features compare the steered run with a replay that "
        "re-tokenizes prompt and response without the chat template, not an exact "
        "replay (fidelity notes, section 3).",
        "- **Their failed judgments were stored as under-steer (0).** Where the stored "
        "explanation shows the failure (it starts with "
        + " or ".join(f"`{p}`" for p in FAILURE_PREFIXES) + ") the row has "
        "`judge_status = failed`, a null `label` and the text in `judge_error`; "
        "`authors_label` keeps the 0 they stored. A label taken from their judgment "
        "cache alone has no explanation, so a failure there cannot be told apart.",
        "- `authors_label` (extra column): the label exactly as the authors stored it.",
        "- `seed` and `finish_reason` are null (their `generate()` is unseeded and records "
        "neither); `vector_norm` is their `steering_vector_norm` (DiffMean; null for "
        "LinearProbe, whose files record only the probe's accuracy); their files hold no "
        "response lengths, so `response_tokens` is null unless a result item carries a "
        "token count or the import counted each response with the model's tokenizer "
        "(`--tokenizer`; `encode(response, add_special_tokens=False)`, as their "
        "`include_token_stats` counts; per pair in the table below).",
        "- `model` is their folder name; `method` is `diffmean`, or `probe` for their "
        "`probe*` folder (e.g. `probe_l2-0.01`); `id` hashes model, method, concept, "
        "prompt, layer, alpha and sample 0, as ours do.",
        f"- Prompts: `prompt_id` is their `sample_id`, the position in "
        f"`random.seed({PROMPT_SEED}); random.sample(alpaca_eval, {N_PROMPTS})`"
        + (" (each result's instruction was checked against that draw)."
           if source.get("prompts_checked_against_draw") else
           " (taken from the result files; `alpaca_eval.json` was not at hand to check)."),
        "- Concept levels are the authors' id ranges (low 0-39 and 120-129, mid 40-79 and "
        "130-139, high 80-119 and 140-149); `partition` is their per-level draw "
        "(`numpy.random.default_rng(42)`, 40 seen / 10 unseen per level).",
        "- Result files with alpha 0 (their unsteered baseline) are skipped, as their "
        "loaders skip them.",
        "",
        "## Import",
        "",
        "| method folder | model | files | rows | labels from cache | cache disagreements "
        "| cache entries without a result | failed | pending | response_tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        tok = (f"{p['counted_tokens']:,} counted with `{p['tokenizer']}`" if p["tokenizer"]
               else f"{p['with_tokens']:,} from the files")
        out.append(f"| {p['method_dir']} | {p['model']} | {p['files']:,} | {p['rows']:,} | "
                   f"{p['from_cache']:,} | {p['cache_disagreements']:,} | "
                   f"{p['cache_unmatched']:,} | {p['failed']:,} | {p['pending']:,} | {tok} |")
    avg = [p for p in pairs if p.get("avg_response_tokens") is not None]
    if avg:
        out += ["", "Mean response length per pair, from their judgment caches' "
                "`avg_response_tokens`: " + ", ".join(
                    f"{p['method_dir']}/{p['model']} {p['avg_response_tokens']:.1f}"
                    for p in avg) + "."]
    out += ["", "`build.json` lists the source, every file with its sha256, and the "
            "software versions.", ""]
    return "\n".join(out)
