"""Chunked prefill: prompts longer than the token budget are prefilled over several steps.

The token -> row index must follow each chunk's real positions, so steering still starts
exactly where the spec says; checked against the HF reference token for token.
"""

from __future__ import annotations

import pytest
import torch

from asteer_build.engine import POSITION_MODES, SteerSpec
from asteer_build.engine.reference import HFReference

from .conftest import PROMPTS, chat_ids

pytestmark = pytest.mark.slow  # starts its own engine


def test_chunked_prefill_matches_reference(engines, varied_model):
    from vllm import SamplingParams

    prompts = chat_ids(varied_model, [" ".join([q] * 8) for q in PROMPTS[:6]])
    assert min(map(len, prompts)) > 40  # each prefill needs >= 2 chunks of 24 tokens
    v = {"v": torch.randn(128, generator=torch.Generator().manual_seed(11))}
    specs = [SteerSpec("v", 1.0 + i, i % 6, POSITION_MODES[i % 3]) for i in range(6)]
    specs[3] = None
    # in the test process (conftest.EngineRegistry); the 24-token budget is the point
    eng = engines.get(varied_model, inprocess=True, max_num_batched_tokens=24, max_num_seqs=8)
    eng.register_vectors(v)
    outs = eng.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
        specs,
    )
    ours = [list(o.outputs[0].token_ids) for o in outs]
    ref = HFReference(varied_model)
    ref.register_vectors(v)
    assert ours == ref.generate(prompts, specs, max_new_tokens=16)
    assert ours != ref.generate(prompts, [None] * 6, max_new_tokens=16)
