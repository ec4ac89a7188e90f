"""Steerability features from the early residual stream, steered run versus replay.

The definitions are the reference authors' (arXiv 2606.11599 and their code), so a
predictor trained on them reads the same quantities. Inputs per rollout (torch, on
whatever device holds them; computed in float32):
- `steered`, `[T, K, H]`: the residual stream at decode steps `steps` (T of them) and
  layers L + k for k in `offsets` (K of them, k = 0 first); at k = 0 the state *after*
  adding alpha * v_c;
- `steered_pre`, `[T, H]`: the steered state at layer L *before* the addition;
- `replay`, `[T, K, H]`: the unsteered replay at the same steps and layers;
- `v = alpha * v_c`.

Per (t, k), with h~ the steered state and h the replay's; at k = 0, h~ is `steered_pre`
for the distances and similarities and the after-addition state for `sa`:
- `dn` = ||h~ - h||                       (distance)
- `ds` = cos(h~, h)                        (similarity)
- `da` = cos(h~ - h, v), k != 0 only       (alignment of the change with the vector)
- `sa` = cos(h~, v)                        (alignment of the state with the vector)
Dynamics for t in steps[1:] against t0 = steps[0]:
- `dnr` = dn(t) / dn(t0)   `dsd` = ds(t) - ds(t0)   `dad` = da(t) - da(t0)

With the exact replay (the default) the replay equals the steered run before the
addition at every layer <= L, so at k = 0 `dn` is 0, `ds` is 1 and `dnr` is 0 (the
guard below): those columns are constant by construction. With `capture.replay:
authors` (the authors' re-tokenized, untemplated replay) they measure that replay's
context mismatch instead.

Each token x layer matrix contributes every entry `{g}_t{t}_k{k}`, global statistics
`{g}_mean|std|max|min`, per-token `{g}_t{t}_mean|std|max` and per-layer
`{g}_k{k}_mean|std|max` (std is the population std, ddof 0). Plus `alpha` and
`vector_norm` (||v_c||). With the default 4 steps and 7 offsets that is 414 features.

Guards, as the authors' (never NaN): a cosine with an argument of norm <= 1e-8 (e.g.
alpha = 0, or a missing step's zero rows) is 0; `dnr` is 0 where dn(t0) <= 1e-8.

Names in the authors' code (`asteer_build.engine.feature_names.authors_name`): `dn`
MagDiff, `ds` CosSim, `da` SteerAlign, `sa` SteerProj, `dnr` MagDiffRatio, `dsd`
CosSimDelta, `dad` SteerAlignDelta; `{g}_t1_k1` is `MagDiff_T1_L11` at L = 10 (absolute
layers); `vector_norm` is their `InterventionMag` (||after - before|| at (t0, L) / alpha,
which is ||v_c|| up to the model dtype's rounding) and `alpha` their `Alpha`. Their
columns are in our order except the last two (`InterventionMag`, then `Alpha`).
"""

from __future__ import annotations

import torch

# The names (and which steps / offsets each family has) are the dataset contract's, kept
# torch-free in feature_names.py; `compute_batch` returns values in their order.
from ..core.feature_names import GROUPS, feature_names

__all__ = ["EPS", "GROUPS", "matrices", "feature_names", "compute_batch", "compute",
           "compute_named"]

#: the authors' one threshold: cosines of shorter vectors and `dnr` over a smaller dn(t0)
#: are 0
EPS = 1e-8


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na = a.norm(dim=-1)
    nb = b.norm(dim=-1)
    ok = (na > EPS) & (nb > EPS)
    dot = (a * b).sum(-1)
    # the denominator of an unselected cell is 1, never a clamped tiny product
    den = torch.where(ok, na * nb, torch.ones_like(dot))
    return torch.where(ok, dot / den, torch.zeros_like(dot))


def matrices(
    steered: torch.Tensor, replay: torch.Tensor, v: torch.Tensor, steered_pre: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The seven token x layer matrices, `[..., T, K]` (da and dad drop the k = 0 column).

    `steered`, `replay`: `[..., T, K, H]`; `steered_pre`: `[..., T, H]`; `v` (= alpha *
    v_c): `[..., H]`.
    """
    s = steered.float()
    r = replay.float()
    if steered_pre.shape != s.shape[:-2] + s.shape[-1:]:
        raise ValueError(f"steered_pre: expected shape {tuple(s.shape[:-2] + s.shape[-1:])} "
                         f"([..., T, H]), got {tuple(steered_pre.shape)}")
    vv = v.float().unsqueeze(-2).unsqueeze(-2)
    # What is compared with the replay: the state before the addition at L (k = 0), the
    # block outputs above it.
    before = torch.cat([steered_pre.float().unsqueeze(-2), s[..., 1:, :]], dim=-2)
    diff = before - r
    dn = diff.norm(dim=-1)
    ds = _cos(before, r)
    da = _cos(diff[..., 1:, :], vv.expand_as(diff[..., 1:, :]))
    sa = _cos(s, vv.expand_as(s))
    base = dn[..., :1, :]
    later = dn[..., 1:, :]
    ok = base > EPS
    dnr = torch.where(ok, later / torch.where(ok, base, torch.ones_like(base)),
                      torch.zeros_like(later))
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
    steered: torch.Tensor,
    replay: torch.Tensor,
    v_c: torch.Tensor,
    alpha: torch.Tensor,
    *,
    steered_pre: torch.Tensor,
) -> torch.Tensor:
    """Features of N rollouts at once: `[N, T, K, H]` states, `[N, T, H]` before-addition
    states, `[N, H]` vectors, `[N]` alphas -> `[N, F]` float32 (order of `feature_names`).

    `steered_pre` is required (keyword-only): without it DN / DS at the steered layer
    would silently use the after-addition state, which is not the definition.
    """
    v_c = v_c.to(steered.device).float()
    alpha = alpha.to(steered.device).float()
    mats = matrices(steered, replay, alpha.unsqueeze(-1) * v_c, steered_pre.to(steered.device))
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
    *,
    steered_pre: torch.Tensor,
) -> torch.Tensor:
    """All features of one rollout as a float32 vector (order of `feature_names`)."""
    a = torch.tensor([float(alpha)])
    return compute_batch(steered[None], replay[None], v_c[None], a,
                         steered_pre=steered_pre[None])[0]


def compute_named(steered, replay, v_c, alpha, steps, offsets, *,
                  steered_pre) -> dict[str, float]:
    values = compute(steered, replay, v_c, alpha, steered_pre=steered_pre).cpu().tolist()
    return dict(zip(feature_names(steps, offsets), values, strict=True))
