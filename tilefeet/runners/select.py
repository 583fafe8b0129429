"""``--backend auto`` and ``--precision auto``: pick the fastest backend (and precision) that works
here, and say why.

In order:

1. TensorRT, when there is an NVIDIA GPU and the ``tensorrt`` package imports;
2. eager torch (channels-last) on CUDA; ``torch.compile`` is opt-in there (:data:`EAGER_ON_GPU`);
3. on the CPU, the fastest of ONNX Runtime, OpenVINO and torch, *measured* on the bundle at the
   run's tile and batch size, once: the result is cached on disk under a key of the bundle's
   fingerprint, the shape, the precisions, the CPU model, the thread count and the library versions.

``--precision auto`` (the default) is fp16 on a GPU with tensor cores where the engine's accuracy
guard passes at fp16 on that GPU (:func:`gpu_precision`), else fp32. On a CPU that runs bf16 natively (AMX or
AVX-512 bf16: :func:`native_bf16`), the bf16 kernels of OpenVINO and torch are measured beside the
fp32 ones; so is OpenVINO's int8 graph (:mod:`.quantize`) where OpenVINO has int8 kernels and the
engine carries at least two check slices. A reduced-precision candidate faster than the fastest
fp32 one is chosen only if it passes the accuracy guard (:mod:`.guard`: checked once on the engine's
check slices: held-out F1 within 0.002 of fp32's, labels and objects that agree with fp32's); the
fastest that passes wins. An engine without check data runs fp32.

Only backends the bundle's network allows take part (``EngineBundle.backends``: an ONNX graph runs
on ONNX Runtime, OpenVINO and TensorRT, TorchScript on torch); on a GPU without TensorRT, a bundle
torch cannot run goes to ONNX Runtime's CUDA provider. A backend that cannot load here (OpenVINO on
a machine without its wheel) is left out, with its one-line reason in the choice's reason.

An explicitly requested backend is checked instead, and a missing library or GPU, or a backend the
bundle cannot use, is a one-line error that says what to do; with ``--precision auto`` its precision
is chosen as above, among that backend's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
from dataclasses import dataclass, replace
from functools import lru_cache
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
    precision: str = "fp32"  #: the concrete precision (``--precision auto`` resolved)

    def astuple(self) -> tuple[str, Options, str]:
        return self.backend, self.options, self.reason


def choose(
    bundle: Any,
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 4,
    tile: tuple[int, int] = (512, 512),
    prefer: str = "auto",
    cache: Path | None = None,
) -> Choice:
    """The backend, its options and the precision for a run, and why: ``prefer`` is the user's
    ``--backend`` ("auto", or a backend name, which is checked and kept), ``precision`` the user's
    ``--precision`` ("auto", or a precision, which is kept)."""
    choice = _choose(bundle, device, precision, batch_size, (tile[0], tile[1]), prefer, cache or cache_dir())
    return replace(choice, reason=f"{choice.reason}; {INT8_NOTE}") if precision == "int8" else choice


def _choose(bundle: Any, device: str, precision: str, batch_size: int, tile: tuple[int, int], prefer: str, cache: Path) -> Choice:
    dev = resolve_device(device)
    allowed = allowed_backends(bundle)
    if dev.type == "cuda":

        def pick(p: str) -> Choice:
            return replace(check_backend(prefer, dev, p, bundle=bundle) if prefer != "auto" else _on_gpu(dev, p, allowed), precision=p)

        if precision == "int8":
            raise ConfigError("--precision int8 runs on the CPU (OpenVINO); on a GPU use fp16 or bf16 (or auto)")
        if precision != "auto":
            return pick(precision)
        backend = pick(GPU_REDUCED).backend
        concrete, why = gpu_precision(bundle, dev, backend, batch_size, cache)
        choice = pick(concrete)
        return replace(choice, reason=f"{choice.reason}; {why}")
    if prefer != "auto":
        if precision != "auto":
            return replace(check_backend(prefer, dev, precision, bundle=bundle), precision=precision)
        check_backend(prefer, dev, "fp32", bundle=bundle)
        return _on_cpu(bundle, precision, batch_size, tile, cache, (prefer,), requested=prefer)
    return _on_cpu(bundle, precision, batch_size, tile, cache, allowed)


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
    """``(backend, options, reason)`` for a run at a given precision (:func:`choose` also resolves
    ``--precision auto``, and says which precision it chose)."""
    choice = choose(bundle, device=device, precision=precision, batch_size=batch_size, tile=tile, prefer=prefer, cache=cache)
    return choice.astuple()


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
    if device.type == "cpu" and precision == "int8" and backend != "openvino":
        why = "its int8 graph ran slower than OpenVINO's here" if backend == "onnxruntime" else "it has no int8 path in tilefeet"
        raise ConfigError(
            f"tilefeet runs int8 on openvino, not {backend} ({why}); use --backend openvino, "
            f"or --precision {' or '.join(runs or ['fp32'])}"
        )
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
    return gpu_choice(gpu, precision, trt_version=trt_version, trt_reason=trt_reason, allowed=allowed, ort_reason=ort_reason)


def gpu_choice(
    gpu: str,
    precision: str,
    *,
    trt_version: str | None,
    trt_reason: str | None,
    allowed: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt"),
    ort_reason: str | None = None,
) -> Choice:
    """The GPU half of the order (pure): TensorRT, else eager torch; for a network torch cannot run
    (an ONNX graph), ONNX Runtime's CUDA provider after TensorRT."""
    if trt_version is not None and "tensorrt" in allowed:
        return Choice(
            "tensorrt", (), f"TensorRT {trt_version} and {gpu}: a compiled {precision} plan (built once, cached)"
        )
    why_not = f"no TensorRT ({trt_reason})"
    if "torch" not in allowed:
        if "onnxruntime" in allowed and ort_reason is None:
            return Choice("onnxruntime", (), f"{why_not}; ONNX Runtime's CUDA provider ({precision}) on {gpu}")
        raise BackendUnavailableError(f"no backend for this network on {gpu}: {why_not}; onnxruntime: {ort_reason}")
    return Choice("torch", (), f"{why_not}; eager torch ({precision}, channels-last) on {gpu}; {EAGER_ON_GPU}")


