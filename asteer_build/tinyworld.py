"""The tiny world: a small random Llama and a locally trained tokenizer, written offline.

Tests, benchmarks and the demo need a real Hugging Face model folder that vLLM and
`transformers` both load, without any network. This module writes one deterministically
from a seed: a Llama-architecture model with random weights (tied embeddings whose scale
is a knob: with the default init the logits are so flat that steering barely changes the
output, see research/cpu-notes.md) and a byte-level BPE tokenizer trained here on a
built-in corpus, with a chat template. The folder is cached by a hash of its parameters,
so every test module reuses the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from . import atomic

__all__ = [
    "TinyWorldSpec", "VARIED", "WORDS", "CONCEPT_WORDS", "build_tiny_model", "cache_dir",
    "is_tiny_model",
]

# Words the tokenizer learns as whole tokens. Concept words are what the tiny world's
# concepts and the rules judge look for; filler words make ordinary "answers".
CONCEPT_WORDS = [
    "ocean", "music", "robot", "coffee", "forest", "rocket", "castle", "dragon",
    "garden", "winter", "pirate", "planet", "emoji", "table", "upper", "poem",
]
FILLER_WORDS = [
    "the", "a", "is", "of", "and", "to", "in", "it", "you", "that", "for", "on", "with",
    "as", "this", "are", "be", "can", "we", "how", "what", "why", "when", "answer",
    "question", "explain", "simple", "good", "idea", "water", "time", "people", "work",
    "make", "first", "then", "because", "also", "more", "very", "help", "think", "about",
    "write", "story", "list", "three", "reasons", "short", "long", "day", "city", "book",
    "friend", "learn", "school", "food", "travel", "money", "health", "sleep", "plan",
]
WORDS = CONCEPT_WORDS + FILLER_WORDS

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}<|end|>\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TinyWorldSpec:
    """Everything that determines the written files; its hash names the cache folder."""

    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 2  # head_dim = 64: vLLM's CPU attention rejects head_dim 16
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 1024
    # The defaults give steering visible regimes: at HF's init std (0.02) the blocks
    # move the residual little, so with tied embeddings scaled x3 the logits follow the
    # residual's direction, and a concept's DiffMean vector raises its words' rate with
    # alpha, then crowds out everything (under / success / over, at temperature 1.0,
    # with a different window per concept). Greedy decoding of this model just repeats
    # one token, though: see `VARIED` for tests that need varied greedy text.
    initializer_range: float = 0.02
    embed_scale: float = 3.0
    dtype: str = "float32"

    def key(self) -> str:
        payload = json.dumps({**asdict(self), "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: Larger block weights and unscaled embeddings: varied greedy text, weak steering. For
#: engine tests whose equalities would be vacuous on a model that repeats one token.
VARIED = TinyWorldSpec(initializer_range=0.1, embed_scale=1.0)


def cache_dir() -> Path:
    """Root of asteer's local cache; `ASTEER_CACHE` overrides it (tests point it anywhere)."""
    root = os.environ.get("ASTEER_CACHE") or Path.home() / ".cache" / "asteer"
    return Path(root)


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 16)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice([".", "?", "!"]))
    # Words seen in isolation too, so each becomes one token with its leading space.
    lines.extend(" " + w for w in WORDS for _ in range(20))
    return lines


def _write_tokenizer(spec: TinyWorldSpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
        padding_side="left",
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _write_model(spec: TinyWorldSpec, out: Path, vocab_size: int, special: dict[str, int]) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=special["<|bos|>"],
        eos_token_id=special["<|eos|>"],
        pad_token_id=special["<|pad|>"],
        rms_norm_eps=1e-5,
        initializer_range=spec.initializer_range,
        rope_theta=10000.0,
        torch_dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(spec.embed_scale)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(str(out))


def build_tiny_model(spec: TinyWorldSpec | None = None, root: Path | None = None) -> Path:
    """Write (or reuse) the tiny model folder and return its path.

    The folder appears atomically (written under a temp name, then renamed), so parallel
    test processes never see half a model.
    """
    spec = spec or TinyWorldSpec()
    if spec.hidden_size % spec.num_heads or spec.hidden_size // spec.num_heads < 32:
        raise ValueError(
            f"tinyworld: hidden_size={spec.hidden_size} / num_heads={spec.num_heads} must "
            "give an integer head_dim >= 32 (vLLM's CPU attention rejects smaller heads)"
        )
    root = Path(root) if root else cache_dir() / "tinyworld"
    target = root / f"llama-{spec.key()}"
    if (target / "asteer_tinyworld.json").exists():
        return target
    with atomic.commit_dir(target) as tmp:
        _write_tokenizer(spec, tmp)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tmp))
        special = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        _write_model(spec, tmp, len(tok), special)
        (tmp / "asteer_tinyworld.json").write_text(
            json.dumps({**asdict(spec), "format": FORMAT_VERSION}, indent=2)
        )
    return target


def is_tiny_model(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is the tiny world: the config's `tinyworld`, or a folder written by
    `build_tiny_model` (it carries `asteer_tinyworld.json`). Sources that only make sense
    for the tiny world (the template contrast banks) check this."""
    if str(path) == "tinyworld":
        return True
    p = Path(path)
    return p.is_dir() and (p / "asteer_tinyworld.json").is_file()


def main() -> None:  # pragma: no cover - convenience entry
    import argparse

    p = argparse.ArgumentParser(description="Write the tiny-world model and print its path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-scale", type=float, default=TinyWorldSpec.embed_scale)
    p.add_argument("--init-range", type=float, default=TinyWorldSpec.initializer_range)
    a = p.parse_args()
    spec = TinyWorldSpec(seed=a.seed, embed_scale=a.embed_scale, initializer_range=a.init_range)
    print(build_tiny_model(spec))


if __name__ == "__main__":  # pragma: no cover
    main()
