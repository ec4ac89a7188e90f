"""Pooling contrast-bank texts into one vector per text: the output of block `layer`
(the residual stream), averaged over every position but 0.

Reference setting: each text is tokenized without a chat template, BOS first where the
model has one (position 0, which pooling skips, is then the BOS the reference skipped).

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

#: token ids of the texts, layer -> [len(ids), hidden] float32
Pooler = Callable[[list[list[int]], int], np.ndarray]


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """No chat template; BOS in front when the tokenizer has one, so position 0 (which
    pooling skips) is the BOS the reference skipped, not the text's first word."""
    bos = tokenizer.bos_token_id
    out = []
    for t in texts:
        ids = list(tokenizer(t).input_ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        out.append(ids)
    return out


def engine_pooler(engine: SteeringEngine, chunk: int = 2048) -> Pooler:
    def pool(ids: list[list[int]], layer: int) -> np.ndarray:
        parts = [engine.pool_hidden(ids[i:i + chunk], layer, skip=1)
                 for i in range(0, len(ids), chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, engine.hidden_size), "f4")

    return pool


def hf_pooler(ref: Any) -> Pooler:
    """One sequence per forward: no padding, so nothing to mask and nothing to doubt."""
    def pool(ids: list[list[int]], layer: int) -> np.ndarray:
        rows = [ref.residual_stream(x, None, [layer])[layer][1:].mean(0).numpy() for x in ids]
        return np.stack(rows).astype(np.float32)

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
    given, else one started here with `settings.engine_args` and shut down after)."""
    if settings.pool == "hf":
        import torch

        from ..reference import HFReference

        dev = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        ref = HFReference(model_path, dtype=torch.float32, device=dev)
        yield Pooling(hf_pooler(ref), ref.tokenizer, len(ref.layers), "hf")
        return
    own = engine is None
    if own:
        from ..engine import SteeredEngine
        from ..engine.llm import default_cpu_engine_args

        engine = SteeredEngine(model_path,
                               **(dict(settings.engine_args or {}) or default_cpu_engine_args()))
    try:
        yield Pooling(engine_pooler(engine), engine.get_tokenizer(), engine.num_layers,
                      "vllm")
    finally:
        if own:
            engine.shutdown()
