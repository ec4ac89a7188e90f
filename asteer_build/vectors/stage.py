"""The vectors stage: contrast banks -> pooled states -> one vector per method and concept
(the `file` method's come from the user's file instead: `vector_files`), written as one
model's vector files.

Files per model: `<method>.safetensors` (one float32 tensor per concept id) and
`index.json` ({method: {concept_id: {norm, layer, bank_size, probe_accuracy, ...}}}).

Banks come from, in order: the `banks` handed in, `settings.banks` (files in the
reference authors' layout, from the Hub or a folder: `bankfiles`), `settings.bank_dir`
(written by `banks.build_banks`), or, for the tiny world only, the built-in templates
(`writers.TemplateWriter`). A real model with none of these is refused: filler-template
vectors would silently stand in for the reference's.

The stage is resumable per concept: each finished concept's vectors go to
`<cache_dir>/<concept>.safetensors` (temp name, then rename) with a fingerprint of
everything that determines them (model, layer, bank texts, probe settings, pooling path),
and a rerun reuses matching files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import atomic
from ..engine.protocol import SteeringEngine
from ..inputs.sources import Concept
from .bankfiles import load_bank_files
from .banks import Bank, BankError, bank_path, check_bank, load_bank, plan_requests, safe_name
from .methods import make_vector
from .pooling import Pooling, open_pooling, tokenize_texts
from .settings import ProbeSettings, VectorSettings
from .vector_files import VectorFileError, file_key, read_vector_file
from .writers import TemplateWriter

__all__ = ["build_vectors", "compute_vectors", "stage_banks", "load_vectors",
           "load_residual_norm", "RESIDUAL_NORM_FILE"]

#: written beside the vector files only with `alpha_units: norm`
RESIDUAL_NORM_FILE = "residual_norm.json"

OnConcept = Callable[[str, dict[str, Any]], None]


def _as_bank(cid: str, b: Any) -> Bank:
    if isinstance(b, Bank):
        return b
    pos, neg = b
    return Bank(cid, list(pos), list(neg))


NO_BANKS = ("no contrast banks configured for model {model}: the built-in template banks "
            "are for the tiny world only; set vectors.banks (e.g. {{hub: "
            "Fcr09/SteerBoost-data, pattern: 'training/{{concept_id}}.json'}} or {{path: "
            "FOLDER}}) or vectors.bank_dir")


def stage_banks(concepts: Sequence[Concept], settings: VectorSettings,
                banks: Mapping[str, Any] | None = None, *,
                model_path: str | None = None) -> dict[str, Bank]:
    """Each concept's bank, in concept order: from `banks` ({id: Bank or (pos, neg)}),
    else from `settings.banks` or `settings.bank_dir`, else (only when `model_path` is
    the tiny world, or not given) from the built-in templates."""
    if banks is None and settings.banks is not None:
        banks = load_bank_files(concepts, settings.banks)
    if banks is None and settings.bank_dir is not None:
        banks = {}
        for c in concepts:
            p = bank_path(settings.bank_dir, c.concept_id)
            if not p.exists():
                raise BankError(f"{c.concept_id}: no contrast bank at {p}; write the banks "
                                "first (asteer_build.vectors.build_banks)")
            banks[c.concept_id] = load_bank(p)
    if banks is None and model_path is not None:
        from ..inputs.tinyworld import is_tiny_model

        if not is_tiny_model(model_path):
            raise BankError(NO_BANKS.format(model=model_path))
    if banks is None:
        w = TemplateWriter()
        banks = {}
        for c in concepts:
            texts = dict(w.write(c, plan_requests(c, settings.bank_size, settings.seed)))
            banks[c.concept_id] = Bank(
                c.concept_id, [t for r, t in texts.items() if r.kind == "pos"],
                [t for r, t in texts.items() if r.kind == "neg"])
    missing = [c.concept_id for c in concepts if c.concept_id not in banks]
    if missing:
        raise BankError(f"no contrast bank for concept(s) {missing}")
    out = {c.concept_id: _as_bank(c.concept_id, banks[c.concept_id]) for c in concepts}
    for cid, b in out.items():
        check_bank(cid, b.positives, b.negatives)  # before any engine starts
    return out


def build_vectors(model_path: str, concepts: Sequence[Concept], out_dir: str | Path,
                  settings: VectorSettings, *, engine: SteeringEngine | None = None,
                  banks: Mapping[str, Any] | None = None,
                  on_concept: OnConcept | None = None) -> dict[str, Any]:
    """The stage end to end: write `<method>.safetensors` + `index.json` into `out_dir`
    and return the index. `engine`: a running `SteeredEngine` to pool on (else one is
    started for `pool: vllm`); `banks`: texts handed in, overriding the configured ones."""
    ids = [c.concept_id for c in concepts]
    # the user's own vectors are read first: a file that misses a concept fails before an
    # engine starts
    file_vecs = _read_file_vectors(settings, ids) if "file" in settings.methods else None
    if not settings.pooled_methods and settings.alpha_units == "raw":
        return _write_files(Path(out_dir), settings, ids, {}, file_vecs)  # no banks needed
    bank_objs = stage_banks(concepts, settings, banks, model_path=model_path)
    with open_pooling(model_path, settings, engine) as pooling:
        return compute_vectors(model_path, bank_objs, out_dir, settings, pooling,
                               on_concept=on_concept, file_vectors=file_vecs)


FileVectors = tuple[dict[str, torch.Tensor], dict[str, Any]]


def _read_file_vectors(s: VectorSettings, ids: Sequence[str]) -> FileVectors:
    return read_vector_file(s.file, ids, int(s.layer))


def _fingerprint(model_id: str, s: VectorSettings, probe: ProbeSettings, kind: str,
                 b: Bank) -> str:
    key = {"model": model_id, "layer": int(s.layer), "methods": sorted(s.pooled_methods),
           "probe": probe.as_dict(), "bank": b.digest(), "pool": kind, "v": 2}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


#: a concept's vectors by method, their index entries, and its bank's residual norm
#: (mean token L2 norm at the layer over all its texts, and the text count)
Result = tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], tuple[float, int] | None]


def _cached(cache: Path | None, cid: str, fingerprint: str) -> Result | None:
    f = cache / f"{safe_name(cid)}.safetensors" if cache else None
    if f is None or not f.exists():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(f), "pt") as h:
        meta = h.metadata() or {}
    if meta.get("fingerprint") != fingerprint:
        return None
    norm = json.loads(meta["bank_norm"]) if "bank_norm" in meta else None
    return load_file(str(f)), json.loads(meta["entries"]), (tuple(norm) if norm else None)


def _concept_vectors(s: VectorSettings, probe: ProbeSettings, kind: str, b: Bank,
                     pos: np.ndarray, neg: np.ndarray, norms: np.ndarray) -> Result:
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise RuntimeError(f"{b.concept_id}: non-finite pooled states at layer {s.layer}")
    tens: dict[str, torch.Tensor] = {}
    ents: dict[str, dict[str, Any]] = {}
    for meth in s.pooled_methods:
        v, acc = make_vector(meth, pos, neg, probe)
        tens[meth] = v.contiguous()
        ents[meth] = {"norm": float(v.double().norm()), "layer": int(s.layer),
                      "bank_size": len(pos), "n_positive": len(pos),
                      "n_negative": len(neg), "probe_accuracy": acc,
                      "bank_digest": b.digest(), "pool": kind}
    return tens, ents, (float(np.mean(norms, dtype=np.float64)), len(norms))


def _bank_ids(tokenizer: Any, cid: str, side: str, texts: Sequence[str]) -> list[list[int]]:
    """The texts' token ids for pooling; a text of one token has nothing left once
    position 0 is skipped (the reference would average nothing: NaN), so it is refused."""
    ids = tokenize_texts(tokenizer, texts)
    for i, x in enumerate(ids):
        if len(x) < 2:
            raise BankError(f"{cid}: {side} text {i} ({texts[i]!r:.60}) is {len(x)} token(s); "
                            "pooling skips position 0 and needs at least one more")
    return ids


def compute_vectors(model_id: str, banks: Mapping[str, Bank], out_dir: str | Path,
                    settings: VectorSettings, pooling: Pooling, *,
                    concepts_per_call: int | None = None,
                    on_concept: OnConcept | None = None,
                    file_vectors: FileVectors | None = None) -> dict[str, Any]:
    """Vectors for every bank (checked by `stage_banks`), pooled with `pooling`; concepts
    already in `settings.cache_dir` under the same fingerprint are read back, not pooled.
    The `file` method's vectors come from `file_vectors` (read here when not given)."""
    from safetensors.torch import save_file

    s, layer, num_layers = settings, settings.layer, pooling.num_layers
    if not 0 <= int(layer) < num_layers:
        raise ValueError(f"layer {layer} is beyond the model {model_id}: it has {num_layers} "
                         f"decoder layers (valid layers 0..{num_layers - 1})")
    probe = s.probe
    cache = Path(s.cache_dir) if s.cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)

    def fingerprint(b: Bank) -> str:
        return _fingerprint(model_id, s, probe, pooling.kind, b)

    results: dict[str, Result] = {}
    todo: list[str] = []
    for cid, b in banks.items():
        hit = _cached(cache, cid, fingerprint(b))
        if hit is not None and hit[2] is None and s.alpha_units == "norm":
            hit = None  # cached before bank norms were kept: pool it again
        if hit is not None:
            results[cid] = hit
        else:
            todo.append(cid)

    per_call = concepts_per_call or max(1, 1024 // max(1, 2 * max(
        (len(banks[c].positives) + len(banks[c].negatives)) // 2 for c in todo)
        if todo else 1))
    for g0 in range(0, len(todo), per_call):
        group = todo[g0:g0 + per_call]
        ids: list[list[int]] = []
        spans = []
        for cid in group:
            pos = _bank_ids(pooling.tokenizer, cid, "positive", banks[cid].positives)
            neg = _bank_ids(pooling.tokenizer, cid, "negative", banks[cid].negatives)
            spans.append((len(ids), len(ids) + len(pos), len(ids) + len(pos) + len(neg)))
            ids += pos + neg
        pooled, token_norms = pooling.pool(ids, int(layer))
        for cid, (a, m, e) in zip(group, spans, strict=True):
            res = _concept_vectors(s, probe, pooling.kind, banks[cid], pooled[a:m],
                                   pooled[m:e], token_norms[a:e])
            tens, ents, norm = res
            if cache:
                with atomic.atomic_path(cache / f"{safe_name(cid)}.safetensors") as tmp:
                    save_file(tens, str(tmp), metadata={
                        "fingerprint": fingerprint(banks[cid]), "entries": json.dumps(ents),
                        "bank_norm": json.dumps(norm)})
            results[cid] = res
            if on_concept:
                on_concept(cid, ents)

    if "file" in s.methods and file_vectors is None:
        file_vectors = _read_file_vectors(s, list(banks))
    if file_vectors is not None and s.pooled_methods:
        for cid in banks:  # as wide as the residual stream the banks were pooled from
            width = next(iter(results[cid][0].values())).shape[0]
            if file_vectors[0][cid].shape[0] != width:
                raise VectorFileError(
                    f"vectors.file: {s.file.where()}: concept {cid!r} at layer {layer} (key "
                    f"{file_key(cid, layer)!r}): {file_vectors[0][cid].shape[0]} values, the "
                    f"model's residual stream has {width}")
    return _write_files(Path(out_dir), s, list(banks), results, file_vectors)


