"""Reading sections: OME-Zarr images (NGFF 0.5 on zarr v3, 0.4 on zarr v2) and in-memory arrays.

An :class:`Image` is lazy: opening reads metadata only, :meth:`Image.read` reads one box of one
pyramid level (out-of-bounds pixels by symmetric reflection, so edge tiles see real texture).
Its :class:`ImageMeta` is a small picklable description that pure planning code works from.

Accepted layouts: ``yx``, plus leading axes of size one (``c``, ``z``, ``t``: the common
``tczyx`` of bioformats2raw) which are dropped. Metadata is validated with ``ome-zarr-models``;
pixel sizes are converted to nanometres from the axis units.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CorruptDataError, InputNotFoundError, InvalidImageError, TilefeetError, TilefeetWarning
from .geometry import Box, Pair, reflect_index
from .units import format_nm, nm_per_unit

FloatPair = tuple[float, float]


@dataclass(frozen=True)
class Level:
    """One pyramid level: its array path, 2-D shape and chunks, and its physical grid."""

    path: str
    shape: Pair
    chunks: Pair
    pixel_size_nm: FloatPair | None  #: (y, x); None when the metadata gives no physical unit
    origin_nm: FloatPair = (0.0, 0.0)  #: physical position of the centre of pixel (0, 0)


@dataclass(frozen=True)
class ImageMeta:
    """What planning needs to know about a section, without touching pixel data."""

    source: str  #: path (or a description of an in-memory array)
    levels: tuple[Level, ...]
    dtype: str
    ndim: int  #: dimensions of the stored arrays (leading axes included)
    version: str = ""  #: NGFF version, "" for in-memory arrays
    name: str = ""
    axes: tuple[str, ...] = ("y", "x")

    @property
    def shape(self) -> Pair:
        return self.levels[0].shape

    @property
    def pixel_size_nm(self) -> FloatPair | None:
        return self.levels[0].pixel_size_nm

    def with_pixel_size(self, pixel_size_nm: FloatPair) -> ImageMeta:
        """Override level 0's pixel size (``--pixel-size``); other levels keep their ratio to level 0."""
        base = self.levels[0]
        levels = []
        for lv in self.levels:
            if base.pixel_size_nm is not None and lv.pixel_size_nm is not None:
                ratio = (lv.pixel_size_nm[0] / base.pixel_size_nm[0], lv.pixel_size_nm[1] / base.pixel_size_nm[1])
                shift = (
                    (lv.origin_nm[0] - base.origin_nm[0]) / base.pixel_size_nm[0],
                    (lv.origin_nm[1] - base.origin_nm[1]) / base.pixel_size_nm[1],
                )
            else:  # no physical metadata: infer the ratio from the shapes
                ratio = (base.shape[0] / lv.shape[0], base.shape[1] / lv.shape[1])
                shift = ((ratio[0] - 1) / 2, (ratio[1] - 1) / 2)
            px = (pixel_size_nm[0] * ratio[0], pixel_size_nm[1] * ratio[1])
            origin = (shift[0] * pixel_size_nm[0], shift[1] * pixel_size_nm[1])
            levels.append(replace(lv, pixel_size_nm=px, origin_nm=origin))
        return replace(self, levels=tuple(levels))

    lead_shape: tuple[int, ...] = ()  #: sizes of the axes before y, x (all 1 for a section)

    def describe(self) -> str:
        lead = [f"{n} {a}" for a, n in zip(self.axes[:-2], self.lead_shape) if n > 1]
        kind = f", a stack of {' × '.join(lead)} planes" if lead else ""
        rows = [f"{self.source}  (OME-Zarr {self.version or '-'}, {self.dtype}, axes {''.join(self.axes)}{kind})"]
        for i, lv in enumerate(self.levels):
            px = format_nm(lv.pixel_size_nm) if lv.pixel_size_nm else "unknown pixel size"
            rows.append(f"  level {i} ({lv.path}): {lv.shape[0]} × {lv.shape[1]} px, chunks {lv.chunks[0]} × {lv.chunks[1]}, {px}")
        return "\n".join(rows)


