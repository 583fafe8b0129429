"""``--backend auto``: pick the fastest backend that works here, and say why.

In order:

1. TensorRT, when there is an NVIDIA GPU and the ``tensorrt`` package imports;
2. ``torch.compile`` on CUDA (eager torch if Triton, its GPU compiler, is missing);
3. on the CPU, the faster of ONNX Runtime and torch, *measured* on the bundle at the run's tile
   and batch size, once: the result is cached on disk under a key of the bundle's fingerprint,
   the shape, the precision, the CPU model, the thread count and the library versions.

Only backends the bundle's network allows take part (``EngineBundle.backends``: an ONNX graph runs
on ONNX Runtime and TensorRT, TorchScript on torch); on a GPU without TensorRT, a bundle torch
cannot run goes to ONNX Runtime's CUDA provider.

An explicitly requested backend is checked instead, and a missing library or GPU, or a backend the
bundle cannot use, is a one-line error that says what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import build_once, cache_dir
from ..device import resolve_device
from ..errors import BackendUnavailableError, ConfigError
from . import RunnerSpec, runner_class

Options = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Choice:
    backend: str
    options: Options
    reason: str

    def astuple(self) -> tuple[str, Options, str]:
        return self.backend, self.options, self.reason


def resolve_backend(
    bundle: Any,
    *,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 4,
    tile: tuple[int, int] = (512, 512),
    prefer: str = "auto",
    cache: Path | None = None,
) -> tuple[str, Options, str]:
    """``(backend, options, reason)`` for a run: ``prefer`` is the user's ``--backend`` ("auto", or a
    backend name, which is checked and kept). ``options`` go into :class:`RunnerSpec` unchanged."""
    dev = resolve_device(device)
    allowed = allowed_backends(bundle)
    if prefer != "auto":
        return check_backend(prefer, dev, precision, bundle=bundle).astuple()
    if dev.type == "cuda":
        return _on_gpu(dev, precision, allowed).astuple()
    return _on_cpu(bundle, precision, batch_size, (tile[0], tile[1]), cache or cache_dir(), allowed).astuple()


def allowed_backends(bundle: Any) -> tuple[str, ...]:
    """The backends that can run ``bundle``'s network (every registered one for objects that do not say)."""
    from . import BACKENDS

    return tuple(getattr(bundle, "backends", None) or BACKENDS)


def check_backend(backend: str, device: torch.device, precision: str, *, bundle: Any = None) -> Choice:
    """An explicitly requested backend, if it can run here; else a one-line error saying what to install."""
    from . import BACKENDS

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use auto or one of: {', '.join(sorted(BACKENDS))}")
    allowed = allowed_backends(bundle) if bundle is not None else tuple(BACKENDS)
    if backend not in allowed:
        raise ConfigError(
            f"engine {bundle.name!r} holds a {bundle.network} network, which runs on {' or '.join(allowed)}, not "
            f"{backend}; use --backend {allowed[0]} (or auto)"
        )
    reason = unavailable_reason(backend, device)
    if reason:
        raise BackendUnavailableError(reason)
    runs = _cpu_precisions().get(backend)
    if device.type == "cpu" and runs is not None and precision not in runs:
        alternative = CPU_CANDIDATES.get(precision, ())
        raise ConfigError(
            f"{backend} has no {precision} convolutions on the CPU; use --precision {' or '.join(runs)}"
            + (f", or --backend {alternative[0]}" if alternative else "")
        )
    return Choice(backend, (), f"--backend {backend} was requested")


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or ``None``; imports only that backend's library."""
    if backend == "tensorrt":
        from .tensorrt_runner import unavailable_reason as why

        return why(device)
    if backend == "onnxruntime":
        from .onnxruntime_runner import unavailable_reason as why

        return why(device)
    if backend == "openvino":
        from .openvino_runner import unavailable_reason as why

        return why(device)
    return None  # torch: resolve_device already checked the device


# ------------------------------------------------------------------------------------------ GPU


