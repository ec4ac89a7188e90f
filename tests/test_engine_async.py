"""The async engine (vLLM's AsyncLLM), as an asyncio caller drives it: many requests in flight."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from asteer_build.engine import AsyncSteeredEngine, SteerSpec
from asteer_build.engine.reference import HFReference
from asteer_build.pipeline.rollouts import (
    CaptureSettings,
    RolloutRequest,
    run_one_with_capture_async,
)

from .conftest import PROMPTS, chat_ids, engine_args

pytestmark = pytest.mark.slow  # starts its own engine


def test_async_engine_concurrent_requests_match_reference(varied_model):
    from vllm import SamplingParams

    prompts = chat_ids(varied_model, PROMPTS)
    v = {"v": torch.randn(128, generator=torch.Generator().manual_seed(3))}
    specs = [None if i % 4 == 0 else SteerSpec("v", 0.75 * i, i % 6) for i in range(16)]
    reqs = [prompts[i % len(prompts)] for i in range(16)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    cap_req = RolloutRequest(id="cap", prompt_token_ids=prompts[0], vector="v", alpha=2.0,
                             layer=1, seed=5, max_tokens=8, temperature=0.0,
                             prompt=PROMPTS[0])

    async def run():
        eng = AsyncSteeredEngine.from_args(varied_model, **engine_args())
        try:
            from asteer_build.engine.protocol import AsyncSteeringEngine

            assert isinstance(eng, AsyncSteeringEngine)
            await eng.register_vectors(v)
            with pytest.raises(ValueError, match=r"steer\[0\]\.layer"):
                bad = SteerSpec("v", 1, 9)
                await eng.generate_final({"prompt_token_ids": reqs[0]}, params, bad)
            outs = await asyncio.gather(
                *(
                    eng.generate_final({"prompt_token_ids": p}, params, s)
                    for p, s in zip(reqs, specs, strict=True)
                )
            )
            # the async capture unit, with each replay mode, on the same engine
            captured = await asyncio.gather(*(
                run_one_with_capture_async(eng, cap_req, CaptureSettings(
                    activation_dtype="float32", replay=mode))
                for mode in ("exact", "authors")
            ))
        finally:
            eng.shutdown()
        # generate_final asks for the final output only, on a copy of the caller's params
        from vllm.sampling_params import RequestOutputKind

        assert params.output_kind == RequestOutputKind.CUMULATIVE
        assert all(o.finished and len(o.outputs[0].token_ids) == 16 for o in outs)
        return [list(o.outputs[0].token_ids) for o in outs], captured

    ours, (exact, authors) = asyncio.run(run())
    ref = HFReference(varied_model)
    ref.register_vectors(v)
    assert ours == ref.generate(reqs, specs, max_new_tokens=16)
    assert len({tuple(t) for t in ours}) >= 12
    # exact replay: DN at the steered layer is 0; the authors' (bare text) is not, and
    # its states are the untemplated text's at len(tokens(prompt)) - 1 + t
    assert exact.response_token_ids == authors.response_token_ids
    assert all(exact.features[f"dn_t{t}_k0"] == 0.0 for t in (0, 1, 3, 5))
    assert all(authors.features[f"dn_t{t}_k0"] > 0.0 for t in (0, 1, 3, 5))
    tok = ref.tokenizer
    text = tok.decode(authors.response_token_ids, skip_special_tokens=True).strip()
    full = tok(PROMPTS[0] + text)["input_ids"]
    start = len(tok(PROMPTS[0])["input_ids"]) - 1
    layers = [1, 2, 3, 4, 5]  # L + {0, 1, 2, 3}; L + 5 and up are past the 6 blocks
    plain = ref.residual_stream(full, None, layers)
    for i, t in enumerate((0, 1, 3, 5)):
        want = torch.stack([plain[layer][start + t] for layer in layers[:4]]).numpy()
        np.testing.assert_allclose(authors.activations["replay"][i], want, atol=2e-4,
                                   rtol=1e-4)
