"""Prompt rendering: the one place a chat turn becomes token ids.

A steerability predictor only transfers to prompts rendered exactly as its training
rollouts were: on a template with a thinking switch (Qwen3) one option changes every
prompt's tail (`<think>\\n\\n</think>\\n\\n` or nothing). So the build, the contrast-bank
writer, the online probe (`asteer-train suggest --live`), the benchmarks and the tests
all call `render_ids` here, with the options of one `PromptFormat`: the config's
`prompt_format:` section, recorded in `build.json` and read back from it by `train` and
`suggest` (`PromptFormat.from_build`), never decided again.

Light on purpose (judge and train import `core`): transformers is imported only when a
tokenizer is loaded by path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_CHAT_TEMPLATE_KWARGS", "PromptFormat", "load_tokenizer", "prompt_ids",
           "render_ids", "user_turn"]

#: thinking off where the template knows the switch (Qwen3); templates without it ignore
#: the variable, so their prompts are the same either way
DEFAULT_CHAT_TEMPLATE_KWARGS: Mapping[str, Any] = {"enable_thinking": False}

#: arguments of `apply_chat_template` the renderer sets itself: passing them through the
#: template's variables would change what a "prompt" is (text instead of ids, no
#: generation prompt), so the config may not
_RESERVED = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def _json_value(v: Any, where: str) -> Any:
    """A template variable: JSON-like only, so `build.json` records it exactly."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_json_value(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, Mapping):
        return {str(k): _json_value(x, f"{where}.{k}") for k, x in v.items()}
    raise ValueError(f"{where}: expected a JSON value (string, number, boolean, list, "
                     f"mapping or null) (got {v!r})")


@dataclass(frozen=True)
class PromptFormat:
    """How a user turn is rendered: the model's own chat template with a generation
    prompt, no system prompt, and `chat_template_kwargs` as extra template variables
    (vLLM's server calls them the same)."""

    chat_template_kwargs: Mapping[str, Any] = field(
        default_factory=lambda: dict(DEFAULT_CHAT_TEMPLATE_KWARGS))

    @classmethod
    def parse(cls, raw: Any, where: str = "prompt_format") -> PromptFormat:
        """The config section; errors name the field and the value. An absent section
        (None) is the default."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected a mapping (got {raw!r})")
        unknown = [k for k in raw if k != "chat_template_kwargs"]
        # not core.fields: train imports this module, whose imports stay as light as
        # tests/test_train_model.py allows
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown field (known: "
                             "chat_template_kwargs)")
        kw = raw.get("chat_template_kwargs", DEFAULT_CHAT_TEMPLATE_KWARGS)
        w = f"{where}.chat_template_kwargs"
        if kw is None:
            kw = {}
        if not isinstance(kw, Mapping):
            raise ValueError(f"{w}: expected a mapping of template variables (got {kw!r})")
        out = {}
        for k, v in kw.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise ValueError(f"{w}: template variable names are identifiers (got {k!r})")
            if k in _RESERVED:
                raise ValueError(f"{w}.{k}: set by the renderer, not a template variable "
                                 f"(got {v!r})")
            out[k] = _json_value(v, f"{w}.{k}")
        return cls(out)

    @classmethod
    def from_build(cls, build: Mapping[str, Any] | None) -> PromptFormat:
        """The format a build rendered its prompts with, from its `build.json` (a run
        folder's or a published dataset's). A build.json without the record was written
        before it existed, when every build rendered with the default."""
        rec = (build or {}).get("prompt_format")
        if rec is None:
            rec = ((build or {}).get("config") or {}).get("prompt_format")
        return cls.parse(rec, "prompt_format")

    def as_dict(self) -> dict[str, Any]:
        return {"chat_template_kwargs": dict(self.chat_template_kwargs)}

    @property
    def is_default(self) -> bool:
        return dict(self.chat_template_kwargs) == dict(DEFAULT_CHAT_TEMPLATE_KWARGS)


def user_turn(prompt: str) -> list[dict[str, str]]:
    """One user message, no system prompt (the reference testbed's setting)."""
    return [{"role": "user", "content": prompt}]


def render_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
               fmt: PromptFormat | None = None) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, generation prompt
    added. `tokenizer`: a transformers tokenizer or vLLM's (`engine.get_tokenizer()`)."""
    kwargs = dict((fmt or PromptFormat()).chat_template_kwargs)
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                        tokenize=True, return_dict=False, **kwargs)
    return [int(x) for x in ids]


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """A model folder's (or Hub id's) tokenizer, loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer: Any, prompt: str, fmt: PromptFormat | None = None) -> list[int]:
    """A user turn's prompt ids; `tokenizer` may be a model path (loaded once)."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    return render_ids(tok, user_turn(prompt), fmt)