#: Why ``auto`` runs eager torch on a GPU, not torch.compile. Measured on an H200 (isbi-membrane):
#: compiling took 15.1 s in a fresh process, while a whole gigapixel section took 9.54 s with eager
#: fp16, 8.75 s of it the pipeline around the network (the run with a near-free network), so a
#: faster network could save at most 8 % there. Worth it only for jobs of many gigapixels per process.
EAGER_ON_GPU = (
    "torch.compile is opt-in (--backend-option compile=true): on an H200 it took 15 s to build per process, "
    "more than a faster network saves on a section bound by the CPU work around it"
)


#: The reduced precision ``--precision auto`` considers on a GPU: on tensor cores fp16 runs at bf16's
#: rate with 3 more mantissa bits (H200, isbi-membrane: fp16 739 Mpx/s, relative error 2.1e-3; bf16
#: 593 Mpx/s, 4.1e-2; fp32 143 Mpx/s, and a gigapixel section 1.5x slower end to end).
GPU_REDUCED = "fp16"
#: The first compute capability with fp16 tensor cores (Volta).
TENSOR_CORES = (7, 0)


def gpu_precision(bundle: Any, device: torch.device, backend: str, batch_size: int, cache: Path) -> tuple[str, str]:
    """``--precision auto`` on a GPU: fp16 where the GPU has tensor cores and the engine's accuracy
    guard passes at fp16 on this GPU (checked once, cached), else fp32; and why."""
    gpu = torch.cuda.get_device_name(device)
    capability = tuple(torch.cuda.get_device_capability(device))
    guard = None
    if capability >= TENSOR_CORES:
        guard = _guard(bundle, (backend, GPU_REDUCED), batch_size, cache, device=str(device))
    return gpu_precision_choice(gpu, (capability[0], capability[1]), guard)


def gpu_precision_choice(gpu: str, capability: tuple[int, int], guard: Any) -> tuple[str, str]:
    """The decision of :func:`gpu_precision` from what it found (pure): ``guard`` is the accuracy
    guard's verdict at fp16 on this GPU, ``None`` when the engine carries no check data."""
    if capability < TENSOR_CORES:
        return "fp32", f"fp32: {gpu} (compute capability {capability[0]}.{capability[1]}) has no fp16 tensor cores"
    if guard is None:
        return "fp32", (
            f"fp32: the engine carries no check slices, so {GPU_REDUCED} is not chosen unchecked "
            f"(--precision {GPU_REDUCED} runs it)"
        )
    if guard.passed:
        return GPU_REDUCED, f"{GPU_REDUCED} on {gpu}'s tensor cores: {guard.describe()}"
    return "fp32", f"fp32: {guard.describe()} (--precision {GPU_REDUCED} runs it anyway)"


# ------------------------------------------------------------------------------------------ CPU


