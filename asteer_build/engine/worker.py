"""The vLLM Worker subclass that carries steering (`worker_cls`).

A subclass, not a `worker_extension_cls`: steering must be installed when the model loads,
before compile and graph capture, and an extension may not override Worker methods. The
base class is the platform's own worker, chosen when vLLM imports this module inside the
worker process, so one qualified name serves CPU and GPU, in-process, multiprocess and
tensor-parallel engines alike. RPC methods are plain, string-named methods called through
`collective_rpc`, so nothing callable is ever pickled.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from . import adapters
from .capture_buffer import CaptureBuffer, PoolBuffer
from .spec import CONFIG_KEY, WORKER_CLS
from .steering import SteeringState, find_decoder_layers

logger = logging.getLogger("asteer.engine")


class _SteeringWorkerMixin:
    asteer: SteeringState | None = None
    asteer_capture: CaptureBuffer | None = None
    asteer_pool: PoolBuffer | None = None
    asteer_adapter: str = ""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)  # type: ignore[misc]
        self._asteer_install()

    def _asteer_install(self) -> None:
        runner = self.model_runner  # type: ignore[attr-defined]
        vcfg = self.vllm_config  # type: ignore[attr-defined]
        adapter = adapters.select(runner)
        extra = (getattr(vcfg, "additional_config", None) or {}).get(CONFIG_KEY, {})
        hf = vcfg.model_config.hf_text_config
        num_layers = int(hf.num_hidden_layers)
        layers_cfg = extra.get("layers")
        steer_layers = list(range(num_layers)) if layers_cfg is None else list(layers_cfg)
        bad = [x for x in steer_layers if not 0 <= int(x) < num_layers]
        if bad:
            raise ValueError(f"asteer: steer_layers {bad} out of range 0..{num_layers - 1}")
        max_seqs = vcfg.scheduler_config.max_num_seqs
        max_tokens = int(
            getattr(runner, "max_num_tokens", 0) or vcfg.scheduler_config.max_num_batched_tokens
        )
        sizes = getattr(vcfg.compilation_config, "cudagraph_capture_sizes", None) or [0]
        max_tokens = max(max_tokens, max(sizes)) + 8
        _check_prefix_salt(vcfg)
        graphs, why = adapters.graph_capture_possible(vcfg)
        eager = not graphs
        model = runner.get_model()
        state = SteeringState(
            num_layers=num_layers,
            hidden_size=int(vcfg.model_config.get_hidden_size()),
            steer_layers=[int(x) for x in steer_layers],
            capacity=int(extra.get("capacity") or 2 * max_seqs),
            max_num_tokens=max_tokens,
            dtype=vcfg.model_config.dtype,
            device=torch.device(runner.device),
            allow_python_branches=bool(eager),
        )
        capture = CaptureBuffer(
            num_layers=num_layers,
            hidden_size=state.hidden_size,
            max_rows=int(extra.get("capture_rows") or min(4 * max_seqs + 64, max_tokens)),
            max_num_tokens=max_tokens,
            dtype=state.dtype,
            device=state.device,
            allow_python_branches=bool(eager),
        )
        pool = PoolBuffer(
            hidden_size=state.hidden_size,
            slots=int(extra.get("pool_slots") or 4 * max_seqs),
            max_num_tokens=max_tokens,
            device=state.device,
            allow_python_branches=bool(eager),
        )
        blocks = find_decoder_layers(model, num_layers)
        # Hook order per block matters: state before steering, steering, state after.
        for layer, block in enumerate(blocks):
            if type(block).__name__ == "PPMissingLayer":
                continue  # another pipeline stage owns it
            if layer in state.slot_of_layer:
                block.register_forward_hook(capture.make_pre_hook(layer))
                block.register_forward_hook(state.make_hook(layer))
            block.register_forward_hook(capture.make_post_hook(layer))
            block.register_forward_hook(pool.make_hook(layer))
        adapter.install(runner, state, capture, pool)
        self.asteer = state
        self.asteer_capture = capture
        self.asteer_pool = pool
        self.asteer_adapter = adapter.NAME
        logger.info(
            "asteer: steering installed (%s adapter, layers %s, %d rows, %s hooks: %s)",
            adapter.NAME, state.steer_layers, state.capacity,
            "eager" if eager else "graph-safe", why,
        )

    # ---- RPC (collective_rpc by name) ---------------------------------------------------
    def asteer_register_vectors(self, vectors: dict[str, Any]) -> dict[str, str]:
        assert self.asteer is not None, "asteer steering is not installed in this worker"
        return self.asteer.register_vectors(vectors)

    def asteer_collect(self, pairs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Take the captures of (steered, replay) pairs, compute features on this device."""
        from .collect import collect_pairs

        assert self.asteer is not None and self.asteer_capture is not None
        out = collect_pairs(self.asteer, self.asteer_capture, pairs)
        return out if getattr(self, "rank", 0) == 0 else None

    def asteer_take_pooled(self, keys: list[str]) -> dict[str, bytes] | None:
        """Pooled prompt states (float32 bytes) by key; missing keys are left out."""
        assert self.asteer_pool is not None
        out = {}
        for key in keys:
            v = self.asteer_pool.take(key)
            if v is not None:
                out[key] = v.numpy().astype("<f4").tobytes()
        return out if getattr(self, "rank", 0) == 0 else None

    def asteer_info(self) -> dict[str, Any]:
        s = self.asteer
        assert s is not None, "asteer steering is not installed in this worker"
        return {
            "adapter": self.asteer_adapter,
            "steer_layers": s.steer_layers,
            "capacity": s.capacity,
            "hidden_size": s.hidden_size,
            "num_layers": s.num_layers,
            "live_requests": len(s.requests),
            "rows_in_use": s.capacity - len(s._free_rows),
            "rejected": s.rejected,
            "capture_rows": self.asteer_capture.max_rows if self.asteer_capture else 0,
            "captures_stored": len(self.asteer_capture.store) if self.asteer_capture else 0,
            "vectors": dict(s.vector_digest),
            "prefix_salt": _salt_installed(),
            "graph_safe_hooks": not s.allow_python_branches,
        }


def _salt_installed() -> bool:
    from .prefix_cache import installed

    return installed()


def _check_prefix_salt(vcfg: Any) -> None:
    """Refuse to serve steering with prefix caching on and no block-hash salt.

    The salt lives in the scheduler, i.e. the engine-core process. With one worker per
    engine (the uniprocess executor: one GPU, or vLLM's CPU backend) this worker runs in
    that process, so the check is exact; multiprocess workers are started by it with the
    same environment and installed packages, so the same answer holds there. The
    client checks before starting (`SteeredEngine`), this catches raw `vllm.LLM`
    engines with `worker_cls` set by hand.
    """
    from .prefix_cache import PLUGIN_MISSING, installed

    if getattr(vcfg.cache_config, "enable_prefix_caching", False) and not installed():
        raise RuntimeError(PLUGIN_MISSING.format(where=""))


def _platform_worker():
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    if current_platform.is_cuda_alike():
        from vllm.v1.worker.gpu_worker import Worker

        return Worker
    raise adapters.UnsupportedVLLMError(
        f"asteer: no steered worker for platform {current_platform.device_name!r}"
    )


class SteeredWorker(_SteeringWorkerMixin, _platform_worker()):  # type: ignore[misc]
    """The platform's vLLM worker plus per-request steering."""


assert WORKER_CLS == f"{__name__}.SteeredWorker"