@dataclass
class Image:
    """A lazily read section: metadata plus per-level array handles."""

    meta: ImageMeta
    _arrays: list[Any] = field(default_factory=list, repr=False)  #: zarr or dask/numpy arrays, per level
    _lead: tuple[int, ...] = ()  #: index for the leading singleton axes

    # ---- construction

    @classmethod
    def open(cls, path: str | os.PathLike, *, sections_only: bool = True) -> Image:
        """Open an OME-Zarr image (0.5 or 0.4) by path; only metadata is read.

        ``sections_only`` refuses leading axes longer than one (stacks, channels): tilefeet
        segments 2-D sections. ``tilefeet info`` turns it off to describe any image.
        """
        return _open_ome_zarr(Path(path), sections_only)

    @classmethod
    def from_array(
        cls,
        data: Any,
        pixel_size_nm: FloatPair | float | None = None,
        *,
        origin_nm: FloatPair = (0.0, 0.0),
        name: str = "array",
    ) -> Image:
        """Wrap a numpy, dask or xarray 2-D array (xarray coordinates give the pixel size in nm)."""
        arr: Any = data
        px: Any = pixel_size_nm
        origin = origin_nm
        if hasattr(data, "dims") and hasattr(data, "coords"):  # xarray.DataArray
            arr, px2, origin2 = _from_xarray(data)
            px = px if px is not None else px2
            origin = origin2 if origin2 is not None else origin
        if isinstance(px, (int, float)):
            px = (float(px), float(px))
        shape = tuple(int(s) for s in arr.shape)
        lead = _check_axes_shape(shape, tuple("?" * (len(shape) - 2)) + ("y", "x"), name)
        chunks = tuple(int(c[0]) for c in arr.chunks)[-2:] if hasattr(arr, "chunks") and arr.chunks else shape[-2:]
        level = Level("0", (shape[-2], shape[-1]), (chunks[-2], chunks[-1]), px, origin)
        meta = ImageMeta(name, (level,), str(np.dtype(arr.dtype)), len(shape), "", name)
        _check_level(meta, 0)
        return cls(meta, [arr], lead)

    # ---- reading

    @property
    def shape(self) -> Pair:
        return self.meta.shape

    def array(self, level: int) -> Any:
        """The stored array of a level (zarr or dask/numpy), leading axes included."""
        if not self._arrays:
            self._arrays = _open_level_arrays(self.meta)
        return self._arrays[level]

    def read(self, level: int, box: Box) -> np.ndarray:
        """Pixels of ``box`` at ``level`` as a 2-D array; outside the image, symmetric reflection."""
        h, w = self.meta.levels[level].shape
        inside = Box(0, 0, h, w)
        if inside.contains(box):
            return self._read_inside(level, box)
        ys = reflect_index(np.arange(box.y0, box.y1), h)
        xs = reflect_index(np.arange(box.x0, box.x1), w)
        hull = Box(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        data = self._read_inside(level, hull)
        return data[np.ix_(ys - hull.y0, xs - hull.x0)]

    def _read_inside(self, level: int, box: Box) -> np.ndarray:
        arr = self.array(level)
        index = self._lead + (slice(box.y0, box.y1), slice(box.x0, box.x1))
        try:
            data = arr[index]
            if hasattr(data, "compute"):
                data = data.compute()
            return np.asarray(data)
        except TilefeetError:
            raise
        except Exception as e:  # zarr/numcodecs raise plain RuntimeError/ValueError on bad bytes
            raise CorruptDataError(
                f"{self.meta.source}: could not read level {level} ({self.meta.levels[level].path}) at "
                f"y {box.y0}:{box.y1}, x {box.x0}:{box.x1}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                f"a chunk there is damaged: restore or re-convert the input"
            ) from None

    def __getstate__(self) -> dict:
        # Arrays of a store are re-opened in the receiving process; in-memory ones travel as they are.
        state = dict(self.__dict__)
        if self.meta.version:
            state["_arrays"] = []
        return state


# ------------------------------------------------------------------------------------ OME-Zarr


def _open_ome_zarr(path: Path, sections_only: bool = True) -> Image:
    import zarr

    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist; give the path of an OME-Zarr image (convert TIFF/PNG with `tilefeet convert`)")
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception:
        raise InvalidImageError(
            f"{path} is not a Zarr store; convert TIFF/PNG images with `tilefeet convert {path} OUT.ome.zarr --pixel-size 4nm`"
        ) from None
    if not isinstance(node, zarr.Group):
        raise InvalidImageError(
            f"{path} is a bare Zarr array, not an OME-Zarr image group; wrap it with `tilefeet convert` or give the image group"
        )
    attrs: dict[str, Any] = dict(node.attrs)
    ms: Any
    if "bioformats2raw.layout" in attrs.get("ome", attrs) and "0" in node:
        return _open_ome_zarr(path / "0", sections_only)
    if "ome" in attrs:
        version = str(attrs["ome"].get("version", "0.5"))
        ms = attrs["ome"].get("multiscales")
    else:
        ms = attrs.get("multiscales")
        version = str(ms[0].get("version", "0.4")) if isinstance(ms, list) and ms and isinstance(ms[0], dict) else "0.4"
    if not ms:
        raise InvalidImageError(
            f"{path} has no OME-Zarr 'multiscales' metadata, so it is not an OME-Zarr image; "
            f"convert the data with `tilefeet convert` or add NGFF multiscales metadata"
        )
    _validate(path, node, version)
    multiscale = ms[0]
    axes = multiscale.get("axes") or [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    axes = [a if isinstance(a, dict) else {"name": a} for a in axes]  # 0.3 wrote plain names
    names = tuple(str(a.get("name", "?")) for a in axes)
    space = [i for i, a in enumerate(axes) if a.get("type", "space" if a.get("name") in ("x", "y", "z") else "") == "space"]
    if len(space) < 2 or space[-2:] != [len(axes) - 2, len(axes) - 1]:
        raise InvalidImageError(f"{path}: the last two axes must be spatial (y, x), got axes {names}")
    units = [axes[i].get("unit") for i in space[-2:]]
    global_scale, global_shift = _transforms(multiscale.get("coordinateTransformations") or [], len(axes))
    levels, lead = [], None
    for k, ds in enumerate(multiscale.get("datasets", [])):
        apath = ds["path"]
        try:
            arr: Any = node[apath]
        except KeyError:
            raise InvalidImageError(f"{path}: multiscales names dataset {apath!r} but the store has no such array") from None
        shape = tuple(int(s) for s in arr.shape)
        if len(shape) != len(axes):
            raise InvalidImageError(f"{path}/{apath}: array has {len(shape)} dimensions but metadata declares axes {names}")
        if k == 0:
            lead = _check_axes_shape(shape, names, str(path)) if sections_only else (0,) * (len(shape) - 2)
        scale, shift = _transforms(ds.get("coordinateTransformations") or [], len(axes))
        scale = [a * b for a, b in zip(scale, global_scale)]
        shift = [a * g + b for a, g, b in zip(shift, global_scale, global_shift)]
        px = None
        if all(u is not None for u in units):
            f = [nm_per_unit(u, where=f"{path} axis {names[i]!r}") for u, i in zip(units, space[-2:])]
            px = (scale[-2] * f[0], scale[-1] * f[1])
            origin = (shift[-2] * f[0], shift[-1] * f[1])
            if min(px) <= 0:
                raise InvalidImageError(f"{path}/{apath}: scale must be positive, got {scale[-2:]}")
        else:
            origin = (0.0, 0.0)
        chunks = tuple(int(c) for c in (arr.chunks or shape))
        if k == 0:
            scale0, shape0 = scale, shape
        elif not _consistent(shape, scale, shape0, scale0):
            # The level's scale says one size, its shape another: which is wrong cannot be told, and
            # reading it would put pixels in the wrong place. Level 0 defines the section; skip it.
            warnings.warn(TilefeetWarning(
                f"{path}/{apath}: its scale {_fmt(scale[-2:])} and shape {shape[-2]} × {shape[-1]} disagree with level 0 "
                f"({_fmt(scale0[-2:])}, {shape0[-2]} × {shape0[-1]}); this level is ignored (fix its coordinateTransformations)"
            ), stacklevel=3)
            continue
        levels.append(Level(str(apath), (shape[-2], shape[-1]), (chunks[-2], chunks[-1]), px, origin))
    first: Any = node[levels[0].path]
    meta = ImageMeta(str(path), tuple(levels), str(first.dtype), len(axes), version, str(multiscale.get("name") or ""), names,
                     tuple(int(s) for s in first.shape[:-2]))
    _check_level(meta, 0)
    return Image(meta, [], lead or ())


def _validate(path: Path, node: Any, version: str) -> None:
    """Validate with ome-zarr-models; its pydantic error becomes one line naming the first problem."""
    try:
        if version.startswith("0.5"):
            from ome_zarr_models.v05 import Image as Model
        elif version.startswith("0.4"):
            from ome_zarr_models.v04 import Image as Model  # type: ignore[assignment]
        else:
            return  # older layouts: read leniently below
        Model.from_zarr(node)
    except ImportError:
        return
    except Exception as e:
        first = _first_validation_error(e)
        if "dimension_names" in first:
            # NGFF 0.5 asks arrays to repeat the axis names; some writers leave them out. The axes
            # metadata says the same thing, so read on, but say so.
            warnings.warn(
                TilefeetWarning(f"{path}: its arrays lack zarr dimension_names (NGFF 0.5 requires them); reading the axes metadata instead"),
                stacklevel=3,
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


def _check_axes_shape(shape: tuple[int, ...], names: tuple[str, ...], where: str) -> tuple[int, ...]:
    """Leading axes must have size one; returns the index that drops them."""
    if len(shape) < 2:
        raise InvalidImageError(f"{where}: need a 2-D image (y, x), got shape {shape}")
    for size, name in zip(shape[:-2], names[:-2]):
        if size != 1:
            if name == "c":
                raise InvalidImageError(
                    f"{where} has {size} channels; tilefeet segments single-channel EM: select one channel first"
                )
            raise InvalidImageError(
                f"{where} has {size} planes along axis {name!r} (shape {shape}); tilefeet segments 2-D sections: "
                f"write one plane as its own OME-Zarr image"
            )
    return (0,) * (len(shape) - 2)


def _consistent(shape: Sequence[int], scale: Sequence[float], shape0: Sequence[int], scale0: Sequence[float]) -> bool:
    """Does a level cover the same extent as level 0 (``shape × scale``), within one of its own pixels
    (downsampling rounds sizes up or down)? Checked on y and x, in the metadata's units."""
    for a in (-2, -1):
        factor = scale[a] / scale0[a]
        if factor <= 0 or abs(shape[a] * factor - shape0[a]) > factor + 1:
            return False
    return True


def _fmt(scale: Sequence[float]) -> str:
    return "×".join(f"{v:g}" for v in scale)


def _check_level(meta: ImageMeta, level: int) -> None:
    h, w = meta.levels[level].shape
    if h == 0 or w == 0:
        raise InvalidImageError(f"{meta.source} is empty (shape {h} × {w}); nothing to segment")
    if np.dtype(meta.dtype).kind not in "uif":
        raise InvalidImageError(f"{meta.source} has dtype {meta.dtype}; expected integer or floating-point intensities")


def _open_level_arrays(meta: ImageMeta) -> list[Any]:
    import zarr

    group = zarr.open_group(store=meta.source, mode="r")
    return [group[lv.path] for lv in meta.levels]


def _from_xarray(da: Any) -> tuple[Any, FloatPair | None, FloatPair | None]:
    """Data and (pixel size, origin) in nm from a DataArray with y/x coordinates (unit attr, default nm)."""
    dims = tuple(da.dims)
    if dims[-2:] != ("y", "x"):
        raise InvalidImageError(f"xarray input must end with dims ('y', 'x'), got {dims}")
    px, origin = [], []
    for d in ("y", "x"):
        if d not in da.coords or da.sizes[d] < 2:
            return da.data, None, None
        c = np.asarray(da.coords[d].values, dtype=np.float64)
        f = nm_per_unit(da.coords[d].attrs.get("units", da.coords[d].attrs.get("unit", "nm")), where=f"xarray coordinate {d!r}")
        px.append(float(c[1] - c[0]) * f)
        origin.append(float(c[0]) * f)
    return da.data, (px[0], px[1]), (origin[0], origin[1])