def _on_gpu(device: torch.device, precision: str, allowed: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")) -> Choice:
    gpu = torch.cuda.get_device_name(device)
    trt_reason = unavailable_reason("tensorrt", device) if "tensorrt" in allowed else "the network cannot use it"
    trt_version = None
    if trt_reason is None:
        from .tensorrt_runner import import_tensorrt

        trt_version = str(import_tensorrt().__version__)
    ort_reason = unavailable_reason("onnxruntime", device) if "torch" not in allowed else None
    return gpu_choice(
        gpu, precision, trt_version=trt_version, trt_reason=trt_reason, has_triton=_has_triton(), allowed=allowed,
        ort_reason=ort_reason,
    )


def gpu_choice(
    gpu: str,
    precision: str,
    *,
    trt_version: str | None,
    trt_reason: str | None,
    has_triton: bool,
    allowed: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt"),
    ort_reason: str | None = None,
) -> Choice:
    """The GPU half of the order (pure): TensorRT, else torch.compile, else eager torch; for a
    network torch cannot run (an ONNX graph), ONNX Runtime's CUDA provider after TensorRT."""
    if trt_version is not None and "tensorrt" in allowed:
        return Choice(
            "tensorrt", (), f"TensorRT {trt_version} and {gpu}: a compiled {precision} plan (built once, cached)"
        )
    why_not = f"no TensorRT ({trt_reason})"
    if "torch" not in allowed:
        if "onnxruntime" in allowed and ort_reason is None:
            return Choice("onnxruntime", (), f"{why_not}; ONNX Runtime's CUDA provider ({precision}) on {gpu}")
        raise BackendUnavailableError(f"no backend for this network on {gpu}: {why_not}; onnxruntime: {ort_reason}")
    if has_triton:
        return Choice("torch", (("compile", True),), f"{why_not}; torch.compile ({precision}) on {gpu}")
    return Choice(
        "torch",
        (),
        f"{why_not} and no Triton for torch.compile (pip install triton); eager torch ({precision}) on {gpu}",
    )


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


# ------------------------------------------------------------------------------------------ CPU


#: CPU backends that have kernels for each precision (torch has no fp16 convolutions on the CPU,
#: ONNX Runtime's CPU provider no bf16 ones).
CPU_CANDIDATES = {"fp32": ("onnxruntime", "torch"), "fp16": ("onnxruntime",), "bf16": ("torch",)}


def _cpu_precisions() -> dict[str, list[str]]:
    """backend -> precisions it runs on the CPU (the inverse of :data:`CPU_CANDIDATES`)."""
    out: dict[str, list[str]] = {}
    for precision, backends in CPU_CANDIDATES.items():
        for b in backends:
            out.setdefault(b, []).append(precision)
    return out


def _on_cpu(
    bundle: Any, precision: str, batch_size: int, tile: tuple[int, int], cache: Path, allowed: tuple[str, ...] = ()
) -> Choice:
    where = f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"
    candidates, skipped = [], []
    for backend in CPU_CANDIDATES.get(precision, ("torch",)):
        if allowed and backend not in allowed:
            skipped.append(f"{backend}: the engine's {getattr(bundle, 'network', '?')} network does not run on it")
            continue
        reason = unavailable_reason(backend, torch.device("cpu"))
        if reason:
            skipped.append(f"{backend}: {reason}")
        else:
            candidates.append(backend)
    if not candidates:
        raise BackendUnavailableError(f"no backend runs {precision} on the {where}: " + "; ".join(skipped))
    if len(candidates) == 1:
        why = "; ".join(skipped) or f"the only CPU backend with {precision} kernels"
        return Choice(candidates[0], (), f"{candidates[0]} on the {where} ({why})")
    timing = measured_timing(bundle, candidates, precision, batch_size, tile, cache)
    rates = timing["mpx_per_s"]
    best = max(candidates, key=lambda b: rates[b])
    versus = " vs ".join(f"{b} {rates[b]:.2f} Mpx/s" for b in sorted(candidates, key=lambda b: -rates[b]))
    return Choice(
        best,
        (),
        f"{best} is the faster on the {where}: {versus}, measured on {batch_size}×{tile[0]}×{tile[1]} tiles ({timing['path']})",
    )


def measured_timing(
    bundle: Any, backends: list[str], precision: str, batch_size: int, tile: tuple[int, int], cache: Path
) -> dict[str, Any]:
    """Mpx/s of each backend on this bundle and shape, measured on first use and then read from the
    cache. The measurement runs under the cache's file lock, so concurrent workers do not measure
    at once (which would also skew the numbers)."""
    key = timing_key(bundle, backends, precision, batch_size, tile)
    path = cache / "select" / f"{key[:24]}.json"

    def measure(tmp: Path) -> None:
        rates = {b: measure_mpx_per_s(b, bundle, precision, batch_size, tile) for b in backends}
        doc = {
            "mpx_per_s": rates,
            "shape": [batch_size, bundle.in_channels, *tile],
            "precision": precision,
            "cpu": cpu_model(),
            "bundle": bundle.fingerprint,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp.write_text(json.dumps(doc, indent=2) + "\n")

    build_once(path, measure)
    return {**json.loads(path.read_text()), "path": str(path)}


def timing_key(bundle: Any, backends: list[str], precision: str, batch_size: int, tile: tuple[int, int]) -> str:
    doc = {
        "bundle": bundle.fingerprint,
        "backends": sorted(backends),
        "precision": precision,
        "batch": batch_size,
        "tile": list(tile),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def measure_mpx_per_s(
    backend: str,
    bundle: Any,
    precision: str,
    batch_size: int,
    tile: tuple[int, int],
    *,
    min_seconds: float = 1.0,
    max_calls: int = 5,
) -> float:
    """Best-of-N throughput of one backend on the CPU (one warm-up call first)."""
    spec = RunnerSpec(
        engine=str(bundle.path), backend=backend, device="cpu", precision=precision, batch_size=batch_size, tile=tile
    )
    runner = runner_class(backend)(bundle, spec)
    x = torch.randn(batch_size, bundle.in_channels, *tile, generator=torch.Generator().manual_seed(0))
    runner(x)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < max_calls and (spent < min_seconds or calls < 2):
        t0 = time.perf_counter()
        runner(x)
        dt = time.perf_counter() - t0
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    runner.close()
    return batch_size * tile[0] * tile[1] / best / 1e6


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose speed the measurement compares (absent ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {"torch": str(torch.__version__)}
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript"):
        with contextlib.suppress(PackageNotFoundError):
            versions[dist] = version(dist)
    return versions
