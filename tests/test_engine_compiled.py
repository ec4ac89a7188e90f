"""The steered engine with compilation on (`enforce_eager=False`).

Every other CPU engine test runs eager; here vLLM compiles the model with torch.compile
(Inductor on CPU), so the hooks run in their graph-safe form, traced into the compiled
graph: no Python branch per step, fixed-shape gathers. One compiled engine serves the
module; its compile cache lives in a temp dir, so each run compiles from scratch (about
a minute and a half on a busy 2-core machine) and never reads a stale cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asteer_build.engine import POSITION_MODES, SteeredEngine, SteerSpec
from asteer_build.engine.reference import HFReference
from asteer_build.pipeline.rollouts import CaptureSettings, RolloutRequest, run_with_capture

from .capture_support import assert_captures_match_hf
from .conftest import PROMPTS, chat_ids, engine_args
from .test_engine import _mixed_batch, _run, _vectors, assert_steering_matches_hf

LAYERS = 6


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-compile-cache")


@pytest.fixture(scope="module")
def engine(varied_model, compile_cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CACHE_ROOT", str(compile_cache))
    eng = SteeredEngine(varied_model, **engine_args(enforce_eager=False, max_num_seqs=48))
    eng.register_vectors(_vectors())
    yield eng
    eng.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def prompts(varied_model):
    return chat_ids(varied_model, PROMPTS)


@pytest.fixture(scope="module")
def reference(varied_model):
    ref = HFReference(varied_model, dtype=torch.float32)
    ref.register_vectors(_vectors())
    return ref


def test_engine_is_compiled_and_hooks_are_graph_safe(engine, compile_cache):
    from vllm.config import CompilationMode

    (info,) = engine.info()
    assert info["graph_safe_hooks"] is True
    assert info["adapter"] == "cpu-v1"
    cfg = engine.llm.llm_engine.vllm_config
    assert not cfg.model_config.enforce_eager
    assert cfg.compilation_config.mode != CompilationMode.NONE
    # the compiled artifacts went to this module's cache, not the user's
    assert any(p.is_file() for p in (compile_cache / "torch_compile_cache").rglob("*"))


def test_alpha_zero_equals_unsteered(engine, prompts):
    base = _run(engine, prompts, [None] * len(prompts))
    for mode in POSITION_MODES:
        for layer in (0, 3, 5):
            zero = _run(engine, prompts, [SteerSpec("ocean", 0.0, layer, mode)] * len(prompts))
            assert zero == base, (mode, layer)
    steered = _run(engine, prompts, [SteerSpec("ocean", 4.0, 2)] * len(prompts))
    assert sum(s != b for s, b in zip(steered, base, strict=True)) >= len(prompts) // 2


def test_mixed_batch_equals_each_request_alone(engine, prompts):
    reqs = _mixed_batch(prompts)
    together = _run(engine, [p for p, _ in reqs], [s for _, s in reqs])
    alone = [_run(engine, [p], [s])[0] for p, s in reqs]
    assert together == alone
    by_prompt: dict[tuple, set] = {}
    for (p, _), toks in zip(reqs, together, strict=True):
        by_prompt.setdefault(tuple(p), set()).add(tuple(toks))
    assert sum(len(v) > 1 for v in by_prompt.values()) >= len(prompts) - 1


def test_steering_matches_hf(engine, prompts, reference):
    assert_steering_matches_hf(engine, prompts, reference)


def _req(i, ids, vector, alpha, layer, mode, max_tokens=8, temp=0.0):
    return RolloutRequest(id=f"c{i}", prompt_token_ids=ids, vector=vector, alpha=alpha,
                          layer=layer, positions=mode, seed=100 + i, max_tokens=max_tokens,
                          temperature=temp)


def test_captured_states_match_hf(engine, prompts, reference):
    reqs = [
        _req(0, prompts[0], "ocean", 2.0, 2, "all"),
        _req(1, prompts[1], "music", 3.0, 1, "generated"),
        _req(2, prompts[2], "robot", 1.5, 3, "last_prompt_and_generated"),
    ]
    settings = CaptureSettings(features=False, activations=True, activation_dtype="float32",
                               extra_offsets=(-1,))
    results = run_with_capture(engine, reqs, settings)
    all_offsets = assert_captures_match_hf(reqs, results, settings, reference, LAYERS)
    for res, offsets in zip(results, all_offsets, strict=True):
        acts = res.activations
        k0 = offsets.index(0)
        assert np.array_equal(acts["replay"][:, k0], acts["steered_pre"][:, 0])


def test_staggered_capture_batch_equals_alone(engine, varied_model):
    """Rows stay attributed when the compiled hooks gather a mixed, staggered batch."""
    qs = [" ".join([PROMPTS[i % 8]] * (1 + i % 5)) for i in range(12)]
    ids = chat_ids(varied_model, qs)
    modes = ("all", "generated", "last_prompt_and_generated")
    names = ("ocean", "music", "robot")
    reqs = [_req(i, ids[i], names[i % 3], 0.5 * (i % 7), i % 5, modes[i % 3],
                 max_tokens=6 + (i % 9), temp=0.8) for i in range(12)]
    settings = CaptureSettings()
    together = run_with_capture(engine, reqs, settings)
    alone = [run_with_capture(engine, [r], settings)[0] for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert a.response_token_ids == b.response_token_ids
        for name in ("steered", "replay", "steered_pre"):
            np.testing.assert_allclose(a.activations[name].astype(np.float32),
                                       b.activations[name].astype(np.float32), atol=2e-3)
    firsts = {r.activations["steered"][0, 0].tobytes() for r in together}
    assert len(firsts) >= 10
