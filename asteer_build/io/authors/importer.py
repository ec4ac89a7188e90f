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

Reading `.tar.zst`: the `zstandard` package is not in our lock, so tarballs are streamed
through the `zstd` command (`zstd -dc`, members parsed as they arrive, nothing unpacked
to disk); without it, pass an already-unpacked folder holding `result/`.

Nothing half-written is left behind: the folder is assembled under a dot-prefixed temp
name beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ...core import atomic, contract
from ...pipeline.plan import item_id
from ..publish.layout import SPLIT, PublishError
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

log = logging.getLogger("asteer_build.publish")

IMPORT_FORMAT = "asteer-import/1"

_RESULT_TAR = re.compile(r"result__(?P<method>[^/]+?)__(?P<model>[^/]+)\.tar\.zst")
_JUDGMENTS = re.compile(r"judgments__(?P<method>[^/]+?)__(?P<model>[^/]+)__L(?P<layer>\d+)\.json")
_RESULT_FILE = re.compile(r"(?P<layer>\d+)-(?P<alpha>[^/]+)\.json")


class AuthorsImportError(PublishError):
    """The authors' files cannot be imported; the message names the file and field."""


@dataclass
class Pair:
    """One (their method folder, their model folder): where its results and caches are."""

    method_dir: str
    model: str
    tree: Path | None = None  # result/{method}/{model}
    tarball: Path | None = None  # result__{method}__{model}.tar.zst
    judgments: dict[int, Path] = field(default_factory=dict)  # layer -> cache file

    @property
    def method(self) -> str:
        return method_name(self.method_dir)


@dataclass
class Located:
    """The authors' files found in a folder or fetched from the Hub."""

    root: Path
    pairs: dict[tuple[str, str], Pair]
    concepts: Path | None
    alpaca: Path | None
    readme: Path | None
    hub: dict[str, Any] | None = None
    #: a temp folder of links made for a Hub import, removed after it
    view: Path | None = None


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


# ---------------------------------------------------------------------------- names


def method_name(method_dir: str) -> str:
    """Their method folder as our `method`: `diffmean`, or `probe` for `probe*` (their
    LinearProbe runs live in `probe_l2-0.01`, the l2 weight in the name)."""
    if method_dir == "diffmean":
        return "diffmean"
    if method_dir.startswith("probe"):
        return "probe"
    raise AuthorsImportError(f"result/{method_dir}: unknown method folder (expected "
                             "`diffmean` or `probe...`)")


def concept_level(cid: int, where: str) -> str:
    level = contract.authors_concept_level(cid)
    if level is not None:
        return level
    raise AuthorsImportError(f"{where}: concept_id {cid} is outside the authors' level "
                             "ranges (0-149)")


def _wanted(pair: tuple[str, str], methods: list[str] | None, models: list[str] | None) -> bool:
    """A pair passes `--method` when either their folder name or ours is listed."""
    mdir, model = pair
    if methods and mdir not in methods and method_name(mdir) not in methods:
        return False
    return not models or model in models


# ---------------------------------------------------------------------------- locate


