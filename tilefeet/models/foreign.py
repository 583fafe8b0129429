"""Networks tilefeet did not build: load them without pickle, and measure what tiling needs.

A foreign network arrives as a graph file: an ONNX graph, a ``torch.export`` program (``.pt2``) or
TorchScript. tilefeet reads from the graph what it can (input rank and channels, fixed or dynamic
axes) and *measures* the rest by running the network on the CPU:

* the size divisor: the smallest ``d`` such that the network keeps the size of inputs whose sides
  are odd multiples of ``d``, raised to the network's total stride (input side over the side of its
  coarsest feature map, read from the shapes of its intermediate tensors): tiles on a lattice whose
  stride is a multiple of it see the pooling grid the whole image would, which crop mode's
  equality with whole-image inference needs. Some networks pad odd sizes themselves (MONAI's
  ``BasicUNet``), so sizes alone under-report it. Where no intermediate shapes can be read
  (TorchScript), the smallest shift of the input that shifts the output alike stands in;
* the receptive field: how far a change of one input pixel reaches in the output (any change of
  its bits: outside the receptive field a convolution computes from the very same numbers),
  measured on a random input (a zero input leaves ReLUs dead and under-reports it), at two
  positions, on an input grown until the change stays away from its borders. Random-weight and
  trained networks alike often reach far with tiny contributions (1e-6 of the largest, from the
  deepest level): those count, as crop mode's bit-level promise needs them;
* batch independence: a tile's output must not depend on its batch companions (a batch norm left
  in training mode breaks it, and with it tilefeet's bit-identity across block sizes);
* FLOPs per pixel, counted from the ONNX graph (Conv, ConvTranspose, Gemm, MatMul).

Each way a network cannot be tiled is a one-line :class:`~tilefeet.errors.InvalidEngineError`.

No pickle: ``.pt2`` archives are checked to hold no pickled payloads before ``torch.export.load``
reads them (plain tensors are raw bytes there; only tensor subclasses and custom objects are
pickled), and TorchScript is read by ``torch.jit.load``, which executes no pickled Python.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidEngineError

#: One forward pass on the CPU: float32 ``(B, C, H, W)`` in, the network's raw output out.
RunFn = Callable[[np.ndarray], np.ndarray]

#: Candidate divisors and shift periods (powers of two: every pooling and strided layer we know).
DIVISORS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Largest probe input side for the receptive field; a network reaching further is not tileable.
MAX_PROBE = 1024
#: A fixed input size below this is not worth tiling (the overlap would eat the tile).
MIN_FIXED_TILE = 128
ONNX_SIZE_LIMIT = 2_000_000_000  #: protobuf's limit for a single-file graph, with some room


@dataclass(frozen=True)
class Geometry:
    """What tiling needs to know of a network, measured by :func:`measure`."""

    in_channels: int
    out_channels: int
    divisor: int  #: tile sides (and the lattice stride, for crop mode) are multiples of this
    receptive_field: int  #: pixels, one axis: 2 × the farthest reach of a one-pixel change + 1
    fixed_tile: tuple[int, int] | None = None  #: the only input size a fixed-size graph takes
    fixed_batch: int | None = None  #: the only batch size a graph with a fixed batch axis takes

    def recommended(self) -> tuple[int, int]:
        """``(tile, overlap)``: the overlap is half the receptive field, rounded up to the divisor
        (blending weights fall to nothing at tile edges, where context is missing; crop mode needs
        an overlap of the whole receptive field, which the planner checks), and the tile at least
        four overlaps and 256 px, at most 1024, a multiple of the divisor."""
        if self.fixed_tile is not None:
            tile = self.fixed_tile[0]
            return tile, min(_round_up(self.receptive_field // 2, self.divisor), tile // 2 // self.divisor * self.divisor)
        overlap = _round_up(max(self.receptive_field // 2, 1), self.divisor)
        tile = _round_up(min(max(256, 4 * overlap), 1024), self.divisor)
        return tile, min(overlap, tile // 2 // self.divisor * self.divisor)


def _round_up(v: int, d: int) -> int:
    return -(-v // d) * d


# ------------------------------------------------------------------------------ graph files


@dataclass(frozen=True)
class OnnxIO:
    """An ONNX graph's one input and one output, as declared in the graph."""

    input: str
    output: str
    input_shape: tuple[int | str, ...]  #: ints for fixed axes, names for dynamic ones
    output_shape: tuple[int | str, ...]
    opset: int


