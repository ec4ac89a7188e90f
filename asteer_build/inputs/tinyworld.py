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
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core import atomic
from ..core.paths import cache_dir

__all__ = [
    "ARCHS", "TinyWorldSpec", "VARIED", "WORDS", "CONCEPT_WORDS", "arch_spec",
    "build_arch_model", "build_compute_model", "build_tiny_model", "cache_dir", "COMPUTE_BOUND",
    "is_tiny_model", "parse_tiny_name", "resolve_model_path", "resolve_tiny_name",
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


#: A random model wide enough that per-token matrix work, not per-step host work, sets
#: the pace (hidden 1024, MLP 4096, head_dim 64), like the paper's 2-3B models on a GPU,
#: with only 2 layers so a long-tailed workload still runs in minutes on 2 CPU cores.
#: Benchmarks only (`benchmarks/bench_engine.py`): the tiny model's 128-wide blocks leave
#: vLLM's and HF's per-step overheads as the whole cost, which hides what padding costs.
COMPUTE_BOUND = TinyWorldSpec(hidden_size=1024, num_layers=2, num_heads=16, num_kv_heads=16,
                              intermediate_size=4096, embed_scale=1.0)


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 16)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice([".", "?", "!"]))
    # Words seen in isolation too, so each becomes one token with its leading space.
    lines.extend(" " + w for w in WORDS for _ in range(20))
    return lines


@dataclass(frozen=True)
class _Chat:
    """A tokenizer's special tokens and chat template (the tiny world's or a real family's)."""

    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    template: str


_TINY_CHAT = _Chat(tuple(SPECIAL_TOKENS), "<|bos|>", "<|eos|>", "<|pad|>", CHAT_TEMPLATE)


def _write_tokenizer(spec: TinyWorldSpec, out: Path, chat: _Chat = _TINY_CHAT) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(chat.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=chat.bos,
        eos_token=chat.eos,
        pad_token=chat.pad,
        additional_special_tokens=[
            t for t in chat.special_tokens if t not in (chat.bos, chat.eos, chat.pad)
        ],
        padding_side="left",
        model_max_length=spec.max_position_embeddings,
    )
    fast.chat_template = chat.template
    fast.save_pretrained(str(out))


def _shape(spec: TinyWorldSpec, vocab_size: int) -> dict:
    """The config fields every tiny model shares, whatever its class: one place, so the
    tiny world's own model and the paper's three architectures stay the same size."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=True,
    )


def _write_model(spec: TinyWorldSpec, out: Path, vocab_size: int, special: dict[str, int]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **_shape(spec, vocab_size),
        bos_token_id=special["<|bos|>"],
        eos_token_id=special["<|eos|>"],
        pad_token_id=special["<|pad|>"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        torch_dtype=spec.dtype,
    )
    _save_random_model(LlamaForCausalLM, config, spec, out)


def _save_random_model(make, config, spec: TinyWorldSpec, out: Path) -> None:
    """Seeded random weights (embeddings scaled by `spec.embed_scale`) and a generation
    config that names only the special tokens, so its sampling is transformers' defaults
    unless a test writes its own."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(spec.seed)
    model = make(config)
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


def build_compute_model(root: Path | None = None) -> Path:
    """Write (or reuse) the compute-bound random Llama (`COMPUTE_BOUND`); same tokenizer
    and chat template as the tiny model, so a benchmark's prompts run on both."""
    return build_tiny_model(COMPUTE_BOUND, root)


# --- The paper's three architectures in miniature ------------------------------------
#
# The reference testbed steers Qwen3-1.7B, gemma-2-2b-it and Llama-3.2-3B. Their model
# classes differ in ways a steering hook can trip over: Qwen3 normalises q and k per
# head; Gemma 2 scales the embeddings by sqrt(hidden), wraps every block's attention and
# MLP in extra norms, soft-caps attention and final logits and alternates sliding-window
# and global attention; Llama 3.2 uses llama3 rope scaling and tied embeddings. Each
# builder below writes a small random model of the real Hugging Face class with those
# features switched on at sizes where they act on short test prompts, plus a chat
# template shaped like the real family's, on the tiny world's own tokenizer.

