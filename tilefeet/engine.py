"""Engine bundles: a trained network described by ``engine.toml`` + ``weights.safetensors``.

An engine bundle is data, never code. ``engine.toml`` declares::

    name = "isbi-membrane"
    [input]          pixel_size_nm = [4.0, 4.0], channels, divisor, receptive_field
    [normalization]  how the training data was normalized, and its reference histogram
    [output]         classes, activation ("sigmoid" or "softmax")
    [architecture]   name = "unet2d" and its parameters
    [weights]        file, sha256
    [inference]      recommended tile / overlap
    [metrics]        held-out scores (written by training / evaluation)

Bundles are found by name on a search path (``$TILEFEET_ENGINES``, the repo's ``engines/``, the
ones shipped inside the wheel) or given as a folder path.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from .errors import EngineNotFoundError, InvalidEngineError

ENGINE_FILE = "engine.toml"


@dataclass(frozen=True)
class Normalization:
    """How raw intensities became network inputs in training: ``(x - mean) / std`` (method ``meanstd``)
    or ``(x - low) / (high - low)`` (method ``range``), plus statistics of the raw training data that
    section-adaptive modes match against (its percentiles and a reference histogram)."""

    method: Literal["meanstd", "range"] = "meanstd"
    mean: float = 0.0  #: raw mean of the training data (meanstd)
    std: float = 1.0  #: raw standard deviation of the training data (meanstd)
    low: float = 0.0  #: raw value mapped to 0 (range)
    high: float = 255.0  #: raw value mapped to 1 (range)
    percentiles: tuple[float, float] = (1.0, 99.0)  #: which percentiles ``percentile_values`` holds
    percentile_values: tuple[float, float] = (0.0, 255.0)  #: raw training values at those percentiles
    histogram_range: tuple[float, float] = (0.0, 256.0)  #: raw value range the histogram bins span
    histogram: tuple[float, ...] = ()  #: reference histogram of raw training intensities (densities)

    def to_network(self, x: Any) -> Any:
        """Raw intensities (array-like, already matched to the training distribution) to network input."""
        if self.method == "meanstd":
            return (x - self.mean) / self.std
        return (x - self.low) / (self.high - self.low)

    def to_toml(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "mean": self.mean,
            "std": self.std,
            "low": self.low,
            "high": self.high,
            "percentiles": list(self.percentiles),
            "percentile_values": list(self.percentile_values),
            "histogram_range": list(self.histogram_range),
            "histogram": [round(float(v), 8) for v in self.histogram],
        }


@dataclass(frozen=True)
class EngineBundle:
    """A trained network and everything needed to run it on a section."""

    name: str
    path: Path  #: the bundle folder
    pixel_size_nm: tuple[float, float]  #: (y, x) pixel size the network was trained at
    classes: tuple[str, ...]
    activation: Literal["sigmoid", "softmax"]
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
        return _sha256_file(self.weights_path)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of engine.toml and the weights: what a cached compiled engine or a resume must match."""
        h = hashlib.sha256((self.path / ENGINE_FILE).read_bytes())
        h.update(self.weights_digest.encode())
        return h.hexdigest()

    def flops_per_pixel(self) -> float:
        arch = dict(self.architecture)
        if arch.get("name") == "unet2d":
            from .models.unet import unet_flops_per_pixel

            return unet_flops_per_pixel(self.in_channels, self.out_channels, arch["base_channels"], arch["depth"])
        return float("nan")

    def build_model(self, *, load_weights: bool = True):  # -> torch.nn.Module
        """The network with its output activation, in eval mode, batch norms folded, on the CPU."""
        import torch

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
        from .models.head import WithActivation

        return WithActivation(net, self.activation).eval().requires_grad_(False).to(torch.float32)


def build_architecture(arch: Mapping[str, Any], in_channels: int, out_channels: int):
    """An untrained network from an ``[architecture]`` table."""
    params = {k: v for k, v in arch.items() if k != "name"}
    name = arch.get("name")
    if name == "unet2d":
        from .models.unet import UNet2d

        return UNet2d(in_channels=in_channels, out_channels=out_channels, **params)
    raise InvalidEngineError(f"unknown architecture {name!r} in engine.toml; tilefeet knows: unet2d")


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
    if bundle.activation not in ("sigmoid", "softmax"):
        raise InvalidEngineError(f"{where}: activation must be sigmoid or softmax, got {bundle.activation!r}")
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
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(weights))
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
        "weights": {"file": weights.name, "sha256": _sha256_file(weights)},
        "inference": {"tile": tile, "overlap": overlap},
    }
    if metrics:
        doc["metrics"] = dict(metrics)
    if training:
        doc["training"] = dict(training)
    (folder / ENGINE_FILE).write_text(dump_toml(doc))
    return load_engine(folder)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_toml(doc: Mapping[str, Any]) -> str:
    """A small TOML writer for the flat tables engine.toml uses (stdlib has a reader only)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, Mapping)]
    for k, v in doc.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items() if not isinstance(vv, Mapping)]
            for kk, vv in v.items():
                if isinstance(vv, Mapping):
                    lines += ["", f"[{k}.{kk}]"] + [f"{k3} = {value(v3)}" for k3, v3 in vv.items()]
    return "\n".join(lines) + "\n"
