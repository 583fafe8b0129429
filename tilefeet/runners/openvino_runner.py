"""The OpenVINO runner: the bundle's cached ONNX export, compiled by OpenVINO for this CPU.

It reads the same fp32 ONNX file ONNX Runtime runs (:func:`.onnx_export.export_onnx`: tilefeet's
U-Net, ``torch.export`` programs, and imported ONNX graphs alike) and lets OpenVINO lower it to
the processor's own kernels: AMX and AVX-512 bf16 where the CPU has them (see the README's
*Performance* section for what that gives). The precision is OpenVINO's inference precision hint,
always set, because OpenVINO computes in bf16 by itself on CPUs with native bf16 unless told
``f32``: ``--precision fp32`` means f32 here as everywhere else.

* **Fixed shapes**: the model is reshaped to the runner's ``(batch, C, H, W)`` before compiling, so
  every call runs one compiled program, and a tile's result does not depend on the tiles beside
  it (bit-identical output across block sizes, as with the other backends).
* **Compiled once per machine**: OpenVINO's model cache (``CACHE_DIR``) under
  ``$TILEFEET_CACHE/openvino/<engine>-<precision>-<key>``, the key covering the engine's
  fingerprint, the precision, the shape, the CPU model and OpenVINO's version; a second process
  loads the compiled blob instead of compiling again.
* **Threads**: the ``threads`` option is OpenVINO's ``INFERENCE_NUM_THREADS`` (default: all
  cores), one stream, latency hint: one call at a time uses the whole CPU, as torch and ONNX
  Runtime do. oneDNN's rounding depends on the thread count, so equal runs set it alike.

CPU only: OpenVINO's GPU and NPU plugins are Intel's devices; a CUDA device is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import cache_dir
from ..device import resolve_device
from ..errors import BackendUnavailableError, ConfigError
from . import Runner, RunnerSpec, check_options
from .onnx_export import export_onnx

INSTALL = "pip install openvino"
#: tilefeet precision -> OpenVINO inference precision hint, and the CPU capability it needs.
#: OpenVINO's inference precision per tilefeet precision; int8 runs the quantized graph
#: (:mod:`.quantize`), its few float operations in f32.
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16", "int8": "INT8"}


def import_openvino():  # -> module
    """``openvino``, or a one-line :class:`BackendUnavailableError` saying what to install (or why it
    did not load: a wheel for another CPU, a missing system library)."""
    try:
        import openvino
    except ImportError as e:
        missing = getattr(e, "name", None) == "openvino" or "No module named 'openvino'" in str(e)
        why = f"backend 'openvino' needs the openvino package: {INSTALL}" if missing else f"openvino does not load here ({_first_line(e)})"
        raise BackendUnavailableError(why) from None
    return openvino


@lru_cache(maxsize=1)
def core() -> Any:
    """One ``openvino.Core`` per process (it holds the plugins; creating one costs a few ms)."""
    return import_openvino().Core()


def unavailable_reason(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device`` here (``None`` if it can); imports openvino."""
    if device.type != "cpu":
        return f"tilefeet runs OpenVINO on the CPU only, not on {device}; use --device cpu"
    try:
        import_openvino()  # each time: a module made unimportable later (tests, broken installs) is seen
        devices = core().available_devices
    except BackendUnavailableError as e:
        return str(e)
    except Exception as e:  # OpenVINO raises RuntimeError for a plugin that does not load
        return f"openvino does not start here ({_first_line(e)})"
    if "CPU" not in devices:
        return f"openvino has no CPU plugin here (it has {', '.join(devices) or 'none'})"
    return None