def locate_folder(folder: str | Path, methods: list[str] | None = None,
                  models: list[str] | None = None) -> Located:
    """The authors' files in a local folder laid out as their `data/` (or the Hub repo):
    `result/{method}/{model}/` trees and/or `result__*.tar.zst`, `cache/judgments__*`
    (or at the top), `concepts.json`, `alpaca_eval.json`, `README.md`."""
    root = Path(folder)
    pairs: dict[tuple[str, str], Pair] = {}
    res = root / "result"
    if res.is_dir():
        for mdir in sorted(p for p in res.iterdir() if p.is_dir()):
            for model in sorted(p for p in mdir.iterdir() if p.is_dir()):
                key = (mdir.name, model.name)
                pairs.setdefault(key, Pair(*key)).tree = model
    for tar in sorted(root.glob("result__*.tar.zst")):
        m = _RESULT_TAR.fullmatch(tar.name)
        if m is None:
            raise AuthorsImportError(f"{tar}: expected result__{{method}}__{{model}}.tar.zst")
        key = (m["method"], m["model"])
        pairs.setdefault(key, Pair(*key)).tarball = tar
    for cache in sorted([*root.glob("cache/judgments__*.json"), *root.glob("judgments__*.json")]):
        m = _JUDGMENTS.fullmatch(cache.name)
        if m is None:
            raise AuthorsImportError(
                f"{cache}: expected judgments__{{method}}__{{model}}__L{{layer}}.json")
        key = (m["method"], m["model"])
        pairs.setdefault(key, Pair(*key)).judgments[int(m["layer"])] = cache
    pairs = {k: v for k, v in pairs.items() if _wanted(k, methods, models)}
    for p in pairs.values():
        method_name(p.method_dir)  # an unknown method folder is an error, early
    with_results = {k: v for k, v in pairs.items() if v.tree or v.tarball}
    if not with_results:
        which = f" for method {methods} / model {models}" if methods or models else ""
        raise AuthorsImportError(
            f"{root}: no result files{which} (expected result/{{method}}/{{model}}/ or "
            "result__{method}__{model}.tar.zst)")

    def opt(name: str) -> Path | None:
        p = root / name
        return p if p.is_file() else None

    return Located(root, pairs, opt("concepts.json"), opt("alpaca_eval.json"), opt("README.md"))


def hub_patterns(methods: list[str] | None, models: list[str] | None) -> list[str]:
    """What to download: the pairs' tarballs and judgment caches only (never the feature
    caches, banks or other pairs of the ~9 GB repo). `--method probe` matches their
    `probe_l2-0.01` by pattern."""
    ms = [("probe*" if m == "probe" else m) for m in (methods or ["*"])]
    mods = models or ["*"]
    out = []
    for m in ms:
        for model in mods:
            out += [f"result__{m}__{model}.tar.zst", f"cache/judgments__{m}__{model}__L*.json"]
    return out


