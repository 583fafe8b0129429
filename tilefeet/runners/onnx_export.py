"""Export an engine bundle to ONNX with torch's dynamo exporter, check it, and cache it per user.

    export_onnx(bundle, "fp16")  ->  OnnxExport(path=<cache>/onnx/<name>-fp16-<key>/model.onnx, ...)

The graph maps ``tiles`` ``(B, C_in, H, W)`` float32 to ``probabilities`` ``(B, C_out, H, W)``
float32 whatever the precision: an fp16 or bf16 graph casts on the way in and out, and computes in
between in that type. TensorRT 11 is strongly typed and takes its precision from the graph alone,
so reduced precision has to be *in* the ONNX file. Batch, height and width are dynamic, with H and
W multiples of the network's divisor (a constraint the exporter proves and records). Weights live
in ``model.onnx.data`` beside the graph, so no model is too big for protobuf's 2 GB limit.

Every export is checked before it is cached: ``onnx.checker`` on the file, then ONNX Runtime on the
CPU against the torch fp32 network (where ONNX Runtime has kernels for the precision). The cache key
is the bundle's fingerprint, the precision, the opset and the exporter's versions, so a retrained
bundle or a new torch exports afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BackendUnavailableError, ConfigError, InvalidEngineError
from . import build_once, cache_dir

INPUT_NAME = "tiles"
OUTPUT_NAME = "probabilities"
GRAPH_FILE = "model.onnx"
META_FILE = "export.json"
#: ONNX opset per precision: bfloat16 convolutions and pools exist from opset 22 on; fp32/fp16
#: stay at 20, which every TensorRT 10.x parser reads.
OPSETS = {"fp32": 20, "fp16": 20, "bf16": 22}
#: Largest relative error (max |a - b| / max |b|) allowed against the torch fp32 network.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}
#: Bump when the layout of an export changes, so old cache entries are not reused.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class OnnxExport:
    """An exported, checked graph in the cache."""

    path: Path  #: the graph; its weights are in ``<path>.data`` beside it
    precision: str  #: compute type inside the graph (inputs and outputs are float32 regardless)
    opset: int
    sha256: str  #: of the graph and its weights: what a TensorRT plan is keyed on
    checked: str  #: how the export was verified, for humans

    @property
    def files(self) -> tuple[Path, ...]:
        """The graph and its weights (copy both to move an export)."""
        return tuple(p for p in (self.path, self.path.with_name(self.path.name + ".data")) if p.exists())


def export_onnx(bundle: Any, precision: str = "fp32", *, cache: Path | None = None) -> OnnxExport:
    """The checked ONNX export of ``bundle`` at ``precision``, exported on first use and cached.

    Concurrent callers (several workers, several runs) export once: the others wait and load.
    """
    _check_precision(precision)
    require_onnx()
    folder = (cache or cache_dir()) / "onnx" / f"{_safe(bundle.name)}-{precision}-{export_key(bundle, precision)[:16]}"
    build_once(folder, lambda tmp: _export_into(tmp, bundle, precision))
    meta = json.loads((folder / META_FILE).read_text())
    return OnnxExport(folder / GRAPH_FILE, meta["precision"], meta["opset"], meta["sha256"], meta["checked"])


def export_key(bundle: Any, precision: str) -> str:
    """sha256 over everything that changes the exported file."""
    import onnxscript

    doc = {
        "bundle": bundle.fingerprint,
        "precision": precision,
        "opset": OPSETS[precision],
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
        "format": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def relative_error(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|`` in float64: the one measure of agreement the
    export check, the conformance suite and the benchmark use."""
    a = torch.as_tensor(actual).detach().cpu().double()
    e = torch.as_tensor(expected).detach().cpu().double()
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- steps


