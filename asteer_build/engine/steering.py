"""Worker-side steering: persistent tables, row allocation, the per-step index, the hook.

This is the one place where steering happens inside vLLM. Everything here is shared by
the runner adapters (`adapters/`), which only translate their runner's batch geometry
into the arrays `fill_index` takes.

Layout (all allocated once, when the model loads, before any compile or graph capture,
so their addresses stay fixed):

- `tables[s]` `[capacity + 1, hidden]` for each steerable layer s: row r holds the
  pre-scaled `alpha * v` of the config that owns row r, in the model dtype, *only in the
  table of that config's layer*; row 0 is zero everywhere. Requests with equal configs
  (same fingerprint) share a row.
- `row_index` `[max_num_tokens]` int64: the table row of every scheduled token this step;
  0 for unsteered tokens, positions outside a request's window and padding. One index
  serves every layer, since a request's row is non-zero only in its own layer's table.

The hook on block l's output is pure tensor math: `hidden + tables[s][row_index[:n]]`.
The delta goes to the `hidden` half of vLLM's `(hidden, residual)` pair: the residual
stream is their sum, and leaving `residual` alone keeps the next fused add-norm intact.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.testseam import hook as seam_hook
from .spec import POSITION_MODES, steer_start

logger = logging.getLogger("asteer.engine")


@dataclass
class _Row:
    row: int
    layer: int
    refs: int


class SteeringState:
    """Tables, row allocator and per-step index for one worker (one TP rank)."""

    def __init__(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        steer_layers: list[int],
        capacity: int,
        max_num_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        allow_python_branches: bool,
    ) -> None:
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.steer_layers = sorted(set(steer_layers))
        self.slot_of_layer = {layer: s for s, layer in enumerate(self.steer_layers)}
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        # Eager runners may skip layers nobody steers with a Python check; compiled or
        # graph-captured runners must not branch in Python (it would be traced once).
        self.allow_python_branches = allow_python_branches
        self.tables = torch.zeros(
            len(self.steer_layers), capacity + 1, hidden_size, dtype=dtype, device=device
        )
        # Host side of the token -> row index. On CPU the device tensor *is* the host
        # buffer. On GPU two pinned buffers alternate, each guarded by an event, so the
        # host never rewrites a buffer whose async copy the stream has not run yet
        # (async scheduling prepares step k+1 while step k runs).
        on_cpu = device.type == "cpu"
        self._hosts = [
            torch.zeros(max_num_tokens, dtype=torch.int64, pin_memory=not on_cpu)
            for _ in range(1 if on_cpu else 2)
        ]
        self._events = [None] * len(self._hosts)
        self._dirty = [0] * len(self._hosts)
        self._turn = 0
        self.row_index = (
            self._hosts[0]
            if on_cpu
            else torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        )
        self.vectors: dict[str, torch.Tensor] = {}  # name -> float32 [hidden] on device
        self.vector_digest: dict[str, str] = {}
        self._free_rows = list(range(capacity, 0, -1))
        self._rows_by_fp: dict[str, _Row] = {}
        # request id -> (row, fingerprint, start position)
        self.requests: dict[str, tuple[int, str, int]] = {}
        self.layer_refs = np.zeros(len(self.steer_layers), dtype=np.int64)
        self.rejected = 0
        self.generation = 0  # bumped whenever the request -> row map changes
        # `asteer-build check`'s deliberate faults (core.testseam); None in a real run
        self._break = seam_hook("check_break")

    # ---- vectors (RPC) -------------------------------------------------------------
    def register_vectors(self, vectors: dict[str, bytes]) -> dict[str, str]:
        """Store vectors (raw little-endian float32 bytes, see `encode_vector`) by name.

        Returns their content digests, which the client checks against its own.
        """
        out = {}
        for name, raw in vectors.items():
            v = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())
            if v.numel() != self.hidden_size:
                raise ValueError(
                    f"vector {name!r}: dimension {v.numel()}, model hidden size "
                    f"{self.hidden_size}"
                )
            if not torch.isfinite(v).all():
                raise ValueError(f"vector {name!r}: contains NaN or inf")
            digest = vector_digest(v)
            self.vectors[name] = v.to(self.device)
            self.vector_digest[name] = digest
            out[name] = digest
        return out

    # ---- request lifecycle -----------------------------------------------------------
    def acquire(self, req_id: str, spec: dict | None, prompt_len: int) -> int:
        """Give a request its table row (0 if unsteered); returns the row."""
        if req_id in self.requests:
            self.release(req_id)
        if not spec:
            return 0
        problem = self._check(spec)
        if problem:
            # The client validates before sending; reaching here means a request came in
            # from elsewhere (e.g. raw vLLM). Never crash the engine for one request.
            self.rejected += 1
            logger.error("asteer: request %s not steered: %s", req_id, problem)
            return 0
        fp = spec["fp"]
        entry = self._rows_by_fp.get(fp)
        if entry is None:
            if not self._free_rows:
                raise RuntimeError(
                    f"asteer: all {self.capacity} steering rows are in use; raise "
                    "`steer_capacity` (it must exceed the number of live requests)"
                )
            row = self._free_rows.pop()
            layer = int(spec["l"])
            alpha = 1.0 if self._break == "addition" else float(spec["a"])
            delta = alpha * self.vectors[spec["v"]]
            self.tables[self.slot_of_layer[layer], row].copy_(delta.to(self.dtype))
            entry = _Row(row=row, layer=layer, refs=0)
            self._rows_by_fp[fp] = entry
            self.layer_refs[self.slot_of_layer[layer]] += 1
        entry.refs += 1
        start = 0 if self._break == "position_mode" else steer_start(spec["p"], prompt_len)
        self.requests[req_id] = (entry.row, fp, start)
        self.generation += 1
        return entry.row

    def release(self, req_id: str) -> None:
        item = self.requests.pop(req_id, None)
        if item is None:
            return
        self.generation += 1
        _, fp, _ = item
        entry = self._rows_by_fp[fp]
        entry.refs -= 1
        if entry.refs == 0:
            slot = self.slot_of_layer[entry.layer]
            self.tables[slot, entry.row].zero_()
            self.layer_refs[slot] -= 1
            del self._rows_by_fp[fp]
            self._free_rows.append(entry.row)

    def _check(self, spec: dict) -> str | None:
        name = spec.get("v")
        if name not in self.vectors:
            return f"unknown vector {name!r}"
        layer = spec.get("l")
        if not isinstance(layer, int) or layer not in self.slot_of_layer:
            return f"layer {layer!r} is not steerable here (steerable: {self.steer_layers})"
        alpha = spec.get("a")
        if not isinstance(alpha, int | float) or not math.isfinite(alpha):
            return f"alpha {alpha!r} is not finite"
        if spec.get("p") not in POSITION_MODES:
            return f"unknown position mode {spec.get('p')!r}"
        if not isinstance(spec.get("fp"), str):
            return "missing fingerprint"
        return None

    def request_arrays(self, req_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows and start positions of `req_ids` (batch order); unknown ids get row 0."""
        get = self.requests.get
        none = (0, "", 0)
        items = [get(r, none) for r in req_ids]
        rows = np.fromiter((i[0] for i in items), dtype=np.int64, count=len(items))
        starts = np.fromiter((i[2] for i in items), dtype=np.int64, count=len(items))
        return rows, starts

    # ---- per step ----------------------------------------------------------------------
    def fill_index(
        self,
        rows_req: np.ndarray,
        start_req: np.ndarray,
        num_computed_req: np.ndarray,
        num_scheduled_req: np.ndarray,
    ) -> None:
        """Write this step's token -> row index, vectorized over scheduled tokens.

        Tokens of request i occupy positions num_computed[i] .. num_computed[i] +
        num_scheduled[i] - 1, contiguous in batch order. This is exact under chunked
        prefill and prefix-cache hits because it reads the runner's own counts.
        """
        turn = self._turn
        host = self._hosts[turn]
        if self._events[turn] is not None:
            self._events[turn].synchronize()
        idx = host.numpy()
        dirty = self._dirty[turn]
        n = int(num_scheduled_req.sum())
        if self.requests and rows_req.any():
            if self._break == "mixed_batch":
                rows_req = np.where(rows_req > 0, rows_req[rows_req > 0][0], 0)
            tok_rows = np.repeat(rows_req, num_scheduled_req)
            # Offset of each token within its request's chunk, against the offset where
            # the request's steering window starts (both relative to num_computed).
            first = np.repeat(start_req - num_computed_req, num_scheduled_req)
            offsets = np.arange(n, dtype=np.int64) - np.repeat(
                np.cumsum(num_scheduled_req) - num_scheduled_req, num_scheduled_req
            )
            np.multiply(tok_rows, offsets >= first, out=idx[:n])
            if dirty > n:
                idx[n:dirty] = 0
            self._dirty[turn] = n
        elif dirty:
            idx[:dirty] = 0
            self._dirty[turn] = 0
        if host is not self.row_index:
            self.row_index.copy_(host, non_blocking=True)
            event = self._events[turn] or torch.cuda.Event()
            event.record()
            self._events[turn] = event
            self._turn = 1 - turn

    def fill_empty(self) -> None:
        """A step that steers nothing (dummy or padding-only batches: vLLM runs them
        without the geometry the adapters fill from): every token reads the zero row."""
        z = np.zeros(0, dtype=np.int64)
        self.fill_index(z, z, z, z)

    # ---- hooks ---------------------------------------------------------------------------
    def make_hook(self, layer: int):
        slot = self.slot_of_layer[layer]
        table = self.tables[slot]
        index = self.row_index
        refs = self.layer_refs
        branches = self.allow_python_branches

        def steer_hook(module, args, output):
            if branches and refs[slot] == 0:
                return None
            hidden, residual = output
            delta = torch.index_select(table, 0, index[: hidden.shape[0]])
            return hidden + delta, residual

        return steer_hook


def encode_vector(v: torch.Tensor) -> bytes:
    """Wire form of a vector for RPC: plain bytes survive every vLLM serializer."""
    return v.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes()


def vector_digest(v: torch.Tensor) -> str:
    data = v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:24]


def find_decoder_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The decoder block list of a vLLM model (the ModuleList with num_hidden_layers items)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == num_layers:
            if name.endswith("layers") and (best is None or len(name) < len(best[0])):
                best = (name, mod)
    if best is None:
        raise RuntimeError(
            f"asteer: could not find the decoder layer list ({num_layers} blocks) in "
            f"{type(model).__name__}"
        )
    return best[1]
