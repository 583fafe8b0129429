"""``tilefeet build-engine``: compile an engine bundle ahead of time, so the first run does not.

    tilefeet build-engine --engine NAME --backend tensorrt --precision fp16 --tile 1024 --batch 8
    tilefeet build-engine --engine NAME --backend tensorrt --min 1x512 --opt 8x1024 --max 8x2048
    tilefeet build-engine --engine NAME --backend onnxruntime --precision fp32

The artefact goes into the same cache the runners read (``$TILEFEET_CACHE`` or the per-user cache
folder, or ``--cache-dir``), so a later ``tilefeet segment`` with the same engine, backend,
precision, tile and batch finds it. Its path is printed on stdout (details go to stderr).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

BACKENDS = ("tensorrt", "onnxruntime", "torch")


def register(app: typer.Typer) -> None:
    app.command("build-engine")(build_engine)


def build_engine(
    engine: str = typer.Option(..., "--engine", "-e", help="Engine bundle name or folder."),
    backend: str = typer.Option(
        "tensorrt",
        help="tensorrt (a serialized plan), onnxruntime (the checked ONNX export) or torch (torch.compile, warming inductor's cache).",
    ),
    precision: str = typer.Option("fp32", help="fp32, fp16 or bf16."),
    tile: Optional[int] = typer.Option(None, help="Tile side in network pixels (default: the engine's)."),
    batch: int = typer.Option(4, help="Tiles per call (tilefeet segment's --batch-size)."),
    min_shape: Optional[str] = typer.Option(
        None, "--min", help="TensorRT profile: smallest input, BATCHxHEIGHTxWIDTH or BATCHxSIDE."
    ),
    opt_shape: Optional[str] = typer.Option(
        None, "--opt", help="TensorRT profile: the input to tune for (default: --batch × --tile)."
    ),
    max_shape: Optional[str] = typer.Option(None, "--max", help="TensorRT profile: largest input."),
    workspace: str = typer.Option("4GiB", help="TensorRT builder workspace limit, e.g. 4GiB."),
    typing_mode: str = typer.Option(
        "auto", "--typing", help="TensorRT typing: auto, weak (10.x builder flags) or strong."
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    cache_dir: Optional[Path] = typer.Option(
        None,
        "--cache-dir",
        help="Cache folder (default: $TILEFEET_CACHE or the per-user cache); runs look there when TILEFEET_CACHE names it.",
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Also copy the result into this folder."),
) -> None:
    """Build a compiled engine (TensorRT plan, ONNX export, or compiled torch) ahead of time."""
    from ..engine import load_engine
    from ..errors import ConfigError
    from ..settings import PRECISIONS

    backend, precision = backend.lower(), precision.lower()
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r} for build-engine; use one of: {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    if typing_mode not in ("auto", "weak", "strong"):
        raise ConfigError(f"unknown --typing {typing_mode!r}; use auto, weak or strong")
    bundle = load_engine(engine)
    side = tile or bundle.tile
    path: Path | str
    if backend == "onnxruntime":
        path = _onnx(bundle, precision, cache_dir, out)
    elif backend == "tensorrt":
        shapes = (min_shape, opt_shape, max_shape)
        path = _tensorrt(bundle, precision, side, batch, shapes, workspace, typing_mode, device, cache_dir, out)
    else:
        path = _torch(bundle, precision, side, batch, device)
    typer.echo(str(path))


def _onnx(bundle, precision: str, cache: Optional[Path], out: Optional[Path]) -> Path:
    from ..runners.onnx_export import copy_export, export_onnx

    export = export_onnx(bundle, precision, cache=cache)
    typer.echo(f"ONNX ({precision}, opset {export.opset}), checked: {export.checked}", err=True)
    return copy_export(export, out) if out else export.path


def _tensorrt(
    bundle,
    precision: str,
    side: int,
    batch: int,
    shapes,
    workspace: str,
    typing_mode: str,
    device: str,
    cache: Optional[Path],
    out: Optional[Path],
) -> Path:
    import shutil

    import torch

    from ..device import resolve_device
    from ..errors import BackendUnavailableError
    from ..runners._trt_glue import DeviceInfo, make_profile, parse_size
    from ..runners.tensorrt_runner import (
        BuildRequest,
        ensure_plan,
        import_tensorrt,
        unavailable_reason,
    )

    trt = import_tensorrt()  # first: without TensorRT, say what to install before anything else
    dev = resolve_device(device)
    reason = unavailable_reason(dev)
    if reason:
        raise BackendUnavailableError(reason)
    mn, op, mx = shapes
    profile = make_profile(
        channels=bundle.in_channels, divisor=bundle.divisor, batch=batch, tile=(side, side), min=mn, opt=op, max=mx
    )
    request = BuildRequest(precision=precision, workspace_bytes=parse_size(workspace), typing=typing_mode)  # type: ignore[arg-type]
    with torch.cuda.device(dev):
        plan = ensure_plan(trt, bundle, request, profile, DeviceInfo.of(dev), cache=cache)
    typer.echo(plan.describe(), err=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(plan.path, out / plan.path.name))
    return plan.path


def _torch(bundle, precision: str, side: int, batch: int, device: str) -> str:
    from ..runners import RunnerSpec
    from ..runners.torch_runner import TorchRunner

    spec = RunnerSpec(
        engine=str(bundle.path),
        backend="torch",
        device=device,
        precision=precision,
        batch_size=batch,
        tile=(side, side),
        options=(("compile", True),),
    )
    runner = TorchRunner(bundle, spec)
    typer.echo(f"compiled and warmed: {runner.describe()}", err=True)
    return _inductor_cache_dir()


def _inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels (reused by later processes with the same shapes)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return str(cache_dir())
    except Exception:  # a private module: its place may change between torch versions
        return "torch inductor's cache (TORCHINDUCTOR_CACHE_DIR)"
