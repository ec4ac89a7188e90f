"""The tiny world's text: the words its tokenizer learns whole (concept words the rules
judge and the template banks look for, filler words for ordinary answers), the corpus it
is trained on, and the chat templates and special tokens of the tiny Llama and of the
paper's three families in miniature (written into their tokenizers by `models`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

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


def corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(4, 16)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice([".", "?", "!"]))
    # Words seen in isolation too, so each becomes one token with its leading space.
    lines.extend(" " + w for w in WORDS for _ in range(20))
    return lines


@dataclass(frozen=True)
class Chat:
    """A tokenizer's special tokens and chat template (the tiny world's or a real family's)."""

    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    template: str


TINY_CHAT = Chat(tuple(SPECIAL_TOKENS), "<|bos|>", "<|eos|>", "<|pad|>", CHAT_TEMPLATE)


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

ARCH_CHATS = {
    "qwen3": Chat(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        None, "<|im_end|>", "<|endoftext|>", _QWEN3_TEMPLATE,
    ),
    "gemma2": Chat(
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>", "<eos>", "<pad>", _GEMMA2_TEMPLATE,
    ),
    "llama3": Chat(
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|finetune_right_pad_id|>"),
        "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", _LLAMA3_TEMPLATE,
    ),
}
# Tokens that end a turn (the generation config's EOS list, as in the real models).
ARCH_STOPS = {
    "qwen3": ("<|im_end|>", "<|endoftext|>"),
    "gemma2": ("<eos>", "<end_of_turn>"),
    "llama3": ("<|end_of_text|>", "<|eot_id|>"),
}
