"""Runners execute an engine bundle on batches of tiles: ``runner(batch) -> probabilities``.

The interface is deliberately small so that every backend (torch, ONNX Runtime, OpenVINO, TensorRT) fits
behind it and passes one conformance suite (``tests/test_runner_conformance.py``):

* ``runner.device``: where ``batch`` must live and where the result comes back (a torch device);
* ``runner(batch)``: ``(B, C_in, H, W)`` float32 normalized tiles → ``(B, C_out, H, W)`` float32
  probabilities, ``B`` = ``spec.batch_size`` (callers pad the last batch: fixed shapes keep results
  independent of how tiles are grouped, and let compiled engines use one profile);
* ``runner.lock``: held around calls, so several blocks in flight share one device in turn.

Backends register by name and are imported only when asked for: ``import tilefeet`` never imports
onnxruntime or tensorrt. Tasks carry a :class:`RunnerSpec` (small, picklable), never a model; each
process builds its runner once (:func:`get_runner`).

``--backend auto`` is resolved where the network runs: a spec may keep ``backend="auto"``, and
:func:`get_runner` resolves it once per process (:func:`resolve_spec`, measured on *this* machine:
a cluster worker with a GPU picks a GPU backend though its client had none) and caches the runner
under the concrete spec. Every runner says what it is (:attr:`Runner.spec`, concrete) and why
(:attr:`Runner.reason`).

Process-wide state:

* the runner cache holds at most :data:`MAX_RUNNERS` runners (least recently used first out: a
  runner holds device memory). Eviction only drops the cache's reference, so a block still using
  an evicted runner finishes with it; :func:`clear_runners` is the one way to empty the cache and
  release device resources at once (call it when no run is in progress in the process);
* torch's process-wide knobs (intra-op thread count, cuDNN's TF32 and determinism flags) are only
  changed under :data:`TORCH_STATE_LOCK`, held for the whole call that needs them and restored when
  it returns, so two runners with different settings in one process never run under each other's,
  and a run leaves the process's settings as it found them.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..errors import BackendUnavailableError, ConfigError
from ..geometry import Pair
from ..profile import PROFILE

__all__ = [
    "BACKENDS",
    "MAX_RUNNERS",
    "TORCH_STATE_LOCK",
    "Runner",
    "RunnerSpec",
    "check_options",
    "clear_runners",
    "get_runner",
    "register",
    "resolve_spec",
    "runner_class",
]

#: Runners kept per process (least recently used leaves first). A run uses one; a worker serving
#: several jobs may alternate between a few.
MAX_RUNNERS = 4
#: Held while torch's process-wide state (thread count, cuDNN flags) is set and relied on.
TORCH_STATE_LOCK = threading.RLock()

#: backend name -> "module:Class", imported lazily
BACKENDS: dict[str, str] = {
    "torch": "tilefeet.runners.torch_runner:TorchRunner",
    "onnxruntime": "tilefeet.runners.onnxruntime_runner:OnnxRuntimeRunner",
    "openvino": "tilefeet.runners.openvino_runner:OpenVinoRunner",
    "tensorrt": "tilefeet.runners.tensorrt_runner:TensorRTRunner",
}


@dataclass(frozen=True)
class RunnerSpec:
    """A picklable recipe for a runner: what each task carries, and the key of the per-process cache."""

    engine: str  #: engine bundle folder
    backend: str = "torch"  #: a backend name, or "auto": chosen where the runner is built (:func:`resolve_spec`)
    device: str = "auto"  #: "auto", "cpu", "cuda", "cuda:1"
    precision: str = "fp32"  #: "fp32", "fp16", "bf16", or "auto": chosen where the runner is built
    batch_size: int = 4
    tile: Pair = (512, 512)
    options: tuple[tuple[str, Any], ...] = field(default=())  #: backend-specific, e.g. (("compile", True),)

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


class Runner(ABC):
    """Base class of every backend."""

    name: ClassVar[str] = "?"

    def __init__(self, bundle: Any, spec: RunnerSpec, reason: str = ""):
        allowed = getattr(bundle, "backends", None)
        if allowed is not None and self.name not in allowed:
            raise ConfigError(
                f"engine {bundle.name!r} holds a {bundle.network} network, which runs on {' or '.join(allowed)}, "
                f"not {self.name}; use --backend {allowed[0]} (or auto)"
            )
        check_tile = getattr(bundle, "check_tile", None)
        if check_tile is not None:
            check_tile(tuple(spec.tile))
        self.bundle = bundle
        self.spec = spec  #: the concrete recipe this runner was built from (never "auto")
        self.reason = reason or f"--backend {self.name} was requested"  #: why this backend runs
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


_cache: OrderedDict[RunnerSpec, Runner] = OrderedDict()
_resolved: dict[RunnerSpec, tuple[RunnerSpec, str]] = {}
_cache_lock = threading.RLock()


def resolve_spec(spec: RunnerSpec) -> tuple[RunnerSpec, str]:
    """``(concrete spec, reason)``: a spec whose backend or precision is "auto" becomes the backend
    (and its options) and precision chosen on *this* machine among those the bundle allows
    (:func:`.select.choose`: TensorRT, compiled torch on a GPU; the measured fastest of ONNX
    Runtime, OpenVINO and torch on a CPU, bf16 where the CPU runs it natively and it passes the
    accuracy guard). The spec's own options are kept over the chosen ones. A concrete spec is
    returned as it is."""
    if spec.backend != "auto" and spec.precision != "auto":
        return spec, f"--backend {spec.backend} was requested"
    from ..engine import load_engine
    from .select import choose

    bundle = load_engine(spec.engine)
    choice = choose(
        bundle, device=spec.device, precision=spec.precision, batch_size=spec.batch_size, tile=(spec.tile[0], spec.tile[1]),
        prefer=spec.backend,
    )
    merged = tuple(sorted({**dict(choice.options), **dict(spec.options)}.items()))
    return replace(spec, backend=choice.backend, options=merged, precision=choice.precision), choice.reason


def get_runner(spec: RunnerSpec) -> Runner:
    """The runner for ``spec`` in this process, built on first use and then shared by all tasks.
    An "auto" spec is resolved once per process (:func:`resolve_spec`) and served by the runner of
    its concrete spec."""
    with _cache_lock:
        if spec not in _resolved:
            with PROFILE.stage("runner"):
                _resolved[spec] = resolve_spec(spec)
        concrete, reason = _resolved[spec]
        runner = _cache.get(concrete)
        if runner is None:
            from ..engine import load_engine

            with PROFILE.stage("runner"):
                runner = runner_class(concrete.backend)(load_engine(concrete.engine), concrete, reason)
            _cache[concrete] = runner
            while len(_cache) > MAX_RUNNERS:
                _cache.popitem(last=False)  # dropped, not closed: a block may still be using it
        elif spec.backend == "auto" or spec.precision == "auto":
            runner.reason = reason  # built for an explicit request first: "auto" chose it, and says why
        _cache.move_to_end(concrete)
        return runner


def clear_runners() -> None:
    """Close every cached runner (device memory released now) and forget "auto" resolutions: the one
    way to reset this process's runners. Call it when no run is in progress in the process."""
    with _cache_lock:
        for r in _cache.values():
            with r.lock:
                r.close()
        _cache.clear()
        _resolved.clear()