#: CPU backends that have kernels for each precision (torch has no fp16 convolutions on the CPU,
#: ONNX Runtime's CPU provider no bf16 ones; OpenVINO's bf16 needs a CPU with native bf16).
CPU_CANDIDATES = {
    "fp32": ("onnxruntime", "openvino", "torch"), "fp16": ("onnxruntime",), "bf16": ("openvino", "torch"),
    "int8": ("openvino",),  # the quantized graph of tilefeet.runners.quantize
}
#: What the plan says of ``--precision int8`` as asked (:mod:`.quantize`).
INT8_NOTE = (
    "int8 as asked: the network quantized, calibrated on half the engine's check slices, and run without the "
    "accuracy guard (--precision auto chooses it only where it is faster and passes the guard)"
)
#: The reduced precision ``--precision auto`` considers on a CPU with native bf16.
AUTO_REDUCED = "bf16"


def _cpu_precisions() -> dict[str, list[str]]:
    """backend -> precisions it runs on the CPU (the inverse of :data:`CPU_CANDIDATES`)."""
    out: dict[str, list[str]] = {}
    for precision, backends in CPU_CANDIDATES.items():
        for b in backends:
            out.setdefault(b, []).append(precision)
    return out


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo`` on Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def native_bf16() -> str | None:
    """What says this CPU computes bf16 natively (``"AMX-BF16"``, ``"AVX512-BF16"``, or OpenVINO's
    ``BF16`` capability where there is no ``/proc/cpuinfo``), or ``None``: then bf16 is emulated,
    slower than fp32, and ``--precision auto`` does not consider it."""
    flags = cpu_flags()
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")):
        if flag in flags:
            return name
    if not flags:
        from .openvino_runner import capabilities

        if "BF16" in capabilities():
            return "OpenVINO's BF16 capability"
    return None


def _label(backend: str, precision: str) -> str:
    return f"{backend} {precision}"


def _on_cpu(
    bundle: Any,
    precision: str,
    batch_size: int,
    tile: tuple[int, int],
    cache: Path,
    allowed: tuple[str, ...] = (),
    *,
    requested: str | None = None,
) -> Choice:
    """The CPU half: every (backend, precision) that can run, measured; reduced precisions guarded."""
    where = f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"
    precisions = [precision] if precision != "auto" else ["fp32"]
    notes: list[str] = []
    if precision == "auto":
        native = native_bf16()
        if native:
            precisions.append(AUTO_REDUCED)
        else:
            notes.append("fp32: this CPU has no native bf16 (no AMX or AVX512_BF16)")
        why_not = int8_unguardable(bundle)
        if why_not is None:
            precisions.append("int8")
        else:
            notes.append(why_not)
    combos, skipped = runnable_on_cpu(bundle, precisions, allowed, requested)
    if not combos:
        what = precision if precision != "auto" else "fp32"
        raise BackendUnavailableError(f"no backend runs {what} on the {where}: " + "; ".join(skipped))
    if requested is None:
        notes = skipped + notes
    if len(combos) == 1:
        (backend, p), = combos
        if requested is not None:
            why = f"--backend {requested} was requested; {p}" + (f" ({'; '.join(notes)})" if notes else "")
            return Choice(backend, (), why, p)
        only = "tilefeet runs int8 on" if p == "int8" else f"with {p} kernels"  # onnxruntime has int8 kernels, slower here
        why = "; ".join(notes) or f"the only CPU backend {only}"
        return Choice(backend, (), f"{backend} on the {where} ({why})", p)
    timing = measured_timing(bundle, combos, precision, batch_size, tile, cache)
    rates, failed = timing["mpx_per_s"], timing.get("failed", {})
    if failed:
        notes = [f"{k} left out: it failed here ({why})" for k, why in failed.items()] + notes
        combos = [c for c in combos if _label(*c) not in failed]
        if not combos or (precision == "auto" and not any(p == "fp32" for _, p in combos)):
            raise BackendUnavailableError(f"no backend ran on the {where}: " + "; ".join(notes))
    ranked = sorted(combos, key=lambda c: -rates[_label(*c)])
    chosen, guards = ranked[0], []
    if precision == "auto":
        fastest_fp32 = next(c for c in ranked if c[1] == "fp32")  # fp32 is always a candidate under auto
        chosen = fastest_fp32
        for c in ranked[: ranked.index(fastest_fp32)]:  # the reduced-precision ones that are faster
            try:
                guard = _guard(bundle, c, batch_size, cache)
            except Exception as e:  # the check itself failed here: the candidate is not chosen, said why
                guards.append(f"{_label(*c)} not chosen: its accuracy guard failed here ({' '.join(str(e).split())[:200]})")
                continue
            if guard is None:
                guards.append(
                    f"{c[1]} not chosen: engine {bundle.name!r} carries no check data to guard it against fp32 "
                    f"(--precision {c[1]} runs it unchecked)"
                )
                break
            guards.append(f"{guard.describe()} ({guard.path})")
            if guard.passed:
                chosen = c
                break
    versus = " vs ".join(f"{_label(*c)} {rates[_label(*c)]:.2f} Mpx/s" for c in ranked)
    head = f"{_label(*chosen)} is the fastest on the {where}" if requested is None else f"--backend {requested} was requested; {chosen[1]} is its fastest on the {where}"
    if precision == "auto" and any(c[1] != "fp32" for c in ranked[: ranked.index(chosen)]):  # faster ones not chosen
        what = "at full precision" if chosen[1] == "fp32" else "that passes the accuracy guard"
        head = f"{_label(*chosen)} is the fastest {what} on the {where}"
    reason = f"{head}: {versus}, measured on {batch_size}×{tile[0]}×{tile[1]} tiles ({timing['path']})"
    extra = guards + [n for n in notes if n]
    return Choice(chosen[0], (), reason + ("; " + "; ".join(extra) if extra else ""), chosen[1])


