"""Steerability features from the early residual stream, steered run versus exact replay.

Inputs per rollout (torch, on whatever device holds them; computed in float32):
`steered` and `replay`, `[T, K, H]`: the residual stream at decode steps `steps` (T of
them) and layers L + k for k in `offsets` (K of them, k = 0 first), where the steered
state at k = 0 is the one *after* adding alpha * v; `v = alpha * v_c`.

Per (t, k):
- `dn` = ||h~ - h||                       (distance)
- `ds` = cos(h~, h)                        (similarity)
- `da` = cos(h~ - h, v), k != 0 only       (alignment of the change with the vector)
- `sa` = cos(h~, v)                        (alignment of the state with the vector)
Dynamics for t in steps[1:] against t0 = steps[0]:
- `dnr` = dn(t) / dn(t0)   `dsd` = ds(t) - ds(t0)   `dad` = da(t) - da(t0)

Each token x layer matrix contributes every entry `{g}_t{t}_k{k}`, global statistics
`{g}_mean|std|max|min`, per-token `{g}_t{t}_mean|std|max` and per-layer
`{g}_k{k}_mean|std|max` (std is the population std). Plus `alpha` and `vector_norm`
(||v_c||). With the default 4 steps and 7 offsets that is 414 features.

Guards (never NaN): a cosine with a zero-norm argument (norm <= 1e-12, e.g. alpha = 0)
is 0. `dnr` with dn(t0) <= 1e-6 (no change at t0, e.g. alpha = 0, or the `generated`
position mode where t0 is not steered) is 1.0 if dn(t) <= 1e-6 too, else dn(t) / 1e-6.
"""

from __future__ import annotations

import torch

# The names (and which steps / offsets each family has) are the dataset contract's, kept
# torch-free in feature_names.py; `compute_batch` returns values in their order.
from .feature_names import GROUPS, feature_names

__all__ = ["EPS_COS", "EPS_DN", "GROUPS", "matrices", "feature_names", "compute_batch",
           "compute", "compute_named"]

EPS_COS = 1e-12
EPS_DN = 1e-6


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na = a.norm(dim=-1)
    nb = b.norm(dim=-1)
    ok = (na > EPS_COS) & (nb > EPS_COS)
    dot = (a * b).sum(-1)
    return torch.where(ok, dot / (na * nb).clamp_min(EPS_COS), torch.zeros_like(dot))


def matrices(
    steered: torch.Tensor, replay: torch.Tensor, v: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The seven token x layer matrices, `[..., T, K]` (da and dad drop the k = 0 column).

    `steered`, `replay`: `[..., T, K, H]`; `v` (= alpha * v_c): `[..., H]`.
    """
    s = steered.float()
    r = replay.float()
    vv = v.float().unsqueeze(-2).unsqueeze(-2)
    diff = s - r
    dn = diff.norm(dim=-1)
    ds = _cos(s, r)
    da = _cos(diff, vv.expand_as(diff))[..., 1:]
    sa = _cos(s, vv.expand_as(s))
    base = dn[..., :1, :]
    later = dn[..., 1:, :]
    dnr = torch.where(
        base <= EPS_DN,
        torch.where(later <= EPS_DN, torch.ones_like(later), later / EPS_DN),
        later / base.clamp_min(EPS_DN),
    )
    return {
        "dn": dn, "ds": ds, "da": da, "sa": sa,
        "dnr": dnr, "dsd": ds[..., 1:, :] - ds[..., :1, :], "dad": da[..., 1:, :] - da[..., :1, :],
    }


def _stats(m: torch.Tensor) -> list[torch.Tensor]:
    """Entries, global, per-token and per-layer statistics of `[..., T, K]` matrices."""
    flat = m.flatten(-2)
    glob = torch.stack(
        [flat.mean(-1), flat.std(-1, unbiased=False), flat.amax(-1), flat.amin(-1)], dim=-1
    )
    rows = torch.stack([m.mean(-1), m.std(-1, unbiased=False), m.amax(-1)], dim=-1).flatten(-2)
    cols = torch.stack([m.mean(-2), m.std(-2, unbiased=False), m.amax(-2)], dim=-1).flatten(-2)
    return [flat, glob, rows, cols]


def compute_batch(
    steered: torch.Tensor, replay: torch.Tensor, v_c: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Features of N rollouts at once: `[N, T, K, H]` states, `[N, H]` vectors, `[N]`
    alphas -> `[N, F]` float32 (order of `feature_names`)."""
    v_c = v_c.to(steered.device).float()
    alpha = alpha.to(steered.device).float()
    mats = matrices(steered, replay, alpha.unsqueeze(-1) * v_c)
    parts: list[torch.Tensor] = []
    for g in GROUPS:
        parts += _stats(mats[g])
    tail = torch.stack([alpha, v_c.norm(dim=-1)], dim=-1)
    return torch.cat(parts + [tail], dim=-1).float()


def compute(
    steered: torch.Tensor,
    replay: torch.Tensor,
    v_c: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """All features of one rollout as a float32 vector (order of `feature_names`)."""
    a = torch.tensor([float(alpha)])
    return compute_batch(steered[None], replay[None], v_c[None], a)[0]


def compute_named(steered, replay, v_c, alpha, steps, offsets) -> dict[str, float]:
    values = compute(steered, replay, v_c, alpha).cpu().tolist()
    return dict(zip(feature_names(steps, offsets), values, strict=True))
