"""Do our hooks and buffers survive compilation and CUDA graphs?

Runs the real `SteeringState` (steer hook), `CaptureBuffer` (pre/post capture hooks) and
`PoolBuffer` (pool hook) on a small decoder stack written here (LayerNorm + MLP blocks
returning vLLM's `(hidden, residual)` pair, hidden 256) over a scripted sequence of
steps: requests arrive and finish, prefill in chunks, decode, change alpha, layer and
position mode, ask for capture at chosen decode steps and for pooled prompt states,
and one dummy step. The first step steers nothing, so a graph that recorded an early
return (the eager hook form) or a stale index would differ from eager afterwards.

Variants, each against the eager reference (eager hook form, no compile):

- `compile`: graph-safe hooks under `torch.compile(dynamic=True)` with every guard
  dropped, as vLLM compiles (traced once, reused for every batch size);
- on CUDA also `cudagraph` (graph-safe hooks captured into one `torch.cuda.CUDAGraph`
  at a padded size and replayed: vLLM's full graphs with compilation off) and
  `compile+cudagraph` (the compiled model captured: vLLM's default).

Checks (pass/fail per variant): every step's output, every captured (post, pre) row and
every pooled mean equal eager (float32, within `--tol`: compiled kernels are not
bit-exact; each check also records its max abs difference).
`--break steer|branch|capture-branch` breaks the tested variants on purpose (skip the
addition; the eager branch form of every hook inside the graph, which Dynamo refuses
for the steer hook's branch on a numpy count and which CUDA graphs record as taken at
capture; the eager form of the capture and pool hooks only, whose branch on a Python
flag the trace bakes in) so the checks can be seen to fail.

`--engine` adds the engine smoke on real vLLM (benchmarks/engine_smoke.py:
three engine starts, compiled cold, compiled warm from the compile cache, eager), under
`engine_smoke` in the same JSON. It is opt-in: it needs vLLM, and on CPU it compiles the
model (minutes on 2 cores), which CI's `--device cpu` run must not pay.

Writes `gpu_check-<device>.json` under the user's cache (`$ASTEER_CACHE/gpu_check/`,
default `~/.cache/asteer/gpu_check/`), so the pre-flight check leaves the checkout
clean; `--out` writes elsewhere (the committed reports in benchmarks/results/ are
written that way). Exit status 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asteer_build.core.paths import cache_dir
from asteer_build.engine.capture_buffer import CaptureBuffer, PoolBuffer
from asteer_build.engine.spec import SteerSpec, to_extra_args
from asteer_build.engine.steering import SteeringState, encode_vector, vector_digest

HERE = Path(__file__).resolve().parent
LAYERS = 4
STEER_LAYERS = [1, 2]
PAD = 48  # CUDA graph batch size (every step fits)
MAX_TOKENS = 64


class Block(torch.nn.Module):
    """A decoder block in vLLM's calling convention: `(hidden, residual)` in and out,
    the residual stream being their sum."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.up = torch.nn.Linear(hidden, 2 * hidden)
        self.down = torch.nn.Linear(2 * hidden, hidden)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor):
        residual = hidden + residual
        return self.down(torch.nn.functional.gelu(self.up(self.norm(residual)))), residual


