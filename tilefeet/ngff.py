"""The one home of NGFF (OME-Zarr) metadata: reading it, validated, and writing it, one function per kind.

Reading (:func:`read_multiscale`): an image or label image group, NGFF 0.5 (zarr v3, under the
``"ome"`` key) or 0.4 (zarr v2), following a bioformats2raw layout to its first image, validated
with ``ome-zarr-models`` (its first complaint becomes one line), into a small frozen
:class:`Multiscale` with every level's shape, chunks, dtype, scale and translation (the global
transform folded in). Everything that reads a store (sections, training stacks, evaluation,
preview, ``info``) goes through it.

Writing: :func:`image_metadata` and :func:`label_metadata` build the group attributes of an image
and of a label image, :func:`add_label` lists a finished label image in ``labels/``, and
:func:`create_levels` makes the arrays of a pyramid. Pyramids here are 2× per level: level ``k``'s
pixel ``i`` covers level-0 pixels ``[i·2^k, (i+1)·2^k)``, so its centre sits at
``origin + (2^k − 1)/2`` level-0 pixels: the translation each level records.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputNotFoundError, InvalidImageError, TilefeetWarning
from .geometry import Pair
from .storage import Remote, is_remote_error, is_url, join, remote_error
from .units import nm_per_unit

#: Display colours of label classes, in class order (NGFF image-label "colors").
LABEL_COLORS = [(255, 64, 0), (0, 170, 255), (255, 200, 0), (170, 0, 255), (0, 220, 90), (255, 0, 140)]


def label_name(cls: str) -> str:
    """A class name as a safe group name (``"Mito boundary" -> "mito-boundary"``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", cls.strip()).strip("-").lower() or "class"


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Axis:
    name: str
    type: str  #: "space", "channel", "time", or "" when the metadata does not say
    unit: str | None


@dataclass(frozen=True)
class Dataset:
    """One pyramid level as stored: full array shape (leading axes included) and its transform."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    scale: tuple[float, ...]  #: per axis, the multiscale's global scale folded in
    translation: tuple[float, ...]


@dataclass(frozen=True)
class Multiscale:
    """An NGFF image or label image group as read from a store (metadata only)."""

    path: str  #: the group that holds the multiscales (after following bioformats2raw)
    version: str  #: "0.5", "0.4", ...
    name: str
    axes: tuple[Axis, ...]
    datasets: tuple[Dataset, ...]
    metadata: dict = field(default_factory=dict)  #: the multiscale's free-form "metadata"
    channels: tuple[str, ...] = ()  #: omero channel labels, when the image has them
    image_label: dict | None = None  #: the image-label metadata of a label image
    labels: tuple[str, ...] = ()  #: label images listed under ``labels/`` (of an image)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def is_label(self) -> bool:
        return self.image_label is not None

    def pixel_size_nm(self, level: int) -> tuple[float, float] | None:
        """(y, x) pixel size of a level in nm; None when the y/x axes carry no unit."""
        f = self._nm_per_unit()
        if f is None:
            return None
        s = self.datasets[level].scale
        return (s[-2] * f[0], s[-1] * f[1])

    def origin_nm(self, level: int) -> tuple[float, float]:
        """(y, x) position of the centre of a level's pixel (0, 0) in nm (0 without units)."""
        f = self._nm_per_unit()
        t = self.datasets[level].translation
        return (t[-2] * f[0], t[-1] * f[1]) if f is not None else (0.0, 0.0)

    def _nm_per_unit(self) -> tuple[float, float] | None:
        units = [self.axes[-2].unit, self.axes[-1].unit]
        if any(u is None for u in units):
            return None
        return (
            nm_per_unit(units[0], where=f"{self.path} axis {self.axes[-2].name!r}"),
            nm_per_unit(units[1], where=f"{self.path} axis {self.axes[-1].name!r}"),
        )


def open_group(path: str | Path, *, role: str = "input", storage_options: Mapping[str, Any] | None = None) -> Any:
    """The zarr group at ``path`` (read-only): a local path, or an ``http(s)://`` or ``s3://`` URL
    (``storage_options``: see :mod:`tilefeet.storage`); one-line errors for a missing path, URL or
    bucket, refused credentials, an unreachable server, a bare array, or no store."""
    import zarr

    if is_url(path):
        return _open_remote_group(Remote.create(str(path), storage_options, role=role), role)
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(
            f"{role} {p} does not exist; give the path of an OME-Zarr image (convert TIFF/PNG with `tilefeet convert`)"
        )
    try:
        node = zarr.open(store=str(p), mode="r")
    except Exception:
        how = (f"`tilefeet convert {p} IMAGE.ome.zarr --labels NAME` adds it to its image's store as labels/NAME" if role == "labels"
               else f"`tilefeet convert {p} OUT.ome.zarr --pixel-size 4nm`")
        raise InvalidImageError(f"{role} {p} is not a Zarr store; convert TIFF/PNG images first: {how}") from None
    return _check_group(node, role, p)


def _open_remote_group(remote: Remote, role: str) -> Any:
    import zarr
    from zarr.errors import NodeNotFoundError

    try:
        node = zarr.open(store=remote.zarr_store(read_only=True), mode="r")
    except NodeNotFoundError:
        raise remote.missing(role=role) from None
    except Exception as e:
        if is_remote_error(e):
            raise remote_error(e, remote, role=role) from None
        raise InvalidImageError(f"{role} {remote.url} is not a Zarr store ({type(e).__name__}); check the URL") from None
    return _check_group(node, role, remote.url)


def _check_group(node: Any, role: str, where: Any) -> Any:
    import zarr

    if not isinstance(node, zarr.Group):
        raise InvalidImageError(
            f"{role} {where} is a bare Zarr array, not an OME-Zarr image group; wrap it with `tilefeet convert` or give the image group"
        )
    return node


def ome_attrs(group: Any) -> dict:
    """The NGFF attributes of a group: under ``"ome"`` (0.5) or at the top (0.4 and older)."""
    attrs = dict(group.attrs)
    return dict(attrs.get("ome", attrs))


def read_multiscale(
    path: str | Path, *, role: str = "input", validate: bool = True, storage_options: Mapping[str, Any] | None = None,
    group: Any = None,
) -> Multiscale:
    """The NGFF multiscale image or label image at ``path``, a local path or a URL (see the module
    docstring); ``group``: the zarr group at ``path``, opened already (a store whose metadata is not
    where a reader looks for it: an unfinished output on an object store)."""
    if group is None:
        group = open_group(path, role=role, storage_options=storage_options)
    attrs = dict(group.attrs)
    ome = ome_attrs(group)
    if "bioformats2raw.layout" in ome and "0" in group:
        return read_multiscale(join(path, "0"), role=role, validate=validate, storage_options=storage_options)
    ms = ome.get("multiscales")
    if "ome" in attrs:
        version = str(ome.get("version", "0.5"))
    else:
        version = str(ms[0].get("version", "0.4")) if isinstance(ms, list) and ms and isinstance(ms[0], dict) else "0.4"
    if not ms:
        raise InvalidImageError(
            f"{role} {path} has no OME-Zarr 'multiscales' metadata, so it is not an OME-Zarr image; "
            f"convert the data with `tilefeet convert` or add NGFF multiscales metadata"
        )
    if validate:
        _validate(str(path), group, version, label="image-label" in ome)
    first = ms[0]
    raw_axes = first.get("axes") or []
    raw_axes = [a if isinstance(a, dict) else {"name": str(a)} for a in raw_axes]  # 0.3 wrote plain names
    datasets = []
    for ds in first.get("datasets", []):
        apath = str(ds["path"])
        try:
            arr = group[apath]
        except KeyError:
            raise InvalidImageError(f"{role} {path}: multiscales names dataset {apath!r} but the store has no such array") from None
        shape = tuple(int(s) for s in arr.shape)
        if not raw_axes:
            raw_axes = [{"name": n, "type": "space"} for n in ("z", "y", "x")[-len(shape) :]] if len(shape) <= 3 else []
        n = len(raw_axes)
        if len(shape) != n:
            names = tuple(str(a.get("name", "?")) for a in raw_axes)
            raise InvalidImageError(f"{role} {path}/{apath}: array has {len(shape)} dimensions but metadata declares axes {names}")
        scale, shift = _transforms(ds.get("coordinateTransformations") or [], n)
        gscale, gshift = _transforms(first.get("coordinateTransformations") or [], n)
        datasets.append(
            Dataset(
                apath,
                shape,
                tuple(int(c) for c in (arr.chunks or shape)),
                str(arr.dtype),
                tuple(a * b for a, b in zip(scale, gscale)),
                tuple(a * g + b for a, g, b in zip(shift, gscale, gshift)),
            )
        )
    if not datasets:
        raise InvalidImageError(f"{role} {path}: multiscales lists no datasets; re-convert it")
    axes = tuple(
        Axis(str(a.get("name", "?")), str(a.get("type") or ("space" if a.get("name") in ("x", "y", "z") else "")), a.get("unit"))
        for a in raw_axes
    )
    labels: tuple[str, ...] = ()
    if "labels" in group:
        labels = tuple(str(n) for n in ome_attrs(group["labels"]).get("labels", []))
    channels = tuple(str(c.get("label", i)) for i, c in enumerate(ome.get("omero", {}).get("channels", [])))
    return Multiscale(
        path=Remote.create(str(path), {}, role=role).url if is_url(path) else str(path),
        version=version,
        name=str(first.get("name") or ""),
        axes=axes,
        datasets=tuple(datasets),
        metadata=dict(first.get("metadata") or {}),
        channels=channels,
        image_label=dict(ome["image-label"]) if "image-label" in ome else None,
        labels=labels,
    )


def _validate(path: str, group: Any, version: str, *, label: bool) -> None:
    """Validate with ome-zarr-models; its pydantic error becomes one line naming the first problem."""
    try:
        if version.startswith("0.5"):
            from ome_zarr_models.v05 import Image, ImageLabel
        elif version.startswith("0.4"):
            from ome_zarr_models.v04 import Image, ImageLabel  # type: ignore[assignment]
        else:
            return  # older layouts: read leniently
        (ImageLabel if label else Image).from_zarr(group)
    except ImportError:
        return
    except Exception as e:
        first = _first_validation_error(e)
        if "dimension_names" in first:
            # NGFF 0.5 asks arrays to repeat the axis names; some writers leave them out. The axes
            # metadata says the same thing, so read on, but say so.
            warnings.warn(
                TilefeetWarning(f"{path}: its arrays lack zarr dimension_names (NGFF 0.5 requires them); reading the axes metadata instead"),
                stacklevel=4,
            )
            return
        raise InvalidImageError(f"{path}: invalid OME-Zarr {version} multiscales metadata ({first}); fix the metadata or re-convert the image") from None


def _first_validation_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            err = errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            return f"{loc}: {err.get('msg', '')}".strip(": ")
        except Exception:
            pass
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _transforms(transforms: Sequence[dict], n: int) -> tuple[list[float], list[float]]:
    scale, shift = [1.0] * n, [0.0] * n
    for t in transforms:
        if t.get("type") == "scale" and "scale" in t:
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation" and "translation" in t:
            shift = [float(v) for v in t["translation"]]
    return scale, shift


# ------------------------------------------------------------------------------------ writing


def pyramid_shapes(shape: Pair, chunk: Pair, max_levels: int = 12) -> list[Pair]:
    """Level shapes, halving (rounding up) until the image fits in one chunk."""
    shapes = [shape]
    while len(shapes) < max_levels and (shapes[-1][0] > chunk[0] or shapes[-1][1] > chunk[1]) and min(shapes[-1]) > 1:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def compressor() -> Any:
    """Blosc with zstd at a low level: EM, probabilities and masks compress well, and writing must keep up with a GPU."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def grey_compressor(dtype: Any) -> Any:
    """The codec for grey 8-bit images written at pipeline speed (uint8 probabilities, uncertainty):
    zstd level 1 on the bytes as they are. Bit-shuffling, right for 0/1 masks, splits grey levels
    into noisy bit planes: on uint8 probabilities of real EM it compressed less (3.1× against 3.6×)
    at a quarter of the speed (62 against 246 MB/s on one core). Other dtypes keep :func:`compressor`."""
    import numpy as np

    if np.dtype(dtype) != np.uint8:
        return compressor()
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle")


def multiscales(
    name: str,
    pixel_size_nm: tuple[float, float],
    n_levels: int,
    *,
    origin_nm: tuple[float, float] = (0.0, 0.0),
    lead_axes: Sequence[dict] = (),
    lead_scale: Sequence[float] | None = None,
    lead_origin: Sequence[float] | None = None,
    method: str = "mean",
    metadata: dict | None = None,
    unit: str = "nanometer",
    unit_scale: float = 1.0,
) -> dict:
    """NGFF multiscales metadata for 2×-per-level pyramids (pixel centres at ``origin + i·pixel``).

    ``lead_axes`` come before y, x (a channel axis, or z of a stack); ``lead_scale`` is their
    scale and ``lead_origin`` their translation, the same on every level (z is not downsampled;
    default scale 1, origin 0).
    """
    (py, px), (oy, ox) = pixel_size_nm, origin_nm
    lead = [float(v) for v in lead_scale] if lead_scale is not None else [1.0] * len(lead_axes)
    datasets = []
    for k in range(n_levels):
        f = 2**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [*lead, py * f * unit_scale, px * f * unit_scale]},
                    {"type": "translation", "translation": [*(float(v) for v in (lead_origin or [0.0] * len(lead))), (oy + py * (f - 1) / 2) * unit_scale, (ox + px * (f - 1) / 2) * unit_scale]},
                ],
            }
        )
    ms: dict[str, Any] = {
        "name": name,
        "axes": [*lead_axes, {"name": "y", "type": "space", "unit": unit}, {"name": "x", "type": "space", "unit": unit}],
        "datasets": datasets,
        "type": f"2x2 {method}",
    }
    if metadata:
        ms["metadata"] = metadata
    return ms


def image_metadata(multiscale: dict, *, version: str = "0.5", channels: Sequence[dict] | None = None) -> dict:
    """The attributes of an image group around one ``multiscales`` entry (see :func:`multiscales`):
    under ``"ome"`` for 0.5, at the top level for 0.4; ``channels`` become omero rendering settings."""
    doc: dict[str, Any] = {"multiscales": [multiscale]}
    if channels:
        doc["omero"] = {"channels": list(channels), "rdefs": {"model": "greyscale"}}
    if version.startswith("0.4"):
        doc["multiscales"] = [{**multiscale, "version": "0.4"}]
        return doc
    return {"ome": {"version": "0.5", **doc}}


def label_metadata(multiscale: dict, *, colors: Sequence[dict] = (), properties: Sequence[dict] = ()) -> dict:
    """The attributes of an NGFF 0.5 label image group: its multiscales and ``image-label`` (colours
    and properties per label value; the source image is the group two levels up)."""
    image_label: dict[str, Any] = {"version": "0.5", "source": {"image": "../../"}}
    if colors:
        image_label["colors"] = list(colors)
    if properties:
        image_label["properties"] = list(properties)
    return {"ome": {"version": "0.5", "multiscales": [multiscale], "image-label": image_label}}


def add_label(image_group: Any, name: str) -> Any:
    """Create (or reopen) ``labels/`` of an image group and list ``name`` there; returns ``labels/``.
    Call it when the label image is complete: readers only see listed label images."""
    labels = image_group.require_group("labels")
    names = list(ome_attrs(labels).get("labels", []))
    if name not in names:
        names.append(name)
    labels.attrs["ome"] = {"version": "0.5", "labels": names}
    return labels


def create_levels(
    group: Any,
    shapes: Sequence[tuple[int, ...]],
    *,
    chunks: tuple[int, ...],
    dtype: Any,
    dimension_names: Sequence[str] | None,
    shards: tuple[int, ...] | None = None,
    compressors: Any = "default",
    overwrite: bool = False,
) -> list[Any]:
    """One array per pyramid level (``"0"``, ``"1"``, ...), chunked as ``chunks`` clipped to each
    level's shape, filled with 0; ``shards`` (zarr v3) on level 0 only (coarser levels are small);
    ``overwrite``: replace arrays of those names."""
    arrays = []
    for k, shape in enumerate(shapes):
        kw: dict[str, Any] = {}
        if dimension_names is not None:
            kw["dimension_names"] = list(dimension_names)
        arrays.append(
            group.create_array(
                str(k),
                shape=tuple(shape),
                chunks=tuple(max(1, min(c, s)) for c, s in zip(chunks, shape)),
                shards=shards if shards is not None and k == 0 else None,
                dtype=dtype,
                compressors=compressor() if compressors == "default" else compressors,
                fill_value=0,
                overwrite=overwrite,
                **kw,
            )
        )
    return arrays
