"""The Hugging Face reference: the same steering with `transformers` and forward hooks.

This is how the reference authors generated their testbed (`generate()` plus a hook that
adds `alpha * v` at the output of block L, batch 8). Here it is the correctness oracle
for the vLLM engine and the baseline its benchmarks compare against. Batches are left
padded, so the last prompt token of every row sits at the same padded index and position
modes are per-row masks on HF's own (padding-aware) `position_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .spec import SteerSpec, steer_start


class HFReference:
    """A `transformers` causal LM with per-row steering hooks."""

    def __init__(
        self,
        model_path: str,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        attn_implementation: str | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if attn_implementation is None:
            # SDPA has no soft-capping, and transformers then silently drops Gemma 2's
            # attention cap: an oracle must compute the model as defined, so eager.
            cfg = AutoConfig.from_pretrained(model_path)
            capped = getattr(cfg, "attn_logit_softcapping", None) is not None
            attn_implementation = "eager" if capped else "sdpa"
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attn_implementation
        ).to(device)
        self.model.eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.vectors: dict[str, torch.Tensor] = {}
        self.layers = self.model.model.layers
        self.pad_id = self.tokenizer.pad_token_id

    def register_vectors(self, vectors: dict[str, Any]) -> None:
        for name, v in vectors.items():
            self.vectors[name] = torch.as_tensor(v, dtype=torch.float32).reshape(-1)

    @contextmanager
    def steering(self, specs: Sequence[SteerSpec | None], prompt_lens: Sequence[int]):
        """Hooks adding each row's delta at its layer and positions for one batch."""
        hidden = self.model.config.hidden_size
        by_layer: dict[int, list[int]] = {}
        for i, s in enumerate(specs):
            if s is not None:
                by_layer.setdefault(s.layer, []).append(i)
        handles = []
        for layer, rows in by_layer.items():
            delta = torch.zeros(len(specs), 1, hidden, dtype=torch.float32)
            start = torch.full((len(specs), 1), 1 << 30, dtype=torch.long)
            for i in rows:
                s = specs[i]
                delta[i, 0] = float(s.alpha) * self.vectors[s.vector]
                start[i, 0] = steer_start(s.positions, prompt_lens[i])
            delta = delta.to(self.device, self.dtype)
            start = start.to(self.device)

            def hook(module, args, kwargs, output, delta=delta, start=start):
                h = output[0] if isinstance(output, tuple) else output
                pos = kwargs["position_ids"].to(self.device)
                mask = (pos >= start).unsqueeze(-1).to(h.dtype)
                h = h + delta * mask
                return (h, *output[1:]) if isinstance(output, tuple) else h

            handles.append(self.layers[layer].register_forward_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _pad(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, width - len(x) :] = torch.tensor(list(x), dtype=torch.long)
            mask[i, width - len(x) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        steer: Sequence[SteerSpec | None] | None = None,
        *,
        max_new_tokens: int = 16,
        batch_size: int = 8,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[list[int]]:
        """New token ids per prompt; never stops at EOS (like vLLM's `ignore_eos`)."""
        steer = list(steer) if steer is not None else [None] * len(prompts)
        out: list[list[int]] = []
        if seed is not None:
            torch.manual_seed(seed)
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b : b + batch_size]
            specs = steer[b : b + batch_size]
            ids, mask = self._pad(batch)
            sample = temperature > 0
            with self.steering(specs, [len(x) for x in batch]):
                gen = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_k=0 if sample else None,
                    top_p=1.0 if sample else None,
                    eos_token_id=None,
                    pad_token_id=self.pad_id,
                )
            out.extend(row[ids.shape[1] :].tolist() for row in gen)
        return out

    @torch.no_grad()
    def residual_stream(
        self,
        token_ids: Sequence[int],
        spec: SteerSpec | None,
        layers: Sequence[int],
        prompt_len: int | None = None,
    ) -> dict[int, torch.Tensor]:
        """The residual stream after each block in `layers` for one sequence: [T, hidden].

        `prompt_len` places the position modes' window when `token_ids` continues past
        the prompt (prompt + generated tokens); it defaults to the whole sequence.
        """
        ids, mask = self._pad([token_ids])
        got: dict[int, torch.Tensor] = {}
        with self.steering([spec], [prompt_len or len(token_ids)]):
            # Read block outputs with hooks registered after the steering hooks (so they
            # see the steered stream), not `output_hidden_states`, whose last entry has
            # the final norm applied: vLLM's stream is pre-norm everywhere.
            handles = [
                self.layers[layer].register_forward_hook(
                    lambda mod, args, out, layer=layer: got.__setitem__(
                        layer, (out[0] if isinstance(out, tuple) else out)[0].float().cpu()
                    )
                )
                for layer in layers
            ]
            try:
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
        return got