def locate_hub(repo: str, revision: str | None = None, methods: list[str] | None = None,
               models: list[str] | None = None) -> Located:
    """Fetch only what the import needs through `huggingface_hub` (its cache, offline mode
    and token work as for any Hub file): `concepts.json`, `alpaca_eval.json`, `README.md`
    (for the license), then one `snapshot_download` with `allow_patterns` for the
    selected pairs' tarballs and judgment caches."""
    from huggingface_hub import snapshot_download

    from ...inputs.sources import SourceError, _hub_download, hub_commit

    fetched: list[str] = []
    singles: dict[str, Path | None] = {}
    for name, required in (("concepts.json", True), ("alpaca_eval.json", False),
                           ("README.md", False)):
        try:
            singles[name] = Path(_hub_download(repo, name, revision, "import"))
            fetched.append(name)
        except SourceError:
            if required:
                raise
            singles[name] = None
    patterns = hub_patterns(methods, models)
    try:
        snap = Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                      allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any Hub failure names the repo and patterns
        raise AuthorsImportError(f"hub:{repo}: cannot download {patterns}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    # Offline, snapshot_download returns the cached snapshot folder whole: use only what
    # the patterns select, so a fuller cache does not widen the import.
    picked = sorted(
        p.relative_to(snap).as_posix() for p in snap.rglob("*")
        if p.is_file() and any(fnmatch.fnmatch(p.relative_to(snap).as_posix(), pat)
                               for pat in patterns)
    )
    fetched += picked
    view = _link_view(snap, picked)
    try:
        loc = locate_folder(view, methods, models)
    except BaseException:
        shutil.rmtree(view, ignore_errors=True)
        raise
    loc.root, loc.view = snap, view
    loc.concepts, loc.alpaca, loc.readme = (singles["concepts.json"],
                                            singles["alpaca_eval.json"], singles["README.md"])
    loc.hub = {"repo": repo, "revision": revision or "main",
               "commit": hub_commit(singles["concepts.json"] or snap), "fetched": fetched}
    return loc


def _link_view(snap: Path, rels: list[str]) -> Path:
    """A folder of links to just the picked files, so `locate_folder` sees nothing else
    of a fuller cached snapshot."""
    import tempfile

    view = Path(tempfile.mkdtemp(prefix="asteer-import-"))
    for rel in rels:
        dest = view / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to((snap / rel).resolve())
    return view


# ---------------------------------------------------------------------------- read


def _load_json(data: bytes | IO[bytes], where: str) -> Any:
    try:
        return json.loads(data if isinstance(data, bytes) else data.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AuthorsImportError(f"{where}: not valid JSON ({e})") from e


def _parse_rel(rel: str, where: str) -> tuple[int, int, float] | None:
    """`{cid}/{layer}-{alpha}.json` -> (cid, layer, alpha); None for other files."""
    parts = rel.split("/")
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    m = _RESULT_FILE.fullmatch(parts[1])
    if m is None:
        return None
    try:
        alpha = float(m["alpha"])
    except ValueError:
        raise AuthorsImportError(f"{where}: alpha {m['alpha']!r} in the file name is not a "
                                 "number") from None
    return int(parts[0]), int(m["layer"]), alpha


def iter_result_files(pair: Pair) -> Iterator[tuple[str, str, Any]]:
    """(display path, `{cid}/{file}` relative path, parsed JSON) of every file of a pair:
    an unpacked tree in (concept, layer, alpha) order, else the tarball streamed in its
    own member order."""
    if pair.tree is not None:
        files = [p for p in pair.tree.glob("*/*.json")]

        def key(p: Path) -> tuple[Any, ...]:
            parsed = _parse_rel(p.relative_to(pair.tree).as_posix(), str(p))
            return (0, *parsed) if parsed else (1, 0, 0, 0.0, str(p))

        for p in sorted(files, key=key):
            rel = p.relative_to(pair.tree).as_posix()
            yield str(p), rel, _load_json(p.read_bytes(), str(p))
        return
    assert pair.tarball is not None
    yield from _iter_tarball(pair)


def _iter_tarball(pair: Pair) -> Iterator[tuple[str, str, Any]]:
    tar_path = pair.tarball
    assert tar_path is not None
    zstd = shutil.which("zstd")
    if zstd is None:
        raise AuthorsImportError(
            f"{tar_path}: reading .tar.zst needs the `zstd` command (the `zstandard` "
            "package is not in our lock); unpack it (tar --use-compress-program=unzstd "
            "-xf FILE) and import the folder holding result/")
    prefix = f"result/{pair.method_dir}/{pair.model}/"
    # (resolved: zstd skips a symbolic link, which is what the Hub cache holds)
    proc = subprocess.Popen([zstd, "-dc", "--", str(tar_path.resolve())], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not member.isfile() or not name.endswith(".json"):
                    continue
                where = f"{tar_path}:{name}"
                if not name.startswith(prefix):
                    raise AuthorsImportError(f"{where}: outside {prefix} (a tarball holds "
                                             "one (method, model))")
                f = tar.extractfile(member)
                assert f is not None
                yield where, name[len(prefix):], _load_json(f, where)
    except tarfile.TarError as e:
        raise AuthorsImportError(f"{tar_path}: not a readable tar.zst ({e})") from e
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        rc = proc.wait()
    if rc != 0:
        raise AuthorsImportError(f"{tar_path}: zstd failed ({err.strip() or rc})")


def load_judgments(path: Path, pair: Pair, layer: int) -> dict[tuple[int, float, int], int]:
    """A judgment cache as {(concept_id, alpha rounded to 2, sample_id): judgment}."""
    where = str(path)
    blob = _load_json(path.read_bytes(), where)
    if not isinstance(blob, dict):
        raise AuthorsImportError(f"{where}: expected a JSON object")
    if blob.get("format_version") != JUDGMENT_CACHE_VERSION:
        raise AuthorsImportError(f"{where}: format_version: expected "
                                 f"{JUDGMENT_CACHE_VERSION} (got {blob.get('format_version')!r})")
    for fld, want in (("layer", layer), ("steering_method", pair.method_dir),
                      ("llm", pair.model)):
        if fld in blob and str(blob[fld]) != str(want):
            raise AuthorsImportError(f"{where}: {fld}: {blob[fld]!r} does not match the file "
                                     f"name's {want!r}")
    judg = blob.get("judgments")
    if not isinstance(judg, dict):
        raise AuthorsImportError(f"{where}: judgments: missing or not an object")
    out: dict[tuple[int, float, int], int] = {}
    for cid, by_alpha in judg.items():
        if not isinstance(by_alpha, dict):
            raise AuthorsImportError(f"{where}: judgments.{cid}: expected an object")
        for alpha, by_sid in by_alpha.items():
            if not isinstance(by_sid, dict):
                raise AuthorsImportError(f"{where}: judgments.{cid}.{alpha}: expected an object")
            for sid, j in by_sid.items():
                fld = f"judgments.{cid}.{alpha}.{sid}"
                try:
                    key = (int(cid), round(float(alpha), 2), int(sid))
                except ValueError:
                    raise AuthorsImportError(f"{where}: {fld}: keys must be numbers") from None
                out[key] = _judgment(j, where, fld)
    return out


def _judgment(j: Any, where: str, fld: str) -> int:
    if isinstance(j, bool) or j not in (0, 1, 2, "0", "1", "2"):
        raise AuthorsImportError(f"{where}: {fld}: expected 0, 1 or 2 (got {j!r})")
    return int(j)


@dataclass
class PairStats:
    rows: int = 0
    files: int = 0
    skipped_files: int = 0
    skipped_alpha0: int = 0
    from_cache: int = 0
    cache_disagreements: int = 0
    cache_unmatched: int = 0
    failed: int = 0
    pending: int = 0
    with_tokens: int = 0
    counted_tokens: int = 0
    tokenizer: str | None = None
    avg_response_tokens: float | None = None


def _float(v: Any, where: str, fld: str) -> float:
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise AuthorsImportError(f"{where}: {fld}: expected a number (got {v!r})") from None
    return out


def pair_rows(pair: Pair, concepts: dict[int, str], prompts: dict[int, dict[str, Any]],
              draw: list[dict[str, Any]] | None, stats: PairStats,
              tokenizer: Any | None = None) -> Iterator[list[dict[str, Any]]]:
    """Rows of the `rollouts` config, one list per result file (their 50 prompts).
    With a `tokenizer`, a row without a token count in the file gets the length of its
    response in that tokenizer's tokens, counted as their `include_token_stats` counts
    (`encode(response, add_special_tokens=False)`)."""
    cache: dict[tuple[int, float, int], int] = {}
    for layer, path in sorted(pair.judgments.items()):
        cache.update(load_judgments(path, pair, layer))
        blob_avg = json.loads(path.read_bytes()).get("avg_response_tokens")
        if isinstance(blob_avg, (int, float)):
            stats.avg_response_tokens = float(blob_avg)
    used: set[tuple[int, float, int]] = set()
    for where, rel, data in iter_result_files(pair):
        parsed = _parse_rel(rel, where)
        if parsed is None:
            stats.skipped_files += 1
            continue
        cid, layer, alpha = parsed
        if alpha == 0.0:
            stats.skipped_alpha0 += 1
            continue
        if not isinstance(data, dict):
            raise AuthorsImportError(f"{where}: expected a JSON object with `results`")
        results = data.get("results")
        if not isinstance(results, list):
            raise AuthorsImportError(f"{where}: results: missing or not a list")
        meta = data.get("metadata") or {}
        if not isinstance(meta, dict):
            raise AuthorsImportError(f"{where}: metadata: expected an object")
        for fld, want in (("layer", layer), ("alpha", alpha), ("concept_id", cid)):
            if fld in meta and not math.isclose(_float(meta[fld], where, f"metadata.{fld}"),
                                                want, rel_tol=1e-9, abs_tol=1e-9):
                raise AuthorsImportError(f"{where}: metadata.{fld}: {meta[fld]!r} does not "
                                         f"match the path's {want!r}")
        if cid not in concepts:
            raise AuthorsImportError(f"{where}: concept_id {cid} is not in concepts.json")
        norm = meta.get("steering_vector_norm")
        norm = None if norm is None else _float(norm, where, "metadata.steering_vector_norm")
        level = concept_level(cid, where)
        stats.files += 1
        rows = []
        for i, item in enumerate(results):
            rows.append(_row(pair, item, i, where, cid, layer, alpha, level, norm, concepts,
                             prompts, draw, cache, used, stats))
        rows.sort(key=lambda r: int(r["prompt_id"]))
        if tokenizer is not None:
            _count_tokens(rows, tokenizer, stats)
        stats.rows += len(rows)
        yield rows
    stats.cache_unmatched = len(set(cache) - used)


def _count_tokens(rows: list[dict[str, Any]], tokenizer: Any, stats: PairStats) -> None:
    todo = [r for r in rows if r["response_tokens"] is None and r["response"] is not None]
    if not todo:
        return
    enc = tokenizer([r["response"] for r in todo], add_special_tokens=False)["input_ids"]
    for r, ids in zip(todo, enc, strict=True):
        r["response_tokens"] = len(ids)
    stats.counted_tokens += len(todo)


def load_tokenizers(specs: list[str] | None, models: list[str]) -> dict[str, Any]:
    """`--tokenizer MODEL=NAME_OR_PATH` (repeatable) or `auto` (their own table of model
    folder -> tokenizer) as {their model folder: tokenizer}. Loaded with `transformers`
    through the Hugging Face cache, so offline mode and a local path work."""
    if not specs:
        return {}
    wanted: dict[str, str] = {}
    for spec in specs:
        if spec == "auto":
            wanted.update({m: AUTHORS_TOKENIZERS[m] for m in models if m in AUTHORS_TOKENIZERS})
            continue
        model, sep, name = spec.partition("=")
        if not sep or not model or not name:
            raise AuthorsImportError(f"--tokenizer: expected MODEL=NAME_OR_PATH or auto "
                                     f"(got {spec!r})")
        wanted[model] = name
    unknown = sorted(set(wanted) - set(models))
    if unknown:
        raise AuthorsImportError(f"--tokenizer: no results for model(s) {unknown} (models "
                                 f"here: {sorted(models)})")
    from transformers import AutoTokenizer

    out = {}
    for model, name in sorted(wanted.items()):
        try:
            out[model] = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # noqa: BLE001 - any loading failure names the tokenizer
            raise AuthorsImportError(f"--tokenizer: cannot load {name!r} for {model}: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    return out


def _row(pair: Pair, item: Any, i: int, where: str, cid: int, layer: int, alpha: float,
         level: str, norm: float | None, concepts: dict[int, str],
         prompts: dict[int, dict[str, Any]], draw: list[dict[str, Any]] | None,
         cache: dict[tuple[int, float, int], int], used: set[tuple[int, float, int]],
         stats: PairStats) -> dict[str, Any]:
    f = f"results[{i}]"
    if not isinstance(item, dict):
        raise AuthorsImportError(f"{where}: {f}: expected an object")
    sid = item.get("sample_id")
    if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
        raise AuthorsImportError(f"{where}: {f}.sample_id: missing or not a whole number "
                                 f"(got {sid!r})")
    if "response_after" not in item and "error" not in item:
        raise AuthorsImportError(f"{where}: {f}.response_after: missing")
    instruction = item.get("instruction", item.get("prompt"))
    if not isinstance(instruction, str):
        raise AuthorsImportError(f"{where}: {f}.instruction: missing or not text")
    if draw is not None:
        if sid >= len(draw):
            raise AuthorsImportError(f"{where}: {f}.sample_id: {sid} is beyond the authors' "
                                     f"{len(draw)}-prompt draw")
        if draw[sid]["instruction"] != instruction:
            raise AuthorsImportError(
                f"{where}: {f}.instruction: differs from prompt {sid} of the authors' draw "
                f"(random.seed({PROMPT_SEED}); random.sample(alpaca_eval, {N_PROMPTS}))")
    prev = prompts.setdefault(sid, {"prompt": instruction, "dataset": item.get("dataset")})
    if prev["prompt"] != instruction:
        raise AuthorsImportError(f"{where}: {f}.instruction: sample_id {sid} has another "
                                 "text in an earlier file")
    response = item.get("response_after")
    if response is not None and not isinstance(response, str):
        raise AuthorsImportError(f"{where}: {f}.response_after: expected text or null")
    tokens = None
    for k in TOKEN_KEYS:
        if item.get(k) is not None:
            tokens = int(_float(item[k], where, f"{f}.{k}"))
            stats.with_tokens += 1
            break
    key = (cid, round(alpha, 2), sid)
    j = item.get("judgment")
    if j is not None:
        j = _judgment(j, where, f"{f}.judgment")
        if key in cache and cache[key] != j:
            stats.cache_disagreements += 1
    elif key in cache:
        j = cache[key]
        stats.from_cache += 1
    if key in cache:
        used.add(key)
    explanation = item.get("explanation")
    if explanation is not None and not isinstance(explanation, str):
        explanation = json.dumps(explanation)
    status, label, error = "pending", None, None
    if j is not None:
        if explanation and explanation.startswith(FAILURE_PREFIXES):
            status, error = "failed", explanation
            stats.failed += 1
        else:
            status, label = "ok", j
    else:
        stats.pending += 1
    pid = str(sid)
    return {
        "id": item_id(pair.model, pair.method, str(cid), pid, layer, alpha, 0),
        "model": pair.model,
        "method": pair.method,
        "concept_id": str(cid),
        "concept": concepts[cid],
        "concept_level": level,
        "prompt_id": pid,
        "prompt": instruction,
        "layer": layer,
        "alpha": alpha,
        "vector_norm": norm,
        "seed": None,
        "response": response,
        "response_tokens": tokens,
        "finish_reason": None,
        "label": label,
        "judge_model": JUDGE_MODEL if j is not None else None,
        "judge_status": status,
        "judge_explanation": None if status == "failed" else explanation,
        "judge_error": error,
        "judge_rubric": JUDGE_RUBRIC if j is not None else None,
        "authors_label": j,
    }


def read_concepts(path: Path | None, root: Path) -> dict[int, str]:
    if path is None:
        raise AuthorsImportError(f"{root}: concepts.json not found (the authors' concept "
                                 "names; it sits at the top of their Hub dataset)")
    rows = _load_json(path.read_bytes(), str(path))
    if not isinstance(rows, list):
        raise AuthorsImportError(f"{path}: expected a list of concepts")
    out: dict[int, str] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise AuthorsImportError(f"{path}: [{i}]: expected an object")
        for fld in ("concept_id", "concept_name"):
            if fld not in r:
                raise AuthorsImportError(f"{path}: [{i}].{fld}: missing")
        cid = r["concept_id"]
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise AuthorsImportError(f"{path}: [{i}].concept_id: expected an integer "
                                     f"(got {cid!r})")
        concept_level(cid, f"{path}: [{i}]")
        out[cid] = str(r["concept_name"])
    return out


def prompt_draw(path: Path | None) -> list[dict[str, Any]] | None:
    """Their 50 prompts in their order, from `alpaca_eval.json`, when it is at hand."""
    if path is None:
        return None
    rows = _load_json(path.read_bytes(), str(path))
    if not isinstance(rows, list) or len(rows) < N_PROMPTS:
        raise AuthorsImportError(f"{path}: expected a list of at least {N_PROMPTS} rows")
    draw = random.Random(PROMPT_SEED).sample(rows, N_PROMPTS)
    for i, r in enumerate(draw):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise AuthorsImportError(f"{path}: a sampled row (prompt {i}): instruction: "
                                     "missing or not text")
    return draw


def stated_license(readme: Path | None) -> str | None:
    """The `license` of the Hub dataset's README front matter, as the authors state it."""
    if readme is None:
        return None
    import yaml

    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end] if end > 0 else "") or {}
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    if isinstance(lic, list):
        lic = ", ".join(str(x) for x in lic)
    return str(lic) if lic else None


# ---------------------------------------------------------------------------- write


def _hf_schema(schema: pa.Schema) -> pa.Schema:
    import datasets

    feats = datasets.Features.from_arrow_schema(schema)
    meta = {"huggingface": json.dumps({"info": {"features": feats.to_dict()}}, sort_keys=True)}
    return schema.with_metadata(meta)


class _RolloutFiles:
    """`rollouts/train-NNNNN.parquet`, a new file every `rows_per_file` rows."""

    def __init__(self, folder: Path, rows_per_file: int, rows_per_group: int) -> None:
        self.folder = folder / "rollouts"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = _hf_schema(IMPORT_SCHEMA)
        self.rows_per_file = rows_per_file
        self.rows_per_group = rows_per_group
        self.buf: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.in_file = 0
        self.files: list[str] = []

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.buf += rows
        while len(self.buf) >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, n: int) -> None:
        n = min(n, len(self.buf), self.rows_per_file - self.in_file)
        if self.writer is None:
            name = f"{SPLIT}-{len(self.files):05d}.parquet"
            self.files.append(f"rollouts/{name}")
            self.writer = pq.ParquetWriter(str(self.folder / name), self.schema,
                                           compression="zstd", compression_level=3,
                                           use_dictionary=True, store_schema=True)
        t = pa.Table.from_pylist(self.buf[:n], schema=self.schema)
        self.writer.write_table(t, row_group_size=n)
        self.buf = self.buf[n:]
        self.in_file += n
        if self.in_file >= self.rows_per_file:
            self.writer.close()
            self.writer, self.in_file = None, 0

    def close(self) -> list[str]:
        while self.buf:
            self._flush(len(self.buf))
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.files


def _write_small(folder: Path, name: str, table: pa.Table) -> str:
    rel = f"{name}/{SPLIT}-00000.parquet"
    (folder / name).mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(_hf_schema(table.schema).metadata),
                   folder / rel, compression="zstd", store_schema=True)
    return rel


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
    writer = _RolloutFiles(folder, rows_per_file, rows_per_group)
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
    files += [_write_small(folder, "concepts", ctable), _write_small(folder, "prompts", ptable)]
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
    from ..publish.hub import _REPO_ID, _hub_token, check_no_secret, hub_upload

    token = None
    if repo is not None:
        if not _REPO_ID.fullmatch(repo):
            raise AuthorsImportError(f"--repo: expected ORG/NAME (got {repo!r})")
        if not dry_run:
            token = _hub_token()
            if not token:
                raise AuthorsImportError("no Hugging Face token: set HF_TOKEN or run "
                                         "`hf auth login` (or use --dry-run)")
    result = import_authors(source, out, **kwargs)
    result.repo = repo
    if repo is not None and token is not None:
        check_no_secret(result.folder, token)
        (upload or hub_upload)(result.folder, repo, private=private, token=token)
        result.uploaded = True
    return result
