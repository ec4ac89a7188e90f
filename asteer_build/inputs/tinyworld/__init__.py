"""The tiny world: a small random Llama and a locally trained tokenizer, written offline.

Tests, benchmarks and the demo need a real Hugging Face model folder that vLLM and
`transformers` both load, without any network. This package writes one deterministically
from a seed: a Llama-architecture model with random weights (tied embeddings whose scale
is a knob: with the default init the logits are so flat that steering barely changes the
output) and a byte-level BPE tokenizer trained here on a built-in corpus, with a chat
template; also miniatures of the paper's three architectures. A folder is cached by a
hash of its parameters, so every test module reuses the same files.

`text` holds the world's words and chat templates, `models` writes the folders, `names`
resolves a config's `tinyworld[:ARCH][:seed=N]` model paths.
"""

from __future__ import annotations

from ...core.paths import cache_dir
from .models import (
    ARCHS,
    COMPUTE_BOUND,
    GEMMA2_SLIDING_WINDOW,
    VARIED,
    TinyWorldSpec,
    arch_spec,
    build_arch_model,
    build_compute_model,
    build_tiny_model,
)
from .names import is_tiny_model, parse_tiny_name, resolve_model_path, resolve_tiny_name
from .text import CONCEPT_WORDS, FILLER_WORDS, WORDS

__all__ = [
    "ARCHS", "TinyWorldSpec", "VARIED", "WORDS", "CONCEPT_WORDS", "FILLER_WORDS", "arch_spec",
    "build_arch_model", "build_compute_model", "build_tiny_model", "cache_dir", "COMPUTE_BOUND",
    "GEMMA2_SLIDING_WINDOW", "is_tiny_model", "parse_tiny_name", "resolve_model_path",
    "resolve_tiny_name",
]