def onnx_io(model: Any, where: str) -> OnnxIO:
    """The input and output of an ``onnx.ModelProto``; refuses graphs tilefeet cannot feed."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise InvalidEngineError(
            f"{where} has inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; tilefeet runs "
            "networks with one image input and one output: export the network with exactly those"
        )

    def shape(v: Any) -> tuple[int | str, ...]:
        dims = v.type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)

    for v in (inputs[0], outputs[0]):
        if v.type.tensor_type.elem_type != 1:  # TensorProto.FLOAT
            import onnx

            kind = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
            raise InvalidEngineError(f"{where}: tensor {v.name!r} is {kind}; tilefeet feeds and reads float32 tensors")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxIO(inputs[0].name, outputs[0].name, shape(inputs[0]), shape(outputs[0]), opset)


def load_onnx(path: Path) -> Any:
    """An ONNX graph with its weights (external data beside it, if any); one-line errors for a file
    that is not ONNX or whose weights are missing or do not fit the graph."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf, onnx and OS errors: all mean "not a usable graph"
        raise InvalidEngineError(f"{path} is not a readable ONNX graph with its weights ({first_line(e)})") from None
    return model


def onnx_session(model_or_path: Any, where: str) -> Any:
    """An ONNX Runtime CPU session; a graph whose weights do not match it fails here, in one line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: probing sizes makes expected errors
    source = str(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path.SerializeToString()
    try:
        return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types
        raise InvalidEngineError(
            f"{where}: ONNX Runtime cannot load the graph ({first_line(e)}): its weights do not match it or it is damaged"
        ) from None


def onnx_run_fn(session: Any) -> RunFn:
    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    return lambda x: session.run([out], {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def check_pt2(path: Path) -> None:
    """Refuse a ``.pt2`` archive that holds pickled payloads (tensor subclasses, custom objects,
    opaque constants) or sample inputs that need more than ``torch.load(weights_only=True)``:
    ``torch.export.load`` would unpickle them, and a bundle is data, never code."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            for name in names:
                base = name.rsplit("/", 1)[-1]
                if name.endswith(".json") and ("weights_config" in base or "constants_config" in base):
                    config = json.loads(z.read(name)).get("config", {})
                    if any(entry.get("use_pickle") for entry in config.values()):
                        raise InvalidEngineError(
                            f"{path} holds pickled tensors ({name}); tilefeet loads no pickle: export with plain tensors"
                        )
                if "/constants/" in name and base.startswith(("custom_obj", "opaque_obj")):
                    raise InvalidEngineError(
                        f"{path} holds a pickled custom object ({name}); tilefeet loads no pickle: export without it"
                    )
            for name in names:
                if "/sample_inputs/" in name:
                    import io

                    import torch

                    try:
                        torch.load(io.BytesIO(z.read(name)), weights_only=True)
                    except Exception:
                        raise InvalidEngineError(
                            f"{path}: its sample inputs ({name}) are not plain tensors; tilefeet loads no pickle"
                        ) from None
    except zipfile.BadZipFile:
        raise InvalidEngineError(f"{path} is not a torch.export program (.pt2 archive); save one with torch.export.save") from None


