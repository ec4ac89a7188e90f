"""The one check that captured residual-stream rows equal Hugging Face's: shared by the
capture, compiled-engine and architecture modules, so a tolerance or position rule
changes in one place."""

from __future__ import annotations

import numpy as np
import torch


def assert_captures_match_hf(reqs, results, settings, reference, num_layers: int, *,
                             scaled: bool = False, label: str = "") -> list[list[int]]:
    """Steered and replay rows at every captured (step, layer) equal the HF reference's
    block outputs over the same tokens (atol 2e-4, times the state's magnitude when
    `scaled`, for models whose stream is large). Returns each request's captured
    offsets (k = -1 first when `settings.extra_offsets` asks for it)."""
    out = []
    for req, res in zip(reqs, results, strict=True):
        acts = res.activations
        offsets = sorted({*settings.extra_offsets, *settings.resolve(req.layer, num_layers)[0]})
        layers = [req.layer + k for k in offsets]
        P = len(req.prompt_token_ids)
        full = req.prompt_token_ids + res.response_token_ids
        positions = [P - 1 + t for t in settings.steps]
        steered = reference.residual_stream(full, req.steer(), layers, prompt_len=P)
        plain = reference.residual_stream(full, None, layers, prompt_len=P)
        for j, layer in enumerate(layers):
            want_s = torch.stack([steered[layer][p] for p in positions]).numpy()
            want_r = torch.stack([plain[layer][p] for p in positions]).numpy()
            scale = max(1.0, float(np.abs(want_s).max())) if scaled else 1.0
            msg = f"{label} {req.id} layer {layer}"
            np.testing.assert_allclose(acts["steered"][:, j], want_s, atol=2e-4 * scale,
                                       rtol=1e-4, err_msg=msg)
            np.testing.assert_allclose(acts["replay"][:, j], want_r, atol=2e-4 * scale,
                                       rtol=1e-4, err_msg=msg)
        out.append(offsets)
    return out
