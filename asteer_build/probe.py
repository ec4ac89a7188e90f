"""Steering vectors from contrast banks: pooling, DiffMean, LinearProbe, per-concept cache.

Reference setting: each bank text is tokenized without a chat template (BOS first where
the model has one), one forward, the output of block L averaged over every position but 0;
DiffMean = mean(pos) - mean(neg), not normalized; LinearProbe = the weights of a
bias-free logistic probe (AdamW lr 5e-3, weight decay 1e-3, 10 full-batch epochs, L2
penalty 0.01 on the weights), not normalized.

Pooling runs on the steered vLLM engine (`SteeredEngine.pool_hidden`: prefill-only
requests pooled on the device), so 150 concepts x 100 texts cost one prefill pass; the
Hugging Face path (`HFReference`) is kept as the oracle the tests compare against.

The stage is resumable per concept: each finished concept's vectors go to
`<cache_dir>/<concept>.safetensors` (temp name, then rename) with a fingerprint of
everything that determines them (model, layer, bank texts, probe settings, pooling path),
and a rerun reuses matching files. The probe trains in float64 on the CPU from a seeded
init, so a rebuild from the same pooled states is bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import atomic
from .banks import Bank, BankError, check_bank
from .sources import Concept

__all__ = ["ProbeSettings", "tokenize_texts", "engine_pooler", "hf_pooler", "diffmean",
           "train_probe", "compute_vectors", "build_vectors_pooled", "METHODS"]

METHODS = ("diffmean", "probe")

Pooler = Callable[[list[list[int]], int], np.ndarray]


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """No chat template; BOS in front when the tokenizer has one, so position 0 (which
    pooling skips) is the BOS the reference skipped, not the text's first word."""
    bos = tokenizer.bos_token_id
    out = []
    for t in texts:
        ids = list(tokenizer(t).input_ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        out.append(ids)
    return out


def engine_pooler(engine: Any, chunk: int = 2048) -> Pooler:
    def pool(ids: list[list[int]], layer: int) -> np.ndarray:
        parts = [engine.pool_hidden(ids[i:i + chunk], layer, skip=1)
                 for i in range(0, len(ids), chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, engine.hidden_size), "f4")

    return pool


def hf_pooler(ref: Any) -> Pooler:
    """One sequence per forward: no padding, so nothing to mask and nothing to doubt."""
    def pool(ids: list[list[int]], layer: int) -> np.ndarray:
        rows = [ref.residual_stream(x, None, [layer])[layer][1:].mean(0).numpy() for x in ids]
        return np.stack(rows).astype(np.float32)

    return pool


def diffmean(pos: np.ndarray, neg: np.ndarray) -> torch.Tensor:
    v = pos.astype(np.float64).mean(0) - neg.astype(np.float64).mean(0)
    return torch.from_numpy(v.astype(np.float32))


class ProbeSettings:
    def __init__(self, epochs: int = 10, lr: float = 5e-3, weight_decay: float = 1e-3,
                 l2: float = 0.01, seed: int = 0) -> None:
        self.epochs, self.lr, self.weight_decay, self.l2, self.seed = (
            int(epochs), float(lr), float(weight_decay), float(l2), int(seed))

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay,
                "l2": self.l2, "seed": self.seed}


