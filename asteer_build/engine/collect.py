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

from .. import features as F
from .capture_buffer import CaptureBuffer
from .steering import SteeringState


def _stack(rows: dict, steps: list[int], layers: list[int], hidden: int, like: torch.Tensor):
    out = torch.zeros(len(steps), len(layers), hidden, dtype=like.dtype, device=like.device)
    pre = torch.zeros(len(steps), hidden, dtype=like.dtype, device=like.device)
    for i, t in enumerate(steps):
        post_row, pre_row = rows[t]
        out[i] = post_row[layers]
        pre[i] = pre_row
    return out, pre


def _wire(t: torch.Tensor, dtype: str) -> dict[str, Any]:
    arr = t.detach().to("cpu", getattr(torch, dtype)).contiguous()
    return {"shape": list(arr.shape), "dtype": dtype, "data": arr.numpy().tobytes()}


def collect_pairs(
    state: SteeringState, capture: CaptureBuffer, pairs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    results = []
    hidden = state.hidden_size
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
        if not present:
            results.append(res)
            continue
        layers = [int(p["layer"]) + int(k) for k in p["offsets"]]
        like = next(iter(s_rows.values()))[0]
        s, s_pre = _stack(s_rows, present, layers, hidden, like)
        r, _ = _stack(r_rows, present, layers, hidden, like)
        if p.get("features", True):
            vec = state.vectors.get(p["vector"])
            if vec is None:
                res["error"] = f"unknown vector {p['vector']!r}"
            else:
                # Missing steps (short responses) are zero rows: documented as such.
                full_s = torch.zeros(len(want), len(layers), hidden, device=s.device)
                full_r = torch.zeros_like(full_s)
                idx = [want.index(t) for t in present]
                full_s[idx] = s.float()
                full_r[idx] = r.float()
                feats = F.compute(full_s, full_r, vec, float(p["alpha"]))
                res["features"] = _wire(feats, "float32")
        if p.get("activations"):
            dt = p.get("activation_dtype", "float16")
            res["activations"] = {
                "steered": _wire(s, dt),
                "replay": _wire(r, dt),
                "steered_pre": _wire(s_pre.unsqueeze(1), dt),
            }
        results.append(res)
    return results


def unwire(obj: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(obj["data"], dtype=obj["dtype"]).reshape(obj["shape"]).copy()
