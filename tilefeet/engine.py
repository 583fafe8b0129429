"""Engine bundles: a trained network described by ``engine.toml`` + ``weights.safetensors``.

An engine bundle is data, never code. ``engine.toml`` declares::

    name = "isbi-membrane"
    [input]          pixel_size_nm = [4.0, 4.0], channels, divisor, receptive_field
    [normalization]  how the training data was normalized, and its reference histogram
    [output]         classes, activation ("sigmoid", "softmax", or "none": the network's output
                     already is probabilities)
    [architecture]   the network: name = "unet2d" and its parameters (tilefeet's own U-Net, weights
                     in safetensors), or a foreign network (``import-engine``): name = "onnx" (an
                     ONNX graph), "torch_export" (a ``torch.export`` program, ``.pt2``) or
                     "torchscript"; see :data:`NETWORKS`
    [weights]        file, sha256
    [inference]      recommended tile / overlap
    [metrics]        held-out scores (written by training / evaluation)

The network is data too: a foreign network is a graph file (ONNX, a ``.pt2`` program, TorchScript),
never a pickled module: tilefeet does not ``torch.load`` modules (see :mod:`tilefeet.models.foreign`).

Bundles are found by name on a search path (``$TILEFEET_ENGINES``, the repo's ``engines/``, the
ones shipped inside the wheel) or given as a folder path.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, EngineNotFoundError, InputNotFoundError, InvalidEngineError, TilefeetError
from .intensity import Normalization
from .storage import os_error

ENGINE_FILE = "engine.toml"

#: The network formats a bundle can hold (``[architecture] name``) and the backends that run each.
#: tilefeet's U-Net and exported programs are torch modules, so they also export to ONNX (for ONNX
#: Runtime and TensorRT); an ONNX graph has no torch form; TorchScript does not go through the
#: dynamo ONNX exporter, so it runs on torch only. OpenVINO reads the same ONNX file ONNX Runtime runs.
NETWORKS: dict[str, tuple[str, ...]] = {
    "unet2d": ("torch", "onnxruntime", "openvino", "tensorrt"),
    "torch_export": ("torch", "onnxruntime", "openvino", "tensorrt"),
    "torchscript": ("torch",),
    "onnx": ("onnxruntime", "openvino", "tensorrt"),
}
ACTIVATIONS: tuple[str, ...] = ("sigmoid", "softmax", "none")


@dataclass(frozen=True)
class EngineBundle:
    """A trained network and everything needed to run it on a section."""

    name: str
    path: Path  #: the bundle folder
    pixel_size_nm: tuple[float, float]  #: (y, x) pixel size the network was trained at
    classes: tuple[str, ...]
    activation: Literal["sigmoid", "softmax", "none"]
    architecture: Mapping[str, Any]
    normalization: Normalization
    in_channels: int = 1
    divisor: int = 16  #: tile sides must be multiples of this
    receptive_field: int = 0  #: pixels, one axis
    weights_file: str = "weights.safetensors"
    weights_sha256: str = ""
    description: str = ""
    tile: int = 512  #: recommended tile (network grid)
    overlap: int = 64  #: recommended overlap
    metrics: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def out_channels(self) -> int:
        return len(self.classes)

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights_file

    @property
    def network(self) -> str:
        """The network's format: a key of :data:`NETWORKS`."""
        return str(self.architecture.get("name", ""))

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends that can run this bundle's network (``--backend auto`` chooses among them)."""
        return NETWORKS.get(self.network, ())

    @property
    def fixed_tile(self) -> tuple[int, int] | None:
        """The only tile a network with a fixed input size accepts, else ``None``."""
        fixed = self.architecture.get("fixed_tile")
        return (int(fixed[0]), int(fixed[1])) if fixed else None

    @property
    def fixed_batch(self) -> int | None:
        """The only batch size a graph with a fixed batch axis accepts, else ``None``."""
        fixed = self.architecture.get("fixed_batch")
        return int(fixed) if fixed else None

    def check_tile(self, tile: tuple[int, int]) -> None:
        """Refuse, in one line, a tile this network cannot take."""
        fixed = self.fixed_tile
        if fixed is not None and tuple(tile) != fixed:
            raise ConfigError(
                f"engine {self.name!r} has a fixed input size of {fixed[0]}×{fixed[1]} px; use --tile {fixed[0]}"
                + ("" if fixed[0] == fixed[1] else f",{fixed[1]}")
            )

    def check_weights(self) -> None:
        """The weights file exists and, when ``engine.toml`` records its sha256, is that file."""
        if not self.weights_path.is_file():
            raise InvalidEngineError(f"engine {self.name!r}: weights file {self.weights_path} is missing; re-copy the bundle")
        if self.weights_sha256 and self.weights_digest != self.weights_sha256:
            raise InvalidEngineError(
                f"engine {self.name!r}: {self.weights_path} does not match the sha256 recorded in {ENGINE_FILE} "
                "(damaged or replaced); re-copy the bundle, or re-export it to record new weights"
            )

    @cached_property
    def weights_digest(self) -> str:
        """sha256 of the weights file, read once per bundle (the check and the fingerprint share it)."""
        return file_sha256(self.weights_path)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of engine.toml and the weights: what a cached compiled engine or a resume must match."""
        h = hashlib.sha256((self.path / ENGINE_FILE).read_bytes())
        h.update(self.weights_digest.encode())
        return h.hexdigest()

    def flops_per_pixel(self) -> float:
        """FLOPs of one forward pass per input pixel: analytic for tilefeet's U-Net; for a foreign
        network, counted from its ONNX graph (Conv, ConvTranspose, Gemm, MatMul) at import."""
        arch = dict(self.architecture)
        if arch.get("name") == "unet2d":
            from .models.unet import unet_flops_per_pixel

            return unet_flops_per_pixel(self.in_channels, self.out_channels, arch["base_channels"], arch["depth"])
        return float(arch.get("flops_per_pixel", float("nan")))

    def build_model(self, *, load_weights: bool = True):  # -> torch.nn.Module
        """The network with its output activation, in eval mode, batch norms folded, on the CPU.

        A foreign network is loaded from its graph file (:func:`tilefeet.models.foreign.load_module`);
        an ONNX graph has no torch form and is a one-line :class:`ConfigError`."""
        import torch

        from .models.head import WithActivation

        if self.network != "unet2d":
            from .models.foreign import load_module

            self.check_weights()
            return WithActivation(load_module(self), self.activation).eval().requires_grad_(False)
        net = build_architecture(self.architecture, self.in_channels, self.out_channels)
        if load_weights:
            from safetensors.torch import load_file

            self.check_weights()
            try:
                state = load_file(str(self.weights_path))
            except Exception as e:  # safetensors raises its own SafetensorError for damaged files
                raise InvalidEngineError(
                    f"engine {self.name!r}: {self.weights_path} is not a readable safetensors file "
                    f"({str(e).splitlines()[0]}); re-copy or re-export the bundle"
                ) from None
            try:
                net.load_state_dict(state)
            except (RuntimeError, ValueError) as e:
                raise InvalidEngineError(
                    f"engine {self.name!r}: weights in {self.weights_path} do not fit the declared architecture "
                    f"({str(e).splitlines()[0]}); re-export the bundle"
                ) from None
        net.eval()
        if hasattr(net, "fuse"):
            net.fuse()
        return WithActivation(net, self.activation).eval().requires_grad_(False).to(torch.float32)


def build_architecture(arch: Mapping[str, Any], in_channels: int, out_channels: int):
    """An untrained network from an ``[architecture]`` table."""
    params = {k: v for k, v in arch.items() if k != "name"}
    name = arch.get("name")
    if name == "unet2d":
        from .models.unet import UNet2d

        return UNet2d(in_channels=in_channels, out_channels=out_channels, **params)
    raise InvalidEngineError(f"unknown architecture {name!r} in engine.toml; tilefeet knows: {', '.join(NETWORKS)}")


# ------------------------------------------------------------------------------- finding bundles


def engine_search_path() -> list[Path]:
    """Folders searched for engine bundles by name, first match wins."""
    paths = [Path(p) for p in os.environ.get("TILEFEET_ENGINES", "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    paths += [here.parent / "engines", here / "_engines"]  # source checkout / installed wheel
    return [p for p in paths if p.is_dir()]


def list_engines() -> list[str]:
    names: set[str] = set()
    for folder in engine_search_path():
        names.update(p.parent.name for p in folder.glob(f"*/{ENGINE_FILE}"))
    return sorted(names)


def find_engine(name_or_path: str | os.PathLike) -> Path:
    """The bundle folder for an engine name or a path to a bundle folder / its engine.toml."""
    p = Path(name_or_path)
    if p.name == ENGINE_FILE and p.is_file():
        return p.parent
    if (p / ENGINE_FILE).is_file():
        return p
    if os.sep not in str(name_or_path) and "/" not in str(name_or_path):
        for folder in engine_search_path():
            if (folder / str(name_or_path) / ENGINE_FILE).is_file():
                return folder / str(name_or_path)
    known = ", ".join(list_engines()) or "none found"
    raise EngineNotFoundError(
        f"no engine {str(name_or_path)!r}; available engines: {known} (or give the path of a bundle folder "
        f"holding {ENGINE_FILE})"
    )


def load_engine(name_or_path: str | os.PathLike | EngineBundle) -> EngineBundle:
    """Read an engine bundle by name (see :func:`engine_search_path`) or folder path."""
    if isinstance(name_or_path, EngineBundle):
        return name_or_path
    folder = find_engine(name_or_path)
    toml_path = folder / ENGINE_FILE
    try:
        raw = tomllib.loads(toml_path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InvalidEngineError(f"{toml_path} is not valid TOML ({e}); fix or re-create the bundle") from None
    return engine_from_toml(raw, folder)


def engine_from_toml(raw: Mapping[str, Any], folder: Path) -> EngineBundle:
    where = folder / ENGINE_FILE
    try:
        inp, out, arch = raw["input"], raw["output"], raw["architecture"]
        px = inp["pixel_size_nm"]
        px = (float(px), float(px)) if isinstance(px, (int, float)) else (float(px[0]), float(px[-1]))
        norm = dict(raw.get("normalization", {}))
        for key in ("percentiles", "percentile_values", "histogram_range", "histogram"):
            if key in norm:
                norm[key] = tuple(float(v) for v in norm[key])
        weights = raw.get("weights", {})
        infer = raw.get("inference", {})
        bundle = EngineBundle(
            name=str(raw.get("name", folder.name)),
            path=folder,
            pixel_size_nm=px,
            classes=tuple(str(c) for c in out["classes"]),
            activation=out.get("activation", "sigmoid"),
            architecture=dict(arch),
            normalization=Normalization(**norm),
            in_channels=int(inp.get("channels", 1)),
            divisor=int(inp.get("divisor", 1)),
            receptive_field=int(inp.get("receptive_field", 0)),
            weights_file=str(weights.get("file", "weights.safetensors")),
            weights_sha256=str(weights.get("sha256", "")),
            description=str(raw.get("description", "")),
            tile=int(infer.get("tile", 512)),
            overlap=int(infer.get("overlap", 64)),
            metrics=dict(raw.get("metrics", {})),
            raw=dict(raw),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidEngineError(f"{where} lacks or mistypes a field ({e!r}); see engines/README.md for the schema") from None
    if bundle.activation not in ACTIVATIONS:
        raise InvalidEngineError(f"{where}: activation must be one of {', '.join(ACTIVATIONS)}, got {bundle.activation!r}")
    if bundle.network not in NETWORKS:
        raise InvalidEngineError(f"{where}: unknown architecture {bundle.network!r}; tilefeet knows: {', '.join(NETWORKS)}")
    if min(bundle.pixel_size_nm) <= 0 or not bundle.classes or bundle.divisor < 1:
        raise InvalidEngineError(f"{where}: pixel_size_nm, classes and divisor must be positive / non-empty")
    if not bundle.weights_path.is_file():  # fail at load, not in the first task
        raise InvalidEngineError(f"engine {bundle.name!r}: weights file {bundle.weights_path} is missing; re-copy the bundle")
    return bundle


def write_bundle(
    folder: Path,
    *,
    name: str,
    state_dict: Mapping[str, Any],
    architecture: Mapping[str, Any],
    pixel_size_nm: tuple[float, float],
    classes: tuple[str, ...],
    normalization: Normalization,
    activation: str = "sigmoid",
    in_channels: int = 1,
    description: str = "",
    tile: int = 512,
    overlap: int = 64,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> EngineBundle:
    """Write ``engine.toml`` and ``weights.safetensors`` into ``folder`` (created) and load it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.safetensors"
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, weights)
    depth = int(architecture.get("depth", 0))
    rf = 0
    if architecture.get("name") == "unet2d":
        from .models.unet import unet_receptive_field

        rf = unet_receptive_field(depth)
    doc: dict[str, Any] = {
        "name": name,
        "description": description,
        "input": {
            "pixel_size_nm": [float(pixel_size_nm[0]), float(pixel_size_nm[1])],
            "channels": in_channels,
            "divisor": 2**depth if depth else 1,
            "receptive_field": rf,
        },
        "normalization": normalization.to_toml(),
        "output": {"classes": list(classes), "activation": activation},
        "architecture": dict(architecture),
        "weights": {"file": weights.name, "sha256": file_sha256(weights)},
        "inference": {"tile": tile, "overlap": overlap},
    }
    if metrics:
        doc["metrics"] = dict(metrics)
    if training:
        doc["training"] = dict(training)
    (folder / ENGINE_FILE).write_text(dump_toml(doc))
    return load_engine(folder)


