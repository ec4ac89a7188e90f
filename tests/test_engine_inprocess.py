"""In-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, uni executor): look inside.

With the model in this process, a test hook reads the residual stream (`hidden +
residual`, copied: the next fused add-norm mutates in place) after each block, so the
steering delta can be checked directly.
"""

from __future__ import annotations

import pytest
import torch

from asteer_build.engine import SteerSpec
from asteer_build.engine.reference import HFReference

from .conftest import PROMPTS, chat_ids

LAYER = 2


@pytest.fixture(scope="module")
def engine(engines, varied_model):
    """conftest.EngineRegistry's in-process engine (uni executor,
    VLLM_ENABLE_V1_MULTIPROCESSING=0 while it starts)."""
    eng = engines.get(varied_model, inprocess=True)
    g = torch.Generator().manual_seed(7)
    eng.register_vectors({"v": torch.randn(128, generator=g)})
    return eng


def _residuals(engine, prompt, spec) -> dict[int, torch.Tensor]:
    """Residual stream after every block for the prefill of `prompt`: {layer: [T, H]}."""
    from vllm import SamplingParams

    store: dict[int, list[torch.Tensor]] = {}

    def install(model):
        from asteer_build.engine.steering import find_decoder_layers

        handles = []
        for i, block in enumerate(find_decoder_layers(model, 6)):

            def hook(mod, args, out, i=i):
                store.setdefault(i, []).append((out[0] + out[1]).detach().clone())

            handles.append(block.register_forward_hook(hook))
        return handles

    (handles,) = engine.llm.apply_model(install)
    try:
        engine.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), [spec])
    finally:
        for h in handles:
            h.remove()
    return {i: xs[0] for i, xs in store.items()}


def test_in_process_engine_is_used(engine):
    assert type(engine.llm.llm_engine.engine_core).__name__ == "InprocClient"
    # the pipeline is typed against this Protocol; SteeredEngine is its implementation
    from asteer_build.engine.protocol import AsyncSteeringEngine, SteeringEngine

    assert isinstance(engine, SteeringEngine)
    assert not isinstance(engine, AsyncSteeringEngine)  # no generate_final


@pytest.mark.parametrize("mode", ["all", "generated", "last_prompt_and_generated"])
def test_residual_after_layer_moves_by_alpha_v(engine, varied_model, mode):
    (prompt,) = chat_ids(varied_model, PROMPTS[:1])
    alpha = 2.5
    v = torch.randn(128, generator=torch.Generator().manual_seed(7))
    base = _residuals(engine, prompt, None)
    steered = _residuals(engine, prompt, SteerSpec("v", alpha, LAYER, mode))
    T = len(prompt)
    assert base[LAYER].shape == (T, 128)
    for layer in range(LAYER):
        assert torch.equal(base[layer], steered[layer])
    diff = steered[LAYER] - base[LAYER]
    expected = torch.zeros(T, 128)
    first = {"all": 0, "generated": T, "last_prompt_and_generated": T - 1}[mode]
    expected[first:] = alpha * v
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5)
    if mode != "generated":
        assert not torch.allclose(steered[LAYER + 1], base[LAYER + 1], atol=1e-3)


def test_residual_stream_matches_hf(engine, varied_model):
    (prompt,) = chat_ids(varied_model, PROMPTS[3:4])
    ref = HFReference(varied_model)
    v = torch.randn(128, generator=torch.Generator().manual_seed(7))
    ref.register_vectors({"v": v})
    spec = SteerSpec("v", 3.0, LAYER)
    ours = _residuals(engine, prompt, spec)
    theirs = ref.residual_stream(prompt, spec, layers=range(6))
    for layer in range(6):
        torch.testing.assert_close(ours[layer], theirs[layer], atol=2e-4, rtol=1e-4)
