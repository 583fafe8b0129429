"""The TensorRT runner: a serialized plan built from the bundle's ONNX export, run on torch CUDA
tensors with ``execute_async_v3``.

    bundle ─► ONNX (onnx_export, cached) ─► plan (built once per GPU model, TensorRT version,
    ONNX hash, profile and precision; cached; a file lock lets one worker build while the others
    wait) ─► engine + execution context ─► runner(batch): set_tensor_address ×2, enqueue

Written against the documented TensorRT 10.x and 11.x Python APIs (``tensorrt.Builder``,
``OnnxParser.parse_from_file``, ``IBuilderConfig.set_memory_pool_limit`` / ``set_flag`` /
``set_timing_cache``, ``create_optimization_profile``, ``build_serialized_network``,
``Runtime.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape`` /
``set_tensor_address`` / ``execute_async_v3``). TensorRT 10 takes reduced precision from builder
flags; TensorRT 11 removed them and is strongly typed (see :mod:`._trt_glue`). This runner has
never executed on real TensorRT: TensorRT could not be installed where tilefeet is built and tested.
The call sequence is exercised against a recording fake (``tests/fake_tensorrt.py``), which is not
evidence that TensorRT accepts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import build_once, cache_dir
from ..device import resolve_device
from ..errors import BackendUnavailableError, ConfigError, InvalidEngineError
from . import Runner, RunnerSpec, check_options
from ._trt_glue import (
    DeviceInfo,
    IOBinding,
    IOTensor,
    PlanKey,
    PrecisionMode,
    Profile,
    Typing,
    enqueue,
    find_covering_plan,
    make_profile,
    parse_size,
    plan_path,
    precision_mode,
    resolve_io,
    timing_cache_path,
)
from .onnx_export import export_onnx

INSTALL = (
    "pip install tensorrt (TensorRT 10 or 11, on a machine with an NVIDIA GPU and driver), "
    "or use --backend torch or onnxruntime"
)
DEFAULT_WORKSPACE = 4 << 30


def import_tensorrt():  # -> module
    """``tensorrt``, or a one-line :class:`BackendUnavailableError` saying what to install."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(f"backend 'tensorrt' needs the tensorrt package: {INSTALL}") from None
    except Exception as e:  # a broken install (missing libnvinfer, stub wheel) fails in many ways
        raise BackendUnavailableError(
            f"tensorrt is installed but cannot be imported ({type(e).__name__}: {e}); reinstall it: {INSTALL}"
        ) from None
    return tensorrt


def unavailable_reason(device: torch.device) -> str | None:
    """Why TensorRT cannot run on ``device`` here (``None`` if it can); imports tensorrt."""
    try:
        import_tensorrt()
    except BackendUnavailableError as e:
        return str(e)
    if device.type != "cuda":
        return (
            f"backend 'tensorrt' runs on NVIDIA GPUs only, and the device here is {device}: "
            "use --device cuda on a GPU machine, or --backend torch or onnxruntime"
        )
    return None


# ----------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class BuildRequest:
    """What to build: the user's choices, before they meet a TensorRT version and a GPU."""

    precision: str = "fp16"
    workspace_bytes: int = DEFAULT_WORKSPACE
    typing: Typing = "auto"
    tf32: bool = False


@dataclass(frozen=True)
class BuiltPlan:
    path: Path
    key: PlanKey
    mode: PrecisionMode

    def describe(self) -> str:
        key = self.key
        return (
            f"TensorRT {key.trt_version} plan for {key.device.name} ({key.device.sm}), "
            f"{self.mode.describe()}, shapes {key.profile.describe()}"
        )


def ensure_plan(
    trt: Any, bundle: Any, request: BuildRequest, profile: Profile, device: DeviceInfo, *, cache: Path | None = None
) -> BuiltPlan:
    """The cached plan for ``bundle`` on ``device`` and ``profile`` (or a cached one whose profile
    covers it), built first if there is none; concurrent callers build once, the others wait."""
    root = cache or cache_dir()
    version = str(trt.__version__)
    mode = precision_mode(
        request.precision,
        trt_version=version,
        has_flag=lambda f: hasattr(trt.BuilderFlag, f),
        typing=request.typing,
        tf32=request.tf32,
    )
    onnx = export_onnx(bundle, mode.onnx_precision, cache=root)
    key = PlanKey(device, version, onnx.sha256, profile, request.precision, mode.strongly_typed, request.tf32)
    path = plan_path(root, key, bundle.name)
    if not path.exists():
        covering = find_covering_plan(root, key)
        if covering is not None:
            return BuiltPlan(covering[0], covering[1], mode)

    def build(tmp: Path) -> None:
        timing = timing_cache_path(root, device, version)
        plan = build_plan(trt, onnx.path, profile, mode, request.workspace_bytes, timing)
        tmp.write_bytes(plan)
        path.with_suffix(".json").write_text(key.to_json())

    build_once(path, build)
    return BuiltPlan(path, key, mode)


