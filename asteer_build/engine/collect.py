"""Worker side of `asteer_collect`: assemble a (steered, replay) pair's captured rows into
`[steps, layers, hidden]` tensors and compute its features on the worker's device.

Runs when the client asks, after the replay finished: rows are taken (and freed) from the
capture buffer's store. The records are `spec.CapturePair` in and `spec.CollectResult`
out; only the RPC sees them as dicts (arrays as raw bytes with their shapes, which every
vLLM serializer carries).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from . import features as F
from .capture_buffer import CaptureBuffer
from .spec import CapturePair, CollectResult
from .steering import SteeringState


def _stack(rows: dict, steps: list[int], layers: list[int]):
    """`[T, K, H]` post states and `[T, H]` pre states of the given steps."""
    post = torch.stack([rows[t][0] for t in steps])[:, layers]
    pre = torch.stack([rows[t][1] for t in steps])
    return post, pre


def _pad(x: torch.Tensor, idx: list[int], n: int) -> torch.Tensor:
    out = x.new_zeros((n, *x.shape[1:]))
    out[idx] = x
    return out


def _host(t: torch.Tensor, dtype: str) -> np.ndarray:
    return t.detach().to("cpu", getattr(torch, dtype)).contiguous().numpy()


def collect_pairs(
    state: SteeringState, capture: CaptureBuffer, pairs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The RPC's body: wire dicts in (`CapturePair`), wire dicts out (`CollectResult`)."""
    return [r.to_wire() for r in collect_records(
        state, capture, [CapturePair.from_wire(p) for p in pairs])]


def collect_records(
    state: SteeringState, capture: CaptureBuffer, pairs: list[CapturePair]
) -> list[CollectResult]:
    found: list[CollectResult] = []
    # features are computed for all pairs of one shape in a single batched call
    groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, float]]] = {}
    for p in pairs:
        s_rows = capture.take(p.steered) or {}
        same = p.replay == p.steered
        r_rows = s_rows if same else (capture.take(p.replay) or {})
        overflow = p.steered in capture.overflowed or p.replay in capture.overflowed
        capture.overflowed.discard(p.steered)
        capture.overflowed.discard(p.replay)
        want = list(p.steps)
        present = [t for t in want if t in s_rows and t in r_rows]
        found.append(CollectResult(tuple(present), overflow))
        if not present:
            continue
        layers = [p.layer + k for k in p.offsets]
        s, s_pre = _stack(s_rows, present, layers)
        r, _ = _stack(r_rows, present, layers)
        if len(present) < len(want):
            # Missing steps (a response shorter than the step) are zero rows, in the
            # features and the activations alike, so every rollout has the same shape.
            idx = [want.index(t) for t in present]
            s, r, s_pre = (_pad(x, idx, len(want)) for x in (s, r, s_pre))
        if p.features:
            vec = state.vectors.get(p.vector)
            if vec is None:
                found[-1] = replace(found[-1], error=f"unknown vector {p.vector!r}")
            else:
                key = (len(want), len(layers))
                groups.setdefault(key, []).append((len(found) - 1, s, r, s_pre, vec, p.alpha))
        if p.activations:
            dt = p.activation_dtype
            found[-1] = replace(found[-1], activations={
                "steered": _host(s, dt),
                "replay": _host(r, dt),
                "steered_pre": _host(s_pre.unsqueeze(1), dt),
            })
    for items in groups.values():
        feats = F.compute_batch(
            torch.stack([i[1] for i in items]),
            torch.stack([i[2] for i in items]),
            torch.stack([i[4] for i in items]),
            torch.tensor([i[5] for i in items]),
            steered_pre=torch.stack([i[3] for i in items]),
        ).cpu()
        for (at, *_), row in zip(items, feats, strict=True):
            found[at] = replace(found[at], features=_host(row, "float32"))
    return found
