"""Steering vectors (DiffMean, LinearProbe) from contrast banks; the `vectors` stage.

This is the small built-in path: contrast banks are template texts that contain or
avoid the concept (enough for the tiny world, and a working fallback elsewhere). Pooling
follows the reference: no chat template, output of block `layer`, mean over all tokens
but position 0. LLM-written banks can replace `contrast_bank` without changing
`build_vectors`' signature or its files.

Files per (model): `<method>.safetensors` (one float32 tensor per concept id) and
`index.json` ({method: {concept_id: {norm, layer, bank_size, probe_accuracy}}}).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .sources import Concept

__all__ = ["build_vectors", "contrast_bank", "pooled_states", "load_vectors"]

_FILLER_TEMPLATES = [
    "the {x} is a good idea for people",
    "we can think about the {x} and work on it",
    "this is why the {x} can help you learn",
    "first make a plan then explain the {x}",
    "a short story of a day in the city with the {x}",
    "people also write about the {x} as a simple answer",
]


def contrast_bank(concept: Concept, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` positive texts (mention the concept) and `n` negatives (avoid it)."""
    from .tinyworld import FILLER_WORDS

    rng = random.Random(f"{seed}|{concept.concept_id}")
    avoid = set(concept.concept.lower().split())
    fill = [w for w in FILLER_WORDS if w not in avoid]
    pos, neg = [], []
    for _ in range(n):
        t = rng.choice(_FILLER_TEMPLATES)
        words = " ".join(rng.choice(fill) for _ in range(rng.randint(3, 8)))
        pos.append(f"{t.format(x=concept.concept)} {words} {concept.concept}")
        t = rng.choice(_FILLER_TEMPLATES)
        words = " ".join(rng.choice(fill) for _ in range(rng.randint(3, 8)))
        neg.append(f"{t.format(x=rng.choice(fill))} {words}")
    return pos, neg


@torch.no_grad()
def pooled_states(ref: Any, texts: Sequence[str], layer: int, batch: int = 64) -> torch.Tensor:
    """[len(texts), hidden]: block `layer`'s output averaged over positions 1.. of each
    text (right-padded batches; padding is masked out of attention and the mean)."""
    tok, model = ref.tokenizer, ref.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for b in range(0, len(texts), batch):
        enc = [tok(t, add_special_tokens=False).input_ids for t in texts[b:b + batch]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)
            mask[i, :len(e)] = 1
        hs = model(input_ids=ids.to(ref.device), attention_mask=mask.to(ref.device),
                   output_hidden_states=True).hidden_states[layer + 1].float().cpu()
        keep = mask.clone()
        keep[:, 0] = 0
        keep[mask.sum(1) == 1, 0] = 1  # a one-token text keeps its only position
        w = keep.unsqueeze(-1).float()
        out.append((hs * w).sum(1) / w.sum(1))
    return torch.cat(out)


def _probe(pos: torch.Tensor, neg: torch.Tensor, epochs: int, lr: float, wd: float,
           l2: float, seed: int) -> tuple[torch.Tensor, float]:
    """Bias-free logistic probe on pooled states (the reference's LinearProbe)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    w = (torch.randn(x.shape[1], generator=g) * 1e-3).requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=wd)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w @ w)
        loss.backward()
        opt.step()
    w = w.detach()
    acc = float(((x @ w > 0).float() == y).float().mean())
    return w, acc


def build_vectors(
    model_path: str,
    concepts: Sequence[Concept],
    layer: int,
    methods: Sequence[str],
    out_dir: str | Path,
    *,
    bank_size: int = 32,
    seed: int = 0,
    probe_epochs: int = 10,
    probe_lr: float = 0.005,
    probe_weight_decay: float = 0.001,
    probe_l2: float = 0.01,
    device: str | None = None,
    engine: Any = None,
    pool: str | None = None,
    banks: Any = None,
    bank_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    engine_args: dict[str, Any] | None = None,
    on_concept: Any = None,
) -> dict[str, Any]:
    """Write `<method>.safetensors` + `index.json` into `out_dir`; return the index.

    Given an `engine`, `pool` ("vllm" | "hf"), written `banks`/`bank_dir` or a
    `cache_dir`, this is `probe.build_vectors_pooled`: pooling on the vLLM engine at
    vLLM speed, LLM-written banks, per-concept resume. Same files either way.
    """
    if any(x is not None for x in (engine, pool, banks, bank_dir, cache_dir)):
        from .probe import build_vectors_pooled

        return build_vectors_pooled(
            model_path, concepts, layer, methods, out_dir, engine=engine,
            pool=pool or "vllm", banks=banks, bank_dir=bank_dir, bank_size=bank_size,
            seed=seed, cache_dir=cache_dir, probe_epochs=probe_epochs, probe_lr=probe_lr,
            probe_weight_decay=probe_weight_decay, probe_l2=probe_l2,
            engine_args=engine_args, on_concept=on_concept, device=device)
    from safetensors.torch import save_file

    from .reference import HFReference

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = HFReference(model_path, dtype=torch.float32, device=dev)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, dict[str, torch.Tensor]] = {m: {} for m in methods}
    index: dict[str, Any] = {m: {} for m in methods}
    for c in concepts:
        pos_t, neg_t = contrast_bank(c, bank_size, seed)
        pos = pooled_states(ref, pos_t, layer)
        neg = pooled_states(ref, neg_t, layer)
        for m in methods:
            acc = None
            if m == "diffmean":
                v = pos.mean(0) - neg.mean(0)
            elif m == "probe":
                v, acc = _probe(pos, neg, probe_epochs, probe_lr, probe_weight_decay,
                                probe_l2, seed)
            else:
                raise ValueError(f"methods: unknown method {m!r}")
            tensors[m][c.concept_id] = v.contiguous()
            index[m][c.concept_id] = {"norm": float(v.norm()), "layer": layer,
                                      "bank_size": bank_size, "probe_accuracy": acc}
    for m in methods:
        save_file(tensors[m], str(out / f"{m}.safetensors"))
    (out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    del ref
    return index


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
