"""`SteeringState` without vLLM: rows, dedupe, release, and the per-step token index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asteer_build.engine.spec import SteerSpec, to_extra_args
from asteer_build.engine.steering import SteeringState, encode_vector, vector_digest


def _state(capacity=4, branches=True) -> SteeringState:
    s = SteeringState(
        num_layers=4, hidden_size=8, steer_layers=[0, 1, 2, 3], capacity=capacity,
        max_num_tokens=64, dtype=torch.float32, device=torch.device("cpu"),
        allow_python_branches=branches,
    )
    s.register_vectors({"v": encode_vector(torch.arange(8.0)), "w": encode_vector(torch.ones(8))})
    return s


def _spec(name, alpha, layer, mode="all"):
    v = torch.arange(8.0) if name == "v" else torch.ones(8)
    return to_extra_args(SteerSpec(name, alpha, layer, mode), vector_digest(v))


def test_rows_hold_prescaled_delta_only_in_their_layer_and_are_shared():
    s = _state()
    r1 = s.acquire("a", _spec("v", 2.0, 1), prompt_len=5)
    r2 = s.acquire("b", _spec("v", 2.0, 1), prompt_len=9)  # same config: same row
    r3 = s.acquire("c", _spec("w", -1.0, 3, "generated"), prompt_len=5)
    assert r1 == r2 != r3 and 0 not in (r1, r3)
    assert torch.equal(s.tables[1, r1], 2.0 * torch.arange(8.0))
    assert torch.equal(s.tables[3, r3], -torch.ones(8))
    assert s.tables[[0, 2, 3], r1].abs().sum() == 0
    assert s.tables[:, 0].abs().sum() == 0
    s.release("a")
    assert torch.equal(s.tables[1, r1], 2.0 * torch.arange(8.0))  # "b" still uses it
    s.release("b")
    s.release("c")
    assert s.tables.abs().sum() == 0 and not s.requests and list(s.layer_refs) == [0, 0, 0, 0]


def test_capacity_exhaustion_is_a_clear_error():
    s = _state(capacity=2)
    s.acquire("a", _spec("v", 1.0, 0), 4)
    s.acquire("b", _spec("v", 2.0, 0), 4)
    with pytest.raises(RuntimeError, match="steering rows are in use"):
        s.acquire("c", _spec("v", 3.0, 0), 4)


def test_bad_spec_from_outside_is_rejected_not_raised():
    s = _state()
    assert s.acquire("x", {"v": "nope", "a": 1.0, "l": 0, "p": "all", "fp": "f"}, 3) == 0
    assert s.acquire("y", {"v": "v", "a": float("nan"), "l": 0, "p": "all", "fp": "f"}, 3) == 0
    assert s.rejected == 2 and not s.requests


def test_index_under_chunked_prefill_and_prefix_hits():
    """Three requests, one mid-prefill chunk, one with a cached prefix, one decoding."""
    s = _state()
    ra = s.acquire("a", _spec("v", 1.0, 0, "all"), prompt_len=10)
    rb = s.acquire("b", _spec("v", 2.0, 0, "generated"), prompt_len=6)
    rc = s.acquire("c", _spec("w", 1.0, 2, "last_prompt_and_generated"), prompt_len=8)
    rows, starts = s.request_arrays(["a", "b", "c", "zz"])
    assert list(rows) == [ra, rb, rc, 0] and list(starts) == [0, 6, 7, 0]
    # a: second prefill chunk, positions 4..7; b: decode at position 6 (consumes gen 0);
    # c: prefix hit of 4 tokens, computes positions 4..7 (7 = last prompt token);
    # zz: unsteered, 2 tokens
    computed = np.array([4, 6, 4, 0])
    scheduled = np.array([4, 1, 4, 2])
    s.fill_index(rows, starts, computed, scheduled)
    got = s.row_index[:11].tolist()
    assert got == [ra] * 4 + [rb] + [0, 0, 0, rc] + [0, 0]
    # next step: only "b" decodes; stale entries past the batch are cleared
    s.fill_index(rows[1:2], starts[1:2], np.array([7]), np.array([1]))
    assert s.row_index[:11].tolist() == [rb] + [0] * 10
    s.fill_index(rows[3:], starts[3:], np.array([2]), np.array([1]))
    assert s.row_index[:11].tolist() == [0] * 11


def test_hook_adds_delta_per_token_and_skips_idle_layers():
    s = _state()
    r = s.acquire("a", _spec("w", 3.0, 1), prompt_len=2)
    s.fill_index(np.array([r, 0]), np.array([0, 0]), np.array([0, 0]), np.array([2, 1]))
    hidden, residual = torch.zeros(3, 8), torch.ones(3, 8)
    out_h, out_r = s.make_hook(1)(None, (), (hidden, residual))
    assert torch.equal(out_h, torch.tensor([[3.0] * 8, [3.0] * 8, [0.0] * 8]))
    assert out_r is residual
    assert s.make_hook(0)(None, (), (hidden, residual)) is None  # nobody steers layer 0
    graphed = _state(branches=False)
    h0, _ = graphed.make_hook(0)(None, (), (hidden, residual))
    assert torch.equal(h0, hidden)
