"""The ONNX Runtime runner: the bundle's cached ONNX export in an ``InferenceSession``.

On the CPU it runs the CPU provider on numpy views of the batch (no copies). On an NVIDIA GPU
(``pip install onnxruntime-gpu``) it runs the CUDA provider, or TensorRT's provider with the
option ``("ort_tensorrt", True)``, with I/O binding: ONNX Runtime reads the input from and writes
the output into torch CUDA tensors, on a stream of its own that first waits for the caller's.

Precision is in the graph (see :mod:`.onnx_export`): the CPU provider runs fp32 and fp16 graphs
(it has no bf16 convolutions); the CUDA provider fp32 and fp16 (bf16 where its kernels exist).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..artifacts import cache_dir
from ..device import resolve_device
from ..errors import BackendUnavailableError, ConfigError
from . import Runner, RunnerSpec, check_options
from .onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
INSTALL_CPU = "pip install 'tilefeet[onnx]' (or pip install onnxruntime)"
INSTALL_GPU = "pip uninstall onnxruntime && pip install onnxruntime-gpu"


def import_onnxruntime():  # -> module
    """``onnxruntime``, or a one-line :class:`BackendUnavailableError` saying what to install."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(f"backend 'onnxruntime' needs the onnxruntime package: {INSTALL_CPU}") from None
    return onnxruntime


def unavailable_reason(device: torch.device) -> str | None:
    """Why this backend cannot run on ``device`` here (``None`` if it can); imports onnxruntime."""
    try:
        ort = import_onnxruntime()
    except BackendUnavailableError as e:
        return str(e)
    if device.type == "cuda" and CUDA not in ort.get_available_providers():
        return (
            f"this onnxruntime has no CUDA provider (it has {', '.join(ort.get_available_providers())}): {INSTALL_GPU}"
        )
    return None


def providers_for(
    available: Sequence[str],
    device: torch.device,
    *,
    precision: str,
    tensorrt: bool = False,
    tf32: bool = False,
    stream: int | None = None,
    trt_cache: str = "",
) -> list[tuple[str, dict[str, Any]]]:
    """The ``(provider, options)`` list for a session on ``device``: pure, so it is tested anywhere.

    On a GPU: TensorRT's provider first if asked for, then CUDA, then the CPU for anything neither
    covers. fp32 means IEEE fp32 (no TF32) unless ``tf32``. ``stream`` is the CUDA stream handle the
    GPU providers enqueue on.
    """
    if device.type == "cpu":
        if precision == "bf16":
            raise ConfigError(
                "onnxruntime's CPU provider has no bf16 convolutions; use --precision fp32 or fp16, or --backend torch"
            )
        return [(CPU, {})]
    if CUDA not in available:
        raise BackendUnavailableError(
            f"this onnxruntime has no CUDA provider (it has {', '.join(available)}): {INSTALL_GPU}"
        )
    index = device.index or 0
    shared: dict[str, Any] = {"device_id": index}
    if stream:
        shared["user_compute_stream"] = str(stream)
    cuda = {**shared, "use_tf32": int(tf32), "cudnn_conv_algo_search": "EXHAUSTIVE"}
    out: list[tuple[str, dict[str, Any]]] = []
    if tensorrt:
        if TRT not in available:
            raise BackendUnavailableError(
                f"this onnxruntime has no TensorRT provider (it has {', '.join(available)}): pip install onnxruntime-gpu tensorrt"
            )
        # No fp16/bf16 flags: precision is in the graph, and without them the provider builds a
        # strongly typed network, the only kind TensorRT 11 has.
        trt = {
            **shared,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": trt_cache,
            "trt_timing_cache_enable": True,
        }
        out.append((TRT, trt))
    return out + [(CUDA, cuda), (CPU, {})]


class OnnxRuntimeRunner(Runner):
    """Options: ``ort_tensorrt`` (TensorRT's provider first, on a GPU), ``tf32`` (let the CUDA
    provider use TF32 for fp32), ``threads`` (CPU intra-op threads; default: ONNX Runtime's)."""

    name = "onnxruntime"

    def __init__(self, bundle: Any, spec: RunnerSpec, reason: str = ""):
        super().__init__(bundle, spec, reason)
        check_options(spec, {"ort_tensorrt", "tf32", "threads"})
        ort = import_onnxruntime()
        self._device = resolve_device(spec.device)
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        providers = providers_for(
            ort.get_available_providers(),
            self._device,
            precision=spec.precision,
            tensorrt=bool(spec.option("ort_tensorrt", False)),
            tf32=bool(spec.option("tf32", False)),
            stream=self._stream.cuda_stream if self._stream is not None else None,
            trt_cache=str(cache_dir() / "ort-tensorrt"),
        )
        self.export = export_onnx(bundle, spec.precision)
        self.session = _session(ort, str(self.export.path), providers, threads=int(spec.option("threads", 0)))
        self._out_shape = (spec.batch_size, bundle.out_channels, *spec.tile)

    @property
    def device(self) -> torch.device:
        return self._device

    def describe(self) -> str:
        return f"{super().describe()}, {' > '.join(self.session.get_providers())}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to(self._device, torch.float32).contiguous()
        step = self.bundle.fixed_batch
        if step and step != x.shape[0]:
            # A graph with a fixed batch axis (often 1) runs the batch in slices of that size: each
            # tile is still computed alone, so results do not depend on how tiles are grouped.
            if x.shape[0] % step:
                raise ConfigError(
                    f"engine {self.bundle.name!r} takes batches of exactly {step}; use --batch-size {step} or a multiple of it"
                )
            return torch.cat([self._run(x[i : i + step]) for i in range(0, x.shape[0], step)])
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._device.type == "cpu":
            (y,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
            return torch.from_numpy(y)
        return self._run_bound(x)

    def _run_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Run on CUDA tensors in place: no host copies. ONNX Runtime's stream first waits for the
        caller's (which produced ``x``); ``run_with_iobinding`` returns once its stream is done, so
        the output is ready for any stream."""
        assert self._stream is not None  # made in __init__ for CUDA devices
        out = torch.empty((x.shape[0], *self._out_shape[1:]), dtype=torch.float32, device=self._device)
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        binding = self.session.io_binding()
        index = self._device.index or 0
        binding.bind_input(INPUT_NAME, "cuda", index, _np_float32(), tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", index, _np_float32(), tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out

    def close(self) -> None:
        self.session = None


def _session(ort: Any, path: str, providers: list[tuple[str, dict[str, Any]]], *, threads: int = 0):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the provider fallbacks it logs are expected
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for every failure
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendUnavailableError(f"onnxruntime cannot run {path} here ({first})") from None
    wanted = providers[0][0]
    if wanted not in session.get_providers():  # ONNX Runtime falls back to the CPU silently
        raise BackendUnavailableError(
            f"onnxruntime could not start {wanted} (CUDA/cuDNN libraries missing or mismatched?); got {session.get_providers()}"
        )
    return session


def _np_float32():
    import numpy as np

    return np.float32