def train_probe(pos: np.ndarray, neg: np.ndarray, s: ProbeSettings | None = None
                ) -> tuple[torch.Tensor, float]:
    """Bias-free logistic probe; returns (weights as float32, training accuracy).

    Init as `nn.Linear(hidden, 1, bias=False)` does (uniform +-1/sqrt(hidden)), from a
    generator seeded per call, so the result depends only on the inputs and settings.
    """
    s = s or ProbeSettings()
    x = torch.from_numpy(np.concatenate([pos, neg]).astype(np.float64))
    y = torch.cat([torch.ones(len(pos), dtype=torch.float64),
                   torch.zeros(len(neg), dtype=torch.float64)])
    d = x.shape[1]
    g = torch.Generator().manual_seed(s.seed)
    bound = 1.0 / math.sqrt(d)
    w = ((torch.rand(d, generator=g, dtype=torch.float64) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.AdamW([w], lr=s.lr, weight_decay=s.weight_decay)
    for _ in range(s.epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + s.l2 * (w @ w)
        loss.backward()
        opt.step()
    w = w.detach()
    acc = float(((x @ w > 0).to(torch.float64) == y).to(torch.float64).mean())
    return w.to(torch.float32), acc


def _safe(cid: str) -> str:
    from .banks import _safe as safe

    return safe(cid)


def _as_bank(cid: str, b: Any) -> Bank:
    if isinstance(b, Bank):
        return b
    pos, neg = b
    return Bank(cid, list(pos), list(neg))


def compute_vectors(
    model_id: str,
    banks: Mapping[str, Any],
    layer: int,
    methods: Sequence[str],
    out_dir: str | Path,
    *,
    pooler: Pooler,
    tokenizer: Any,
    num_layers: int,
    pool_kind: str,
    cache_dir: str | Path | None = None,
    probe: ProbeSettings | None = None,
    concepts_per_call: int | None = None,
    on_concept: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Vectors for every bank; writes `<method>.safetensors` + `index.json` into
    `out_dir` and returns the index ({method: {concept_id: {norm, layer, bank_size,
    probe_accuracy, ...}}})."""
    from safetensors.torch import load_file, save_file

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods: unknown method(s) {bad} (known: {', '.join(METHODS)})")
    if not 0 <= int(layer) < num_layers:
        raise ValueError(f"layer {layer} is beyond the model {model_id}: it has {num_layers} "
                         f"decoder layers (valid layers 0..{num_layers - 1})")
    probe = probe or ProbeSettings()
    bank_objs = {cid: _as_bank(cid, b) for cid, b in banks.items()}
    for cid, b in bank_objs.items():
        check_bank(cid, b.positives, b.negatives)
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)

    def fingerprint(b: Bank) -> str:
        key = {"model": model_id, "layer": int(layer), "methods": sorted(methods),
               "probe": probe.as_dict(), "bank": b.digest(), "pool": pool_kind, "v": 1}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    results: dict[str, tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]] = {}
    todo: list[str] = []
    for cid, b in bank_objs.items():
        f = cache / f"{_safe(cid)}.safetensors" if cache else None
        if f is not None and f.exists():
            from safetensors import safe_open

            with safe_open(str(f), "pt") as h:
                meta = h.metadata() or {}
            if meta.get("fingerprint") == fingerprint(b):
                results[cid] = (load_file(str(f)), json.loads(meta["entries"]))
                continue
        todo.append(cid)

    per_call = concepts_per_call or max(1, 1024 // max(1, 2 * max(
        (len(bank_objs[c].positives) + len(bank_objs[c].negatives)) // 2 for c in todo)
        if todo else 1))
    for g0 in range(0, len(todo), per_call):
        group = todo[g0:g0 + per_call]
        ids: list[list[int]] = []
        spans = []
        for cid in group:
            b = bank_objs[cid]
            a = len(ids)
            ids += tokenize_texts(tokenizer, b.positives)
            m = len(ids)
            ids += tokenize_texts(tokenizer, b.negatives)
            spans.append((a, m, len(ids)))
        pooled = pooler(ids, int(layer))
        for cid, (a, m, e) in zip(group, spans, strict=True):
            pos, neg = pooled[a:m], pooled[m:e]
            if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
                raise RuntimeError(f"{cid}: non-finite pooled states at layer {layer}")
            tens: dict[str, torch.Tensor] = {}
            ents: dict[str, dict[str, Any]] = {}
            for meth in methods:
                acc = None
                if meth == "diffmean":
                    v = diffmean(pos, neg)
                else:
                    v, acc = train_probe(pos, neg, probe)
                tens[meth] = v.contiguous()
                ents[meth] = {"norm": float(v.double().norm()), "layer": int(layer),
                              "bank_size": len(pos), "n_positive": len(pos),
                              "n_negative": len(neg), "probe_accuracy": acc,
                              "bank_digest": bank_objs[cid].digest(), "pool": pool_kind}
            if cache:
                f = cache / f"{_safe(cid)}.safetensors"
                with atomic.atomic_path(f) as tmp:
                    save_file(tens, str(tmp),
                              metadata={"fingerprint": fingerprint(bank_objs[cid]),
                                        "entries": json.dumps(ents)})
            results[cid] = (tens, ents)
            if on_concept:
                on_concept(cid, ents)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {m: {} for m in methods}
    for meth in methods:
        tensors = {cid: results[cid][0][meth] for cid in bank_objs}
        for cid in bank_objs:
            index[meth][cid] = results[cid][1][meth]
        save_file(tensors, str(out / f"{meth}.safetensors"))
    (out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    return index


def build_vectors_pooled(
    model_path: str,
    concepts: Sequence[Concept],
    layer: int,
    methods: Sequence[str],
    out_dir: str | Path,
    *,
    engine: Any = None,
    pool: str = "vllm",
    banks: Mapping[str, Any] | None = None,
    bank_dir: str | Path | None = None,
    bank_size: int = 32,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    probe_epochs: int = 10,
    probe_lr: float = 0.005,
    probe_weight_decay: float = 0.001,
    probe_l2: float = 0.01,
    engine_args: dict[str, Any] | None = None,
    on_concept: Callable[[str, dict[str, Any]], None] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The vectors stage end to end: banks (given, from a bank cache folder, or tiny-world
    templates), pooled on the vLLM engine (given, or started here) or on the HF reference.
    """
    from .banks import TemplateWriter, bank_path, load_bank, plan_requests

    if banks is None and bank_dir is not None:
        banks = {}
        for c in concepts:
            p = bank_path(bank_dir, c.concept_id)
            if not p.exists():
                raise BankError(f"{c.concept_id}: no contrast bank at {p}; write the banks "
                                "first (asteer_build.banks.build_banks)")
            banks[c.concept_id] = load_bank(p)
    if banks is None:
        w = TemplateWriter()
        banks = {}
        for c in concepts:
            texts = dict(w.write(c, plan_requests(c, bank_size, seed)))
            banks[c.concept_id] = Bank(
                c.concept_id, [t for r, t in texts.items() if r.kind == "pos"],
                [t for r, t in texts.items() if r.kind == "neg"])
    missing = [c.concept_id for c in concepts if c.concept_id not in banks]
    if missing:
        raise BankError(f"no contrast bank for concept(s) {missing}")
    banks = {c.concept_id: banks[c.concept_id] for c in concepts}
    settings = ProbeSettings(probe_epochs, probe_lr, probe_weight_decay, probe_l2, seed)
    kw = dict(cache_dir=cache_dir, probe=settings, on_concept=on_concept)
    if pool == "hf" and engine is None:
        from .reference import HFReference

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ref = HFReference(model_path, dtype=torch.float32, device=dev)
        n_layers = len(ref.layers)
        return compute_vectors(model_path, banks, layer, methods, out_dir,
                               pooler=hf_pooler(ref), tokenizer=ref.tokenizer,
                               num_layers=n_layers, pool_kind="hf", **kw)
    if pool not in ("vllm", "hf"):
        raise ValueError(f"vectors.pool: expected vllm or hf (got {pool!r})")
    own = engine is None
    if own:
        from .engine import SteeredEngine
        from .engine.llm import default_cpu_engine_args

        engine = SteeredEngine(model_path, **(engine_args or default_cpu_engine_args()))
    try:
        return compute_vectors(model_path, banks, layer, methods, out_dir,
                               pooler=engine_pooler(engine), tokenizer=engine.get_tokenizer(),
                               num_layers=engine.num_layers, pool_kind="vllm", **kw)
    finally:
        if own:
            engine.shutdown()