ARCHS = ("qwen3", "gemma2", "llama3")

_QWEN3_TEMPLATE = (
    # Like Qwen3's: ChatML turns, no BOS, earlier assistant turns lose their reasoning,
    # and `enable_thinking=False` pre-fills an empty think block.
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set content = m['content'] %}"
    "{%- if '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_GEMMA2_TEMPLATE = (
    # Like gemma-2-it's: BOS, <start_of_turn>user / model turns, no system role,
    # roles must alternate.
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_LLAMA3_TEMPLATE = (
    # Like Llama 3.2's: BOS, a system header that always carries the knowledge-cutoff
    # and date lines, <|start_header_id|>role<|end_header_id|> turns ending in <|eot_id|>.
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{{- m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

_ARCH_CHATS = {
    "qwen3": _Chat(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        None, "<|im_end|>", "<|endoftext|>", _QWEN3_TEMPLATE,
    ),
    "gemma2": _Chat(
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>", "<eos>", "<pad>", _GEMMA2_TEMPLATE,
    ),
    "llama3": _Chat(
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|finetune_right_pad_id|>"),
        "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", _LLAMA3_TEMPLATE,
    ),
}
# Tokens that end a turn (the generation config's EOS list, as in the real models).
_ARCH_STOPS = {
    "qwen3": ("<|im_end|>", "<|endoftext|>"),
    "gemma2": ("<eos>", "<end_of_turn>"),
    "llama3": ("<|end_of_text|>", "<|eot_id|>"),
}
#: Sliding window of the tiny Gemma 2 (real: 4096): short enough that test prompts plus
#: a few generated tokens run past it, so windowed layers really drop early tokens.
GEMMA2_SLIDING_WINDOW = 16


def arch_spec(arch: str, seed: int = 0) -> TinyWorldSpec:
    """The size knobs of one architecture's tiny model (hidden 64, head_dim 32, GQA 2:1)."""
    if arch not in ARCHS:
        raise ValueError(f"tinyworld: arch={arch!r} is not one of {', '.join(ARCHS)}")
    return TinyWorldSpec(
        seed=seed, hidden_size=64, num_layers=6, num_heads=2, num_kv_heads=1,
        intermediate_size=192, initializer_range=0.1,
        # Gemma multiplies embeddings by sqrt(hidden); at full size a token's own (tied)
        # embedding then dominates the stream and greedy decoding repeats it. Shrunk x10,
        # the blocks steer the text and greedy output varies, as the parity tests need.
        embed_scale=0.1 if arch == "gemma2" else 1.0,
    )


def _arch_config(arch: str, spec: TinyWorldSpec, vocab_size: int, ids: dict[str, int]):
    common = dict(
        **_shape(spec, vocab_size),
        eos_token_id=[ids[t] for t in _ARCH_STOPS[arch]],
        dtype=spec.dtype,
    )
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(
            **common, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                          "rope_theta": 1_000_000.0},
            bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        )
    if arch == "gemma2":
        from transformers import Gemma2Config

        layer_types = [
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(spec.num_layers)
        ]
        return Gemma2Config(
            **common, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            # Real caps are 50 (attention) and 30 (logits); the tiny model's scores are
            # far smaller, so caps this low are what makes tanh bend them here.
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
            # Real gemma-2-2b has query_pre_attn_scalar == head_dim; a different value
            # here shows the engine takes the scale from the config, not head_dim.
            query_pre_attn_scalar=48,
            sliding_window=GEMMA2_SLIDING_WINDOW, layer_types=layer_types,
            bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        **common, rms_norm_eps=1e-5,
        # Llama 3.2's rope scaling (factor 32, low 1, high 4); the original context is
        # 128 (real: 8192) so that all three frequency bands occur at head_dim 32.
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 128},
        bos_token_id=ids["<|begin_of_text|>"], pad_token_id=ids["<|finetune_right_pad_id|>"],
    )


def build_arch_model(arch: str, seed: int = 0, root: Path | None = None) -> Path:
    """Write (or reuse) a tiny random model of one of the paper's architectures.

    `arch` is one of ARCHS: "qwen3" (Qwen3ForCausalLM), "gemma2" (Gemma2ForCausalLM),
    "llama3" (LlamaForCausalLM with llama3 rope scaling). Cached and written atomically
    like `build_tiny_model`.
    """
    spec = arch_spec(arch, seed)
    chat = _ARCH_CHATS[arch]
    root = Path(root) if root else cache_dir() / "tinyworld"
    payload = json.dumps({**asdict(spec), "arch": arch, "format": FORMAT_VERSION},
                         sort_keys=True)
    target = root / f"{arch}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"
    if (target / "asteer_tinyworld.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic.commit_dir(target) as tmp:
        _write_tokenizer(spec, tmp, chat)
        tok = AutoTokenizer.from_pretrained(str(tmp))
        ids = {t: tok.convert_tokens_to_ids(t) for t in chat.special_tokens}
        config = _arch_config(arch, spec, len(tok), ids)
        _save_random_model(AutoModelForCausalLM.from_config, config, spec, tmp)
        (tmp / "asteer_tinyworld.json").write_text(json.dumps(json.loads(payload), indent=2))
    return target


def parse_tiny_name(name: str) -> tuple[str | None, int] | None:
    """(arch or None for the default tiny Llama, seed) of a config model path naming a
    tiny model: `tinyworld`, `tinyworld:seed=N`, `tinyworld:ARCH` or
    `tinyworld:ARCH:seed=N` (ARCH one of ARCHS); None for any other path. Lets one config
    hold several distinct tiny models (the transfer benchmark's dataset) without
    writing their cache folders into it. A malformed `tinyworld:` name is an error."""
    if name == "tinyworld":
        return None, 0
    if not name.startswith("tinyworld:"):
        return None
    arch, seed = None, 0
    parts = name.split(":")[1:]
    for i, part in enumerate(parts):
        if part in ARCHS and i == 0:
            arch = part
        elif re.fullmatch(r"seed=\d+", part) and i == len(parts) - 1:
            seed = int(part.split("=", 1)[1])
        else:
            raise ValueError(
                f"tinyworld: {name!r}: expected tinyworld[:ARCH][:seed=N] with ARCH one "
                f"of {', '.join(ARCHS)}; bad part {part!r}"
            )
    return arch, seed


def resolve_tiny_name(name: str) -> Path:
    """The folder of the tiny model a `tinyworld[:ARCH][:seed=N]` name denotes (written
    on first use, cached)."""
    parsed = parse_tiny_name(name)
    if parsed is None:
        raise ValueError(f"tinyworld: {name!r} is not a tiny-model name")
    arch, seed = parsed
    if arch is not None:
        return build_arch_model(arch, seed)
    return build_tiny_model(TinyWorldSpec(seed=seed))


def resolve_model_path(path: str) -> str:
    """A config's model path as something vLLM / transformers load: a tiny-world name
    becomes its folder (written on first use); any other path is returned as it is. The
    one place the builder and the sampling resolver turn names into folders."""
    return path if parse_tiny_name(path) is None else str(resolve_tiny_name(path))


def is_tiny_model(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is the tiny world: the config's `tinyworld`, or a folder written by
    `build_tiny_model` (it carries `asteer_tinyworld.json`). Sources that only make sense
    for the tiny world (the template contrast banks) check this."""
    if str(path) == "tinyworld" or str(path).startswith("tinyworld:"):
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
