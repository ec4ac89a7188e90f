"""Pooling contrast-bank texts into one vector per text: the output of block `layer`
(the residual stream), averaged over every position but 0.

Reference setting (the authors' `extract_hidden_states`): each text is tokenized raw, no
chat template, with the tokenizer's default special tokens (`add_special_tokens=True`);
the state is the output of block `layer`, averaged over positions 1.. (position 0 is
skipped). For the reference's models that is exactly what `tokenize_texts` gives: Gemma-2
and Llama-3.2 add their BOS (position 0 is the BOS), Qwen3 has none (position 0 is the
text's first token). One addition: a tokenizer that declares a BOS but does not add it
(the tiny world's) gets it in front, so position 0 is a BOS there too; without it the
tiny world's pooled states are much noisier (measured: template-bank probe training
accuracy 0.50-0.83 instead of 0.71-0.96 at 12 + 12 texts).

- `engine_pooler`: the steered vLLM engine (`SteeredEngine.pool_hidden`: prefill-only
  requests pooled on the device), so 150 concepts x 100 texts cost one prefill pass. The
  stage's pooling (`vectors.pool: vllm`).
- `hf_pooler`: the Hugging Face reference (`reference.HFReference`), one sequence per
  forward, so nothing is padded or masked. The oracle the tests compare the engine
  against (`vectors.pool: hf`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.protocol import SteeringEngine
from .settings import VectorSettings

__all__ = ["Pooler", "Pooling", "tokenize_texts", "engine_pooler", "hf_pooler",
           "open_pooling"]

#: token ids of the texts, layer -> ([len(ids), hidden] mean states, [len(ids)] mean token
#: L2 norms), float32, both over positions 1.. (the norms: `alpha_units: norm`)
Pooler = Callable[[list[list[int]], int], tuple[np.ndarray, np.ndarray]]


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """As the reference tokenized bank texts: raw, the tokenizer's default special tokens;
    plus the declared BOS where the tokenizer leaves it out (module docstring: never the
    case for the reference's models)."""
    bos = tokenizer.bos_token_id
    out = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=True).input_ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        out.append(ids)
    return out


def engine_pooler(engine: SteeringEngine, chunk: int = 2048) -> Pooler:
    def pool(ids: list[list[int]], layer: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [engine.pool_hidden(ids[i:i + chunk], layer, skip=1, with_norms=True)
                 for i in range(0, len(ids), chunk)]
        if not parts:
            return np.zeros((0, engine.hidden_size), "f4"), np.zeros(0, "f4")
        return (np.concatenate([m for m, _ in parts]),
                np.concatenate([n for _, n in parts]))

    return pool


def hf_pooler(ref: Any) -> Pooler:
    """One sequence per forward: no padding, so nothing to mask and nothing to doubt."""
    def pool(ids: list[list[int]], layer: int) -> tuple[np.ndarray, np.ndarray]:
        states = [ref.residual_stream(x, None, [layer])[layer][1:] for x in ids]
        means = np.stack([h.mean(0).numpy() for h in states]).astype(np.float32)
        norms = np.array([float(h.norm(dim=-1).mean()) for h in states], np.float32)
        return means, norms

    return pool


@dataclass
class Pooling:
    """What the stage needs from a pooling backend."""

    pool: Pooler
    tokenizer: Any
    num_layers: int
    kind: str  # "vllm" | "hf": recorded in the index and the cache fingerprint


@contextmanager
def open_pooling(model_path: str, settings: VectorSettings,
                 engine: SteeringEngine | None = None
                 ) -> Iterator[Pooling]:
    """The backend `settings.pool` names: the HF reference, or the vLLM engine (the one
    given, else one started here with `settings.engine_args`, or the tiny CPU engine's
    arguments when those are None, and shut down after)."""
    if settings.pool == "hf":
        import torch

        from ..engine.reference import HFReference

        dev = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ref = HFReference(model_path, dtype=torch.float32, device=dev)
        yield Pooling(hf_pooler(ref), ref.tokenizer, len(ref.layers), "hf")
        return
    own = engine is None
    if own:
        from ..engine import SteeredEngine
        from ..engine.llm import default_cpu_engine_args

        # None: nothing configured (a direct call): the tiny CPU engine's arguments. The
        # build passes the model's own (`build.vector_settings_for`), even when empty.
        args = (default_cpu_engine_args() if settings.engine_args is None
                else dict(settings.engine_args))
        engine = SteeredEngine(model_path, **args)
    try:
        yield Pooling(engine_pooler(engine), engine.get_tokenizer(), engine.num_layers,
                      "vllm")
    finally:
        if own:
            engine.shutdown()
