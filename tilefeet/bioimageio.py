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
* weights, first usable wins: ``pytorch_state_dict`` whose architecture tilefeet knows
  (its own U-Net, exactly, or a MONAI network, exported to a ``.pt2`` program), ``onnx``,
  ``torchscript`` (``torch.jit.load``, not pickle). State dicts are read with
  ``torch.load(weights_only=True)``. Package sha256s that do not match are refused.

**Out.** A tilefeet bundle becomes a package whose weights all return probabilities: ONNX (the
checked export, activation inside) and, for tilefeet's U-Net, ``pytorch_state_dict`` with the
architecture :class:`tilefeet.models.unet.UNet2dProbabilities`; fixed preprocessing from the
bundle's normalization; pixel size in the axes; classes as output channel names; the halo from the
receptive field; test tensors computed by the bundle's own network; and the whole ``engine.toml``
under ``config.tilefeet``, so importing the package back gives the original bundle, bit for bit for
tilefeet's U-Net. The package is validated with ``bioimageio.spec`` before it is written.

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
from pathlib import Path
from typing import Any, cast

import numpy as np

from .engine import Declared, EngineBundle, Normalization, import_network, load_engine
from .errors import ConfigError, InputNotFoundError, InvalidEngineError
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
) -> EngineBundle:
    """An engine bundle at ``out`` from a bioimage.io model package (``rdf.yaml``/``bioimageio.yaml``,
    its folder, or a ``.zip``). ``pixel_size_nm`` and ``classes`` override what the package says."""
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
        return _to_bundle(descr, folder, Path(out), where=str(src), pixel_size_nm=pixel_size_nm, classes=classes,
                          name=name, receptive_field=receptive_field, overwrite=overwrite)


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
    receptive_field: int | None, overwrite: bool,
) -> EngineBundle:
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise InvalidEngineError(
            f"{where} has {len(descr.inputs)} inputs and {len(descr.outputs)} outputs; tilefeet runs one image in, one map out"
        )
    inp, outp = descr.inputs[0], descr.outputs[0]
    in_channels, px = _input_axes(inp, where)
    out_classes, halo = _output_axes(outp, where)
    name = name or out.name
    normalization, activation = _normalization(inp, where), _activation(outp, where)  # refuses what it cannot honour
    config = (descr.config.model_dump() if hasattr(descr.config, "model_dump") else dict(descr.config or {})).get("tilefeet")
    if config and pixel_size_nm is None and classes is None:
        own = _own_unet(descr, folder, out, config, name, overwrite)
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


