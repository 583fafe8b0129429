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

A bundle that *is* an ONNX graph (``import-engine model.onnx``) is not exported but prepared, into
the same cache and the same contract: its input and output are renamed ``tiles`` and
``probabilities`` (by Identity nodes, so nothing inside the graph changes), the bundle's output
activation is appended, and an fp16 graph is converted by ONNX Runtime's float16 tool (float32
I/O kept). It is checked against the bundle's own graph run by ONNX Runtime in fp32. There is no
bf16 conversion for such graphs (TensorRT 10 runs bf16 from the fp32 graph with a builder flag).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import build_once, cache_dir
from ..engine import file_sha256
from ..errors import BackendUnavailableError, ConfigError, InvalidEngineError

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
    if bundle.network == "torchscript":
        raise ConfigError(
            f"engine {bundle.name!r} is TorchScript, which does not export to ONNX: use --backend torch, or import the "
            "network as ONNX or a torch.export program"
        )
    if bundle.network == "onnx" and precision == "bf16":
        raise ConfigError(
            f"engine {bundle.name!r} is an imported ONNX graph: tilefeet converts it to fp16 but not to bf16; use "
            "--precision fp32 or fp16"
        )
    folder = (cache or cache_dir()) / "onnx" / f"{_safe(bundle.name)}-{precision}-{export_key(bundle, precision)[:16]}"
    build_once(folder, lambda tmp: _export_into(tmp, bundle, precision))
    meta = json.loads((folder / META_FILE).read_text())
    return OnnxExport(folder / GRAPH_FILE, meta["precision"], meta["opset"], meta["sha256"], meta["checked"])


