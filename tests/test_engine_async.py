"""The async engine (vLLM's AsyncLLM), as the Ray feeder drives it: many requests in flight."""

from __future__ import annotations

import asyncio

import pytest
import torch

from asteer_build.engine import AsyncSteeredEngine, SteerSpec
from asteer_build.reference import HFReference

from .conftest import PROMPTS, chat_ids, engine_args


def test_async_engine_concurrent_requests_match_reference(varied_model):
    from vllm import SamplingParams

    prompts = chat_ids(varied_model, PROMPTS)
    v = {"v": torch.randn(128, generator=torch.Generator().manual_seed(3))}
    specs = [None if i % 4 == 0 else SteerSpec("v", 0.75 * i, i % 6) for i in range(16)]
    reqs = [prompts[i % len(prompts)] for i in range(16)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

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
        finally:
            eng.shutdown()
        return [list(o.outputs[0].token_ids) for o in outs]

    ours = asyncio.run(run())
    ref = HFReference(varied_model)
    ref.register_vectors(v)
    assert ours == ref.generate(reqs, specs, max_new_tokens=16)
    assert len({tuple(t) for t in ours}) >= 12