def _own_unet(descr: Any, folder: Path, out: Path, config: Mapping[str, Any], name: str, overwrite: bool) -> EngineBundle | None:
    """A package tilefeet exported from its own U-Net: the exact bundle back (state dict, engine.toml)."""
    sd = descr.weights.pytorch_state_dict
    if sd is None or str(getattr(sd.architecture, "import_from", "")) != "tilefeet.models.unet":
        return None
    from safetensors.torch import save_file

    from .engine import ENGINE_FILE, dump_toml, file_sha256
    from .errors import OutputExistsError

    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; choose another -o or pass --overwrite to replace it")
    state = {k.removeprefix("net."): v.contiguous() for k, v in _state_dict(sd, folder, str(folder)).items()}
    tmp = out.with_name(f".{out.name}.import.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / "weights.safetensors"))
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
    from bioimageio.spec import save_bioimageio_package
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
    if bundle.network == "torchscript":
        raise ConfigError(f"engine {bundle.name!r} is TorchScript; export-engine --bioimageio writes ONNX weights, which it cannot make")
    with tempfile.TemporaryDirectory(prefix="tilefeet-export-") as tmp:
        work = Path(tmp)
        weights = _write_weights(bundle, work)
        side = _test_side(bundle)
        raw, expected = _test_tensors(bundle, side)
        np.save(work / "test_input.npy", raw)
        np.save(work / "test_output.npy", expected)
        (work / "README.md").write_text(_readme(bundle))
        py, px = bundle.pixel_size_nm
        halo = bundle.receptive_field // 2
        step = bundle.fixed_tile[0] if bundle.fixed_tile else bundle.divisor
        min_size = bundle.fixed_tile[0] if bundle.fixed_tile else step * max(1, -(-(2 * halo + step) // step))
        size: Any = min_size if bundle.fixed_tile else m.ParameterizedSize(min=min_size, step=step)
        if bundle.fixed_batch not in (None, 1):
            raise ConfigError(f"engine {bundle.name!r} takes batches of exactly {bundle.fixed_batch}; bioimage.io allows 1 or any")
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
            data=m.IntervalOrRatioDataDescr(type="float32"), preprocessing=_preprocessing(bundle.normalization, m),
        )]
        outputs = [m.OutputTensorDescr(
            id=m.TensorId("probabilities"), axes=output_axes, test_tensor=m.FileDescr(source=work / "test_output.npy"),
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
            tags=["electron-microscopy", "segmentation", "tilefeet", *bundle.classes],
            inputs=inputs,
            outputs=outputs,
            weights=weights(m),
            config=cast(Any, {"tilefeet": _plain(config)}),
        )
        packaged = work / "package.zip"
        save_bioimageio_package(descr, output_path=packaged)
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


def _write_weights(bundle: EngineBundle, work: Path) -> Any:
    """The weight files in ``work``; returns ``m -> WeightsDescr`` (made once the module is at hand)."""
    import onnx

    from .runners.onnx_export import export_onnx

    export = export_onnx(bundle, "fp32")
    model = onnx.load(str(export.path))  # weights inline: one file in the package
    onnx.save(model, str(work / "weights.onnx"))
    opset = export.opset
    state_file = None
    if bundle.network == "unet2d":
        import torch

        from .models.unet import UNet2dProbabilities

        arch = dict(bundle.architecture)
        net = UNet2dProbabilities(bundle.in_channels, bundle.out_channels, arch["base_channels"], arch["depth"], bundle.activation)
        from safetensors.torch import load_file

        net.net.load_state_dict(load_file(str(bundle.weights_path)))
        torch.save(net.state_dict(), work / "weights.pt")
        state_file = work / "weights.pt"
        kwargs = {"in_channels": bundle.in_channels, "out_channels": bundle.out_channels,
                  "base_channels": arch["base_channels"], "depth": arch["depth"], "activation": bundle.activation}
        torch_version = str(torch.__version__).split("+")[0]

    def make(m: Any) -> Any:
        onnx_w = m.OnnxWeightsDescr(source=work / "weights.onnx", opset_version=opset)
        if state_file is None:
            return m.WeightsDescr(onnx=onnx_w)
        sd = m.PytorchStateDictWeightsDescr(
            source=state_file,
            architecture=m.ArchitectureFromLibraryDescr(callable=m.Identifier("UNet2dProbabilities"),
                                                        import_from="tilefeet.models.unet", kwargs=kwargs),
            pytorch_version=m.Version(torch_version),
        )
        return m.WeightsDescr(onnx=m.OnnxWeightsDescr(source=work / "weights.onnx", opset_version=opset, parent="pytorch_state_dict"),
                              pytorch_state_dict=sd)

    return make


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


def _test_tensors(bundle: EngineBundle, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A raw test input (the bundled ISBI sample where it fits, else smooth noise in the training
    range) and the bundle's own output for it."""
    import torch

    from .runners.onnx_export import reference_output

    n = bundle.fixed_batch or 1
    lo, hi = bundle.normalization.percentile_values
    rng = np.random.default_rng(0)
    raw = (lo + (hi - lo) * rng.random((n, bundle.in_channels, side, side))).astype(np.float32)
    sample = Path(__file__).resolve().parent.parent / "tests" / "data" / "isbi" / "image" / "24.png"
    if bundle.in_channels == 1 and sample.is_file() and bundle.normalization.adaptive == "" and hi > 2:
        import imageio.v3 as iio

        img = np.asarray(iio.imread(sample), dtype=np.float32)
        if img.shape[0] >= side and img.shape[1] >= side:
            raw = np.broadcast_to(img[:side, :side], raw.shape).astype(np.float32)
    x = _network_input(bundle.normalization, raw)
    expected = reference_output(bundle, torch.from_numpy(x)).numpy().astype(np.float32)
    return raw, expected


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


def _readme(bundle: EngineBundle) -> str:
    return (
        f"# {bundle.name}\n\n{bundle.description}\n\nExported by tilefeet from its engine bundle `{bundle.name}`: "
        f"pixel size {bundle.pixel_size_nm[0]:g}×{bundle.pixel_size_nm[1]:g} nm, classes {', '.join(bundle.classes)}, "
        f"receptive field {bundle.receptive_field} px, tile sides multiples of {bundle.divisor}.\n\n"
        "Import it into tilefeet with `tilefeet import-engine rdf.yaml -o engines/NAME`.\n"
    )


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