def build_plan(
    trt: Any, onnx_path: Path, profile: Profile, mode: PrecisionMode, workspace_bytes: int, timing_path: Path
) -> bytes:
    """Parse the ONNX file and build a serialized plan: TensorRT's builder, step by step."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads the external weights file beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no details"
        raise InvalidEngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for name in mode.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in mode.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(network.get_input(0).name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailableError(
            f"TensorRT could not build a plan from {onnx_path} for shapes {profile.describe()} (see its log above)"
        )
    _save_timing_cache(config.get_timing_cache(), timing_path)
    return bytes(plan)


def _save_timing_cache(cache: Any, path: Path) -> None:
    """Write the timing cache atomically: it is shared by every build on this GPU model, and a
    concurrent build of another plan may be reading it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(bytes(cache.serialize()))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ running


@dataclass
class LoadedPlan:
    engine: Any
    context: Any
    io: IOBinding


def load_plan(trt: Any, plan: bytes, input_shape: tuple[int, ...]) -> LoadedPlan:
    """Deserialize a plan, make its execution context and fix the input shape."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise InvalidEngineError(
            "TensorRT cannot load the cached plan (built by another TensorRT or GPU?); delete it to rebuild"
        )
    io = resolve_io([_io_tensor(trt, engine, engine.get_tensor_name(i)) for i in range(engine.num_io_tensors)])
    context = engine.create_execution_context()
    if not context.set_input_shape(io.input, tuple(input_shape)):
        raise InvalidEngineError(
            f"the plan does not accept input shape {tuple(input_shape)}; rebuild it with a profile covering it"
        )
    return LoadedPlan(engine, context, io)


def _io_tensor(trt: Any, engine: Any, name: str) -> IOTensor:
    dtype = engine.get_tensor_dtype(name)
    return IOTensor(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, getattr(dtype, "name", str(dtype)))


class TensorRTRunner(Runner):
    """Options: ``profile`` (a :class:`Profile`; default: the runner's fixed shape),
    ``workspace`` (bytes or "4GiB"), ``typing`` ("auto", "weak", "strong"), ``tf32``; ``threads``
    (CPU threads, which a run sets for every backend) is accepted and has nothing to do here.

    ONNX bundles take the same road: their graph, prepared by :func:`.onnx_export.export_onnx`
    (tilefeet's I/O names, activation appended), is what the plan is built from. A graph with a
    fixed batch axis is refused: the plan's profile is the run's batch."""

    name = "tensorrt"

    def __init__(self, bundle: Any, spec: RunnerSpec, reason: str = ""):
        super().__init__(bundle, spec, reason)
        check_options(spec, {"profile", "workspace", "typing", "tf32", "threads"})
        if bundle.fixed_batch and bundle.fixed_batch != spec.batch_size:
            raise ConfigError(
                f"engine {bundle.name!r} takes batches of exactly {bundle.fixed_batch}; with tensorrt use "
                f"--batch-size {bundle.fixed_batch}, or --backend onnxruntime"
            )
        trt = import_tensorrt()
        self._device = resolve_device(spec.device)
        why_not = unavailable_reason(self._device)
        if why_not:
            raise BackendUnavailableError(why_not)
        shape = (spec.batch_size, bundle.in_channels, *spec.tile)
        profile = spec.option("profile") or make_profile(
            channels=bundle.in_channels, divisor=bundle.divisor, batch=spec.batch_size, tile=spec.tile
        )
        if not profile.covers(shape):
            raise InvalidEngineError(
                f"the TensorRT profile {profile.describe()} does not cover the runner's shape {shape}"
            )
        request = BuildRequest(
            precision=spec.precision,
            workspace_bytes=parse_size(spec.option("workspace", DEFAULT_WORKSPACE)),
            typing=spec.option("typing", "auto") or "auto",  # checked by precision_mode
            tf32=bool(spec.option("tf32", False)),
        )
        with torch.cuda.device(self._device):
            self.plan = ensure_plan(trt, bundle, request, profile, DeviceInfo.of(self._device))
            self._loaded = load_plan(trt, self.plan.path.read_bytes(), shape)
        self._stream = torch.cuda.Stream(self._device)  # TensorRT syncs extra on the legacy default stream
        self._out_shape = (spec.batch_size, bundle.out_channels, *spec.tile)

    @property
    def device(self) -> torch.device:
        return self._device

    def describe(self) -> str:
        return f"{super().describe()}, {self.plan.describe()}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Enqueue on the caller's current stream; the host never waits. On torch's default stream
        (the legacy NULL stream, on which TensorRT adds synchronizations) enqueue instead on the
        runner's own stream, ordered after the caller's, and make the caller's stream wait for it."""
        x = batch.detach().to(self._device, torch.float32).contiguous()
        out = torch.empty(self._out_shape, dtype=torch.float32, device=self._device)
        caller = torch.cuda.current_stream(self._device)
        if caller.cuda_stream != 0:
            enqueue(self._loaded.context, self._loaded.io, x, out, caller.cuda_stream)
            return out
        self._stream.wait_stream(caller)
        enqueue(self._loaded.context, self._loaded.io, x, out, self._stream.cuda_stream)
        caller.wait_stream(self._stream)
        return out

    def close(self) -> None:
        """Drop the execution context and engine (device memory) now, not when the runner is collected."""
        self._loaded.context = self._loaded.engine = None
