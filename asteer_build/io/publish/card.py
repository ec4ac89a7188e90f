"""The dataset card (README.md): YAML metadata built with `huggingface_hub.DatasetCardData`
(license, tasks, size, every config with its data files, features and counts), then a
Markdown body that documents loading, counts, labels, every column and the build."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from ...core import contract
from .build_json import scrub
from .layout import SPLIT, PublishOptions
from .plan import ConfigPlan, RunInfo

#: the Hub's `size_categories` buckets, one per power of ten from 1K (DatasetCardData
#: documents the values)
_SIZES = (
    "n<1K",
    "1K<n<10K",
    "10K<n<100K",
    "100K<n<1M",
    "1M<n<10M",
    "10M<n<100M",
    "100M<n<1B",
    "1B<n<10B",
    "10B<n<100B",
    "100B<n<1T",
)
#: the order earlier publishes wrote the header in, so re-publishing leaves README.md as
#: it was (DatasetCardData's own order puts `language` first)
_HEADER_ORDER = [
    "license",
    "language",
    "pretty_name",
    "task_categories",
    "tags",
    "size_categories",
    "configs",
    "dataset_info",
]


def _size_category(n: int) -> str:
    for i, label in enumerate(_SIZES):
        if n < 10 ** (i + 3):
            return label
    return "n>1T"


def _feature_doc() -> str:
    """The feature families as `asteer_build.engine.features` defines them (its docstring), read
    without importing the module, which would pull in torch."""
    spec = importlib.util.find_spec("asteer_build.engine.features")
    if spec is None or not spec.origin:
        return ""
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""


def label_table(folder: Path, files: list[str]) -> list[dict[str, Any]]:
    tables = [
        pq.read_table(
            folder / f, columns=["model", "method", "label", "judge_status", "judge_model", "alpha"]
        )
        for f in files
    ]
    t = pa.concat_tables(tables)
    rows = []
    keys = (
        t.group_by(["model", "method"])
        .aggregate([])
        .sort_by([("model", "ascending"), ("method", "ascending")])
    )
    for model, method in zip(
        keys.column("model").to_pylist(), keys.column("method").to_pylist(), strict=True
    ):
        sub = t.filter(pc.and_(pc.equal(t["model"], model), pc.equal(t["method"], method)))
        status = sub.column("judge_status").to_pylist()
        labels = sub.column("label").to_pylist()
        ok = [lab for lab, s in zip(labels, status, strict=True) if s == "ok" and lab is not None]
        alphas = sorted(set(sub.column("alpha").to_pylist()))
        judges = sorted({j for j in sub.column("judge_model").to_pylist() if j})
        rows.append(
            {
                "model": model,
                "method": method,
                "rows": sub.num_rows,
                "under": ok.count(0),
                "success": ok.count(1),
                "over": ok.count(2),
                "failed": status.count("failed"),
                "pending": status.count("pending"),
                "alphas": len(alphas),
                "alpha_min": alphas[0],
                "alpha_max": alphas[-1],
                "judge_models": judges,
            }
        )
    return rows


def _schema_md(features: Any) -> str:
    """Column table; feature columns (hundreds) are summarised per family, since the
    YAML header already lists each one with its type."""
    lines = ["| column | type |", "|---|---|"]
    families: dict[str, list[str]] = {}
    for name, f in features.items():
        fam = contract.feature_family(name)
        if fam:
            families.setdefault(fam, []).append(name)
        else:
            lines.append(f"| `{name}` | `{f!r}` |")
    if families:
        lines += ["", "| family | columns | examples |", "|---|---|---|"]
        for fam, cols in families.items():
            ex = ", ".join(f"`{c}`" for c in cols[:2] + cols[-1:])
            lines.append(f"| `{fam}` | {len(cols)} float32 | {ex} |")
        total = sum(len(c) for c in families.values())
        lines += [
            "",
            f"{total} family columns"
            + (" plus `alpha` and `vector_norm`." if "vector_norm" in features else "."),
        ]
    return "\n".join(lines)


def _card_data(name: str, plans: list[ConfigPlan], counts: dict[str, dict[str, int]]) -> Any:
    """The card's YAML metadata: every config with its data files (the rollouts one is the
    default), and per config its `datasets` features and counts, which `load_dataset`
    and the dataset viewer read instead of scanning the files."""
    from huggingface_hub import DatasetCardData

    configs, infos = [], []
    for cp in plans:
        glob = "**/*.parquet" if cp.folder == "activations" else "*.parquet"
        entry: dict[str, Any] = {
            "config_name": cp.name,
            "data_files": [{"split": SPLIT, "path": f"{cp.folder}/{glob}"}],
        }
        if cp.name == "rollouts":
            entry["default"] = True
        configs.append(entry)
        c = counts[cp.name]
        infos.append(
            {
                "config_name": cp.name,
                "features": cp.features._to_yaml_list(),
                "splits": [{"name": SPLIT, "num_bytes": c["nbytes"], "num_examples": c["rows"]}],
                "download_size": c["bytes"],
                "dataset_size": c["nbytes"],
            }
        )
    return DatasetCardData(
        license="apache-2.0",
        language=["en"],
        pretty_name=f"ASTEER steerability dataset ({name})",
        task_categories=["text-classification", "tabular-classification"],
        tags=["activation-steering", "steering-vectors", "interpretability", "steerability", "llm"],
        size_categories=[_size_category(counts.get("rollouts", {}).get("rows", 0))],
        configs=configs,
        dataset_info=infos,
    )


def dataset_card(
    repo: str | None,
    info: RunInfo,
    plans: list[ConfigPlan],
    counts: dict[str, dict[str, int]],
    labels: list[dict[str, Any]] | None,
    has_vectors: bool,
    opts: PublishOptions,
) -> str:
    d = info.manifest.data
    cfg = scrub(d.get("config", {}))
    meta = _card_data(cfg.get("name", "build"), plans, counts)
    repo_id = repo or "ORG/NAME"
    judge_cfg = cfg.get("judge", {}) or {}
    if judge_cfg.get("kind", "llm") == "rules":
        from judge.rules import RULES_VERSION

        judge_desc = (
            f"the deterministic rules judge `{RULES_VERSION}` (tiny world only: it "
            "counts concept words and checks coherence; not an LLM)"
        )
        rubric = RULES_VERSION
    else:
        from judge.rubric import RUBRIC_VERSION

        judge_desc = f"LLM judge `{judge_cfg.get('model', '?')}` through an OpenAI-compatible API"
        rubric = RUBRIC_VERSION
    # The versions the labelled shards were really made with (a `rubric_file`, an
    # earlier rubric), as the judge stage recorded them.
    used = sorted({e["judge_rubric"] for e in d.get("stages", {}).get("labelled", {}).values()
                   if e.get("judge_rubric")})
    if used:
        rubric = "`, `".join(used)
    names = {cp.name for cp in plans}
    authors_replay = (cfg.get("capture") or {}).get("replay", "exact") == "authors"
    replay_desc = (
        "the reference authors' unsteered replay (prompt and response text re-tokenized "
        "without the chat template, `capture.replay: authors`)"
        if authors_replay else "an exact unsteered replay of the same tokens"
    )
    out = ["---", meta.to_yaml(original_order=_HEADER_ORDER), "---", ""]
    out += [f"# ASTEER steerability dataset: `{cfg.get('name', 'build')}`", ""]
    out += [
        "Each row of the default config is one **steered generation**: a language model, a "
        "concept steering vector (DiffMean, LinearProbe, PCA or a file of the builder's: "
        "`method`) added with strength "
        "`alpha` to "
        "the residual stream at the output of decoder block `layer` at every position, one "
        "prompt, the full response, and a judge's label of whether the steering worked: "
        "`0` under-steer, `1` success, `2` over-steer. The `features` config holds "
        f"statistics of the early residual stream of the steered run against {replay_desc}, "
        "from which a predictor (gradient-boosted trees) can tell, after a few decode "
        "steps, whether a strength will succeed.",
        "",
        "This follows the ASTEER testbed of *When is Your LLM Steerable?* (Fan, Cheng, Li, "
        "Feizi, Zhou, 2026), generated with the `asteer` builder on vLLM (per-request "
        "steering inside the engine, hidden-state capture, "
        + ("the authors' replay, " if authors_replay
           else "exact replay with the chat template, ")
        + "failed judgments kept as `failed`, never as a label).",
        "",
        "## Loading",
        "",
        "```python",
        "import numpy as np",
        "from datasets import load_dataset",
        "",
        f'rollouts = load_dataset("{repo_id}", split="train")            # default config',
    ]
    if "features" in names:
        out.append(f'features = load_dataset("{repo_id}", "features", split="train")')
    if "concepts" in names:
        out.append(f'concepts = load_dataset("{repo_id}", "concepts", split="train")')
    acts = [cp for cp in plans if cp.name.startswith("activations")]
    if acts:
        out += [
            f'acts = load_dataset("{repo_id}", "{acts[0].name}", split="train")',
            'acts = acts.with_format("numpy", dtype=np.float16)  # numpy defaults to float32',
            'acts[0]["steered"].shape                              # (positions, layers, hidden)',
        ]
    out += [
        "```",
        "",
        "The training package of `asteer` reads the same repository id or a local copy: "
        f"`asteer-train fit --data {repo_id} --model MODEL --method diffmean --out DIR` "
        "(it downloads only `rollouts`, `features` and `concepts`; add "
        "`--use-partition-column` to hold out the `ood` concepts of this card). "
        "Join configs on `id`.",
        "",
        "## Counts",
        "",
        "| config | rows | Parquet files | bytes on disk |",
        "|---|---|---|---|",
    ]
    for cp in plans:
        c = counts[cp.name]
        out.append(f"| `{cp.name}` | {c['rows']:,} | {c['files']} | {c['bytes']:,} |")
    if has_vectors:
        c = counts.get("vectors", {})
        out.append(f"| `vectors/` | {c.get('rows', 0)} files | - | {c.get('bytes', 0):,} |")
    levels = (
        info.concepts.group_by(["concept_level", "partition"])
        .aggregate([("concept_id", "count")])
        .sort_by([("concept_level", "ascending"), ("partition", "ascending")])
        .to_pylist()
    )
    per_level = ", ".join(
        f"{r['concept_level']}/{r['partition']}: {r['concept_id_count']}" for r in levels
    )
    out += [
        "",
        f"Concepts: {info.concepts.num_rows} ({per_level}; `ood` = unseen); "
        f"prompts: {info.prompts.num_rows}.",
        "",
    ]
    if labels is not None:
        out += [
            "## Labels",
            "",
            "| label | name | meaning |",
            "|---|---|---|",
            "| 0 | under-steer | coherent and on-topic, but the concept is missing |",
            "| 1 | success | the concept is present and the response is still coherent and "
            "relevant to the prompt |",
            "| 2 | over-steer | does not answer the prompt: nonsensical, repetitive, "
            "off-topic, empty (gibberish is always 2) |",
            "",
            f"Judge: {judge_desc}; rubric version `{rubric}`. The judge sees the prompt, the "
            "concept and the steered response only, and gives its reason before its label. "
            "`judge_status` is `ok` (label set), "
            "`failed` (no label; `judge_error` says why) or `pending` (not judged yet); "
            "`judge_rubric` names the rubric version (`name+hash` of its text, or the rules "
            "judge's version) of every ok or failed judgment, null while pending. "
            "A failed judgment is never recorded as under-steer: drop or re-judge those rows.",
            "",
            "Label distribution per model and method (rows with `judge_status == ok`):",
            "",
            "| model | method | rows | alphas | under (0) | success (1) | over (2) | failed "
            "| pending | judge |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in labels:
            out.append(
                f"| {r['model']} | {r['method']} | {r['rows']:,} | {r['alphas']} "
                f"({r['alpha_min']:g}..{r['alpha_max']:g}) | {r['under']:,} | "
                f"{r['success']:,} | {r['over']:,} | {r['failed']:,} | {r['pending']:,} | "
                f"{', '.join(r['judge_models']) or '-'} |"
            )
        out.append("")
    out += ["## Configs and schema", ""]
    notes = {
        "rollouts": "One row per steered generation. `id` is a hash of model, method, "
        "concept, prompt, layer, alpha and sample index; `seed` is the sampling "
        "seed; `vector_norm` is the unscaled vector's L2 norm; `alpha_raw` the multiple "
        "of that vector the engine added (`alpha` itself, unless the build set "
        "`alpha_units: norm`: then alpha x m / vector_norm, m the contrast banks' mean "
        "residual norm at the layer); `response_tokens` "
        "counts generated tokens.",
        "features": "One row per rollout `id` (plus its keys). Every other column is a "
        "float32 feature named `{family}_t{step}_k{offset}` (one matrix entry), "
        "`{family}_{mean|std|max|min}` (whole matrix), `{family}_t{step}_{stat}` "
        "(one decode step over layers) or `{family}_k{offset}_{stat}` (one layer "
        "over steps); see the definitions below.",
        "concepts": "`partition`: `ood` = unseen concept (held out of training), `id` = "
        "seen. " + _partition_text(opts) + " (the same draw as `asteer-train`'s "
        "default split; `asteer-train --use-partition-column` reads this column).",
        "prompts": "`source`: where the prompt came from (e.g. `alpaca_eval`), when known.",
    }
    for cp in plans:
        out += [f"### `{cp.name}`", ""]
        if cp.name.startswith("activations"):
            out.append(
                "Raw residual stream, float16, declared as `Array3D` "
                "`[positions, layers, hidden]`: `steered` and `replay` at decode steps "
                "`t` and layers `L + k` (k = 0 is the steered layer, after the addition for "
                "`steered`), `steered_pre` the steered layer before the addition "
                "`[positions, 1, hidden]`. Join to `rollouts` on `id`."
            )
        else:
            out.append(notes.get(cp.name, ""))
        out += ["", _schema_md(cp.features), ""]
    if has_vectors:
        out += [
            "### `vectors/`",
            "",
            "`vectors/<model>/<method>.safetensors`: one float32 tensor per `concept_id` "
            "(not normalized); `vectors/<model>/index.json`: per method and concept the "
            "norm, layer, contrast-bank size and probe accuracy. Each contrast-bank text is "
            "pooled as the reference pools it (raw text, the tokenizer's special tokens, "
            "the output of block `layer` averaged over positions 1..). DiffMean is "
            "mean(positive) - mean(negative); LinearProbe is the weight of a bias-free "
            "logistic probe trained as the reference trains it (AdamW, lr 5e-3, weight "
            "decay 1e-3, 10 full-batch epochs, BCE plus 0.01 x the weight's L2 norm, not "
            "its square), from a seeded init."
            + (" PCA is the first principal component of the paired differences (positive "
               "text i minus negative text i, centred), pointed to the positive side and "
               "scaled to DiffMean's norm." if "pca" in (cfg.get("methods") or ()) else "")
            + (" `file` vectors were brought by the builder (`index.json` names their source "
               "file and its sha256)." if "file" in (cfg.get("methods") or ()) else ""),
            "",
        ]
    doc = _feature_doc()
    if doc and "features" in names:
        out += [
            "## Feature definitions",
            "",
            "From `asteer_build.engine.features` (the reference authors' definitions; "
            "`asteer_build.engine.feature_names.authors_names(layer)` maps every column to "
            "the authors' name). These features were computed against "
            + ("the authors' replay" if authors_replay else "the exact replay") + ":",
            "",
            "```text",
            doc.strip(),
            "```",
            "",
        ]
    out += [
        "## Build",
        "",
        f"Config hash `{d.get('config_hash')}`, plan hash `{d.get('plan_hash')}`, "
        f"{d.get('items', 0):,} planned items in {d.get('shards', 0):,} shards. "
        "`build.json` holds the full config, software versions and the checksum of every "
        "input shard and published file.",
        "",
        "Software (build):",
        "",
        "```json",
        json.dumps(d.get("software", {}), indent=1, sort_keys=True),
        "```",
        "",
        "Config:",
        "",
        "```yaml",
        yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=100).rstrip(),
        "```",
        "",
        "## License",
        "",
        "Apache-2.0. Prompts and concepts keep the terms of their sources.",
        "",
    ]
    return "\n".join(out)


def _partition_text(opts: PublishOptions) -> str:
    """How the `partition` column was drawn, in words a reader can redo by hand."""
    if opts.partition_scheme == "contiguous":
        return (f"The last {opts.unseen_fraction:.0%} of concepts in id order (numeric when "
                "every id is an integer) are unseen: the reference authors' legacy static "
                "ranges")
    return (f"Drawn as the reference authors draw it: `numpy.random.default_rng("
            f"{opts.partition_seed})`; per `concept_level` in the order low, mid, high, over "
            "the level's ids in ascending order (numeric when every id is an integer), "
            "`rng.permutation(n)`; in that order the last "
            f"{opts.unseen_fraction:.0%} are unseen (10 of 50)")
