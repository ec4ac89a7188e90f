"""`asteer-build import`: the reference authors' released generations as our dataset folder.

The authors of the ASTEER paper publish their testbed on the Hub (`Fcr09/SteerBoost-data`)
as one `result__{method}__{model}.tar.zst` per (method, model), unpacking to
`result/{method}/{model}/{cid}/{layer}-{alpha}.json`, plus judgment caches
`cache/judgments__{method}__{model}__L{layer}.json`. Tarballs of JSON cannot be read
with `datasets.load_dataset`; this module converts them into the folder `asteer-build
publish` writes (`rollouts`, `concepts`, `prompts`, `build.json`, a card), so the 1.42M
labelled generations load with one call and upload with the same Hub path.

Their formats, as their code writes them (repository `Fcr09/SteerBoost`):

- a result file (`utils.save_results`): ``{"metadata": {method, model, layer, alpha,
  concept_id, num_samples, ..., steering_vector_norm (DiffMean) or
  classification_accuracy (probe)}, "results": [{sample_id, dataset, instruction,
  prompt, response_before, response_after, alpha, judgment, explanation}, ...]}``;
  `judgment` and `explanation` are added by `process_judgment_results.py`; a failed
  generation is ``{sample_id, instruction, dataset, "error": ..., response_after: null}``;
- a judgment cache (`utils.build_judgment_cache_payload`): ``{"format_version": 1,
  "layer", "steering_method", "llm", "alphas", "judgments": {cid: {alpha: {sample_id:
  judgment}}}}`` (alpha keys are `str(round(alpha, 2))`), optionally
  `avg_response_tokens`;
- their failed judgments are stored as `judgment` 0 with an explanation that starts
  with "Evaluation error in batch processing" (the API call failed) or "Evaluation error
  parsing response" (empty or unparseable judge output). Where we see that text the row
  gets `judge_status` ``failed``, `label` null, `judge_error` their explanation, and
  `authors_label` keeps the 0 they stored. Labels read from a judgment cache alone carry
  no explanation, so a failure there cannot be told apart: it stays a 0, status ok.

What we assume where their code does not say (written in the card too): the model is
the result folder's name (their short name, e.g. `gemma-2-2b-it`); method folders
`diffmean` -> ``diffmean`` and `probe*` (their `probe_l2-0.01`) -> ``probe``; files with
alpha 0 (their unsteered baseline) are skipped, as their loaders skip them; a label in
the result file wins over the cache's (the cache is built from those files), and
disagreements are counted; response lengths come from a per-item token count when an
item has one (`response_tokens`, `num_tokens`, `n_tokens`) and are null otherwise (their
released files have none); `seed` and `finish_reason` are null (their `generate()` is
unseeded and records neither).

Nothing half-written is left behind: the folder is assembled under a dot-prefixed temp
name beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ...core import atomic, contract
from .facts import (  # noqa: F401  (re-exported: the importer's public facts)
    AUTHORS_CODE,
    AUTHORS_LABEL_FIELD,
    AUTHORS_REPO,
    AUTHORS_TOKENIZERS,
    FAILURE_PREFIXES,
    IMPORT_SCHEMA,
    JUDGE_MODEL,
    JUDGE_RUBRIC,
    JUDGMENT_CACHE_VERSION,
    LEVELS,
    N_PROMPTS,
    PAPER,
    PROMPT_SEED,
    TOKEN_KEYS,
)
from .locate import (
    AuthorsImportError,
    Located,
    concept_level,
    locate_folder,
    locate_hub,
    method_name,  # noqa: F401  (re-exported: train.authors imports it from here)
)
from .read import load_tokenizers, prompt_draw, read_concepts, stated_license
from .rows import PairStats, pair_rows
from .write import RolloutFiles, write_small

log = logging.getLogger("asteer_build.publish")

IMPORT_FORMAT = "asteer-import/1"


@dataclass
class ImportResult:
    folder: str
    repo: str | None
    counts: dict[str, int]
    pairs: list[dict[str, Any]]
    source: dict[str, Any]
    files: list[dict[str, Any]]
    uploaded: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "repo": self.repo,
            "uploaded": self.uploaded,
            "counts": self.counts,
            "pairs": self.pairs,
            "source": self.source,
            "files": self.files,
        }


def import_authors(
    source: str = AUTHORS_REPO,
    out: str | Path = "",
    *,
    revision: str | None = None,
    methods: list[str] | None = None,
    models: list[str] | None = None,
    overwrite: bool = False,
    tokenizers: list[str] | None = None,
    rows_per_file: int = 500_000,
    rows_per_group: int = 20_000,
) -> ImportResult:
    """Convert the authors' result files and judgment caches (a folder, or a Hub dataset
    id fetched with `allow_patterns`) into a dataset folder at `out`."""
    if not out:
        raise AuthorsImportError("--out: a dataset folder is required")
    dest = Path(out).resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise AuthorsImportError(f"--out: {dest} exists and is not empty (pass --overwrite "
                                 "to replace it)")
    if os.path.isdir(source):
        loc = locate_folder(source, methods, models)
    elif re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", source):
        loc = locate_hub(source, revision, methods, models)
    else:
        raise AuthorsImportError(f"{source!r} is neither a folder nor a Hub dataset id "
                                 "ORG/NAME")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        toks = load_tokenizers(tokenizers, sorted({p.model for p in loc.pairs.values()}))
        result = _assemble(loc, tmp, source, rows_per_file, rows_per_group, toks)
        atomic.replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if loc.view is not None:
            shutil.rmtree(loc.view, ignore_errors=True)
    result.folder = str(dest)
    return result


def _assemble(loc: Located, folder: Path, source: str, rows_per_file: int,
              rows_per_group: int, tokenizers: dict[str, Any]) -> ImportResult:
    from ..publish.card import label_table
    from ..publish.state import sha256_file
    from .card import import_card

    concepts = read_concepts(loc.concepts, loc.root)
    draw = prompt_draw(loc.alpaca)
    prompts: dict[int, dict[str, Any]] = {}
    writer = RolloutFiles(folder, rows_per_file, rows_per_group)
    pair_stats: list[dict[str, Any]] = []
    try:
        for key in sorted(loc.pairs):
            pair = loc.pairs[key]
            if pair.tree is None and pair.tarball is None:
                continue
            st = PairStats()
            tok = tokenizers.get(pair.model)
            if tok is not None:
                st.tokenizer = str(getattr(tok, "name_or_path", "") or type(tok).__name__)
            for rows in pair_rows(pair, concepts, prompts, draw, st, tok):
                writer.add(rows)
            log.info("imported %s/%s: %d rows from %d files", pair.method_dir, pair.model,
                     st.rows, st.files)
            pair_stats.append({"method_dir": pair.method_dir, "model": pair.model,
                               "method": pair.method,
                               "from": str(pair.tree or pair.tarball),
                               "judgments": [str(p) for _, p in sorted(pair.judgments.items())],
                               **st.__dict__})
    finally:
        files = writer.close()
    if not files:
        raise AuthorsImportError(f"{loc.root}: the result files hold no rows to import")
    levels = {str(c): concept_level(c, "concepts.json") for c in concepts}
    unseen = set(contract.partition_concepts(levels))
    ids = contract.sort_ids(levels)
    ctable = pa.table({
        "concept_id": ids,
        "concept": [concepts[int(c)] for c in ids],
        "concept_level": [levels[c] for c in ids],
        "partition": [contract.PARTITION_UNSEEN if c in unseen else contract.PARTITION_SEEN
                      for c in ids],
    }, schema=contract.CONCEPTS_SCHEMA)
    if draw is not None:
        prows = [(str(i), r["instruction"], f"alpaca_eval/{r.get('dataset', 'unknown')}")
                 for i, r in enumerate(draw)]
    else:
        prows = [(str(i), p["prompt"], f"alpaca_eval/{p.get('dataset') or 'unknown'}")
                 for i, p in sorted(prompts.items())]
    ptable = pa.table({"prompt_id": [r[0] for r in prows], "prompt": [r[1] for r in prows],
                       "source": [r[2] for r in prows]}, schema=contract.PROMPTS_SCHEMA)
    files += [write_small(folder, "concepts", ctable), write_small(folder, "prompts", ptable)]
    entries = []
    for rel in files:
        p = folder / rel
        entries.append({"path": rel, "config": rel.split("/")[0],
                        "rows": pq.ParquetFile(p).metadata.num_rows,
                        "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    counts = {c: sum(e["rows"] for e in entries if e["config"] == c)
              for c in ("rollouts", "concepts", "prompts")}
    src: dict[str, Any] = loc.hub or {"folder": str(Path(source).resolve())}
    src = {**src, "license": stated_license(loc.readme),
           "prompts_checked_against_draw": draw is not None}
    labels = label_table(folder, [e["path"] for e in entries if e["config"] == "rollouts"])
    card = import_card(src, entries, counts, labels, pair_stats, ctable)
    atomic.write_text(folder / "README.md", card)
    build = {"format": IMPORT_FORMAT, "source": src, "pairs": pair_stats, "counts": counts,
             "files": entries, "software": _versions()}
    atomic.write_text(folder / "build.json", json.dumps(build, indent=1, sort_keys=True,
                                                        default=str) + "\n")
    return ImportResult(str(folder), None, counts, pair_stats, src, entries)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for mod in ("asteer", "pyarrow", "datasets", "huggingface_hub"):
        try:
            out[mod] = version(mod)
        except Exception:  # noqa: BLE001 - a missing distribution is simply not listed
            continue
    return out


def import_and_upload(source: str, out: str, *, repo: str | None = None,
                      private: bool = False, dry_run: bool = False,
                      upload: Callable[..., str] | None = None,
                      **kwargs: Any) -> ImportResult:
    """`import_authors`, then (with `repo`, unless `dry_run`) the upload `publish` uses
    (`hub.hub_upload` unless `upload` is given): the token is checked before the long
    conversion, the folder scanned for it, then one resumable folder upload."""
    from ..publish.hub import check_no_secret, hub_upload, upload_token

    token = None if repo is None else upload_token(repo, dry_run=dry_run)
    result = import_authors(source, out, **kwargs)
    result.repo = repo
    if repo is not None and token is not None:
        check_no_secret(result.folder, token)
        (upload or hub_upload)(result.folder, repo, private=private, token=token)
        result.uploaded = True
    return result