class Stack(torch.nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, residual = x, torch.zeros_like(x)
        for block in self.layers:
            hidden, residual = block(hidden, residual)
        return hidden + residual


# ---- the scripted workload --------------------------------------------------------------
@dataclass
class Req:
    prompt_len: int
    steer: tuple[str, float, int, str] | None = None  # vector, alpha, layer, mode
    cap: list[int] | None = None  # capture steps
    pool: tuple[int, int] | None = None  # layer, skip


REQS = {
    "r0": Req(12),
    "r1": Req(10, ("v", 2.0, 1, "all"), [0, 1, 2]),
    "p0": Req(8, pool=(2, 1)),
    "r2": Req(6, ("w", -3.0, 2, "generated"), [0, 1]),
    "p1": Req(5, pool=(3, 1)),
    "r3": Req(4, ("v", 0.0, 1, "all"), [0]),
    "r4": Req(14, ("v", 5.0, 1, "last_prompt_and_generated"), [0, 1, 3]),
    "r5": Req(7, ("w", 1.5, 2, "all"), [1]),
}
# Each step: what is scheduled (request, tokens) and which requests finished before it.
# None = a dummy step (no geometry: vLLM's DP / warmup batches), of that many tokens.
STEPS: list[tuple[list[tuple[str, int]] | int, list[str]]] = [
    ([("r0", 12)], []),  # nothing steered, captured or pooled
    ([("r0", 1), ("r1", 10), ("p0", 8)], []),
    ([("r0", 1), ("r1", 1), ("r2", 6), ("p1", 5)], ["p0"]),
    ([("r0", 1), ("r1", 1), ("r2", 1), ("r3", 4), ("r4", 7)], ["p1"]),  # r4: first chunk
    ([("r1", 1), ("r2", 1), ("r3", 1), ("r4", 7)], ["r0"]),  # r4: second chunk
    (2, []),  # dummy
    ([("r2", 1), ("r3", 1), ("r4", 1), ("r5", 7)], ["r1"]),
    ([("r2", 1), ("r4", 1), ("r5", 1)], ["r3"]),
    ([("r4", 1), ("r5", 1)], ["r2"]),
    ([("r4", 1), ("r5", 1)], []),
    ([("r4", 1)], ["r5"]),
]


class Harness:
    """One variant: model, hooks, buffers and a forward function."""

    def __init__(self, name: str, model: Stack, hidden: int, device: torch.device,
                 vectors: dict[str, torch.Tensor], graph_safe: bool, brk: str | None) -> None:
        self.name = name
        self.device = device
        branches = not graph_safe or brk in ("branch", "capture-branch")
        self.state = SteeringState(
            num_layers=LAYERS, hidden_size=hidden, steer_layers=STEER_LAYERS, capacity=8,
            max_num_tokens=MAX_TOKENS, dtype=torch.float32, device=device,
            allow_python_branches=not graph_safe or brk == "branch",
        )
        self.state.register_vectors({k: encode_vector(v) for k, v in vectors.items()})
        self.capture = CaptureBuffer(
            num_layers=LAYERS, hidden_size=hidden, max_rows=16, max_num_tokens=MAX_TOKENS,
            dtype=torch.float32, device=device, allow_python_branches=branches,
        )
        self.pool = PoolBuffer(hidden_size=hidden, slots=4, max_num_tokens=MAX_TOKENS,
                               device=device, allow_python_branches=branches)
        self.model = model
        self.handles = []
        for layer, block in enumerate(model.layers):
            if layer in self.state.slot_of_layer:
                self.handles.append(block.register_forward_hook(
                    self.capture.make_pre_hook(layer)))
                steer = self.state.make_hook(layer)
                if brk == "steer":
                    def steer(module, args, output):  # noqa: F811 - broken on purpose
                        return None
                self.handles.append(block.register_forward_hook(steer))
            self.handles.append(block.register_forward_hook(self.capture.make_post_hook(layer)))
            self.handles.append(block.register_forward_hook(self.pool.make_hook(layer)))
        self.vec_digest = {k: vector_digest(v) for k, v in vectors.items()}
        self.fn = model
        self.graph: Any = None
        self.static_in: torch.Tensor | None = None
        self.static_out: torch.Tensor | None = None
        self.step_ms: list[float] = []
        self.setup_s = 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    # -- per step geometry, as the adapters feed it --
    def admit(self, rid: str, r: Req) -> None:
        spec = None
        if r.steer:
            vec, alpha, layer, mode = r.steer
            spec = to_extra_args(SteerSpec(vec, alpha, layer, mode), self.vec_digest[vec])
        row = self.state.acquire(rid, spec, r.prompt_len)
        layer = r.steer[2] if r.steer and row else -1
        cap = {"key": rid, "steps": r.cap} if r.cap else None
        self.capture.acquire(rid, cap, r.prompt_len, layer)
        if r.pool:
            self.pool.acquire(rid, {"key": rid, "layer": r.pool[0], "skip": r.pool[1]},
                              r.prompt_len)

    def finish(self, rid: str) -> None:
        self.state.release(rid)
        self.capture.release(rid)
        self.pool.release(rid)

    def fill(self, sched: list[tuple[str, int]], computed: dict[str, int]) -> None:
        ids = [rid for rid, _ in sched]
        comp = np.array([computed[rid] for rid in ids], np.int64)
        num = np.array([n for _, n in sched], np.int64)
        rows, starts = self.state.request_arrays(ids)
        self.state.fill_index(rows, starts, comp, num)
        self.capture.fill(self.capture.request_arrays(ids), comp, num)
        self.pool.fill(self.pool.request_arrays(ids), comp, num)

    def fill_empty(self) -> None:
        self.state.fill_empty()
        self.capture.fill_empty()
        self.pool.fill_empty()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync = self.device.type == "cuda"
        t0 = time.perf_counter()
        if self.graph is not None:
            n = x.shape[0]
            assert self.static_in is not None and self.static_out is not None
            self.static_in.zero_()
            self.static_in[:n].copy_(x)
            self.graph.replay()
            out = self.static_out[:n].clone()
        else:
            out = self.fn(x)
        if sync:
            torch.cuda.synchronize()
        self.step_ms.append(1000 * (time.perf_counter() - t0))
        self.capture.drain()
        return out


def _compile(h: Harness, backend: str) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    h.fn = torch.compile(
        h.model, dynamic=True, fullgraph=True, backend=backend,
        # vLLM drops every guard: a graph is traced once and reused for all inputs, so a
        # Python branch on host state stays whatever it was at trace time.
        options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
    )


def _capture_graph(h: Harness, hidden: int) -> None:
    """Record one CUDA graph at batch size PAD (warmup on a side stream first), at the
    current state of the buffers: the first step's, where nothing is steered."""
    h.static_in = torch.zeros(PAD, hidden, device=h.device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            h.fn(h.static_in)
    torch.cuda.current_stream().wait_stream(s)
    h.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(h.graph):
        h.static_out = h.fn(h.static_in)
    torch.cuda.synchronize()


def run_variant(h: Harness, hidden: int, device: torch.device, setup=None) -> dict[str, Any]:
    """Play the script; returns outputs per step, captures and pooled means by key."""
    computed = {rid: 0 for rid in REQS}
    admitted: set[str] = set()
    outs: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(0)
    for i, (sched, finished) in enumerate(STEPS):
        for rid in finished:
            h.finish(rid)
        if isinstance(sched, int):
            x = torch.randn(sched, hidden, generator=g).to(device)
            h.fill_empty()
        else:
            for rid, _ in sched:
                if rid not in admitted:
                    h.admit(rid, REQS[rid])
                    admitted.add(rid)
            n = sum(k for _, k in sched)
            x = torch.randn(n, hidden, generator=g).to(device)
            h.fill(sched, computed)
        if i == 0 and setup is not None:
            t0 = time.perf_counter()
            setup(h)  # compile / graph capture happen on the first step's geometry
            h.setup_s = time.perf_counter() - t0
        outs.append(h.forward(x).float().cpu())
        if not isinstance(sched, int):
            for rid, k in sched:
                computed[rid] += k
    caps = {rid: h.capture.take(rid) for rid in REQS if REQS[rid].cap}
    pools = {rid: h.pool.take(rid) for rid in REQS if REQS[rid].pool}
    return {"outs": outs, "caps": caps, "pools": pools}


def compare(ref: dict[str, Any], got: dict[str, Any], tol: float) -> dict[str, Any]:
    def diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
        if a is None or b is None:
            return float("inf") if (a is None) != (b is None) else 0.0
        if a.shape != b.shape:
            return float("inf")
        return float((a.float().cpu() - b.float().cpu()).abs().max()) if a.numel() else 0.0

    out_d = [diff(a, b) for a, b in zip(ref["outs"], got["outs"], strict=True)]
    cap_d, cap_missing = 0.0, []
    for key, rows in ref["caps"].items():
        other = got["caps"].get(key) or {}
        if set(rows or {}) != set(other):
            cap_missing.append(key)
            continue
        for step, (post, pre) in (rows or {}).items():
            cap_d = max(cap_d, diff(post, other[step][0]), diff(pre, other[step][1]))
    pool_d = max((diff(v, got["pools"].get(k)) for k, v in ref["pools"].items()), default=0.0)
    checks = {
        "steered_outputs": {"pass": max(out_d) <= tol, "max_abs_diff": max(out_d),
                            "per_step_max_abs_diff": out_d},
        "captured_rows": {"pass": cap_d <= tol and not cap_missing, "max_abs_diff": cap_d,
                          "keys_with_other_steps": cap_missing},
        "pooled_means": {"pass": pool_d <= tol, "max_abs_diff": pool_d},
    }
    return checks


def _engine_smoke(args: argparse.Namespace) -> dict[str, Any]:
    """Part (b); a failure to run at all (no vLLM, an engine that does not start) is a
    failed check in the report, not a traceback."""
    import shutil
    import tempfile

    cache = args.compile_cache or Path(tempfile.mkdtemp(prefix="asteer-gpu-check-cache-"))
    if str(HERE.parent) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(HERE.parent))
    try:
        from benchmarks.engine_smoke import run_smoke

        return run_smoke(args.device, cache, args.engine_model)
    except Exception as e:
        return {"checks": {"runs": {"pass": False, "error": f"{type(e).__name__}: {e}"[:2000]}},
                "passed": False}
    finally:
        if args.compile_cache is None:
            shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend: inductor (default), or aot_eager (traces "
                         "and functionalizes like inductor, no C++/Triton codegen: fast CI)")
    ap.add_argument("--tol", type=float, default=None,
                    help="max abs difference (default 1e-4: Inductor fuses LayerNorm/GELU, not "
                         "bit-exact; a stale branch or index moves outputs by O(1))")
    ap.add_argument("--break", dest="brk", default=None,
                    choices=["steer", "branch", "capture-branch"],
                    help="break the tested variants on purpose (the checks must fail)")
    ap.add_argument("--engine", action="store_true",
                    help="also run the engine smoke on vLLM (part b; needs vLLM installed)")
    ap.add_argument("--engine-model", default=None,
                    help="model folder for --engine (default: the tiny world, float32)")
    ap.add_argument("--compile-cache", type=Path, default=None,
                    help="vLLM cache root for --engine (default: a fresh temp dir, so the "
                         "first start compiles cold and the restart reads what it wrote)")
    ap.add_argument("--out", type=Path, default=None,
                    help="report file (default: gpu_check-<device>.json under "
                         "$ASTEER_CACHE/gpu_check, else ~/.cache/asteer/gpu_check)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tol = args.tol if args.tol is not None else 1e-4
    torch.manual_seed(0)
    hidden = args.hidden
    model = Stack(hidden, LAYERS).to(device).eval()
    g = torch.Generator().manual_seed(1)
    vectors = {k: torch.randn(hidden, generator=g) for k in ("v", "w")}

    t0 = time.perf_counter()
    ref_h = Harness("eager", model, hidden, device, vectors, graph_safe=False, brk=None)
    with torch.no_grad():
        ref = run_variant(ref_h, hidden, device)
    ref_h.remove()
    timings: dict[str, Any] = {"eager": {"total_s": time.perf_counter() - t0,
                                         "median_step_ms": statistics.median(ref_h.step_ms)}}
    # The reference must not be vacuous: without the addition the outputs differ.
    plain_h = Harness("eager-unsteered", model, hidden, device, vectors, graph_safe=False,
                      brk="steer")
    with torch.no_grad():
        plain = run_variant(plain_h, hidden, device)
    plain_h.remove()
    sanity = {
        "steering_changes_outputs": not compare(ref, plain, tol)["steered_outputs"]["pass"],
        "captures_present": all(ref["caps"].get(k) for k in ("r1", "r2", "r4")),
        "pools_present": all(v is not None for v in ref["pools"].values()),
    }

    variants: list[tuple[str, Any]] = [("compile", lambda h: _compile(h, args.backend))]
    if device.type == "cuda":
        variants += [
            ("cudagraph", lambda h: _capture_graph(h, hidden)),
            ("compile+cudagraph",
             lambda h: (_compile(h, args.backend), _capture_graph(h, hidden))),
        ]
    results: dict[str, Any] = {}
    for name, setup in variants:
        h = Harness(name, model, hidden, device, vectors, graph_safe=True, brk=args.brk)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                got = run_variant(h, hidden, device, setup)
        except Exception as e:  # a hook that cannot be traced or captured fails its check
            results[name] = {"runs": {"pass": False, "max_abs_diff": float("inf"),
                                      "error": f"{type(e).__name__}: {e}"[:2000]}}
            continue
        finally:
            h.remove()
        results[name] = compare(ref, got, tol)
        timings[name] = {"total_s": time.perf_counter() - t0, "setup_s": h.setup_s,
                         "median_step_ms": statistics.median(h.step_ms[1:])}
    passed = all(c["pass"] for r in results.values() for c in r.values())
    smoke = _engine_smoke(args) if args.engine else None
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "hidden": hidden, "layers": LAYERS, "steps": len(STEPS), "tolerance": tol,
        "backend": args.backend, "break": args.brk,
        "reference_sanity": sanity,
        "checks": results,
        "timings": timings,
        "engine_smoke": smoke,
        "passed": passed and all(sanity.values()) and (smoke is None or smoke["passed"]),
    }
    out = args.out or cache_dir() / "gpu_check" / f"gpu_check-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(name, {k: ("PASS" if c["pass"] else "FAIL", c["max_abs_diff"])
                     for k, c in r.items()})
    if smoke is not None:
        print("engine_smoke", {k: "PASS" if c["pass"] else "FAIL"
                               for k, c in smoke["checks"].items()})
    print("gpu_check:", "PASS" if report["passed"] else "FAIL", "->", out)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
