"""`SteeredEngine` and `AsyncSteeredEngine`: vLLM engines with per-request steering.

Thin layers in the style of `vllm.LLM`: they set `worker_cls` to the steered worker,
register vectors once over RPC, validate every request's `SteerSpec` on the client (so a
bad request fails alone with a clear message and the engine keeps serving), and put the
compact spec into each request's `SamplingParams.extra_args`.
"""

from __future__ import annotations

import copy
import gc
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import torch

from . import compat
from .capture_buffer import CAP_KEY, POOL_KEY
from .spec import (
    CONFIG_KEY,
    EXTRA_KEY,
    WORKER_CLS,
    CapturePair,
    CaptureSpec,
    CollectResult,
    SteerSpec,
    to_extra_args,
    validate,
)
from .startup import start_with_cause
from .steering import encode_vector, vector_digest


def _engine_kwargs(
    steer_layers: Sequence[int] | None, steer_capacity: int | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    if "worker_cls" in kwargs and kwargs["worker_cls"] not in ("auto", WORKER_CLS):
        raise ValueError(
            f"SteeredEngine sets worker_cls={WORKER_CLS!r}; got {kwargs['worker_cls']!r}"
        )
    kwargs["worker_cls"] = WORKER_CLS
    _check_plugin(kwargs)
    _cpu_memory_default(kwargs)
    extra = dict(kwargs.pop("additional_config", None) or {})
    cfg: dict[str, Any] = {}
    if steer_layers is not None:
        cfg["layers"] = [int(x) for x in steer_layers]
    if steer_capacity is not None:
        cfg["capacity"] = int(steer_capacity)
    extra[CONFIG_KEY] = cfg
    kwargs["additional_config"] = extra
    return kwargs


def _check_plugin(kwargs: dict[str, Any]) -> None:
    """Fail before starting an engine whose engine core would not salt steered KV.

    The engine-core process is started from this one and inherits its environment, so
    whether it loads the `asteer` plugin is decided here. (The worker checks again
    inside the engine.)
    """
    from .prefix_cache import PLUGIN_MISSING, plugin_will_load

    if kwargs.get("enable_prefix_caching") is False:
        return
    ok, why = plugin_will_load()
    if not ok:
        raise RuntimeError(PLUGIN_MISSING.format(where=why))


def _cpu_memory_default(kwargs: dict[str, Any]) -> None:
    """vLLM's CPU backend reserves `gpu_memory_utilization` (0.92) of one NUMA node for
    the KV cache by default, which fails on small machines; reserve 1 GiB unless told."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    if "gpu_memory_utilization" in kwargs or "kv_cache_memory_bytes" in kwargs:
        return
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    kwargs["kv_cache_memory_bytes"] = 1 << 30


class _VectorRegistry:
    """Client-side view of the vectors registered in the workers (name -> dim, digest)."""

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        self.entries: dict[str, tuple[int, str]] = {}

    def prepare(
        self, vectors: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
        """Validate on the client; returns the tensors and their RPC wire form."""
        out = {}
        for name, vec in vectors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"vector name must be a non-empty string, got {name!r}")
            t = torch.as_tensor(vec).detach().to(torch.float32).cpu().reshape(-1)
            if t.numel() != self.hidden:
                raise ValueError(
                    f"vector {name!r}: dimension {t.numel()}, model hidden size {self.hidden}"
                )
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"vector {name!r}: {bad} NaN or inf entries")
            out[name] = t
        return out, {k: encode_vector(t) for k, t in out.items()}

    def commit(
        self, tensors: dict[str, torch.Tensor], digests: list[dict[str, str]]
    ) -> dict[str, str]:
        """Record what every worker stored (checked by digest); returns name -> digest."""
        for name, t in tensors.items():
            d = vector_digest(t)
            for rank_digests in digests:
                if rank_digests.get(name) != d:
                    raise RuntimeError(f"vector {name!r}: a worker stored different content")
            self.entries[name] = (t.numel(), d)
        return {k: self.entries[k][1] for k in tensors}


class _SteeringClient:
    """What the sync and async engines share: validation and request decoration."""

    num_layers: int
    hidden_size: int
    _vectors: _VectorRegistry

    def _init_model_info(self, model_config: Any) -> None:
        hf = model_config.hf_text_config
        self.num_layers = int(hf.num_hidden_layers)
        self.hidden_size = int(model_config.get_hidden_size())
        self._vectors = _VectorRegistry(self.hidden_size)

    def _decorate(
        self,
        n: int,
        sampling_params: Any,
        steer: Sequence[SteerSpec | None] | None,
        capture: Sequence[CaptureSpec | None] | None = None,
    ) -> list[Any]:
        from vllm import SamplingParams

        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * n
        else:
            params = list(sampling_params)
            if len(params) != n:
                raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
        if steer is None:
            steer = [None] * n
        steer = list(steer)
        if len(steer) != n:
            raise ValueError(f"got {len(steer)} steer specs for {n} prompts")
        specs = [
            validate(s, i, self._vectors.entries, self.num_layers, self.hidden_size)
            for i, s in enumerate(steer)
        ]
        caps = list(capture) if capture is not None else [None] * n
        if len(caps) != n:
            raise ValueError(f"got {len(caps)} capture specs for {n} prompts")
        for i, cap in enumerate(caps):
            if cap is not None and not isinstance(cap, CaptureSpec):
                raise TypeError(f"capture[{i}]: expected CaptureSpec or None, "
                                f"got {type(cap).__name__}")
        out = []
        for sp, spec, cap in zip(params, specs, caps, strict=True):
            if spec is None and cap is None:
                out.append(sp)
                continue
            sp = copy.copy(sp)
            extra = dict(sp.extra_args or {})
            if spec is not None:
                extra[EXTRA_KEY] = to_extra_args(spec, self._vectors.entries[spec.vector][1])
            if cap is not None:
                extra[CAP_KEY] = cap.to_wire()
            sp.extra_args = extra
            out.append(sp)
        return out

    def _pairs_wire(self, pairs: Sequence[CapturePair]) -> list[dict[str, Any]]:
        """Checked against the model here, since a layer past its depth would fail
        inside the worker instead of naming the pair."""
        out = []
        for i, p in enumerate(pairs):
            if not isinstance(p, CapturePair):
                raise TypeError(f"pairs[{i}]: expected CapturePair, got {type(p).__name__}")
            top = p.layer + p.offsets[-1]
            if top >= self.num_layers:
                raise ValueError(
                    f"pairs[{i}] ({p.steered}): layer {p.layer} + offset {p.offsets[-1]} = "
                    f"{top} is past the model's last block {self.num_layers - 1}")
            out.append(p.to_wire())
        return out


class SteeredEngine(_SteeringClient):
    """A `vllm.LLM` whose requests can each carry their own `SteerSpec`.

    Example::

        eng = SteeredEngine(path, dtype="float32", enforce_eager=True)
        eng.register_vectors({"ocean": v})
        outs = eng.generate(prompts, SamplingParams(max_tokens=64),
                            steer=[SteerSpec("ocean", 4.0, layer=2), None])
    """

    def __init__(
        self,
        model: str,
        *,
        steer_layers: Sequence[int] | None = None,
        steer_capacity: int | None = None,
        **engine_args: Any,
    ) -> None:
        compat.check_vllm()
        from vllm import LLM

        kwargs = _engine_kwargs(steer_layers, steer_capacity, engine_args)
        self.llm = start_with_cause(lambda: LLM(model, **kwargs))
        self._init_model_info(self.llm.llm_engine.model_config)
        _freeze_heap()

    def register_vectors(self, vectors: dict[str, Any]) -> dict[str, str]:
        """Send vectors to every worker once; later requests refer to them by name."""
        tensors, wire = self._vectors.prepare(vectors)
        digests = self.llm.collective_rpc("asteer_register_vectors", args=(wire,))
        return self._vectors.commit(tensors, digests)

    @property
    def vectors(self) -> dict[str, tuple[int, str]]:
        return dict(self._vectors.entries)

    def info(self) -> list[dict[str, Any]]:
        """Per-worker steering state (adapter, rows in use, rejected requests...)."""
        return self.llm.collective_rpc("asteer_info")

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        steer: Sequence[SteerSpec | None] | None = None,
        *,
        capture: Sequence[CaptureSpec | None] | None = None,
        use_tqdm: bool = False,
        **kwargs: Any,
    ):
        """Like `vllm.LLM.generate`, plus one `SteerSpec` (or None) per prompt.

        `capture`, per prompt, asks the worker to keep the residual stream at decode
        steps (a `CaptureSpec`, see `capture_buffer.py`); fetch it with `collect`.
        """
        single = isinstance(prompts, str | dict)
        plist = [prompts] if single else list(prompts)
        params = self._decorate(len(plist), sampling_params, steer, capture)
        return self.llm.generate(plist, params, use_tqdm=use_tqdm, **kwargs)

    def collect(self, pairs: Sequence[CapturePair]) -> list[CollectResult]:
        """Take captured (steered, replay) pairs from the workers, with features."""
        wire = self._pairs_wire(pairs)
        got = self.llm.collective_rpc("asteer_collect", args=(wire,))[0]
        return [CollectResult.from_wire(g) for g in got]

    def stream(self, submissions, on_output) -> None:
        """Run requests step by step; `on_output(out)` may return more to submit.

        `submissions` and the callback's return value are `(request_id, prompt, params)`
        tuples with params already decorated (`decorate`). This is how a rollout's
        replay joins the running batch as soon as the rollout has its first tokens,
        instead of waiting for the whole batch to finish.
        """
        core = self.llm.llm_engine
        live: set[str] = set()
        try:
            for rid, prompt, params in submissions:
                core.add_request(rid, prompt, params)
                live.add(rid)
            while core.has_unfinished_requests():
                for out in core.step():
                    if out.finished:
                        live.discard(out.request_id)
                    for rid, prompt, params in on_output(out) or ():
                        core.add_request(rid, prompt, params)
                        live.add(rid)
        finally:
            if live:
                core.abort_request(list(live))

    def decorate(self, sampling_params: Any, steer: SteerSpec | None,
                 capture: CaptureSpec | None):
        """One request's SamplingParams with its steering and capture specs (validated)."""
        return self._decorate(1, sampling_params, [steer], [capture])[0]

    def pool_hidden(
        self, prompts: Sequence[Sequence[int]], layer: int, skip: int = 1, *,
        with_norms: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Mean residual stream after block `layer` over each prompt's tokens at positions
        >= `skip` (reference: all but position 0), as `[n, hidden]` float32; with
        `with_norms` also each prompt's mean token L2 norm over the same positions, `[n]`.

        One prefill-only request per prompt, pooled on the device; the vectors stage runs
        contrast banks through this at vLLM speed.
        """
        from vllm import SamplingParams

        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        nonce = uuid.uuid4().hex[:8]
        keys = [f"pool:{nonce}:{i}" for i in range(len(prompts))]
        for i, p in enumerate(prompts):
            if len(p) <= skip:
                raise ValueError(f"prompts[{i}]: {len(p)} tokens, need more than skip={skip}")
        params = []
        base = SamplingParams(max_tokens=1, temperature=0.0)
        for key in keys:
            sp = copy.copy(base)
            sp.extra_args = {POOL_KEY: {"key": key, "layer": int(layer), "skip": int(skip)}}
            params.append(sp)
        # Salted so no prefix hit skips computing (and pooling) a shared prefix.
        inputs = [{"prompt_token_ids": list(p), "cache_salt": k} for p, k in zip(
            prompts, keys, strict=True)]
        self.llm.generate(inputs, params, use_tqdm=False)
        got = self.llm.collective_rpc("asteer_take_pooled", args=(keys,))[0]
        missing = [k for k in keys if k not in got]
        if missing:
            raise RuntimeError(f"asteer: {len(missing)} pooled states missing")
        rows = np.stack([np.frombuffer(got[k], dtype="<f4") for k in keys])
        means = rows[:, :-1].copy()
        return (means, rows[:, -1].copy()) if with_norms else means

    def shutdown(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        # What any engine of this process held can be collected again (frozen, cyclic
        # garbage would outlive it: an in-process engine's KV cache among it).
        gc.unfreeze()


class AsyncSteeredEngine(_SteeringClient):
    """The same on vLLM's `AsyncLLM`, for asyncio callers (a server, a notebook); the
    builder's executors drive `SteeredEngine` through `pipeline.feed`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._init_model_info(engine.model_config)

    @classmethod
    def from_args(
        cls,
        model: str,
        *,
        steer_layers: Sequence[int] | None = None,
        steer_capacity: int | None = None,
        **engine_args: Any,
    ) -> AsyncSteeredEngine:
        compat.check_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model, **_engine_kwargs(steer_layers, steer_capacity, engine_args)
        )
        return cls(start_with_cause(lambda: AsyncLLM.from_engine_args(args)))

    def get_tokenizer(self):
        """The engine's tokenizer (the client side re-tokenizes text for the authors'
        replay, `capture.replay: authors`)."""
        return self.engine.get_tokenizer()

    async def register_vectors(self, vectors: dict[str, Any]) -> dict[str, str]:
        tensors, wire = self._vectors.prepare(vectors)
        digests = await self.engine.collective_rpc("asteer_register_vectors", args=(wire,))
        return self._vectors.commit(tensors, digests)

    async def generate(
        self,
        prompt: Any,
        sampling_params: Any,
        steer: SteerSpec | None = None,
        request_id: str | None = None,
        capture: CaptureSpec | None = None,
    ) -> AsyncIterator[Any]:
        """Yield vLLM `RequestOutput`s for one request (the last one is final)."""
        (params,) = self._decorate(1, sampling_params, [steer], [capture])
        rid = request_id or uuid.uuid4().hex
        async for out in self.engine.generate(prompt, params, rid):
            yield out

    async def generate_final(
        self, prompt: Any, sampling_params: Any, steer=None, request_id=None, capture=None
    ):
        """The request's final output only, asked for as `FINAL_ONLY`: with the default
        (cumulative) kind AsyncLLM builds a growing `RequestOutput` at every step and
        wakes the caller's coroutine for each, which a caller that reads only the last
        one does not need."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling_params = copy.copy(sampling_params or SamplingParams())
        sampling_params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for out in self.generate(prompt, sampling_params, steer, request_id, capture):
            final = out
        return final

    async def collect(self, pairs: Sequence[CapturePair]) -> list[CollectResult]:
        wire = self._pairs_wire(pairs)
        got = (await self.engine.collective_rpc("asteer_collect", args=(wire,)))[0]
        return [CollectResult.from_wire(g) for g in got]

    def shutdown(self) -> None:
        self.engine.shutdown()


def _freeze_heap() -> None:
    """Move what the start left (vLLM, torch, the model's config and tokenizer: millions
    of objects that live as long as the engine) out of the collector's sight, as vLLM's
    own engine core and API server do after start-up (`freeze_gc_heap`). The `LLM` front
    end does not, and its process's full collections then walk them all: measured in the
    demo build's driver, full collections of 0.13-0.45 s, growing with the heap, one of
    them mid-generation, which stall the engine's feed and, streaming, the judge beside
    it. `shutdown` undoes it."""
    gc.collect()
    gc.freeze()


def default_cpu_engine_args() -> dict[str, Any]:
    """Engine arguments that work for the tiny world on vLLM's CPU backend."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return {"enforce_eager": True, "max_model_len": 1024, "seed": 0}
