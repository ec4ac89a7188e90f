"""What the pipeline asks of a steered engine, as Protocols.

The pipeline (rollouts, the vectors stage, the executors) is typed against these rather
than against `SteeredEngine` / `AsyncSteeredEngine` themselves: the seam says which
methods a build relies on (and so what a future engine, e.g. one per vLLM major version
or a remote one, must offer), and importing it costs no torch or vLLM. The two classes
in `llm.py` are the implementations; tests/test_engine_inprocess.py holds them to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from .spec import CapturePair, CaptureSpec, CollectResult, SteerSpec

__all__ = ["SteeringEngine", "AsyncSteeringEngine"]


@runtime_checkable
class SteeringEngine(Protocol):
    """A synchronous engine with per-request steering and capture (`SteeredEngine`)."""

    num_layers: int
    hidden_size: int

    def register_vectors(self, vectors: Mapping[str, Any]) -> dict[str, str]: ...

    def get_tokenizer(self) -> Any: ...

    def generate(self, prompts: Any, sampling_params: Any = None,
                 steer: Sequence[SteerSpec | None] | None = None, *,
                 capture: Sequence[CaptureSpec | None] | None = None,
                 use_tqdm: bool = False,
                 **kwargs: Any) -> list[Any]: ...

    def decorate(self, sampling_params: Any, steer: SteerSpec | None,
                 capture: CaptureSpec | None) -> Any: ...

    def stream(self, submissions: Sequence[tuple[str, Any, Any]],
               on_output: Callable[[Any], Sequence[tuple[str, Any, Any]] | None]) -> None: ...

    def collect(self, pairs: Sequence[CapturePair]) -> list[CollectResult]: ...

    def pool_hidden(self, prompts: Sequence[Sequence[int]], layer: int, skip: int = 1, *,
                    with_norms: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        ...

    def shutdown(self) -> None: ...


@runtime_checkable
class AsyncSteeringEngine(Protocol):
    """The asyncio engine (`AsyncSteeredEngine`) for callers with an event loop."""

    num_layers: int
    hidden_size: int

    async def register_vectors(self, vectors: Mapping[str, Any]) -> dict[str, str]: ...

    def get_tokenizer(self) -> Any: ...

    async def generate_final(self, prompt: Any, sampling_params: Any,
                             steer: SteerSpec | None = None, request_id: str | None = None,
                             capture: CaptureSpec | None = None) -> Any: ...

    async def collect(self, pairs: Sequence[CapturePair]) -> list[CollectResult]: ...

    def shutdown(self) -> None: ...