def capabilities() -> tuple[str, ...]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of this CPU (``"BF16"`` where it has native bf16
    convolutions: AMX or AVX-512 bf16), or ``()`` where OpenVINO does not run."""
    if unavailable_reason(torch.device("cpu")):
        return ()
    return tuple(str(c) for c in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def precisions() -> tuple[str, ...]:
    """The tilefeet precisions OpenVINO runs natively on this CPU."""
    caps = capabilities()
    return tuple(p for p in ("fp32", "bf16", "fp16", "int8") if CAPABILITY[p] in caps)


def version() -> str:
    return str(import_openvino().__version__)


class OpenVinoRunner(Runner):
    """Options: ``threads`` (``INFERENCE_NUM_THREADS``; default: every core)."""

    name = "openvino"

    def __init__(self, bundle: Any, spec: RunnerSpec, reason: str = ""):
        super().__init__(bundle, spec, reason)
        check_options(spec, {"threads"})
        self._device = resolve_device(spec.device)
        why = unavailable_reason(self._device)
        if why:
            raise BackendUnavailableError(why)
        if spec.precision not in HINTS:
            raise ConfigError(f"unknown precision {spec.precision!r}; use fp32, bf16 or int8")
        if CAPABILITY[spec.precision] not in capabilities():
            raise ConfigError(
                f"openvino has no native {spec.precision} on this CPU (it has {', '.join(capabilities())}); use --precision fp32"
            )
        self.threads = int(spec.option("threads", 0) or 0)
        self.step = bundle.fixed_batch or spec.batch_size
        if spec.batch_size % self.step:
            raise ConfigError(
                f"engine {bundle.name!r} takes batches of exactly {self.step}; use --batch-size {self.step} or a multiple of it"
            )
        self.export = export_onnx(bundle, "fp32")  # OpenVINO applies the precision itself ...
        graph = self.export.path
        if spec.precision == "int8":  # ... except int8, which needs the quantized graph
            from .quantize import int8_graph

            graph = int8_graph(bundle)
        self.shape = (self.step, bundle.in_channels, *spec.tile)
        self.cache = compile_cache(bundle, spec.precision, self.shape)
        self.compiled = _compile(graph, self.shape, spec.precision, self.threads, self.cache)
        self.request = self.compiled.create_infer_request()

    @property
    def device(self) -> torch.device:
        return self._device

    def describe(self) -> str:
        threads = self.compiled.get_property("INFERENCE_NUM_THREADS")
        return f"{super().describe()}, OpenVINO {version()}, {threads} threads"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to(self._device, torch.float32).contiguous().numpy()
        outs = [self._run(x[i : i + self.step]) for i in range(0, x.shape[0], self.step)]
        return torch.from_numpy(outs[0] if len(outs) == 1 else np.concatenate(outs))

    def _run(self, x: np.ndarray) -> np.ndarray:
        # share_outputs=False: a copy, which no later call overwrites
        result = self.request.infer({0: x}, share_inputs=True, share_outputs=False)
        return np.asarray(result[self.compiled.output(0)], dtype=np.float32)

    def close(self) -> None:
        self.request = None
        self.compiled = None


def compile_cache(bundle: Any, precision: str, shape: tuple[int, ...]) -> Path:
    """OpenVINO's model cache folder for this engine, precision, shape, CPU and OpenVINO version."""
    from .select import cpu_model

    doc = {"bundle": bundle.fingerprint, "precision": precision, "shape": list(shape), "cpu": cpu_model(), "openvino": version()}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in bundle.name) or "engine"
    return cache_dir() / "openvino" / f"{safe}-{precision}-{key}"


def _compile(path: Path, shape: tuple[int, ...], precision: str, threads: int, cache: Path) -> Any:
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "CACHE_DIR": str(cache),
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        del config["CACHE_DIR"]  # a read-only cache: compile every time rather than fail
    try:
        model = core().read_model(str(path))
        model.reshape({model.input(0): list(shape)})
        return core().compile_model(model, "CPU", config)
    except Exception as e:  # OpenVINO raises RuntimeError (and its own types) for every failure
        raise BackendUnavailableError(f"openvino cannot compile {path} for this CPU ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