def _export_into(folder: Path, bundle: Any, precision: str) -> None:
    """Export, check and describe the graph in ``folder`` (a fresh temporary folder)."""
    folder.mkdir(parents=True)
    path = folder / GRAPH_FILE
    opset = OPSETS[precision]
    _export(network_at(bundle, precision), _example_input(bundle), _dynamic_shapes(bundle), opset, path)
    checked = check_export(path, bundle, precision)
    files = [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]
    meta = {
        "precision": precision,
        "opset": opset,
        "sha256": file_sha256(*files),
        "checked": checked,
        "bundle": bundle.fingerprint,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class CastInside(torch.nn.Module):
    """``net`` computing in ``dtype`` between a float32 input and a float32 output."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net = net.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.dtype)).to(torch.float32)


def network_at(bundle: Any, precision: str) -> torch.nn.Module:
    """The bundle's network computing in ``precision``, with float32 input and output."""
    net = bundle.build_model()
    if precision == "fp32":
        return net
    return CastInside(net, {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]).eval()


def _example_input(bundle: Any):  # -> torch.Tensor
    """A small input whose sizes are all different (so the exporter cannot mistake one dynamic
    size for another) and not 0 or 1 (which it would specialize)."""
    d = bundle.divisor
    return torch.zeros(2, bundle.in_channels, 2 * d, 3 * d)


def _dynamic_shapes(bundle: Any) -> dict[str, dict[int, Any]]:
    """Batch free; height and width free multiples of the divisor."""
    from torch.export import Dim

    d = bundle.divisor
    h, w = Dim("h_blocks", min=1), Dim("w_blocks", min=1)
    return {"x": {0: Dim("batch", min=1), 2: d * h if d > 1 else h, 3: d * w if d > 1 else w}}


def _export(model: torch.nn.Module, example: torch.Tensor, dynamic_shapes: dict, opset: int, path: Path) -> None:
    with _exporter_noise_silenced():
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                verbose=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes,
            )
        except Exception as e:  # the exporter raises many types; all mean the same to a user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidEngineError(
                f"torch.onnx could not export the network ({first}); run with a newer torch or report it"
            ) from None
        if program is None:  # only the legacy exporter returns None
            raise InvalidEngineError("torch.onnx returned no program; tilefeet needs torch >= 2.5's dynamo exporter")
        program.save(str(path), external_data=True)


@contextlib.contextmanager
def _exporter_noise_silenced() -> Iterator[None]:
    """Silence two messages of the exporter that no user can act on: a FutureWarning torch's own
    pytree code raises while exporting, and "torchvision is not installed" log lines."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
            )
            yield
    finally:
        log.setLevel(level)


def check_export(path: Path, bundle: Any, precision: str) -> str:
    """Verify an exported graph; raise :class:`InvalidEngineError` if it is broken or disagrees with
    torch. Returns a one-line account of what was checked."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise InvalidEngineError(f"exported ONNX {path} is invalid: {str(e).splitlines()[0]}") from None
    if precision == "bf16":
        return "onnx.checker (ONNX Runtime has no bf16 convolutions on the CPU: no numerical check)"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnx.checker (onnxruntime not installed: no numerical check)"
    err = _compare_with_torch(path, bundle)
    if err > TOLERANCE[precision]:
        raise InvalidEngineError(
            f"exported ONNX {path} disagrees with torch: relative error {err:.2e} > {TOLERANCE[precision]:.0e} ({precision})"
        )
    return f"onnx.checker + onnxruntime CPU vs torch fp32: relative error {err:.1e}"


def _compare_with_torch(path: Path, bundle: Any) -> float:
    """Relative error of ONNX Runtime (CPU) against the torch fp32 network, on a shape that differs
    from the export example (so a graph that froze a size fails here)."""
    import onnxruntime as ort

    d = bundle.divisor
    x = torch.randn(3, bundle.in_channels, 3 * d, 2 * d, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    with torch.inference_mode():
        ref = bundle.build_model()(x)
    return relative_error(torch.from_numpy(y), ref)


def copy_export(export: OnnxExport, out_dir: Path) -> Path:
    """Copy the graph and its weights into ``out_dir``; returns the copied graph's path. The weights
    file keeps its name, which the graph refers to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in export.files:
        shutil.copy2(f, out_dir / f.name)
    return out_dir / export.path.name


def _check_precision(precision: str) -> None:
    if precision not in OPSETS:
        raise ConfigError(f"unknown precision {precision!r}; use fp32, fp16 or bf16")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "engine"


def require_onnx() -> None:
    """Raise a one-line :class:`BackendUnavailableError` unless onnx and onnxscript are installed."""
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            raise BackendUnavailableError(
                f"exporting to ONNX needs the {module} package: pip install 'tilefeet[onnx]' (or pip install onnx onnxscript)"
            ) from None