def _write_files(out: Path, s: VectorSettings, ids: Sequence[str],
                 results: Mapping[str, Result], file_vectors: FileVectors | None
                 ) -> dict[str, Any]:
    """`<method>.safetensors` per method and `index.json`, in concept order."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {m: {} for m in s.methods}
    for meth in s.methods:
        if meth == "file":
            vecs, source = file_vectors
            tensors = {cid: vecs[cid] for cid in ids}
            for cid in ids:
                index[meth][cid] = {"norm": float(vecs[cid].double().norm()),
                                    "layer": int(s.layer), "probe_accuracy": None,
                                    "key": file_key(cid, s.layer), **source}
        else:
            tensors = {cid: results[cid][0][meth] for cid in ids}
            for cid in ids:
                index[meth][cid] = results[cid][1][meth]
        save_file(tensors, str(out / f"{meth}.safetensors"))
    (out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    if s.alpha_units == "norm":
        per = {cid: results[cid][2] for cid in ids}
        texts = sum(n for _, n in per.values())
        mean = sum(v * n for v, n in per.values()) / max(texts, 1)
        (out / RESIDUAL_NORM_FILE).write_text(json.dumps({
            "alpha_units": "norm", "layer": int(s.layer), "mean_token_norm": mean,
            "texts": texts, "positions": "1.. (position 0 skipped, as pooling does)",
            "per_concept": {cid: v for cid, (v, _) in per.items()}}, indent=1))
    return index


def load_residual_norm(folder_files: dict[str, bytes]) -> float | None:
    """The mean residual norm at the layer a norm-units build measured (None: raw)."""
    raw = folder_files.get(RESIDUAL_NORM_FILE)
    return None if raw is None else float(json.loads(raw)["mean_token_norm"])


def load_vectors(folder_files: dict[str, bytes]) -> tuple[dict[str, torch.Tensor],
                                                         dict[str, float]]:
    """From a model's vector files (name -> bytes): {"method/concept_id": tensor} and the
    norms under the same keys, as the engine registers them."""
    from safetensors.torch import load

    index = json.loads(folder_files["index.json"])
    vecs: dict[str, torch.Tensor] = {}
    norms: dict[str, float] = {}
    for method, entries in index.items():
        tens = load(folder_files[f"{method}.safetensors"])
        for cid, e in entries.items():
            vecs[f"{method}/{cid}"] = tens[cid]
            norms[f"{method}/{cid}"] = float(e["norm"])
    return vecs, norms
