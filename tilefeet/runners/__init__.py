"""Runners execute an engine bundle on batches of tiles: ``runner(batch) -> probabilities``.

The interface is deliberately small so that every backend (torch, ONNX Runtime, TensorRT) fits
behind it and passes one conformance suite (``tests/test_runner_conformance.py``):

* ``runner.device``: where ``batch`` must live and where the result comes back (a torch device);
* ``runner(batch)``: ``(B, C_in, H, W)`` float32 normalized tiles → ``(B, C_out, H, W)`` float32
  probabilities, ``B`` = ``spec.batch_size`` (callers pad the last batch: fixed shapes keep results
  independent of how tiles are grouped, and let compiled engines use one profile);
* ``runner.lock``: held around calls, so several blocks in flight share one device in turn.

Backends register by name and are imported only when asked for: ``import tilefeet`` never imports
onnxruntime or tensorrt. Tasks carry a :class:`RunnerSpec` (small, picklable), never a model; each
process builds its runner once (:func:`get_runner`).
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..artifacts import build_once, cache_dir
from ..device import resolve_device
from ..errors import BackendUnavailableError, ConfigError
from ..geometry import Pair

__all__ = [
    "BACKENDS",
    "Runner",
    "RunnerSpec",
    "build_once",
    "cache_dir",
    "check_options",
    "clear_runners",
    "get_runner",
    "register",
    "resolve_device",
    "runner_class",
]

#: backend name -> "module:Class", imported lazily
BACKENDS: dict[str, str] = {
    "torch": "tilefeet.runners.torch_runner:TorchRunner",
    "onnxruntime": "tilefeet.runners.onnxruntime_runner:OnnxRuntimeRunner",
    "tensorrt": "tilefeet.runners.tensorrt_runner:TensorRTRunner",
}


@dataclass(frozen=True)
class RunnerSpec:
    """A picklable recipe for a runner: what each task carries, and the key of the per-process cache."""

    engine: str  #: engine bundle folder
    backend: str = "torch"
    device: str = "auto"  #: "auto", "cpu", "cuda", "cuda:1"
    precision: str = "fp32"  #: "fp32", "fp16", "bf16"
    batch_size: int = 4
    tile: Pair = (512, 512)
    options: tuple[tuple[str, Any], ...] = field(default=())  #: backend-specific, e.g. (("compile", True),)

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


class Runner(ABC):
    """Base class of every backend."""

    name: ClassVar[str] = "?"

    def __init__(self, bundle: Any, spec: RunnerSpec):
        self.bundle = bundle
        self.spec = spec
        self.lock = threading.Lock()

    @property
    @abstractmethod
    def device(self) -> Any:  # torch.device
        """Where input batches must be and where outputs are returned."""

    @abstractmethod
    def __call__(self, batch: Any) -> Any:
        """``(B, C_in, H, W)`` float32 → ``(B, C_out, H, W)`` float32 probabilities, on :attr:`device`."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}, {self.spec.precision}, batch {self.spec.batch_size}"

    def close(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Release device resources (optional)."""


def check_options(spec: RunnerSpec, known: set[str]) -> None:
    """Reject options a backend does not know: a typo must not silently run something else."""
    unknown = {name for name, _ in spec.options} - known
    if unknown:
        raise ConfigError(f"unknown {spec.backend} runner option(s) {sorted(unknown)}; known: {sorted(known)}")


def register(name: str, target: str) -> None:
    """Make a backend available by name; ``target`` is ``"module:Class"``, imported on first use."""
    BACKENDS[name] = target


def runner_class(backend: str) -> type[Runner]:
    target = BACKENDS.get(backend)
    if target is None:
        raise ConfigError(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    module, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendUnavailableError(f"backend {backend!r} cannot be imported here ({e})") from None


_cache: dict[RunnerSpec, Runner] = {}
_cache_lock = threading.Lock()


def get_runner(spec: RunnerSpec) -> Runner:
    """The runner for ``spec`` in this process, built on first use and then shared by all tasks."""
    with _cache_lock:
        runner = _cache.get(spec)
        if runner is None:
            from ..engine import load_engine

            runner = runner_class(spec.backend)(load_engine(spec.engine), spec)
            _cache[spec] = runner
        return runner


def clear_runners() -> None:
    with _cache_lock:
        for r in _cache.values():
            r.close()
        _cache.clear()