def save_safetensors(tensors: Mapping[str, Any], path: Path) -> None:
    """``safetensors.torch.save_file``, whose I/O errors (its own ``SafetensorError``, "... os error 28")
    become the :class:`OSError` any other file write raises, so a full disk is said like one."""
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path))
    except Exception as e:
        found = None if isinstance(e, OSError) else re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def file_sha256(*paths: Path) -> str:
    """sha256 of the files' bytes, one after the other (``hashlib.file_digest`` for one file)."""
    if len(paths) == 1:
        with open(paths[0], "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def dump_toml(doc: Mapping[str, Any]) -> str:
    """``doc`` as TOML text (``tomli-w``; the standard library only reads TOML). Tuples become
    arrays; ``None`` values are left out, as TOML has no null."""

    def plain(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    import tomli_w

    text = tomli_w.dumps(plain(doc))
    compact = _ARRAY.sub(_inline_array, text)
    # tomli-w writes every array one item per line (a 256-bin histogram as 256 lines); arrays of
    # plain values are joined back onto lines of at most 100 characters, and checked to read the same.
    return compact if tomllib.loads(compact) == tomllib.loads(text) else text


#: A multi-line array of plain values as tomli-w writes it: ``[``, one ``value,`` per line, ``]``.
#: Each line matches one way only (indentation, then a value that starts with no blank): with
#: ``[ \t]+[^...]+`` the split between them was free, and an array of n values before a nested
#: one took 4^n steps to reject (14 values: a minute).
_ARRAY = re.compile(r"\[\n((?:[ \t]+[^ \t\[\]{}\n][^\[\]{}\n]*,\n)+)[ \t]*\]")


def _inline_array(m: re.Match[str]) -> str:
    # One item per "\n", TOML's line break. Not str.splitlines(): it also breaks at \x85, \u2028 and
    # \u2029, which a TOML string holds as they are (a string holding one was cut in two).
    items = [line.strip(" \t")[:-1] for line in m.group(1).split("\n")[:-1]]
    one = "[" + ", ".join(items) + "]"
    if len(one) <= 80:
        return one
    lines, line = [], "    "
    for item in items:
        if len(line) + len(item) + 2 > 100 and line.strip():
            lines.append(line.rstrip())
            line = "    "
        line += item + ", "
    lines.append(line.rstrip())
    return "[\n" + "\n".join(lines) + "\n]"


# ------------------------------------------------------------------------ foreign networks


#: ``--normalize`` forms: what the network expects its input to be (see :func:`parse_normalization`).
NORMALIZE_FORMS = ("meanstd:MEAN,STD", "range:LOW,HIGH", "percentile:P_LOW,P_HIGH", "zscore")
#: Where the 1st and 99th percentiles of a normal distribution lie, in standard deviations.
_Z99 = 2.3263478740408408


def parse_normalization(text: str | Normalization) -> Normalization:
    """What a foreign network expects, as :class:`Normalization`:

    ``meanstd:MEAN,STD``   ``(x - MEAN) / STD`` with fixed raw constants;
    ``range:LOW,HIGH``     ``(x - LOW) / (HIGH - LOW)`` with fixed raw constants;
    ``percentile:P1,P2``   each section's P1th and P2th percentiles mapped to 0 and 1 (bioimage.io's
                           ``scale_range``): section-adaptive, :attr:`Normalization.adaptive`;
    ``zscore``             each section to zero mean and unit variance (``zero_mean_unit_variance``
                           per sample): section-adaptive.

    Without training data there is no reference histogram, and the percentiles that the intensity
    check compares with are those of a normal distribution with the declared mean and standard
    deviation (``meanstd``), or the declared range itself (``range``): approximations, said so here."""
    if isinstance(text, Normalization):
        return text
    method, _, args = str(text).strip().partition(":")
    method = method.lower()
    try:
        values = [float(v) for v in args.split(",")] if args.strip() else []
    except ValueError:
        values = None  # type: ignore[assignment]
    if method == "meanstd" and values and len(values) == 2 and values[1] > 0:
        mean, std = values
        return Normalization(
            "meanstd", mean=mean, std=std, percentile_values=(mean - _Z99 * std, mean + _Z99 * std), histogram_range=(0.0, 0.0)
        )
    if method == "range" and values and len(values) == 2 and values[1] > values[0]:
        low, high = values
        return Normalization(
            "range", mean=(low + high) / 2, std=(high - low) / 4, low=low, high=high, percentiles=(0.0, 100.0),
            percentile_values=(low, high), histogram_range=(0.0, 0.0),
        )
    if method == "percentile" and values and len(values) == 2 and 0 <= values[0] < values[1] <= 100:
        return Normalization(
            "range", mean=0.5, std=0.25, low=0.0, high=1.0, percentiles=(values[0], values[1]), percentile_values=(0.0, 1.0),
            histogram_range=(0.0, 0.0), adaptive="percentile",
        )
    if method == "zscore" and not values:
        return Normalization(
            "meanstd", mean=0.0, std=1.0, percentile_values=(-_Z99, _Z99), histogram_range=(0.0, 0.0), adaptive="meanstd"
        )
    raise ConfigError(
        f"unknown preprocessing {str(text)!r} for --normalize; use one of: {', '.join(NORMALIZE_FORMS)} "
        "(e.g. meanstd:125,43 for 8-bit data normalized by the training mean and standard deviation)"
    )


@dataclass(frozen=True)
class Declared:
    """What a user declares about a foreign network (tilefeet cannot read it from the graph)."""

    pixel_size_nm: tuple[float, float]
    classes: tuple[str, ...]
    activation: str = "sigmoid"  #: sigmoid, softmax or none; Declared.create requires it to be said
    normalization: Normalization = field(default_factory=Normalization)
    in_channels: int | None = None  #: checked against the graph where it says; required for TorchScript
    receptive_field: int | None = None  #: declared instead of measured (networks that see the whole input)
    tile: int | None = None  #: recommended tile, else from the measured geometry
    overlap: int | None = None

    @classmethod
    def create(cls, *, pixel_size_nm: Any, classes: Any, activation: str | None = None, normalization: Any = None,
               **kw: Any) -> Declared:
        """From loose user input (``"4nm"``, ``"membrane,mito"``, ``"meanstd:125,43"``); one-line errors.
        Pixel size, classes, normalization and activation have no defaults: a guess would run and give
        wrong answers (a network that returns probabilities, given a sigmoid, puts every pixel at 0.5 or above)."""
        from .units import parse_pixel_size

        if pixel_size_nm is None or pixel_size_nm == "":
            raise ConfigError("missing pixel size: say what pixel size the network was trained at, e.g. --pixel-size 4nm")
        if normalization is None or normalization == "":
            raise ConfigError(
                "missing normalization: say what the network expects its input to be, with --normalize "
                f"{' | '.join(NORMALIZE_FORMS)} (e.g. meanstd:125,43 for the training data's mean and standard deviation)"
            )
        names = tuple(c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes or ()) if c.strip())
        if not names:
            raise ConfigError("missing classes: name the network's output channels, e.g. --classes membrane (or membrane,mito)")
        if activation is None or activation == "":
            raise ConfigError(
                "missing activation: say what turns the network's output into probabilities, with --activation "
                f"{', '.join(ACTIVATIONS)} (none: the network returns probabilities itself)"
            )
        act = str(activation).lower()
        if act not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; use one of: {', '.join(ACTIVATIONS)}")
        return cls(parse_pixel_size(pixel_size_nm, where="--pixel-size"), names, act, parse_normalization(normalization),
                   **{k: v for k, v in kw.items() if v is not None})


#: File suffixes :func:`import_network` reads: ONNX, a ``torch.export`` program, TorchScript.
NETWORK_SUFFIXES = (".onnx", ".pt2", ".pt", ".ts", ".torchscript", ".jit")


def check_network_file(source: str | os.PathLike) -> Path:
    """``source`` as a path to a network file tilefeet can import, or one line saying why not
    (checked before anything is asked of the user's declarations)."""
    src = Path(source)
    if not src.is_file():
        raise InputNotFoundError(f"no network file {src}; give an .onnx, .pt2 or TorchScript file")
    if src.suffix.lower() not in NETWORK_SUFFIXES:
        raise ConfigError(
            f"cannot import {src}: give an ONNX graph (.onnx), a torch.export program (.pt2), TorchScript (.pt) "
            "or a bioimage.io package (rdf.yaml, .zip)"
        )
    return src


def import_network(
    source: str | os.PathLike,
    out: str | os.PathLike,
    declared: Declared,
    *,
    name: str | None = None,
    description: str = "",
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> EngineBundle:
    """An engine bundle at ``out`` around a foreign network: an ONNX graph (``.onnx``), a
    ``torch.export`` program (``.pt2``) or TorchScript (``.pt``/``.ts``/``.torchscript``).

    The graph is checked and measured (:mod:`tilefeet.models.foreign`): input rank and channels,
    fixed axes, divisor, receptive field, batch independence, output size and channels against the
    declared classes, and, with ``activation = "none"``, that the output is probabilities. The
    bundle is written into a temporary folder beside ``out`` and renamed into place complete.
    ``extra``: more engine.toml tables (e.g. ``[bioimageio]`` provenance)."""
    from .models import foreign

    src = check_network_file(source)
    where = str(src)
    suffix = src.suffix.lower()
    arch: dict[str, Any]
    if suffix == ".onnx":
        model = foreign.load_onnx(src)
        if model.ByteSize() > foreign.ONNX_SIZE_LIMIT:
            raise InvalidEngineError(f"{src}: graphs over 2 GB are not supported (protobuf's limit for one file)")
        io = foreign.onnx_io(model, where)
        if len(io.input_shape) != 4 or len(io.output_shape) not in (0, 4):
            raise InvalidEngineError(
                f"{src} takes a {len(io.input_shape)}-D input {io.input_shape}; tilefeet runs 2-D networks on "
                "(batch, channels, height, width) tiles"
            )
        channels = io.input_shape[1]
        if not isinstance(channels, int):
            raise InvalidEngineError(f"{src}: its channel axis is dynamic ({channels!r}); export it with a fixed channel count")
        run = foreign.onnx_run_fn(foreign.onnx_session(model, where))
        fixed_hw = tuple(io.input_shape[2:]) if all(isinstance(v, int) for v in io.input_shape[2:]) else None
        fixed_batch = io.input_shape[0] if isinstance(io.input_shape[0], int) else None
        stride = foreign.onnx_stride(model)
        arch = {"name": "onnx", "input": io.input, "output": io.output, "opset": io.opset,
                "flops_per_pixel": round(foreign.onnx_flops_per_pixel(model), 3)}
        weights_name = "model.onnx"

        def save(folder: Path) -> None:
            import onnx

            onnx.save(model, str(folder / weights_name))
    elif suffix == ".pt2":
        program = foreign.load_pt2(src)
        shape = _program_input_shape(program, where)
        channels = shape[1] if isinstance(shape[1], int) else (declared.in_channels or 1)
        fixed_hw = tuple(shape[2:]) if all(isinstance(v, int) for v in shape[2:]) else None
        fixed_batch = shape[0] if isinstance(shape[0], int) else None
        module = program.module()
        run, stride = foreign.torch_run_fn(module), foreign.torch_stride(module, int(channels))
        arch, weights_name = {"name": "torch_export"}, "model.pt2"

        def save(folder: Path) -> None:
            shutil.copyfile(src, folder / weights_name)
    elif suffix in (".pt", ".ts", ".torchscript", ".jit"):
        import torch

        try:
            script = torch.jit.load(str(src), map_location="cpu").eval()
        except Exception as e:
            raise InvalidEngineError(
                f"{src} is not TorchScript ({foreign.first_line(e)}); tilefeet loads no pickled modules: "
                "save the network with torch.jit.save, torch.export.save (.pt2) or export it to ONNX"
            ) from None
        channels, fixed_hw, fixed_batch = declared.in_channels or 1, None, None
        run, stride = foreign.torch_run_fn(script), foreign.torch_stride(script, int(channels))
        arch, weights_name = {"name": "torchscript"}, "model.torchscript"

        def save(folder: Path) -> None:
            shutil.copyfile(src, folder / weights_name)
    else:  # pragma: no cover - check_network_file refused it
        raise ConfigError(f"cannot import {src}")
    if declared.in_channels is not None and declared.in_channels != channels:
        raise InvalidEngineError(f"{src} takes {channels} input channel(s), but {declared.in_channels} were declared")
    geometry = foreign.measure(
        run, int(channels), stride=stride, fixed_tile=fixed_hw, fixed_batch=fixed_batch,  # type: ignore[arg-type]
        receptive_field=declared.receptive_field, where=where,
    )
    if geometry.out_channels != len(declared.classes):
        raise InvalidEngineError(
            f"{src} outputs {geometry.out_channels} channel(s), but {len(declared.classes)} class(es) were declared "
            f"({', '.join(declared.classes)}); name one class per output channel with --classes"
        )
    if declared.activation == "none":
        side = geometry.fixed_tile or (geometry.divisor * max(1, 64 // geometry.divisor),) * 2
        lo, hi = foreign.probe_outputs(run, int(channels), side, geometry.fixed_batch or 1)  # type: ignore[arg-type]
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise InvalidEngineError(
                f"{src} outputs values from {lo:.3g} to {hi:.3g}, not probabilities; declare its activation "
                "(--activation sigmoid or softmax) so tilefeet applies it"
            )
    if geometry.fixed_tile:
        arch["fixed_tile"] = list(geometry.fixed_tile)
    if geometry.fixed_batch:
        arch["fixed_batch"] = geometry.fixed_batch
    return _write_foreign(out, name or Path(out).name, declared, geometry, arch, weights_name, save,
                          description=description, overwrite=overwrite,
                          extra={"source": {"file": src.name, "sha256": file_sha256(src)}, **dict(extra or {})})


def _program_input_shape(program: Any, where: str) -> tuple[Any, ...]:
    """The input shape of an exported program's one user input (ints for static axes)."""
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        raise InvalidEngineError(f"{where} takes {len(names)} inputs; tilefeet runs networks with one image input")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    shape = tuple(d if isinstance(d, int) else str(d) for d in node.meta["val"].shape)
    if len(shape) != 4:
        raise InvalidEngineError(
            f"{where} takes a {len(shape)}-D input {shape}; tilefeet runs 2-D networks on (batch, channels, height, width) tiles"
        )
    return shape


def _write_foreign(
    out: str | os.PathLike,
    name: str,
    declared: Declared,
    geometry: Any,
    arch: Mapping[str, Any],
    weights_name: str,
    save: Any,
    *,
    description: str,
    overwrite: bool,
    extra: Mapping[str, Any],
) -> EngineBundle:
    """Write a foreign bundle into a temporary folder, then rename it to ``out`` complete."""
    import uuid

    from .errors import OutputExistsError

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; choose another -o or pass --overwrite to replace it")
    tile, overlap = geometry.recommended()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_foreign_into(tmp, out, name, declared, geometry, arch, weights_name, save, description, extra, tile, overlap)
    except OSError as e:
        if isinstance(e, TilefeetError):
            raise
        raise os_error(OSError(e.errno, e.strerror), out) from None  # the temporary folder's name means nothing to the user
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_engine(out)


def _write_foreign_into(
    tmp: Path, out: Path, name: str, declared: Declared, geometry: Any, arch: Mapping[str, Any], weights_name: str, save: Any,
    description: str, extra: Mapping[str, Any], tile: int, overlap: int,
) -> None:
    """The bundle's files into ``tmp``, checked, then renamed to ``out`` (replacing it)."""
    tmp.mkdir(parents=True)
    save(tmp)
    doc: dict[str, Any] = {
        "name": name,
        "description": description or f"imported {arch['name']} network",
        "input": {
            "pixel_size_nm": list(declared.pixel_size_nm),
            "channels": geometry.in_channels,
            "divisor": geometry.divisor,
            "receptive_field": geometry.receptive_field,
        },
        "normalization": declared.normalization.to_toml(),
        "output": {"classes": list(declared.classes), "activation": declared.activation},
        "architecture": dict(arch),
        "weights": {"file": weights_name, "sha256": file_sha256(tmp / weights_name)},
        "inference": {"tile": declared.tile or tile, "overlap": declared.overlap if declared.overlap is not None else overlap},
        **dict(extra),
    }
    (tmp / ENGINE_FILE).write_text(dump_toml(doc))
    load_engine(tmp)  # proves it readable before it takes the name
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def bundle_from_module(
    module: Any,
    *,
    pixel_size_nm: Any,
    classes: Any,
    activation: str = "sigmoid",
    normalization: Any = None,
    in_channels: int = 1,
    name: str = "module",
    receptive_field: int | None = None,
    cache: Path | None = None,
) -> EngineBundle:
    """An engine bundle around a ``torch.nn.Module``, for ``segment(..., model=module)``.

    The module (a copy, in eval mode, on the CPU, fp32) is measured and exported with
    ``torch.export`` (dynamic batch, height and width in multiples of its divisor) into a ``.pt2``
    program in the user cache (``<cache>/modules/<name>-<key>/``), keyed by a hash of its weights,
    its class and the declarations: the same module and declarations find the same bundle, with no
    export. Every runner, and every worker of a cluster, then loads the network from that file: the
    module travels as an exported program (a path in each task), never pickled. On a cluster whose
    workers do not share the cache's file system, put ``$TILEFEET_CACHE`` on a shared one, or import
    the module once into a bundle folder with :func:`import_network` and pass that path.

    ``normalization`` (required): a :class:`Normalization` or a ``--normalize`` form (:func:`parse_normalization`)."""
    import copy
    import json

    import torch

    from .artifacts import build_once, cache_dir
    from .models import foreign

    declared = Declared.create(
        pixel_size_nm=pixel_size_nm, classes=classes, activation=activation, normalization=normalization,
        in_channels=in_channels, receptive_field=receptive_field,
    )
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"model= must be a torch.nn.Module, got {type(module).__name__}")
    net = copy.deepcopy(module).eval().cpu().float()
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for key, tensor in net.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps([repr(declared), name, torch.__version__], sort_keys=True).encode())
    folder = (cache or cache_dir()) / "modules" / f"{_slug(name)}-{h.hexdigest()[:16]}"

    def build(tmp: Path) -> None:
        geometry = foreign.measure(
            foreign.torch_run_fn(net), in_channels, stride=foreign.torch_stride(net, in_channels),
            receptive_field=declared.receptive_field, where=f"model {type(module).__name__}",
        )
        if geometry.out_channels != len(declared.classes):
            raise InvalidEngineError(
                f"model {type(module).__name__} outputs {geometry.out_channels} channel(s), but {len(declared.classes)} "
                f"class(es) were given ({', '.join(declared.classes)}); name one class per output channel"
            )

        def save(folder: Path) -> None:
            export_program(net, in_channels, geometry.divisor, folder / "model.pt2")

        _write_foreign(tmp, name, declared, geometry, {"name": "torch_export"}, "model.pt2", save,
                       description=f"{type(module).__name__} exported by tilefeet.bundle_from_module", overwrite=True,
                       extra={"source": {"module": f"{type(module).__module__}.{type(module).__qualname__}"}})

    build_once(folder, build)
    return load_engine(folder)


def export_program(net: Any, in_channels: int, divisor: int, path: Path) -> None:
    """``torch.export`` a module with dynamic batch, and height and width multiples of ``divisor``."""
    import torch
    from torch.export import Dim

    d = divisor
    example = torch.zeros(2, in_channels, 2 * d if d >= 16 else 32, 3 * d if d >= 16 else 48)
    h, w = Dim("h_blocks", min=1), Dim("w_blocks", min=1)
    dims = {0: Dim("batch", min=1), 2: d * h if d > 1 else Dim("h", min=16), 3: d * w if d > 1 else Dim("w", min=16)}
    arg = next(iter(__import__("inspect").signature(net.forward).parameters))
    try:
        program = torch.export.export(net, (example,), dynamic_shapes={arg: dims})
    except Exception as e:  # torch.export raises many types; all mean the same here
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidEngineError(
            f"torch.export could not export the module ({text}); export it yourself (torch.export or ONNX) and import the file"
        ) from None
    torch.export.save(program, str(path))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "engine"


# ------------------------------------------------------------------------------ object recipes


def engine_recipes(engine: str | os.PathLike | None) -> dict:
    """The ``[objects]`` table of an engine (a name or a bundle folder): one recipe per class (what
    :mod:`tilefeet.objects` uses unless flags say otherwise); empty when the engine records none or
    cannot be found here."""
    if not engine:
        return {}
    try:
        raw = tomllib.loads((find_engine(engine) / ENGINE_FILE).read_text())
    except Exception:  # an engine of another machine, renamed or damaged: no recipe, said in the plan
        return {}
    table = raw.get("objects", {})
    return dict(table) if isinstance(table, dict) else {}


#: ``recipe_from_masks``: the minimum size is this percentile of the true objects' areas ...
MIN_SIZE_PERCENTILE = 2.0
#: ... leaving out specks below this fraction of the median area (annotation noise, not objects)
SPECK_FRACTION = 0.01
#: holes are filled when fewer than this fraction of the true objects have one
HOLES_FRACTION = 0.05


def recipe_from_masks(masks: Any, pixel_size_nm: tuple[float, float]) -> dict:
    """An object recipe for one class from its training masks (2-D, non-zero inside): the minimum
    size is the :data:`MIN_SIZE_PERCENTILE` th percentile of the true objects' areas (8-connected
    components of each mask; specks below :data:`SPECK_FRACTION` of the median left out), and holes
    are filled when almost no true object has one (:data:`HOLES_FRACTION`). Chosen so on
    lucchi-mito's 27 training slices: object F1 of its own predictions there 0.920 (none 0.847,
    the smallest object 0.912, the 5th percentile 0.915, the 10th 0.894; ``benchmarks/cells_scores.py``)."""
    import numpy as np
    from scipy import ndimage as ndi

    areas, holed = [], 0
    for m in masks:
        m = np.asarray(m) != 0
        lab, n = ndi.label(m, structure=np.ones((3, 3), bool))
        if not n:
            continue
        areas.append(np.bincount(lab.ravel())[1:])
        filled = ndi.binary_fill_holes(m, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool))
        holed += len(np.unique(lab[ndi.binary_dilation(filled & ~m, structure=np.ones((3, 3), bool)) & m]))
    if not areas:
        return {}
    area = np.concatenate(areas)
    real = area[area >= SPECK_FRACTION * np.median(area)]
    px = float(pixel_size_nm[0]) * float(pixel_size_nm[1])
    min_px = float(np.percentile(real, MIN_SIZE_PERCENTILE))
    fill = holed < HOLES_FRACTION * len(area)
    return {
        "min_size_nm2": round(min_px * px, 1),
        "fill_holes": bool(fill),
        "why": (f"percentile {MIN_SIZE_PERCENTILE:g} of the areas of the {len(real)} objects in its training masks, specks "
                f"left out; {holed} of {len(area)} have holes"),
    }


def record_recipes(bundle: Any, masks: Any, *, parent: Any = None) -> Any:
    """Write ``[objects.<class>]`` into a new bundle's ``engine.toml`` from its training masks (``(C, H, W)``
    arrays at the engine's pixel size, or ``(H, W)`` for one class): :func:`recipe_from_masks` per
    class; a class the ``parent`` bundle (fine-tuning) has a cell recipe for keeps it. Returns the
    reloaded bundle."""
    import numpy as np

    recipes: dict[str, Any] = {}
    inherited = dict(getattr(parent, "raw", {}).get("objects") or {}) if parent is not None else {}
    for c, cls in enumerate(bundle.classes):
        planes = [np.asarray(m)[c] if np.ndim(m) == 3 else np.asarray(m) for m in masks]
        table = recipe_from_masks(planes, bundle.pixel_size_nm)
        cells = (inherited.get(cls) or {}).get("cells") if isinstance(inherited.get(cls), dict) else None
        if cells:
            table["cells"] = {**cells, "why": f"{cells.get('why', '')} (the parent {parent.name}'s)".strip()}
        if table:
            recipes[cls] = table
    if not recipes:
        return bundle
    path = bundle.path / ENGINE_FILE
    doc = tomllib.loads(path.read_text())
    doc["objects"] = recipes
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_toml(doc))
    tmp.replace(path)
    return load_engine(bundle.path)