def export_key(bundle: Any, precision: str) -> str:
    """sha256 over everything that changes the exported file."""
    from importlib.metadata import version

    doc = {
        "bundle": bundle.fingerprint,
        "precision": precision,
        "opset": OPSETS[precision],
        "torch": torch.__version__,
        "onnxscript": version("onnxscript"),  # not imported: importing it takes seconds, a cached export needs none of it
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


# ------------------------------------------------------------------------------------- steps


def _export_into(folder: Path, bundle: Any, precision: str) -> None:
    """Export, check and describe the graph in ``folder`` (a fresh temporary folder)."""
    folder.mkdir(parents=True)
    path = folder / GRAPH_FILE
    if bundle.network == "onnx":
        opset = _prepare_graph(bundle, precision, path)
    else:
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
    """Relative error of ONNX Runtime (CPU) against the torch fp32 network (for an ONNX bundle: its
    own graph in fp32 with the activation), on a shape that differs from the export example (so a
    graph that froze a size fails here)."""
    import onnxruntime as ort

    x = check_input(bundle, 3, seed=0)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    return relative_error(torch.from_numpy(y), reference_output(bundle, x))


def check_input(bundle: Any, batch: int, *, seed: int) -> torch.Tensor:
    """A random input of a shape the bundle's network takes (its fixed size, or 3d × 2d)."""
    d = bundle.divisor
    hw = bundle.fixed_tile or ((3 * d, 2 * d) if d >= 16 else (48, 32))
    return torch.randn(bundle.fixed_batch or batch, bundle.in_channels, *hw, generator=torch.Generator().manual_seed(seed))


def reference_output(bundle: Any, x: torch.Tensor) -> torch.Tensor:
    """The bundle's network with its activation, in fp32 on the CPU: torch for torch networks,
    ONNX Runtime on the bundle's own graph for an ONNX bundle. What every runner is compared with."""
    if bundle.network != "onnx":
        with torch.inference_mode():
            return bundle.build_model()(x.cpu())
    from ..models.foreign import onnx_run_fn, onnx_session

    bundle.check_weights()
    run = onnx_run_fn(onnx_session(bundle.weights_path, str(bundle.weights_path)))
    n = bundle.fixed_batch or x.shape[0]
    y = torch.cat([torch.from_numpy(run(x[i : i + n].cpu().numpy())) for i in range(0, x.shape[0], n)])
    if bundle.activation == "sigmoid":
        return torch.sigmoid(y)
    return torch.softmax(y, dim=1) if bundle.activation == "softmax" else y


def _prepare_graph(bundle: Any, precision: str, path: Path) -> int:
    """Write the bundle's ONNX graph at ``path`` in tilefeet's contract (see the module docstring);
    returns its opset."""
    import onnx
    from onnx import helper

    bundle.check_weights()
    model = onnx.load(str(bundle.weights_path))
    graph = model.graph
    arch = bundle.architecture
    inp, out = str(arch.get("input", graph.input[0].name)), str(arch.get("output", graph.output[0].name))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    if INPUT_NAME in (inp, out) or OUTPUT_NAME in (inp, out):  # e.g. a graph tilefeet exported itself
        inp, out = _rename(graph, inp, "tilefeet_network_input"), _rename(graph, out, "tilefeet_network_output")
    original_in = next(v for v in graph.input if v.name == inp)
    original_out = next(v for v in graph.output if v.name == out)
    new_in = onnx.ValueInfoProto()
    new_in.CopyFrom(original_in)
    new_in.name = INPUT_NAME
    new_out = onnx.ValueInfoProto()
    new_out.CopyFrom(original_out)
    new_out.name = OUTPUT_NAME
    graph.input.remove(original_in)
    graph.input.insert(0, new_in)
    graph.output.remove(original_out)
    graph.output.append(new_out)
    nodes = [helper.make_node("Identity", [INPUT_NAME], [inp])]
    if bundle.activation == "sigmoid":
        nodes_out = [helper.make_node("Sigmoid", [out], [OUTPUT_NAME])]
    elif bundle.activation == "softmax" and opset >= 13:
        nodes_out = [helper.make_node("Softmax", [out], [OUTPUT_NAME], axis=1)]
    elif bundle.activation == "softmax":  # before opset 13, Softmax flattens the axes after ``axis``
        nodes_out = [
            helper.make_node("ReduceMax", [out], ["tilefeet_max"], axes=[1], keepdims=1),
            helper.make_node("Sub", [out, "tilefeet_max"], ["tilefeet_shifted"]),
            helper.make_node("Exp", ["tilefeet_shifted"], ["tilefeet_exp"]),
            helper.make_node("ReduceSum", ["tilefeet_exp"], ["tilefeet_sum"], axes=[1], keepdims=1),
            helper.make_node("Div", ["tilefeet_exp", "tilefeet_sum"], [OUTPUT_NAME]),
        ]
    else:
        nodes_out = [helper.make_node("Identity", [out], [OUTPUT_NAME])]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    graph.node.extend(nodes_out)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns about values clamped to the fp16 range
            model = convert_float_to_float16(model, keep_io_types=True)
        _sort_nodes(model.graph)  # the converter appends its input casts after their consumers
    onnx.save(model, str(path))
    return opset


def _rename(graph: Any, old: str, new: str) -> str:
    """Rename a tensor of the top-level graph everywhere it appears; returns ``new``."""
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.name == old:
            v.name = new
    return new


def _sort_nodes(graph: Any) -> None:
    """Order a graph's nodes topologically (ONNX requires it), keeping the given order otherwise."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise InvalidEngineError("the ONNX graph has a cycle or an input nothing produces; re-export it")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


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
    """Raise a one-line :class:`BackendUnavailableError` unless onnx and onnxscript are installed
    (found, not imported: a cached export is loaded without them)."""
    for module in ("onnx", "onnxscript"):
        try:
            if sys.modules.get(module, False) is None or importlib.util.find_spec(module) is None:
                raise ImportError(module)
        except (ImportError, ValueError):
            raise BackendUnavailableError(
                f"exporting to ONNX needs the {module} package: pip install 'tilefeet[onnx]' (or pip install onnx onnxscript)"
            ) from None
