"""The tiny world's model knobs that benchmarks lean on."""

from __future__ import annotations

import torch

from asteer_build.core.prompts import prompt_ids
from asteer_build.engine.reference import HFReference
from asteer_build.inputs.tinyworld.models import TinyWorldSpec, build_tiny_model


def test_stream_scale_scales_the_stream_and_keeps_the_logits():
    """`stream_scale: 8` (benchmarks/alpha_units.py's model B): every block's output is
    8x its seed's at the default (up to RMSNorm's epsilon, which the tiny stream's
    RMS of ~0.08 feels at ~0.2%), the logits are its seed's, and the default
    spec's folder name is what it was before the knob existed."""
    base, big = TinyWorldSpec(seed=1), TinyWorldSpec(seed=1, stream_scale=8.0)
    assert "stream_scale" not in base.record() and big.record()["stream_scale"] == 8.0
    assert TinyWorldSpec().key() == "a14c2fce8774ee05"  # the demo's cached folder
    a, b = HFReference(str(build_tiny_model(base))), HFReference(str(build_tiny_model(big)))
    ids = prompt_ids(a.tokenizer, "explain the ocean to a friend")
    ha = a.residual_stream(ids, None, [0, 2, 5])
    hb = b.residual_stream(ids, None, [0, 2, 5])
    for layer in (0, 2, 5):
        want = 8.0 * ha[layer]
        torch.testing.assert_close(hb[layer], want, rtol=0, atol=5e-3 * want.abs().max())
    with torch.no_grad():
        la = a.model(torch.tensor([ids])).logits
        lb = b.model(torch.tensor([ids])).logits
    torch.testing.assert_close(lb, la, rtol=0, atol=5e-3 * la.abs().max())
    assert not b.model.config.tie_word_embeddings and a.model.config.tie_word_embeddings
