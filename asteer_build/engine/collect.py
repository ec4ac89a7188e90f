"""Worker side of `asteer_collect`: assemble a (steered, replay) pair's captured rows into
`[steps, layers, hidden]` tensors and compute its features on the worker's device.

Runs when the client asks, after the replay finished: rows are taken (and freed) from the
capture buffer's store. Tensors cross the RPC as raw bytes (float32 features, float16
or float32 activations) with their shapes, which every vLLM serializer carries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import features as F
from .capture_buffer import CaptureBuffer
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


def _wire(t: torch.Tensor, dtype: str) -> dict[str, Any]:
    arr = t.detach().to("cpu", getattr(torch, dtype)).contiguous()
    return {"shape": list(arr.shape), "dtype": dtype, "data": arr.numpy().tobytes()}


def collect_pairs(
    state: SteeringState, capture: CaptureBuffer, pairs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    # features are computed for all pairs of one shape in a single batched call
    groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, float]]] = {}
    for p in pairs:
        s_rows = capture.take(p["steered"]) or {}
        same = p["replay"] == p["steered"]
        r_rows = s_rows if same else (capture.take(p["replay"]) or {})
        overflow = p["steered"] in capture.overflowed or p["replay"] in capture.overflowed
        capture.overflowed.discard(p["steered"])
        capture.overflowed.discard(p["replay"])
        want = [int(t) for t in p["steps"]]
        present = [t for t in want if t in s_rows and t in r_rows]
        res: dict[str, Any] = {"steps_present": present, "overflow": overflow}
        results.append(res)
        if not present:
            continue
        layers = [int(p["layer"]) + int(k) for k in p["offsets"]]
        s, s_pre = _stack(s_rows, present, layers)
        r, _ = _stack(r_rows, present, layers)
        if len(present) < len(want):
            # Missing steps (a response shorter than the step) are zero rows, in the
            # features and the activations alike, so every rollout has the same shape.
            idx = [want.index(t) for t in present]
            s, r, s_pre = (_pad(x, idx, len(want)) for x in (s, r, s_pre))
        if p.get("features", True):
            vec = state.vectors.get(p["vector"])
            if vec is None:
                res["error"] = f"unknown vector {p['vector']!r}"
            else:
                key = (len(want), len(layers))
                groups.setdefault(key, []).append(
                    (len(results) - 1, s, r, s_pre, vec, float(p["alpha"]))
                )
        if p.get("activations"):
            dt = p.get("activation_dtype", "float16")
            res["activations"] = {
                "steered": _wire(s, dt),
                "replay": _wire(r, dt),
                "steered_pre": _wire(s_pre.unsqueeze(1), dt),
            }
    for items in groups.values():
        feats = F.compute_batch(
            torch.stack([i[1] for i in items]),
            torch.stack([i[2] for i in items]),
            torch.stack([i[4] for i in items]),
            torch.tensor([i[5] for i in items]),
            steered_pre=torch.stack([i[3] for i in items]),
        ).cpu()
        for (at, *_), row in zip(items, feats, strict=True):
            results[at]["features"] = _wire(row, "float32")
    return results


def unwire(obj: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(obj["data"], dtype=obj["dtype"]).reshape(obj["shape"]).copy()
