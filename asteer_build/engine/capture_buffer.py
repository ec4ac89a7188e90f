"""Worker-side capture of the residual stream at a request's first decode steps.

This is the capture buffer: one fixed, persistent allocation, written by hooks through a
per-step capture index, drained to host after the forward, every row labelled.

- A request asks for capture with `extra_args["asteer_cap"] = {"key", "steps", "base"}`:
  rows at token positions `base + t` for t in `steps` (base defaults to prompt_len - 1,
  so t = 0 is the forward over the last prompt token and t = n the forward consuming
  generated token n). A replay passes its own base: its prompt is the original prompt
  plus the first generated tokens, and it must capture the same positions.
- Each step the host finds the scheduled tokens at those positions (vectorized over
  tokens, exact under chunked prefill and prefix hits) and writes their batch indices
  into `token_index[:m]`. Hooks then copy `hidden + residual` (a copy: the next fused
  add-norm mutates it in place) of those tokens: after every block into `post[:m, l]`,
  and, at the request's steering layer only, before the steering addition into `pre[:m]`.
- After the forward the m rows go to host (on GPU: a non-blocking copy into pinned
  memory with an event, no sync in the step) and are stored per key as (step, post, pre).
  Memory on the device is fixed whatever the batch: `max_rows x (layers + 1) x hidden`.
- The client fetches by key over RPC (`asteer_collect`), which also computes the
  steerability features on the worker's device (`asteer_build.engine.features`) and frees them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.testseam import hook as seam_hook
from .spec import MAX_CAPTURE_STEP
from .staging import StagedArrays

logger = logging.getLogger("asteer.engine")

CAP_KEY = "asteer_cap"
MAX_STEP = MAX_CAPTURE_STEP  # steps are kept in a uint64 bit mask


@dataclass
class _Pending:
    keys: list[str]
    steps: np.ndarray
    post: torch.Tensor
    pre: torch.Tensor
    event: object | None


class CaptureBuffer:
    def __init__(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        max_rows: int,
        max_num_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        allow_python_branches: bool,
        max_stored_keys: int = 200_000,
        staging: dict[str, Any] | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.device = device
        self.post = torch.zeros(max_rows, num_layers, hidden_size, dtype=dtype, device=device)
        self.pre = torch.zeros(max_rows, hidden_size, dtype=dtype, device=device)
        # token_index[:m]: batch index of each selected token (0 past m: a valid token);
        # row_layer[:m]: its request's steering layer (-1 past m: no layer). One host
        # buffer per step in flight (see staging.py).
        self._staged = StagedArrays(
            size=max_rows, fills={"index": 0, "layer": -1}, device=device, **(staging or {})
        )
        self.token_index = self._staged["index"]
        self.row_layer = self._staged["layer"]
        self.m = 0  # rows selected this step
        self.active = False  # any capture rows this step (eager runners skip hooks)
        self.allow_python_branches = allow_python_branches
        # req_id -> (key, base or -1 for "prompt_len - 1", step mask, steering layer)
        self.requests: dict[str, tuple[str, int, int, int]] = {}
        self.generation = 0
        self._step_keys: list[str] = []
        self._step_steps = np.zeros(0, dtype=np.int64)
        self._pending: list[_Pending] = []
        self.store: OrderedDict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.max_stored_keys = max_stored_keys
        self.overflowed: set[str] = set()
        self.dropped_keys = 0

    # ---- lifecycle --------------------------------------------------------------------
    def acquire(self, req_id: str, cap: dict | None, prompt_len: int, steer_layer: int) -> None:
        if not cap:
            self.requests.pop(req_id, None)
            return
        steps = [int(t) for t in cap.get("steps", ())]
        if not steps or min(steps) < 0 or max(steps) > MAX_STEP:
            logger.error("asteer: request %s: capture steps %s out of 0..%d", req_id, steps,
                         MAX_STEP)
            return
        mask = 0
        for t in steps:
            mask |= 1 << t
        base = cap.get("base")
        base = prompt_len - 1 if base is None else int(base)
        self.requests[req_id] = (str(cap["key"]), base, mask, int(steer_layer))
        self.generation += 1

    def release(self, req_id: str) -> None:
        if self.requests.pop(req_id, None) is not None:
            self.generation += 1

    def request_arrays(self, req_ids: list[str]):
        """Per request (batch order): key, base, mask, steering layer; base -1 = none."""
        get = self.requests.get
        items = [get(r) for r in req_ids]
        keys = [i[0] if i else "" for i in items]
        base = np.fromiter((i[1] if i else -(1 << 40) for i in items), np.int64, len(items))
        mask = np.fromiter((i[2] if i else 0 for i in items), np.uint64, len(items))
        layer = np.fromiter((i[3] if i else -1 for i in items), np.int64, len(items))
        return keys, base, mask, layer

    # ---- per step ------------------------------------------------------------------------
    def fill(self, arrays, num_computed_req: np.ndarray, num_scheduled_req: np.ndarray) -> None:
        sel = self._select(arrays, num_computed_req, num_scheduled_req)
        if sel is None:
            self._staged.write(0)
            m = 0
        else:
            tok, lay = sel
            m = int(tok.size)
            self._staged.write(m, {"index": tok, "layer": lay})
        self.m = m
        self.active = m > 0

    def fill_empty(self) -> None:
        """A step with no capture rows (dummy or padding-only batches): every index is
        in bounds (token 0) and no row is kept."""
        self._step_keys = []
        self._step_steps = np.zeros(0, dtype=np.int64)
        self._staged.write(0)
        self.m = 0
        self.active = False

    def _select(
        self, arrays, num_computed_req: np.ndarray, num_scheduled_req: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """This step's selected tokens (batch indices) and their steering layers."""
        keys, base, mask, layer = arrays
        if not self.requests or not mask.any():
            return None
        n = int(num_scheduled_req.sum())
        req_of_tok = np.repeat(np.arange(len(num_scheduled_req)), num_scheduled_req)
        starts = np.cumsum(num_scheduled_req) - num_scheduled_req
        pos = np.repeat(num_computed_req, num_scheduled_req) + (
            np.arange(n, dtype=np.int64) - np.repeat(starts, num_scheduled_req)
        )
        t = pos - base[req_of_tok]
        ok = (t >= 0) & (t <= MAX_STEP)
        tt = np.where(ok, t, 0).astype(np.uint64)
        sel = ok & (((mask[req_of_tok] >> tt) & np.uint64(1)) == 1)
        tok = np.nonzero(sel)[0]
        if tok.size == 0:
            return None
        if tok.size > self.max_rows:
            dropped = {keys[r] for r in req_of_tok[tok[self.max_rows :]]}
            self.overflowed |= dropped
            logger.error("asteer: capture buffer full (%d rows); %d keys lose rows; raise "
                         "capture_rows", self.max_rows, len(dropped))
            tok = tok[: self.max_rows]
        self._step_keys = [keys[r] for r in req_of_tok[tok]]
        self._step_steps = t[tok]
        return tok, layer[req_of_tok[tok]]

    def drain(self) -> None:
        """After the forward: move this step's rows off the fixed buffer, labelled."""
        if not self.m:
            return
        m = self.m
        if self.device.type == "cpu":
            item = _Pending(self._step_keys, self._step_steps, self.post[:m].clone(),
                            self.pre[:m].clone(), None)
        else:
            post = torch.empty((m, *self.post.shape[1:]), dtype=self.post.dtype,
                               pin_memory=True)
            pre = torch.empty((m, self.pre.shape[1]), dtype=self.pre.dtype, pin_memory=True)
            post.copy_(self.post[:m], non_blocking=True)
            pre.copy_(self.pre[:m], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            item = _Pending(self._step_keys, self._step_steps, post, pre, ev)
        self._pending.append(item)
        self.m = 0
        self.active = False
        if len(self._pending) > 64:
            self._settle()

    def _settle(self) -> None:
        """File pending rows under their keys (waits on their copies: off the step path)."""
        for item in self._pending:
            if item.event is not None:
                item.event.synchronize()
            for i, (key, step) in enumerate(zip(item.keys, item.steps.tolist(), strict=True)):
                self.store.setdefault(key, {})[int(step)] = (item.post[i], item.pre[i])
        self._pending.clear()
        while len(self.store) > self.max_stored_keys:
            self.store.popitem(last=False)
            self.dropped_keys += 1

    def take(self, key: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        self._settle()
        return self.store.pop(key, None)

    # ---- hooks ---------------------------------------------------------------------------
    def _selected_rows(self, output) -> tuple[int, torch.Tensor]:
        """This step's selected tokens of `hidden + residual` (gathered before adding: m
        rows, not the whole batch).

        Graph-safe runners cannot read `m` (a host value baked in at trace/capture time),
        so they gather `min(max_rows, num_tokens)` rows: a function of the batch shape
        only, so a CUDA graph captured for a size-8 decode batch gathers 8 rows, not
        `max_rows`. Rows past m read token 0 and are never drained.
        """
        hidden, residual = output
        if self.allow_python_branches:
            k = self.m
        else:
            k = torch.sym_min(self.max_rows, hidden.shape[0])
        idx = self.token_index[:k]
        return k, hidden.index_select(0, idx) + residual.index_select(0, idx)

    def make_post_hook(self, layer: int):
        """After block `layer` (and after its steering): copy the residual stream."""
        post = self.post
        if seam_hook("check_break") == "capture_layer":  # a deliberate fault (testseam)
            layer = min(layer + 1, self.num_layers - 1)
        branches = self.allow_python_branches

        def capture_post(module, args, output):
            if branches and not self.active:
                return None
            m, rows = self._selected_rows(output)
            post[:m, layer].copy_(rows)
            return None

        return capture_post

    def make_pre_hook(self, layer: int):
        """At a steerable block, before the steering hook: the state before the addition,
        kept only for rows whose request steers this layer."""
        pre = self.pre
        row_layer = self.row_layer
        branches = self.allow_python_branches

        def capture_pre(module, args, output):
            if branches and not self.active:
                return None
            m, rows = self._selected_rows(output)
            keep = (row_layer[:m] == layer).unsqueeze(-1)
            pre[:m].copy_(torch.where(keep, rows, pre[:m]))
            return None

        return capture_pre


POOL_KEY = "asteer_pool"


class PoolBuffer:
    """Mean of the residual stream over a prompt at one layer, accumulated on the device.

    For the vectors stage: each bank text is one prefill-only request with
    `extra_args["asteer_pool"] = {"key", "layer", "skip"}`; the hook after block `layer`
    adds the states of the request's tokens at positions >= `skip` (reference: 1, i.e.
    all but BOS) into its slot of a fixed `[slots + 1, hidden]` float32 sum with one
    `index_add_`; the host divides by the token count when the client takes it. Chunked
    prefill and prefix hits are handled by the same per-token geometry as capture. (A
    prefix hit skips computing the shared tokens, so pooling requests should not share
    prefixes: the client salts them.)
    """

    def __init__(self, *, hidden_size: int, slots: int, max_num_tokens: int,
                 device: torch.device, allow_python_branches: bool,
                 staging: dict[str, Any] | None = None) -> None:
        # Slot 0 is the sink of tokens nobody pools (graph-safe hooks add every token
        # somewhere); it is never handed out nor read.
        self.sum = torch.zeros(slots + 1, hidden_size, dtype=torch.float32, device=device)
        # the sum of each pooled token's L2 norm: the mean residual norm that strengths in
        # norm units (`alpha_units: norm`) are relative to, from the same pass
        self.norm_sum = torch.zeros(slots + 1, dtype=torch.float32, device=device)
        self.slots = slots
        self._free = list(range(slots, 0, -1))
        # Per scheduled token: its pooling slot (0 = none) and layer (-1 = none); one
        # host buffer per step in flight (see staging.py).
        self._staged = StagedArrays(
            size=max_num_tokens, fills={"slot": 0, "layer": -1}, device=device,
            **(staging or {}),
        )
        self.tok_slot = self._staged["slot"]
        self.tok_layer = self._staged["layer"]
        self.active_layers: set[int] = set()
        self.allow_python_branches = allow_python_branches
        # req_id -> (key, slot, layer, skip, count)
        self.requests: dict[str, tuple[str, int, int, int, int]] = {}
        self.by_key: dict[str, str] = {}
        self.taken: set[str] = set()
        self.store: dict[str, torch.Tensor] = {}
        self.generation = 0

    def acquire(self, req_id: str, spec: dict | None, prompt_len: int) -> None:
        if not spec:
            return
        if not self._free:
            raise RuntimeError(f"asteer: all {self.slots} pooling slots are in use")
        slot = self._free.pop()
        self.sum[slot].zero_()
        self.norm_sum[slot].zero_()
        skip = int(spec.get("skip", 1))
        key = str(spec["key"])
        self.requests[req_id] = (key, slot, int(spec["layer"]), skip, max(prompt_len - skip, 0))
        self.by_key[key] = req_id
        self.generation += 1

    def release(self, req_id: str) -> None:
        item = self.requests.pop(req_id, None)
        if item is None:
            return
        key, slot, _, _, _ = item
        self.by_key.pop(key, None)
        if key in self.taken:
            self.taken.discard(key)
        else:
            self.store[key] = self._mean(item)
        self._free.append(slot)
        self.generation += 1

    def _mean(self, item) -> torch.Tensor:
        """The slot's mean state and, last, its mean token norm (`[hidden + 1]`), still
        on the device: `release` runs inside the step, so it only enqueues the division;
        `take` (an RPC, off the step path) moves it to host."""
        _, slot, _, _, count = item
        return torch.cat([self.sum[slot], self.norm_sum[slot:slot + 1]]) / max(count, 1)

    def take(self, key: str) -> torch.Tensor | None:
        """The pooled state with its mean token norm appended (float32 `[hidden + 1]`,
        host) once the request's prefill is done (it may not be released yet: the worker
        learns about finished requests only at the next step)."""
        if key in self.store:
            return self.store.pop(key).cpu()
        req_id = self.by_key.get(key)
        if req_id is None:
            return None
        self.taken.add(key)
        return self._mean(self.requests[req_id]).cpu()

    def request_arrays(self, req_ids: list[str]):
        get = self.requests.get
        items = [get(r) for r in req_ids]
        slot = np.fromiter((i[1] if i else 0 for i in items), np.int64, len(items))
        layer = np.fromiter((i[2] if i else -1 for i in items), np.int64, len(items))
        skip = np.fromiter((i[3] if i else 0 for i in items), np.int64, len(items))
        return slot, layer, skip

    def fill(self, arrays, num_computed_req: np.ndarray, num_scheduled_req: np.ndarray) -> None:
        slot, layer, skip = arrays
        n = int(num_scheduled_req.sum())
        if not self.requests or not slot.any():
            self.fill_empty()
            return
        starts = np.cumsum(num_scheduled_req) - num_scheduled_req
        pos = np.repeat(num_computed_req, num_scheduled_req) + (
            np.arange(n, dtype=np.int64) - np.repeat(starts, num_scheduled_req)
        )
        tok_slot = np.repeat(slot, num_scheduled_req)
        ok = (pos >= np.repeat(skip, num_scheduled_req)) & (tok_slot > 0)
        self._staged.write(n, {
            "slot": np.where(ok, tok_slot, 0),
            "layer": np.where(ok, np.repeat(layer, num_scheduled_req), -1),
        })
        self.active_layers = {int(x) for x in np.unique(layer[slot > 0])}

    def fill_empty(self) -> None:
        """A step that pools nothing (no pooling requests, dummy or padding batches)."""
        self._staged.write(0)
        self.active_layers = set()

    def make_hook(self, layer: int):
        """Add this layer's pooled tokens into their slots.

        Graph-safe form: one `index_add_` over the batch, tokens not pooled here sent to
        the sink slot 0 (an index select, no `[n, hidden]` mask multiply). The float32
        cast and the add over all `n` tokens remain at every hooked layer and step: which
        tokens pool is only known on the device, and a graph cannot size work by it.
        Eager runners skip layers nobody pools at this step.
        """
        total, norms = self.sum, self.norm_sum
        slots, layers = self.tok_slot, self.tok_layer
        branches = self.allow_python_branches

        def pool_hook(module, args, output):
            if branches and layer not in self.active_layers:
                return None
            hidden, residual = output
            n = hidden.shape[0]
            dst = torch.where(layers[:n] == layer, slots[:n], 0)
            stream = (hidden + residual).float()
            total.index_add_(0, dst, stream)
            norms.index_add_(0, dst, torch.linalg.vector_norm(stream, dim=-1))
            return None

        return pool_hook