def int8_unguardable(bundle: Any) -> str | None:
    """Why ``--precision auto`` cannot consider int8 for ``bundle`` (``None`` when it can): int8 is
    calibrated on half the engine's check slices and judged by the guard on the other half."""
    from .guard import check_data

    data = check_data(bundle)
    n = 0 if data is None else len(data.images)
    if n >= 2:
        return None
    return f"int8 not considered: it is calibrated on half the engine's check slices and judged on the other half, and {bundle.name!r} carries {n}"


def runnable_on_cpu(
    bundle: Any, precisions: list[str], allowed: tuple[str, ...], requested: str | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """The ``(backend, precision)`` pairs that can run here, and why the others cannot."""
    combos: list[tuple[str, str]] = []
    skipped: list[str] = []
    unavailable: dict[str, str | None] = {}
    for p in precisions:
        for backend in CPU_CANDIDATES.get(p, ("torch",)):
            if allowed and backend not in allowed:
                if requested is None and p == precisions[0]:
                    skipped.append(f"{backend}: the engine's {getattr(bundle, 'network', '?')} network does not run on it")
                continue
            if backend not in unavailable:
                unavailable[backend] = unavailable_reason(backend, torch.device("cpu"))
            if unavailable[backend]:
                if p == precisions[0]:
                    skipped.append(f"{backend}: {unavailable[backend]}")
                continue
            if backend == "openvino" and p != "fp32":
                from .openvino_runner import precisions as openvino_precisions

                if p not in openvino_precisions():
                    skipped.append(f"openvino {p}: this CPU has no native {p} for OpenVINO")
                    continue
            combos.append((backend, p))
    return combos, skipped


def _guard(bundle: Any, combo: tuple[str, str], batch_size: int, cache: Path, device: str = "cpu") -> Any:
    from .guard import check_precision

    return check_precision(bundle, combo[0], combo[1], batch_size=batch_size, cache=cache, device=device)


def measured_timing(
    bundle: Any, combos: list[tuple[str, str]], precision: str, batch_size: int, tile: tuple[int, int], cache: Path
) -> dict[str, Any]:
    """Mpx/s of each ``(backend, precision)`` on this bundle and shape (keyed ``"backend precision"``),
    measured on first use and then read from the cache. The measurement runs under the cache's
    file lock, so concurrent workers do not measure at once (which would also skew the numbers)."""
    key = timing_key(bundle, combos, precision, batch_size, tile)
    path = cache / "select" / f"{key[:24]}.json"

    def measure(tmp: Path) -> None:
        rates, failed = {}, {}
        for b, p in combos:
            try:
                rates[_label(b, p)] = measure_mpx_per_s(b, bundle, p, batch_size, tile)
            except Exception as e:  # a candidate that cannot be built or run here (an int8 graph the quantizer refuses) is left out, said why
                failed[_label(b, p)] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        doc = {
            "mpx_per_s": rates,
            "failed": failed,
            "shape": [batch_size, bundle.in_channels, *tile],
            "precision": precision,
            "cpu": cpu_model(),
            "bundle": bundle.fingerprint,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp.write_text(json.dumps(doc, indent=2) + "\n")

    build_once(path, measure)
    return {**json.loads(path.read_text()), "path": str(path)}


def timing_key(bundle: Any, combos: list[tuple[str, str]], precision: str, batch_size: int, tile: tuple[int, int]) -> str:
    doc = {
        "bundle": bundle.fingerprint,
        "candidates": sorted(_label(b, p) for b, p in combos),
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
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "openvino"):
        with contextlib.suppress(PackageNotFoundError):
            versions[dist] = version(dist)
    return versions
