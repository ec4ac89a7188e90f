"""The tiny world's model folders: a seeded random model of a real Hugging Face class and
a byte-level BPE tokenizer trained on the built-in corpus, written offline, atomically,
and cached under a hash of everything that determines their bytes (`TinyWorldSpec`), so
every test process and the demo reuse the same files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ...core import atomic
from ...core.paths import cache_dir
from .text import ARCH_CHATS, ARCH_STOPS, SPECIAL_TOKENS, TINY_CHAT, Chat, corpus

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
    #: None: as above. A number s: the input embeddings and every block's output
    #: projections (attention `o_proj`, MLP `down_proj`) times s, the output embeddings
    #: untied at their unscaled values. Each block reads its input through an RMSNorm, so
    #: the residual stream is s times that of the same seed at s = None and the logits
    #: (after the final RMSNorm) are the same, up to the norms' epsilon: a model whose
    #: stream is s times larger, for `benchmarks/alpha_units.py`
    stream_scale: float | None = None

    def record(self) -> dict:
        """The fields that name and describe the folder (`stream_scale` only when set,
        so folders written before it existed keep their names)."""
        fields = asdict(self)
        if fields["stream_scale"] is None:
            del fields["stream_scale"]
        return fields

    def key(self) -> str:
        payload = json.dumps({**self.record(), "format": FORMAT_VERSION}, sort_keys=True)
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


def _write_tokenizer(spec: TinyWorldSpec, out: Path, chat: Chat = TINY_CHAT) -> None:
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
    tok.train_from_iterator(corpus(spec.seed), trainer=trainer)
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
        tie_word_embeddings=spec.stream_scale is None,
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
        emb = model.get_input_embeddings().weight
        emb.mul_(spec.embed_scale)
        if spec.stream_scale is not None:
            model.get_output_embeddings().weight.copy_(emb)  # untied, unscaled
            emb.mul_(spec.stream_scale)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(spec.stream_scale)
                layer.mlp.down_proj.weight.mul_(spec.stream_scale)
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
            json.dumps({**spec.record(), "format": FORMAT_VERSION}, indent=2)
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
# template shaped like the real family's (`text.ARCH_CHATS`), on the tiny world's own
# tokenizer.

ARCHS = ("qwen3", "gemma2", "llama3")

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
        eos_token_id=[ids[t] for t in ARCH_STOPS[arch]],
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
    chat = ARCH_CHATS[arch]
    root = Path(root) if root else cache_dir() / "tinyworld"
    payload = json.dumps({**spec.record(), "arch": arch, "format": FORMAT_VERSION},
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
