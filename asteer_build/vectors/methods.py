"""The two vector methods, on pooled states (`[n, hidden]` float32 arrays, positives and
negatives). Reference setting: neither is normalized.

- DiffMean: mean(positives) - mean(negatives), accumulated in float64.
- LinearProbe: the weights of a bias-free logistic probe (`train_probe`: AdamW lr 5e-3,
  weight decay 1e-3, 10 full-batch epochs, L2 penalty 0.01 on the weights), trained in
  float64 on the CPU from a seeded init, so a rebuild from the same pooled states is
  bit-identical. The one place the probe's maths lives.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .settings import METHODS, ProbeSettings

__all__ = ["METHODS", "diffmean", "train_probe", "make_vector"]


def diffmean(pos: np.ndarray, neg: np.ndarray) -> torch.Tensor:
    v = pos.astype(np.float64).mean(0) - neg.astype(np.float64).mean(0)
    return torch.from_numpy(v.astype(np.float32))


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


def make_vector(method: str, pos: np.ndarray, neg: np.ndarray, probe: ProbeSettings
                ) -> tuple[torch.Tensor, float | None]:
    """(vector, probe training accuracy or None) for one method."""
    if method == "diffmean":
        return diffmean(pos, neg), None
    if method == "probe":
        return train_probe(pos, neg, probe)
    raise ValueError(f"methods: unknown method {method!r} (known: {', '.join(METHODS)})")
