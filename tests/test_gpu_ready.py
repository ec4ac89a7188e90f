"""What a first GPU run would hit, checked on CPU.

- the hooks' form (eager branches vs graph-safe) follows whether anything can be traced
  or graph-captured, not the compile mode alone;
- capture and pool indices are double-buffered on the host, each buffer rewritten only
  after its copy ran (a fake stream runs copies late, as a GPU stream may);
- dummy batches (no `prepare_inputs`) read in-bounds indices that select nothing;
- the block-hash salting plugin missing is a clear error, not silently shared KV;
- graph-safe capture gathers `min(max_rows, tokens)` rows, and pool release leaves the
  mean on the device until it is taken.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from asteer_build.engine import adapters
from asteer_build.engine.adapters import gpu_v2
from asteer_build.engine.capture_buffer import CAP_KEY, POOL_KEY, CaptureBuffer, PoolBuffer
from asteer_build.engine.spec import EXTRA_KEY, SteerSpec, to_extra_args
from asteer_build.engine.staging import StagedArrays
from asteer_build.engine.steering import SteeringState, encode_vector, vector_digest

H = 8
CPU = torch.device("cpu")


# ---- graph-mode selection ----------------------------------------------------------------
def _vcfg(mode, cudagraph, enforce_eager=False):
    from vllm.config import CompilationConfig

    cc = CompilationConfig(mode=mode, cudagraph_mode=cudagraph)
    return SimpleNamespace(
        compilation_config=cc, model_config=SimpleNamespace(enforce_eager=enforce_eager)
    )


def _cases():
    from vllm.config import CompilationMode as M
    from vllm.config import CUDAGraphMode as G

    off: dict[str, str] = {}
    nocomp = {"TORCH_COMPILE_DISABLE": "1"}
    return [
        # (mode, cudagraph mode, enforce_eager, environment, graph-safe expected)
        (M.NONE, G.NONE, False, off, False),
        (M.NONE, G.FULL, False, off, True),  # -O0 with an explicit cudagraph mode
        (M.NONE, G.FULL_DECODE_ONLY, False, off, True),  # fallback from piecewise
        (M.VLLM_COMPILE, G.NONE, False, off, True),  # traced once
        (M.VLLM_COMPILE, G.FULL_AND_PIECEWISE, False, off, True),
        (M.VLLM_COMPILE, G.NONE, False, nocomp, False),  # nothing traces, no graphs
        (M.VLLM_COMPILE, G.FULL_AND_PIECEWISE, False, nocomp, True),  # graphs still
        (M.STOCK_TORCH_COMPILE, G.NONE, False, off, True),
        (M.VLLM_COMPILE, G.FULL_AND_PIECEWISE, True, off, False),  # enforce_eager
    ]


@pytest.mark.parametrize("i", range(9))
def test_hook_form_follows_graph_capture_not_compile_mode_alone(i):
    mode, cg, eager, env, want = _cases()[i]
    got, why = adapters.graph_capture_possible(_vcfg(mode, cg, eager), env)
    assert got is want, (mode, cg, eager, env, why)


def test_unresolved_cudagraph_mode_is_treated_as_possible():
    from vllm.config import CompilationMode

    cfg = SimpleNamespace(
        compilation_config=SimpleNamespace(mode=CompilationMode.NONE, cudagraph_mode=None),
        model_config=SimpleNamespace(enforce_eager=False),
    )
    assert adapters.graph_capture_possible(cfg, {})[0] is True


# ---- double-buffered host staging ------------------------------------------------------
class FakeStream:
    """A device stream that runs queued host -> device copies only when an event is
    waited on (or at `run_all`), as a GPU stream with two steps in flight may. Each copy
    checks that its host source still holds what it held when the copy was queued."""

    def __init__(self) -> None:
        self.queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.done = 0
        self.sources: list[list[int]] = [[]]  # host data_ptrs per recorded step

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.queue.append((dst, src, src.clone()))
        self.sources[-1].append(src.data_ptr())

    def run_until(self, k: int) -> None:
        for dst, src, snap in self.queue[self.done:k]:
            assert torch.equal(src, snap), "host buffer rewritten before its copy ran"
            dst.copy_(src)
        self.done = max(self.done, k)

    def run_all(self) -> None:
        self.run_until(len(self.queue))

    def event(self) -> FakeEvent:
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, stream: FakeStream, honest: bool = True) -> None:
        self.stream, self.mark, self.honest = stream, 0, honest
        self.waits = 0

    def record(self) -> None:
        self.mark = len(self.stream.queue)
        self.stream.sources.append([])

    def synchronize(self) -> None:
        self.waits += 1
        if self.honest:
            self.stream.run_until(self.mark)


def _staging(stream: FakeStream, **kw) -> dict:
    return {"separate": True, "event_factory": stream.event, "copy": stream.copy, **kw}


def test_staged_arrays_never_rewrite_a_buffer_before_its_copy_ran():
    stream = FakeStream()
    st = StagedArrays(size=16, fills={"a": 0, "b": -1}, device=CPU, **_staging(stream))
    st.write(3, {"a": np.array([5, 6, 7]), "b": np.array([1, 1, 2])})
    st.write(1, {"a": np.array([9]), "b": np.array([0])})
    # two steps in flight, nothing has run: they used different host buffers
    first, second = stream.sources[0], stream.sources[1]
    assert first and second and not set(first) & set(second)
    st.write(2, {"a": np.array([1, 2]), "b": np.array([3, 3])})  # waits for step 1's copy
    assert stream.done >= len(first)
    st.write(0)
    stream.run_all()
    # the device sees the last step: nothing selected, fill values everywhere
    assert st["a"].tolist() == [0] * 16 and st["b"].tolist() == [-1] * 16


def test_fake_stream_catches_a_single_unguarded_buffer():
    """The check above is not vacuous: one host buffer and events nobody waits on let
    the next step overwrite a copy still queued."""
    stream = FakeStream()
    st = StagedArrays(
        size=8, fills={"a": 0}, device=CPU, depth=1, separate=True, copy=stream.copy,
        event_factory=lambda: FakeEvent(stream, honest=False),
    )
    st.write(2, {"a": np.array([4, 5])})
    st.write(2, {"a": np.array([6, 7])})
    with pytest.raises(AssertionError, match="rewritten before its copy ran"):
        stream.run_all()


def _cap_arrays(key_mask_base):
    keys = [k for k, _, _, _ in key_mask_base]
    base = np.array([b for _, b, _, _ in key_mask_base], np.int64)
    mask = np.array([m for _, _, m, _ in key_mask_base], np.uint64)
    layer = np.array([L for _, _, _, L in key_mask_base], np.int64)
    return keys, base, mask, layer


def test_capture_and_pool_indices_are_double_buffered():
    cs, ps = FakeStream(), FakeStream()
    cap = CaptureBuffer(num_layers=2, hidden_size=H, max_rows=8, max_num_tokens=32,
                        dtype=torch.float32, device=CPU, allow_python_branches=False,
                        staging=_staging(cs))
    pool = PoolBuffer(hidden_size=H, slots=4, max_num_tokens=32, device=CPU,
                      allow_python_branches=False, staging=_staging(ps))
    cap.acquire("a", {"key": "ka", "steps": [0, 1, 2]}, prompt_len=4, steer_layer=1)
    cap.acquire("b", {"key": "kb", "steps": [0]}, prompt_len=6, steer_layer=0)
    pool.acquire("p", {"key": "kp", "layer": 1, "skip": 1}, prompt_len=5)
    arrays = cap.request_arrays(["a", "b"])
    parr = pool.request_arrays(["p", "q"])
    # step 1: a and b prefill (t = 0 at their last tokens); p prefills, q decodes
    cap.fill(arrays, np.array([0, 0]), np.array([4, 6]))
    pool.fill(parr, np.array([0, 4]), np.array([5, 1]))
    # step 2 is prepared while step 1's copies are still queued: other host buffers
    cap.fill(arrays, np.array([4, 6]), np.array([1, 1]))
    pool.fill(parr, np.array([5, 5]), np.array([1, 1]))
    for stream in (cs, ps):
        assert stream.done == 0 and stream.sources[0] and stream.sources[1]
        assert not set(stream.sources[0]) & set(stream.sources[1])
    # step 3 reuses step 1's buffers: only after their copies ran (checked by the stream)
    cap.fill(arrays, np.array([5, 7]), np.array([1, 1]))
    pool.fill_empty()
    assert cs.done >= len(cs.sources[0]) and ps.done >= len(ps.sources[0])
    cs.run_all()
    ps.run_all()
    assert cap.m == 1 and cap.token_index.tolist() == [0] * 8  # a at t = 2: token 0
    assert cap.row_layer.tolist() == [1] + [-1] * 7
    assert pool.tok_slot.tolist() == [0] * 32 and pool.tok_layer.tolist() == [-1] * 32


# ---- dummy batches --------------------------------------------------------------------
class FakeMRv2Runner:
    """The four Model Runner V2 methods the adapter wraps; `execute_model` runs one
    graph-safe "block" (the hooks) over `n` tokens, like a dummy run does."""

    max_num_reqs = 8

    def __init__(self, hooks) -> None:
        self.req_states = SimpleNamespace(req_id_to_index={})
        self.hooks = hooks
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_requests(self, so):
        for new in so.scheduled_new_reqs:
            self.req_states.req_id_to_index[new.req_id] = len(self.req_states.req_id_to_index)

    def finish_requests(self, so):
        pass

    def prepare_inputs(self, batch):
        return batch

    def execute_model(self, so, intermediate_tensors=None, dummy_run=False, **kw):
        n = so.total_num_scheduled_tokens
        g = torch.Generator().manual_seed(n)
        out = (torch.randn(n, H, generator=g), torch.randn(n, H, generator=g))
        for hook in self.hooks:
            got = hook(None, (), out)
            out = got if got is not None else out
        self.outputs.append(out)
        return out


def _new(req_id, n, extra):
    return SimpleNamespace(req_id=req_id, prompt_token_ids=list(range(n)),
                           sampling_params=SimpleNamespace(extra_args=extra))


def test_dummy_batch_after_a_real_step_selects_nothing_and_stays_in_bounds():
    v = torch.arange(float(H))
    state = SteeringState(num_layers=1, hidden_size=H, steer_layers=[0], capacity=4,
                          max_num_tokens=64, dtype=torch.float32, device=CPU,
                          allow_python_branches=False)
    state.register_vectors({"v": encode_vector(v)})
    cap = CaptureBuffer(num_layers=1, hidden_size=H, max_rows=16, max_num_tokens=64,
                        dtype=torch.float32, device=CPU, allow_python_branches=False)
    pool = PoolBuffer(hidden_size=H, slots=4, max_num_tokens=64, device=CPU,
                      allow_python_branches=False)
    hooks = [cap.make_pre_hook(0), state.make_hook(0), cap.make_post_hook(0),
             pool.make_hook(0)]
    runner = FakeMRv2Runner(hooks)
    gpu_v2.install(runner, state, cap, pool)
    steer = to_extra_args(SteerSpec("v", 2.0, 0, "all"), vector_digest(v))
    so = SimpleNamespace(
        scheduled_new_reqs=[
            _new("a", 40, {EXTRA_KEY: steer, CAP_KEY: {"key": "ka", "steps": [0]}}),
            _new("p", 10, {POOL_KEY: {"key": "kp", "layer": 0, "skip": 1}}),
        ],
        finished_req_ids=set(), preempted_req_ids=set(), total_num_scheduled_tokens=50,
    )
    runner.add_requests(so)
    batch = SimpleNamespace(num_reqs=2, idx_mapping_np=np.array([0, 1]),
                            num_computed_tokens_np=np.array([0, 0]),
                            num_scheduled_tokens=np.array([40, 10]), req_ids=["a", "p"])
    runner.prepare_inputs(batch)
    assert cap.token_index[0] == 39  # a's last prompt token
    runner.execute_model(so)
    pooled = pool.sum.clone()
    rows = cap.take("ka")
    assert rows is not None and set(rows) == {0}
    # A dummy run (DP rank without work, warmup) of 4 tokens: no prepare_inputs.
    dummy = SimpleNamespace(total_num_scheduled_tokens=4)
    out = runner.execute_model(dummy, dummy_run=True)  # an IndexError without the fix
    g = torch.Generator().manual_seed(4)
    h0 = torch.randn(4, H, generator=g)
    assert torch.equal(out[0], h0)  # nothing steered
    assert torch.equal(pool.sum[1:], pooled[1:])  # dummy tokens pooled nowhere
    assert cap.m == 0 and not cap._pending
    assert state.row_index[:50].abs().sum() == 0
    assert cap.row_layer.tolist() == [-1] * 16
    assert pool.tok_layer[:50].tolist() == [-1] * 50


def test_graph_safe_capture_gathers_rows_by_batch_size():
    cap = CaptureBuffer(num_layers=1, hidden_size=H, max_rows=16, max_num_tokens=64,
                        dtype=torch.float32, device=CPU, allow_python_branches=False)
    cap.acquire("a", {"key": "k", "steps": [0]}, prompt_len=3, steer_layer=0)
    cap.fill(cap.request_arrays(["a"]), np.array([0]), np.array([3]))
    h, r = torch.randn(3, H), torch.randn(3, H)
    k, rows = cap._selected_rows((h, r))
    assert k == 3 and rows.shape == (3, H)  # not max_rows = 16
    assert torch.equal(rows[0], h[2] + r[2])


def test_pool_release_keeps_the_mean_on_the_device_until_taken():
    pool = PoolBuffer(hidden_size=H, slots=2, max_num_tokens=8, device=CPU,
                      allow_python_branches=False)
    pool.acquire("p", {"key": "kp", "layer": 0, "skip": 1}, prompt_len=3)
    pool.fill(pool.request_arrays(["p"]), np.array([0]), np.array([3]))
    h = torch.ones(3, H)
    pool.make_hook(0)(None, (), (h, torch.zeros(3, H)))
    pool.release("p")
    assert pool.store["kp"].device == pool.sum.device
    got = pool.take("kp")  # the mean state, then the mean token norm (sqrt(H) here)
    assert got is not None and torch.equal(got[:H], torch.ones(H))
    assert got[H].item() == pytest.approx(H ** 0.5)
    assert pool.sum[0].sum() == H  # the unpooled BOS went to the sink slot


# ---- plugin missing ---------------------------------------------------------------------
def test_client_refuses_to_start_without_the_salting_plugin(monkeypatch, tiny_model):
    from asteer_build.engine import SteeredEngine

    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    with pytest.raises(RuntimeError, match=r"salting plugin is not active.*VLLM_PLUGINS"):
        SteeredEngine(tiny_model, enforce_eager=True)


_RAW_ENGINE = r"""
import sys
from vllm import LLM
from asteer_build.engine.spec import WORKER_CLS
try:
    LLM(sys.argv[1], worker_cls=WORKER_CLS, enforce_eager=True, dtype="float32",
        max_model_len=256, kv_cache_memory_bytes=64 << 20, enable_prefix_caching=True)
except Exception as e:
    msg = str(e)
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
        msg += " | " + str(e)
    print("ERROR:", msg)
    sys.exit(3)
print("STARTED")
"""


@pytest.mark.slow  # starts a raw vLLM engine in a subprocess
def test_worker_refuses_steering_when_the_engine_core_lacks_the_plugin(tiny_model):
    """A raw vLLM engine with the steered worker but the plugin excluded: the worker,
    in the engine-core process (uniprocess), fails the start with the clear error."""
    env = dict(os.environ, VLLM_PLUGINS="", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _RAW_ENGINE, tiny_model], env=env,
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-3000:]
    assert "salting plugin is not active" in text
