"""bioimage.io model packages in and out, through ``bioimageio.spec`` (format 0.5; 0.4 is read).

    import_package("rdf.yaml" | "model.zip", "engines/zoo-model")   -> EngineBundle
    export_package(bundle, "isbi-membrane.zip")                       -> the written zip

**In.** The description is loaded and validated by ``bioimageio.spec`` (a zip is unpacked first;
files are read and their sha256 checked locally: nothing is fetched unless the package itself
points at URLs). What tilefeet needs is mapped one to one, and anything it cannot honour is refused
in one line rather than approximated:

* axes: ``batch?, channel, y, x`` in that order (3-D, time and index axes are refused);
* pixel size: the space axes' ``scale`` and ``unit`` (or ``pixel_size_nm=`` when they have none);
* preprocessing: ``zero_mean_unit_variance`` (per image: tilefeet's section-wide ``meanstd``
  match), ``fixed_zero_mean_unit_variance``, ``scale_range`` (per-image percentiles: tilefeet's
  section-wide ``percentile`` match), ``scale_linear``; ``ensure_dtype`` is a no-op here. One
  normalizing step at most; anything else is "unknown preprocessing";
* postprocessing: ``sigmoid`` / ``softmax`` become the bundle's activation (none: the network
  returns probabilities itself, which the import checks);
* halo: recorded, and the measured receptive field never goes below ``2·halo + 1``;
* weights: a package tilefeet made from its own U-Net gives the original bundle back (the attached
  weights file; from earlier tilefeet versions, their ``pytorch_state_dict``). Otherwise the first
  usable wins: ``pytorch_state_dict`` of a MONAI network (exported to a ``.pt2`` program), ``onnx``,
  ``torchscript`` (``torch.jit.load``, not pickle). State dicts are read with
  ``torch.load(weights_only=True)``. Package sha256s that do not match are refused.

**Out.** A tilefeet bundle becomes a package whose weights run without tilefeet and return
probabilities (the activation is inside the graph, so there is no postprocessing): TorchScript
(the network traced, for every network torch runs) as the original entry and ONNX (the checked
export, for every network but TorchScript) converted from it. Fixed or per-image preprocessing from
the bundle's normalization; pixel size in the axes; classes as output channel names; the halo from
the receptive field, and tile sizes as ``min + n·step``; test tensors computed by the package's own
weights, each format checked against the bundle's network first; sample TIFFs and a cover; the
description in the format the newest ``bioimageio.core`` reads (:data:`FORMAT_VERSION`). The whole
``engine.toml`` is ``config.tilefeet`` and, for tilefeet's U-Net, the trained weights file is an
attachment, so importing the package back gives the original bundle, bit for bit. The package is
validated with ``bioimageio.spec`` before it is written; ``bioimageio.core``'s model test passes on
it in an environment without tilefeet (``tests/test_bioimageio_core.py``).

Offline: ``bioimageio.spec`` validates a local package without network access; it only goes online
for URLs in a description (a remote source or a ``parent`` id), which tilefeet's packages do not
have. Its settings (``BIOIMAGEIO_CACHE_PATH``, ``BIOIMAGEIO_PERFORM_IO_CHECKS``) apply.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from .engine import Declared, EngineBundle, Normalization, import_network, load_engine
from .errors import ConfigError, InputNotFoundError, InvalidEngineError, TilefeetError
from .storage import os_error

#: preprocessing ids tilefeet maps (see the module docstring)
KNOWN_PREPROCESSING = ("ensure_dtype", "zero_mean_unit_variance", "fixed_zero_mean_unit_variance", "scale_range", "scale_linear")


def _require() -> Any:
    try:
        import bioimageio.spec as spec
    except ImportError:
        raise InvalidEngineError("bioimage.io packages need bioimageio.spec: pip install bioimageio.spec") from None
    return spec


# ------------------------------------------------------------------------------------------ in


def import_package(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    pixel_size_nm: Any = None,
    classes: Any = None,
    name: str | None = None,
    receptive_field: int | None = None,
    overwrite: bool = False,
    activation: str | None = None,
) -> EngineBundle:
    """An engine bundle at ``out`` from a bioimage.io model package (``rdf.yaml``/``bioimageio.yaml``,
    its folder, or a ``.zip``). ``pixel_size_nm``, ``classes`` and ``activation`` override what the
    package says (its postprocessing declares the activation: sigmoid, softmax, or none)."""
    src = Path(source)
    if not src.exists():
        raise InputNotFoundError(f"no bioimage.io package at {src}; give its rdf.yaml, its folder or its .zip")
    with tempfile.TemporaryDirectory(prefix="tilefeet-bioimageio-") as tmp:
        folder = _unpack(src, Path(tmp))
        rdf = next((folder / n for n in ("rdf.yaml", "bioimageio.yaml") if (folder / n).is_file()), None)
        if rdf is None:
            rdf = next(iter(sorted(folder.glob("*.yaml"))), None)
        if rdf is None:
            raise InvalidEngineError(f"{src} holds no rdf.yaml or bioimageio.yaml")
        descr = _load(rdf)
        try:
            return _to_bundle(descr, folder, Path(out), where=str(src), pixel_size_nm=pixel_size_nm, classes=classes,
                              name=name, receptive_field=receptive_field, overwrite=overwrite, activation=activation)
        except OSError as e:
            if isinstance(e, TilefeetError):
                raise
            raise os_error(OSError(e.errno, e.strerror), out) from None  # writing the bundle: no temporary names


def _unpack(src: Path, tmp: Path) -> Path:
    if src.is_dir():
        return src
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            z.extractall(tmp)
        return tmp
    return src.parent


def _load(rdf: Path) -> Any:
    """The validated model description, in format 0.5 (0.4 is converted)."""
    spec = _require()
    from bioimageio.spec.model import v0_5

    try:
        with _quiet_logs():
            descr = spec.load_model_description(rdf, format_version="latest", perform_io_checks=True)
    except ValueError as e:  # pydantic's ValidationError is one: an invalid description
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3])[:300] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        kind = "files that do not match their sha256" if "sha256" in detail.lower() else "an invalid description"
        raise InvalidEngineError(f"{rdf} is not a usable bioimage.io model ({kind}: {detail})") from None
    if not isinstance(descr, v0_5.ModelDescr):
        summary = getattr(descr, "validation_summary", None)
        detail = _first_error(summary) if summary is not None else type(descr).__name__
        kind = "weights or files that do not match their sha256" if "sha256" in detail.lower() else "an invalid description"
        raise InvalidEngineError(f"{rdf} is not a usable bioimage.io model ({kind}: {detail})")
    return descr


def _first_error(summary: Any) -> str:
    for detail in getattr(summary, "details", []):
        for err in getattr(detail, "errors", []):
            loc = ".".join(str(p) for p in getattr(err, "loc", ()))
            return f"{loc}: {err.msg}"[:300]
    return str(getattr(summary, "status", "failed"))


def _to_bundle(
    descr: Any, folder: Path, out: Path, *, where: str, pixel_size_nm: Any, classes: Any, name: str | None,
    receptive_field: int | None, overwrite: bool, activation: str | None = None,
) -> EngineBundle:
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise InvalidEngineError(
            f"{where} has {len(descr.inputs)} inputs and {len(descr.outputs)} outputs; tilefeet runs one image in, one map out"
        )
    inp, outp = descr.inputs[0], descr.outputs[0]
    in_channels, px = _input_axes(inp, where)
    out_classes, halo = _output_axes(outp, where)
    name = name or out.name
    normalization = _normalization(inp, where)  # refuses what it cannot honour
    declared_activation = activation
    activation = activation or _activation(outp, where)
    config = (descr.config.model_dump() if hasattr(descr.config, "model_dump") else dict(descr.config or {})).get("tilefeet")
    if config and pixel_size_nm is None and classes is None and declared_activation is None:
        own = _own_unet(descr, folder, out, config, name, overwrite, where)
        if own is not None:
            return own
    if pixel_size_nm is None and px is None:
        raise ConfigError(
            f"missing pixel size: {where} does not give its space axes a scale and unit; say it with --pixel-size, e.g. 4nm"
        )
    declared = Declared.create(
        pixel_size_nm=pixel_size_nm if pixel_size_nm is not None else px,
        classes=classes if classes is not None else out_classes,
        activation=activation,
        normalization=normalization,
        in_channels=in_channels,
        receptive_field=receptive_field,
    )
    provenance = {"bioimageio": {"name": descr.name, "format_version": descr.format_version, "halo": halo}}
    description = f"{descr.name} (bioimage.io): {descr.description}"[:500]
    weights = descr.weights
    with tempfile.TemporaryDirectory(prefix="tilefeet-weights-") as tmp:
        arch = weights.pytorch_state_dict.architecture if weights.pytorch_state_dict is not None else None
        if arch is not None and str(getattr(arch, "import_from", "")).startswith("monai."):
            network = _module_from_state_dict(weights.pytorch_state_dict, folder, where)
            path = Path(tmp) / "model.pt2"
            _export_for_import(network, declared, path)
        elif weights.onnx is not None:
            path = _file(weights.onnx.source, folder)
        elif weights.torchscript is not None:
            path = Path(tmp) / "model.torchscript"
            shutil.copyfile(_file(weights.torchscript.source, folder), path)
        else:
            formats = [k for k, v in weights if v is not None]
            raise InvalidEngineError(
                f"{where} has weights in {', '.join(formats)}; tilefeet reads onnx, torchscript, or pytorch_state_dict "
                "for architectures it knows (tilefeet's U-Net, MONAI networks)"
            )
        bundle = import_network(path, out, declared, name=name, description=description, overwrite=overwrite, extra=provenance)
    if halo and bundle.receptive_field < 2 * halo + 1:
        return _raise_rf(bundle, 2 * halo + 1)
    return bundle


def _raise_rf(bundle: EngineBundle, rf: int) -> EngineBundle:
    """The package declares a wider halo than was measured: trust the larger."""
    import tomllib

    from .engine import ENGINE_FILE, dump_toml

    doc = tomllib.loads((bundle.path / ENGINE_FILE).read_text())
    doc["input"]["receptive_field"] = rf
    (bundle.path / ENGINE_FILE).write_text(dump_toml(doc))
    return load_engine(bundle.path)


def _input_axes(inp: Any, where: str) -> tuple[int, tuple[float, float] | None]:
    kinds = [a.type for a in inp.axes]
    ids = [str(a.id) for a in inp.axes]
    expected = ["batch", "channel", "space", "space"]
    if kinds[0] != "batch":
        kinds, axes = ["batch", *kinds], [None, *inp.axes]
    else:
        axes = list(inp.axes)
    if kinds != expected or [str(a.id) for a in axes[2:]] != ["y", "x"]:
        raise InvalidEngineError(
            f"{where}: input axes {ids} are not (batch, channel, y, x); tilefeet runs 2-D networks on such tiles"
        )
    channel = axes[1]
    in_channels = len(channel.channel_names)
    ys, xs = axes[2], axes[3]
    px = None
    if ys.unit and xs.unit:
        from .units import nm_per_unit

        px = (float(ys.scale) * nm_per_unit(str(ys.unit), where=where), float(xs.scale) * nm_per_unit(str(xs.unit), where=where))
    return in_channels, px


def _output_axes(outp: Any, where: str) -> tuple[tuple[str, ...], int]:
    kinds = [a.type for a in outp.axes if a.type != "batch"]
    if kinds != ["channel", "space", "space"]:
        raise InvalidEngineError(f"{where}: output axes {[str(a.id) for a in outp.axes]} are not (batch, channel, y, x)")
    channel = next(a for a in outp.axes if a.type == "channel")
    halo = max((int(getattr(a, "halo", 0) or 0) for a in outp.axes if a.type == "space"), default=0)
    return tuple(str(c) for c in channel.channel_names), halo


def _normalization(inp: Any, where: str) -> Normalization:
    from .engine import parse_normalization

    steps = [p for p in inp.preprocessing if p.id != "ensure_dtype"]
    unknown = [p.id for p in steps if p.id not in KNOWN_PREPROCESSING]
    if unknown or len(steps) > 1:
        what = ", ".join(unknown) if unknown else " then ".join(p.id for p in steps)
        raise ConfigError(
            f"unknown preprocessing {what!r} in {where}; tilefeet maps one of {', '.join(KNOWN_PREPROCESSING[1:])} "
            "(import the network file with import-engine --normalize to declare it yourself)"
        )
    if not steps:
        return parse_normalization("range:0,1")  # the network takes raw values as they are
    step = steps[0]
    kw = step.kwargs
    if step.id == "zero_mean_unit_variance":
        return parse_normalization("zscore")
    if step.id == "fixed_zero_mean_unit_variance":
        mean, std = _scalar(kw.mean, "mean", where), _scalar(kw.std, "std", where)
        return parse_normalization(f"meanstd:{mean},{std}")
    if step.id == "scale_range":
        return parse_normalization(f"percentile:{kw.min_percentile},{kw.max_percentile}")
    gain, offset = _scalar(kw.gain, "gain", where), _scalar(kw.offset, "offset", where)
    low = -offset / gain
    return parse_normalization(f"range:{low},{low + 1 / gain}")


def _scalar(v: Any, what: str, where: str) -> float:
    values = v if isinstance(v, (list, tuple)) else [v]
    if len(set(values)) != 1:
        raise ConfigError(f"unknown preprocessing in {where}: a {what} per channel ({values}); tilefeet applies one to all")
    return float(values[0])


def _activation(outp: Any, where: str) -> str:
    steps = [p.id for p in outp.postprocessing if p.id != "ensure_dtype"]
    if not steps:
        return "none"
    if steps in (["sigmoid"], ["softmax"]):
        return steps[0]
    raise ConfigError(f"unknown postprocessing {' then '.join(steps)!r} in {where}; tilefeet applies sigmoid or softmax")


def _file(source: Any, folder: Path) -> Path:
    """A local file of the package (``source`` relative to its folder)."""
    path = getattr(source, "path", None) or str(source)
    p = Path(str(path))
    return p if p.is_absolute() else folder / p


def _state_dict(weights: Any, folder: Path, where: str) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(_file(weights.source, folder), map_location="cpu", weights_only=True)
    except Exception as e:
        raise InvalidEngineError(f"{where}: its pytorch_state_dict weights are not a plain state dict ({str(e).splitlines()[0][:200]})") from None
    return dict(state)


def _module_from_state_dict(weights: Any, folder: Path, where: str) -> Any:
    """A MONAI network from its library architecture and state dict (code from an installed library,
    weights as plain tensors: nothing unpickled)."""
    import importlib

    arch = weights.architecture
    try:
        cls = getattr(importlib.import_module(str(arch.import_from)), str(arch.callable))
        net = cls(**dict(arch.kwargs))
        net.load_state_dict(_state_dict(weights, folder, where))
    except (ImportError, AttributeError, TypeError, RuntimeError) as e:
        raise InvalidEngineError(
            f"{where}: its weights do not match the architecture {arch.import_from}.{arch.callable} ({str(e).splitlines()[0][:200]})"
        ) from None
    return net.eval()


def _export_for_import(net: Any, declared: Declared, path: Path) -> None:
    from .engine import export_program
    from .models import foreign

    channels = declared.in_channels or 1
    divisor, _ = foreign.size_divisor(foreign.torch_run_fn(net), channels, "the network")
    stride = foreign.torch_stride(net, channels)(256) or 1
    export_program(net, channels, max(divisor, stride), path)


def _own_unet(
    descr: Any, folder: Path, out: Path, config: Mapping[str, Any], name: str, overwrite: bool, where: str
) -> EngineBundle | None:
    """A package tilefeet exported from its own U-Net: the exact bundle back (engine.toml and the
    trained weights). The package attaches the bundle's weights file, named with its sha256 in
    ``config.tilefeet``; packages of earlier tilefeet versions held them as ``pytorch_state_dict``
    weights of ``tilefeet.models.unet.UNet2dProbabilities``."""
    from safetensors.torch import save_file

    from .engine import ENGINE_FILE, dump_toml, file_sha256
    from .errors import OutputExistsError

    if dict(config.get("architecture") or {}).get("name") != "unet2d":
        return None
    recorded = dict(config.get("weights") or {})
    attached = {_file(a.source, folder).name: _file(a.source, folder) for a in descr.attachments}
    sd = descr.weights.pytorch_state_dict
    if recorded.get("file") in attached:
        source = attached[recorded["file"]]
        if recorded.get("sha256") and file_sha256(source) != recorded["sha256"]:
            raise InvalidEngineError(
                f"{where}: its attached {source.name} is not the file whose sha256 config.tilefeet records; re-export the package"
            )

        def write(path: Path) -> None:
            shutil.copyfile(source, path)
    elif sd is not None and str(getattr(sd.architecture, "import_from", "")) == "tilefeet.models.unet":
        state = {k.removeprefix("net."): v.contiguous() for k, v in _state_dict(sd, folder, where).items()}

        def write(path: Path) -> None:
            save_file(state, str(path))
    else:
        return None
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; choose another -o or pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.import.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp / "weights.safetensors")
        doc = dict(config)
        doc["name"] = name
        doc["weights"] = {"file": "weights.safetensors", "sha256": file_sha256(tmp / "weights.safetensors")}
        (tmp / ENGINE_FILE).write_text(dump_toml(doc))
        bundle = load_engine(tmp)
        bundle.build_model()  # the weights fit the recorded architecture, or a one-line error now
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_engine(out)


# ----------------------------------------------------------------------------------------- out

#: The model format version packages are declared in: the newest ``bioimageio.core`` (0.11.0) pins
#: ``bioimageio.spec`` 0.5.12.0, which reads a later 0.5.x only by treating it as 0.5.12 (an alert).
#: A newer installed ``bioimageio.spec`` still describes the package; its ``format_version`` is
#: written as this one, and an older spec's own (older) version is kept. Raise it with
#: ``bioimageio.core``'s pin; ``tests/test_bioimageio_core.py`` runs that package's model test.
FORMAT_VERSION = "0.5.12"
#: Largest relative error (max |a - b| / max |b|) between the package's weight formats, and between
#: them and the bundle's own network: float32 on the CPU, the bar of tilefeet's ONNX export check.
AGREEMENT = 1e-4


def export_package(
    bundle: EngineBundle | str | os.PathLike,
    output: str | os.PathLike,
    *,
    authors: tuple[str, ...] = ("tilefeet",),
    license: str = "MIT",
    overwrite: bool = False,
) -> Path:
    """Write ``bundle`` as a bioimage.io model package (a ``.zip``) that validates with
    ``bioimageio.spec``; see the module docstring for what goes in."""
    with _quiet_logs():
        return _export_package(bundle, output, authors=authors, license=license, overwrite=overwrite)


def _export_package(
    bundle: EngineBundle | str | os.PathLike, output: str | os.PathLike, *, authors: tuple[str, ...], license: str,
    overwrite: bool,
) -> Path:
    import tomllib

    _require()
    from bioimageio.spec import save_bioimageio_package_as_folder
    from bioimageio.spec.model import v0_5 as m

    from .engine import ENGINE_FILE
    from .errors import OutputExistsError

    bundle = load_engine(bundle)
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; choose another -o or pass --overwrite to replace it")
    try:  # before the export's minutes of work
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, output) from None
    if bundle.fixed_batch not in (None, 1):
        raise ConfigError(f"engine {bundle.name!r} takes batches of exactly {bundle.fixed_batch}; bioimage.io allows 1 or any")
    with tempfile.TemporaryDirectory(prefix="tilefeet-export-") as tmp:
        work = Path(tmp)
        raw = _test_input(bundle, _test_side(bundle))
        weights = _write_weights(bundle, work, _network_input(bundle.normalization, raw))
        np.save(work / "test_input.npy", raw)
        np.save(work / "test_output.npy", weights.test_output)
        _write_samples(work, raw, weights.test_output)
        (work / "README.md").write_text(_readme(bundle, weights))
        py, px = bundle.pixel_size_nm
        halo = bundle.receptive_field // 2
        step = bundle.fixed_tile[0] if bundle.fixed_tile else bundle.divisor
        min_size = bundle.fixed_tile[0] if bundle.fixed_tile else step * max(1, -(-(2 * halo + step) // step))
        size: Any = min_size if bundle.fixed_tile else m.ParameterizedSize(min=min_size, step=step)
        batch_size: Any = bundle.fixed_batch
        input_axes: list[Any] = [
            m.BatchAxis(size=batch_size),
            m.ChannelAxis(channel_names=[m.Identifier(f"channel{i}") for i in range(bundle.in_channels)]),
            m.SpaceInputAxis(id=m.AxisId("y"), size=size, unit="nanometer", scale=py),
            m.SpaceInputAxis(id=m.AxisId("x"), size=size, unit="nanometer", scale=px),
        ]
        ref = m.TensorId("raw")
        output_axes: list[Any] = [
            m.BatchAxis(size=batch_size),
            m.ChannelAxis(channel_names=[m.Identifier(_identifier(c)) for c in bundle.classes]),
            m.SpaceOutputAxisWithHalo(id=m.AxisId("y"), size=m.SizeReference(tensor_id=ref, axis_id=m.AxisId("y")),
                                      halo=halo, unit="nanometer", scale=py),
            m.SpaceOutputAxisWithHalo(id=m.AxisId("x"), size=m.SizeReference(tensor_id=ref, axis_id=m.AxisId("x")),
                                      halo=halo, unit="nanometer", scale=px),
        ]
        inputs = [m.InputTensorDescr(
            id=ref, axes=input_axes, test_tensor=m.FileDescr(source=work / "test_input.npy"),
            sample_tensor=m.FileDescr(source=work / "sample_input.tif"),
            data=m.IntervalOrRatioDataDescr(type="float32"), preprocessing=_preprocessing(bundle.normalization, m),
        )]
        outputs = [m.OutputTensorDescr(
            id=m.TensorId("probabilities"), axes=output_axes, test_tensor=m.FileDescr(source=work / "test_output.npy"),
            sample_tensor=m.FileDescr(source=work / "sample_output.tif"),
            data=m.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        )]
        config = tomllib.loads((bundle.path / ENGINE_FILE).read_text())
        descr = m.ModelDescr(
            name=_title(bundle.name),
            description=(bundle.description or f"tilefeet engine {bundle.name}")[:1000],
            authors=[m.Author(name=a) for a in authors],
            cite=[m.CiteEntry(text="Ronneberger, Fischer, Brox: U-Net (2015)", doi=m.Doi("10.1007/978-3-319-24574-4_28"))],
            license=cast(Any, license),  # an SPDX id, validated by the model
            documentation=m.FileDescr(source=work / "README.md"),
            covers=[m.FileDescr(source=_write_cover(work, raw, weights.test_output))],
            tags=["electron-microscopy", "segmentation", "tilefeet", *bundle.classes],
            inputs=inputs,
            outputs=outputs,
            weights=weights.descr(m),
            attachments=[m.FileDescr(source=p) for p in weights.attachments],
            config=cast(Any, {"tilefeet": _plain(config)}),
        )
        packaged = work / "package.zip"
        _save_zip(save_bioimageio_package_as_folder(descr, output_path=work / "package"), packaged)
        _load_from_zip(packaged)  # validates the written package, as a user's bioimageio.spec would
        partial = output.with_name(output.name + ".partial")
        try:  # copied beside the output, then renamed: a failed copy never leaves half a package there
            shutil.copyfile(packaged, partial)
            os.replace(partial, output)
        except OSError as e:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise os_error(e, output) from None
    return output


@dataclass(frozen=True)
class _Weights:
    """The weight files written for a package, how well they agree, and the test output they give."""

    torchscript: Path | None
    onnx: Path | None
    opset: int
    torch_version: str
    test_output: np.ndarray  #: computed by the original entry (the first of torchscript, onnx)
    agreement: Mapping[str, float]  #: each format's relative error against the bundle's own network
    attachments: tuple[Path, ...]  #: the bundle's own weights file, for an exact import back
    what: str  #: the network, in words, for the entries' comments

    def descr(self, m: Any) -> Any:
        """The ``weights`` field (made once ``bioimageio.spec``'s model module is at hand)."""
        entries: dict[str, Any] = {}
        if self.torchscript is not None:
            entries["torchscript"] = m.TorchscriptWeightsDescr(
                source=self.torchscript, pytorch_version=m.Version(self.torch_version),
                comment=f"{self.what}, traced with torch.jit.trace by tilefeet",
            )
        if self.onnx is not None:
            derived = self.torchscript is not None
            entries["onnx"] = m.OnnxWeightsDescr(
                source=self.onnx, opset_version=self.opset, parent="torchscript" if derived else None,
                comment=f"{self.what}, exported from the same module with torch.onnx (dynamo) by tilefeet" if derived
                else f"{self.what}, its input and output renamed and its activation appended by tilefeet",
            )
        return m.WeightsDescr(**entries)


def _write_weights(bundle: EngineBundle, work: Path, x: np.ndarray) -> _Weights:
    """The package's weight files in ``work``, each run on ``x`` (the preprocessed test input) and
    checked against the bundle's own network.

    TorchScript, where the network is a torch module (tilefeet's U-Net, a ``.pt2`` program,
    TorchScript), is the original entry: that module with its weights, traced. ONNX (every network
    but TorchScript) is exported from the same module, so its ``parent`` is TorchScript; for an ONNX
    bundle it is the original. Both return probabilities (the activation is inside the graph), and
    neither needs tilefeet or any Python code of its own to run."""
    import torch

    torchscript = _trace(bundle, work / "weights.torchscript") if bundle.network != "onnx" else None
    onnx, opset = _onnx(bundle, work / "weights.onnx") if bundle.network != "torchscript" else (None, 0)
    results: dict[str, np.ndarray] = {}
    if torchscript is not None:
        results["torchscript"] = _run_torchscript(torchscript, x)
    if onnx is not None:
        results["onnx"] = _run_onnx(onnx, x)
    attachments: tuple[Path, ...] = ()
    if bundle.network == "unet2d":  # the trained state dict (the TorchScript has its batch norms folded)
        shutil.copyfile(bundle.weights_path, work / bundle.weights_file)
        attachments = (work / bundle.weights_file,)
    network = "tilefeet's U-Net" if bundle.network == "unet2d" else f"the engine's {bundle.network} network"
    inside = f"its {bundle.activation} activation included" if bundle.activation != "none" else "it returns probabilities"
    return _Weights(
        torchscript=torchscript, onnx=onnx, opset=opset, torch_version=str(torch.__version__).split("+")[0],
        test_output=next(iter(results.values())), agreement=_check_agreement(bundle, x, results),
        attachments=attachments, what=f"{network} ({inside})",
    )


def _trace(bundle: EngineBundle, path: Path) -> Path:
    """The bundle's network with its activation as TorchScript, traced (shapes stay free: the U-Net
    takes no Python decisions on sizes; the agreement check and bioimageio.core's test at several
    sizes confirm it)."""
    import warnings

    import torch

    net = bundle.build_model()
    d = bundle.divisor
    h, w = bundle.fixed_tile or (2 * d, 3 * d)
    example = torch.zeros(bundle.fixed_batch or 2, bundle.in_channels, h, w)
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch ≥ 2.10 for new code, but it is the format bioimage.io's
        # consumers run without a Python architecture (deepImageJ, ilastik, bioimageio.core)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(net, example, check_trace=False)
            torch.jit.save(traced, str(path))
        except Exception as e:  # the tracer raises many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidEngineError(f"engine {bundle.name!r}: torch.jit.trace cannot trace its network ({first[:200]})") from None
    return path


def _onnx(bundle: EngineBundle, path: Path) -> tuple[Path, int]:
    """The checked fp32 ONNX export, with its weights inline (one file in the package)."""
    import onnx

    from .runners.onnx_export import export_onnx

    export = export_onnx(bundle, "fp32")
    onnx.save(onnx.load(str(export.path)), str(path))
    return path, export.opset


def _run_torchscript(path: Path, x: np.ndarray) -> np.ndarray:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        return np.asarray(module(torch.from_numpy(x)).numpy(), dtype=np.float32)


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    from .models.foreign import onnx_run_fn, onnx_session

    return np.asarray(onnx_run_fn(onnx_session(path, str(path)))(x), dtype=np.float32)


def _check_agreement(bundle: EngineBundle, x: np.ndarray, results: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each weight format's relative error against the bundle's own network on the test input; a
    format that disagrees is an export bug, refused rather than packaged."""
    import torch

    from .runners.onnx_export import reference_output, relative_error

    reference = reference_output(bundle, torch.from_numpy(x)).numpy()
    errors = {fmt: relative_error(y, reference) for fmt, y in results.items()}
    bad = {fmt: err for fmt, err in errors.items() if not err <= AGREEMENT}
    if bad:
        what = ", ".join(f"{fmt} {err:.1e}" for fmt, err in bad.items())
        raise InvalidEngineError(
            f"engine {bundle.name!r}: the exported weights disagree with the bundle's network (relative error {what}, "
            f"allowed {AGREEMENT:g}); nothing was written; report it with the engine"
        )
    return errors


def _preprocessing(norm: Normalization, m: Any) -> list[Any]:
    steps: list[Any] = [m.EnsureDtypeDescr(kwargs=m.EnsureDtypeKwargs(dtype="float32"))]
    yx = [m.AxisId("y"), m.AxisId("x")]
    if norm.adaptive == "meanstd":
        steps.append(m.ZeroMeanUnitVarianceDescr(kwargs=m.ZeroMeanUnitVarianceKwargs(axes=yx)))
    elif norm.adaptive == "percentile":
        lo, hi = norm.percentiles
        steps.append(m.ScaleRangeDescr(kwargs=m.ScaleRangeKwargs(axes=yx, min_percentile=lo, max_percentile=hi)))
    elif norm.method == "meanstd":
        steps.append(m.FixedZeroMeanUnitVarianceDescr(kwargs=m.FixedZeroMeanUnitVarianceKwargs(mean=norm.mean, std=norm.std)))
    else:
        gain = 1.0 / (norm.high - norm.low)
        steps.append(m.ScaleLinearDescr(kwargs=m.ScaleLinearKwargs(gain=gain, offset=-norm.low * gain)))
    return steps


def _test_side(bundle: EngineBundle) -> int:
    if bundle.fixed_tile:
        return bundle.fixed_tile[0]
    d = bundle.divisor
    return max(d, -(-max(256, bundle.receptive_field + d) // d) * d)


def _test_input(bundle: EngineBundle, side: int) -> np.ndarray:
    """A raw test input: the bundled ISBI sample where it fits, else smooth noise in the training range."""
    from .sample import sample_dir

    n = bundle.fixed_batch or 1
    lo, hi = bundle.normalization.percentile_values
    rng = np.random.default_rng(0)
    raw = (lo + (hi - lo) * rng.random((n, bundle.in_channels, side, side))).astype(np.float32)
    if bundle.in_channels == 1 and bundle.normalization.adaptive == "" and hi > 2:
        import imageio.v3 as iio

        try:
            img = np.asarray(iio.imread(sample_dir() / "image" / "24.png"), dtype=np.float32)
        except InputNotFoundError:  # a wheel without the sample
            return raw
        if img.shape[0] >= side and img.shape[1] >= side:
            raw = np.broadcast_to(img[:side, :side], raw.shape).astype(np.float32)
    return raw


def _network_input(norm: Normalization, raw: np.ndarray) -> np.ndarray:
    """What the package's preprocessing makes of ``raw`` (per image for the adaptive modes)."""
    if norm.adaptive == "meanstd":
        mean = raw.mean(axis=(2, 3), keepdims=True)
        std = raw.std(axis=(2, 3), keepdims=True)
        return ((raw - mean) / (std + 1e-6)).astype(np.float32)
    if norm.adaptive == "percentile":
        lo = np.percentile(raw, norm.percentiles[0], axis=(2, 3), keepdims=True)
        hi = np.percentile(raw, norm.percentiles[1], axis=(2, 3), keepdims=True)
        return ((raw - lo) / (hi - lo + 1e-6)).astype(np.float32)
    return np.asarray(norm.to_network(raw.astype(np.float64)), dtype=np.float32)


def _write_samples(work: Path, raw: np.ndarray, probabilities: np.ndarray) -> None:
    """The test tensors as TIFF images (bioimage.io's ``sample_tensor``: what a person looks at)."""
    import tifffile

    for name, tensor in (("sample_input.tif", raw), ("sample_output.tif", probabilities)):
        image = tensor[0]  # (c, y, x): one grey page per channel, a single channel as a plain image
        tifffile.imwrite(work / name, np.ascontiguousarray(image[0] if image.shape[0] == 1 else image), photometric="minisblack")


def _write_cover(work: Path, raw: np.ndarray, probabilities: np.ndarray) -> Path:
    """A 2:1 cover: the test input (contrast stretched) beside the first class's probabilities."""
    import imageio.v3 as iio

    img = raw[0, 0].astype(np.float64)
    lo, hi = np.percentile(img, (0.5, 99.5))
    left = np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)
    right = np.clip(probabilities[0, 0].astype(np.float64), 0, 1)
    path = work / "cover.png"
    iio.imwrite(path, np.round(np.concatenate([left, right], axis=1) * 255).astype(np.uint8))
    return path


def _readme(bundle: EngineBundle, weights: _Weights) -> str:
    formats = " and ".join(f for f in ("torchscript", "onnx") if getattr(weights, f) is not None)
    agree = ", ".join(f"{fmt} {err:.1e}" for fmt, err in weights.agreement.items())
    return (
        f"# {bundle.name}\n\n{bundle.description}\n\nExported by tilefeet from its engine bundle `{bundle.name}`: "
        f"pixel size {bundle.pixel_size_nm[0]:g}×{bundle.pixel_size_nm[1]:g} nm, classes {', '.join(bundle.classes)}, "
        f"receptive field {bundle.receptive_field} px, tile sides multiples of {bundle.divisor}.\n\n"
        f"The weights ({formats}) return probabilities and need neither tilefeet nor any Python code of its own: "
        "`torch.jit.load` or ONNX Runtime runs them. The input is normalized as the preprocessing says. "
        "Tiled, each tile needs the halo (half the receptive field) of context on every side.\n\n"
        "## Validation\n\n"
        f"`test_output.npy` was computed from `test_input.npy` by the package's {next(iter(weights.agreement))} weights. "
        f"Every weight format was checked against the bundle's own network in tilefeet (relative error {agree}); "
        "`bioimageio test package.zip` (bioimageio.core) checks that each of them reproduces the test output.\n\n"
        + ("The engine's own record, with its training and held-out scores, is `config.tilefeet` in rdf.yaml. " if bundle.metrics else "")
        + "Import it into tilefeet with `tilefeet import-engine package.zip -o engines/NAME`: "
        + ("the original engine comes back, bit for bit.\n" if weights.attachments
           else f"an engine of its {'ONNX' if weights.onnx is not None else 'TorchScript'} weights.\n")
    )


def _save_zip(folder: Path, path: Path) -> None:
    """Zip the package ``folder`` with its description in :data:`FORMAT_VERSION` (see there)."""
    import re

    rdf = next(folder / n for n in ("rdf.yaml", "bioimageio.yaml") if (folder / n).is_file())
    text = rdf.read_text()
    line = re.compile(r"^format_version: *'?([0-9.]+)'?[ \t]*$", re.MULTILINE)
    found = line.findall(text)
    if len(found) != 1:  # pragma: no cover - bioimageio.spec writes exactly one
        raise InvalidEngineError(f"bioimageio.spec wrote {len(found)} top-level format_version lines in {rdf.name}")
    written = min(found[0], FORMAT_VERSION, key=_version_tuple)
    rdf.write_text(line.sub(f"format_version: {written}", text))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for p in sorted(q for q in folder.rglob("*") if q.is_file()):
            z.write(p, p.relative_to(folder).as_posix())


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _identifier(text: str) -> str:
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in text)
    return out if out and not out[0].isdigit() else f"c_{out}"


def _title(name: str) -> str:
    words = name.replace("-", " ").replace("_", " ")
    return f"tilefeet {words}"[:128]


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _load_from_zip(path: Path) -> Any:
    with tempfile.TemporaryDirectory(prefix="tilefeet-check-") as tmp:
        folder = _unpack(path, Path(tmp))
        rdf = next(folder / n for n in ("rdf.yaml", "bioimageio.yaml") if (folder / n).is_file())
        return _load(rdf)


class _quiet_logs:
    """bioimageio.spec logs through loguru to stderr (a command's output should be its own) and
    leaves files open for the garbage collector: collect them here, with their ResourceWarning
    ignored, instead of warning at some later moment in the user's program."""

    def __enter__(self) -> None:
        import gc
        import warnings

        gc.collect()  # files an earlier call left open are not this call's to warn about
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            from loguru import logger

            logger.disable("bioimageio")
        except ImportError:
            pass

    def __exit__(self, *exc: Any) -> None:
        import gc

        gc.collect()
        self._warnings.__exit__(*exc)
        try:
            from loguru import logger

            logger.enable("bioimageio")
        except ImportError:
            pass