def load_pt2(path: str | os.PathLike) -> Any:  # -> torch.export.ExportedProgram
    """The ``torch.export`` program in ``path``, checked to hold no pickle first (:func:`check_pt2`).

    torch 2.11 warns that the archive's read-only buffer backs its weights ("The given buffer is not
    writable"): the program is only read for inference, so the warning says nothing to a user (and
    under ``-W error`` it would refuse a valid file, as it did in the GPU tests)."""
    import torch

    check_pt2(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            return torch.export.load(str(path))
    except Exception as e:  # deserialization raises many types
        raise InvalidEngineError(f"{path} is not a loadable torch.export program ({first_line(e)})") from None


def load_module(bundle: Any) -> Any:  # -> torch.nn.Module
    """The torch module of a bundle holding a ``.pt2`` program or TorchScript, on the CPU, fp32."""
    import torch

    path = bundle.weights_path
    if bundle.network == "torch_export":
        return load_pt2(path).module()
    if bundle.network == "torchscript":
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:
            raise InvalidEngineError(f"{path} is not loadable TorchScript ({first_line(e)})") from None
    from ..errors import ConfigError

    raise ConfigError(
        f"engine {bundle.name!r} is an ONNX graph, which torch cannot run: use --backend onnxruntime or tensorrt"
    )


def torch_run_fn(module: Any) -> RunFn:
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            y = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        if not isinstance(y, torch.Tensor):
            raise InvalidEngineError(f"the network returns {type(y).__name__}, not one tensor")
        return y.float().numpy()

    return run


# --------------------------------------------------------------------------------- measuring


def measure(
    run: RunFn,
    in_channels: int,
    *,
    stride: Callable[[int], int | None] | None = None,
    fixed_tile: tuple[int, int] | None = None,
    fixed_batch: int | None = None,
    receptive_field: int | None = None,
    where: str = "the network",
) -> Geometry:
    """The :class:`Geometry` of a network by running it (see the module docstring).

    ``stride(side)``: the network's total stride read from its intermediate shapes at a ``side``²
    input (:func:`onnx_stride`, :func:`torch_stride`), or ``None`` where they cannot be read.
    ``receptive_field`` given: it is taken as declared instead of measured (a network whose output
    depends on its whole input, which measuring refuses, can still be imported that way)."""
    if fixed_tile is not None:
        if min(fixed_tile) < MIN_FIXED_TILE:
            raise InvalidEngineError(
                f"{where} takes only {fixed_tile[0]}×{fixed_tile[1]} px inputs, smaller than the smallest tile tilefeet "
                f"runs ({MIN_FIXED_TILE} px); export it with dynamic height and width"
            )
        if fixed_tile[0] != fixed_tile[1]:
            raise InvalidEngineError(
                f"{where} takes only {fixed_tile[0]}×{fixed_tile[1]} px inputs; tilefeet needs square tiles: export it "
                "with dynamic height and width"
            )
        y = _run_checked(run, _random((fixed_batch or 1, in_channels, *fixed_tile), 0), where)
        _same_size(y, fixed_tile, where)
        divisor, out_channels = fixed_tile[0], y.shape[1]
    else:
        divisor, out_channels = size_divisor(run, in_channels, where)
    batch = fixed_batch or 2
    rf = receptive_field if receptive_field is not None else _receptive_field(run, in_channels, divisor, fixed_tile, fixed_batch, where)
    if fixed_tile is None:
        total = stride(_round_up(256, divisor)) if stride is not None else None
        if total is None:
            total = _shift_period(run, in_channels, divisor, rf, fixed_batch, where)
        divisor = max(divisor, total)
    if batch > 1:
        _check_batch_independence(run, in_channels, fixed_tile or (4 * divisor if divisor >= 16 else 64,) * 2, batch, where)  # type: ignore[arg-type]
    return Geometry(in_channels, int(out_channels), int(divisor), int(rf), fixed_tile, fixed_batch)


def _random(shape: Sequence[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _run_checked(run: RunFn, x: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(run(x))
    if y.ndim != 4:
        raise InvalidEngineError(
            f"{where} returns a {y.ndim}-D output {tuple(y.shape)} for a {tuple(x.shape)} input; tilefeet needs "
            "(batch, classes, height, width)"
        )
    if y.shape[0] != x.shape[0]:
        raise InvalidEngineError(f"{where} returns {y.shape[0]} outputs for a batch of {x.shape[0]}")
    return y


def _same_size(y: np.ndarray, hw: Sequence[int], where: str) -> None:
    if tuple(y.shape[2:]) != tuple(hw):
        raise InvalidEngineError(
            f"{where} maps a {hw[0]}×{hw[1]} input to a {y.shape[2]}×{y.shape[3]} output; tilefeet needs an output of "
            "the input's size (a network with 'same' padding, without cropping)"
        )


def size_divisor(run: RunFn, in_channels: int, where: str) -> tuple[int, int]:
    """The smallest ``d`` such that inputs whose sides are odd multiples of ``d`` keep their size."""
    failures: list[str] = []
    for d in DIVISORS:
        m = max(3, -(-64 // d)) | 1  # odd, and at least 64 px: small enough to be quick
        h, w = d * m, d * (m + 2)
        try:
            y = _run_checked(run, _random((1, in_channels, h, w), 0), where)
        except InvalidEngineError:
            raise
        except Exception as e:  # the network refuses this size
            failures.append(f"{h}×{w}: {first_line(e)}")
            continue
        _same_size(y, (h, w), where)
        return d, int(y.shape[1])
    raise InvalidEngineError(f"{where} fails on every tile size tried ({failures[-1] if failures else 'no details'}); check its input shape")


def _reach(run: RunFn, x: np.ndarray, points: Sequence[tuple[int, int]]) -> int:
    """The farthest distance (pixels, Chebyshev) at which changing one input pixel changes the output."""
    base = run(x)
    reach = 0
    for py, px in points:
        x2 = x.copy()
        x2[:, :, py, px] += 4.0
        diff = np.abs(run(x2) - base).max(axis=(0, 1))
        ys, xs = np.nonzero(diff > 0)
        if len(ys):
            reach = max(reach, int(np.abs(ys - py).max()), int(np.abs(xs - px).max()))
    return reach


def _receptive_field(
    run: RunFn,
    in_channels: int,
    divisor: int,
    fixed_tile: tuple[int, int] | None,
    fixed_batch: int | None,
    where: str,
) -> int:
    side = fixed_tile[0] if fixed_tile else _round_up(max(256, 16 * divisor), divisor)
    while True:
        x = _random((fixed_batch or 1, in_channels, side, side), 1)
        c = side // 2
        reach = _reach(run, x, [(c, c), (c + divisor // 2 + 1, c - 1)])
        if reach < side // 2 - divisor - 2:
            return 2 * reach + 1
        if fixed_tile or side >= MAX_PROBE:
            raise InvalidEngineError(
                f"{where}: one input pixel changes the output across the whole {side}×{side} input (a normalization over "
                "the image: instance norm, or a batch norm in training mode, then export in eval mode; or attention), so "
                "tiles cannot reproduce whole-image results; declare its reach with --receptive-field PIXELS to import it anyway"
            )
        side *= 2


def _shift_period(run: RunFn, in_channels: int, divisor: int, rf: int, fixed_batch: int | None, where: str) -> int:
    """The smallest shift (a power of two, at least ``divisor``) of the input that shifts the output
    alike away from the borders, judged against the float noise of the largest shift (which is a
    multiple of any pooling grid): the fallback for the network's total stride."""
    margin = rf // 2 + 2
    top = max(DIVISORS)
    side = _round_up(2 * margin + 64 + top, divisor)
    big = _random((fixed_batch or 1, in_channels, side + top, side + top), 2)
    base = run(big[:, :, :side, :side])

    def error(s: int) -> float:
        shifted = run(big[:, :, s : s + side, s : s + side])
        a = base[:, :, s + margin : side - margin, s + margin : side - margin]
        b = shifted[:, :, margin : side - s - margin, margin : side - s - margin]
        return float(np.abs(a - b).max())

    floor = error(top)
    return next(s for s in DIVISORS if s >= divisor and error(s) <= 2 * floor + 1e-30)


def _feature_sides(shapes: Any, side: int) -> list[int]:
    """Heights of the feature maps among 4-D shapes seen for a ``side`` × ``2·side`` input: those
    twice as wide as high (weights, biases and per-channel constants are not)."""
    return [int(s[2]) for s in shapes if len(s) == 4 and int(s[2]) > 0 and int(s[3]) == 2 * int(s[2])]


def torch_stride(module: Any, in_channels: int) -> Callable[[int], int | None]:
    """``side -> side / (height of the coarsest feature map)`` of a torch module at a
    ``side`` × ``2·side`` input, from forward hooks (an ``nn.Module``) or an fx interpreter (a
    ``torch.export`` program's module); ``None`` for TorchScript, whose submodules cannot be hooked."""
    import torch

    def stride(side: int) -> int | None:
        if isinstance(module, torch.jit.ScriptModule):
            return None
        seen: list[tuple[int, ...]] = []

        def note(value: Any) -> None:
            if isinstance(value, torch.Tensor):
                seen.append(tuple(value.shape))

        x = torch.from_numpy(_random((1, in_channels, side, 2 * side), 6))
        with torch.inference_mode():
            if isinstance(module, torch.fx.GraphModule):

                class Recorder(torch.fx.Interpreter):
                    def run_node(self, n: Any) -> Any:
                        out = super().run_node(n)
                        note(out)
                        return out

                Recorder(module).run(x)
            else:
                handles = [m.register_forward_hook(lambda _m, _i, out: note(out)) for m in module.modules()]
                try:
                    module(x)
                finally:
                    for h in handles:
                        h.remove()
        sides = _feature_sides(seen, side)
        return side // min(sides) if sides else None

    return stride


def onnx_stride(model: Any) -> Callable[[int], int | None]:
    """``side -> side / (height of the coarsest feature map)`` of an ONNX graph, by shape inference
    at a ``side`` × ``2·side`` input; ``None`` if shape inference cannot resolve the sizes."""

    def stride(side: int) -> int | None:
        sides = _feature_sides(_inferred_shapes(model, (side, 2 * side), 1).values(), side)
        return side // min(sides) if sides else None

    return stride


def _inferred_shapes(model: Any, hw: tuple[int, int], batch: int) -> dict[str, tuple[int, ...]]:
    """Every tensor shape of ``model`` that shape inference resolves at a ``batch`` × ``hw`` input
    (fixed input sizes are kept), initializers included."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:  # shapes only: no need to carry the weights through inference
        t.ClearField("raw_data")
        t.ClearField("float_data")
    io = onnx_io(m, "the graph")
    graph_input = next(i for i in m.graph.input if i.name == io.input)
    fixed = [batch, None, *hw]
    for k, d in enumerate(graph_input.type.tensor_type.shape.dim):
        value = fixed[k] if k < len(fixed) else None
        if value is not None and not d.HasField("dim_value"):
            d.Clear()
            d.dim_value = value
    m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for v in (*m.graph.input, *m.graph.value_info, *m.graph.output):
        ds = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in ds):
            shapes[v.name] = tuple(d.dim_value for d in ds)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def _check_batch_independence(run: RunFn, in_channels: int, hw: tuple[int, int], batch: int, where: str) -> None:
    x = _random((batch, in_channels, *hw), 3)
    other = x.copy()
    other[1:] = _random((batch - 1, in_channels, *hw), 4)
    a, b = run(x)[0], run(other)[0]
    if np.abs(a - b).max() > 1e-5 * max(float(np.abs(a).max()), 1e-30):
        raise InvalidEngineError(
            f"{where}: a tile's output depends on the other tiles of its batch (a batch norm in training mode?); "
            "export the network in eval mode (model.eval())"
        )


def probe_outputs(run: RunFn, in_channels: int, hw: tuple[int, int], batch: int = 1) -> tuple[float, float]:
    """The range of the network's output on a random input (to check an ``activation = "none"``
    network really returns probabilities)."""
    y = run(_random((batch, in_channels, *hw), 5))
    return float(np.min(y)), float(np.max(y))


# ------------------------------------------------------------------------------------- FLOPs


def onnx_flops_per_pixel(model: Any, *, side: int = 256) -> float:
    """FLOPs of one forward pass per input pixel, counted from an ONNX graph's Conv, ConvTranspose,
    Gemm and MatMul nodes at a ``side``² input (2 per multiply-add; activations, norms and pools are
    left out, as for tilefeet's own U-Net). ``model``: an ``onnx.ModelProto`` or a path."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    shapes = _inferred_shapes(model, (side, side), 1)
    x = shapes.get(onnx_io(model, "the graph").input)
    pixels = x[2] * x[3] if x and len(x) == 4 else side * side
    flops = 0.0
    for node in model.graph.node:
        ins = [shapes.get(n) for n in node.input]
        out = shapes.get(node.output[0]) if node.output else None
        # Weights are (out, in / groups, kh, kw) for Conv and (in, out / groups, kh, kw) for
        # ConvTranspose: each output (Conv) or input (ConvTranspose) element costs the rest.
        if node.op_type == "Conv" and len(ins) > 1 and ins[1] and out:
            flops += 2 * math.prod(out) * math.prod(ins[1][1:])
        elif node.op_type == "ConvTranspose" and len(ins) > 1 and ins[0] and ins[1]:
            flops += 2 * math.prod(ins[0]) * math.prod(ins[1][1:])
        elif node.op_type in ("Gemm", "MatMul") and ins and ins[0] and out:
            flops += 2 * math.prod(out) * ins[0][-1]
    return flops / pixels


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
