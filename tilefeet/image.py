"""Reading sections: OME-Zarr images (NGFF 0.5 on zarr v3, 0.4 on zarr v2) and in-memory arrays.

An :class:`Image` is lazy: opening reads metadata only, :meth:`Image.read` reads one box of one
pyramid level (out-of-bounds pixels by symmetric reflection, so edge tiles see real texture).
Its :class:`ImageMeta` is a small picklable description that pure planning code works from.

Accepted layouts: ``yx``, plus leading axes of size one (``c``, ``z``, ``t``: the common
``tczyx`` of bioformats2raw) which are dropped; and stacks of sections: a ``z`` axis longer than
one (``zyx``, ``tczyx`` with size-one ``t`` and ``c``), read a section at a time
(:meth:`Image.section`), with the section spacing from the z axis's scale. Metadata is validated
with ``ome-zarr-models``; pixel sizes are converted to nanometres from the axis units.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .chunks import ChunkCheck, check_chunks, chunk_key, list_array
from .errors import CorruptDataError, InvalidImageError, TilefeetWarning
from .geometry import Box, Pair, reflect_index
from .storage import Remote, is_remote_error, is_url, remote_error
from .units import format_nm, nm_per_unit

FloatPair = tuple[float, float]
#: Chunk side of numpy arrays wrapped as images (so a block task depends only on the chunks it needs).
ARRAY_CHUNK = 1024


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
    lead_shape: tuple[int, ...] = ()  #: sizes of the axes before y, x (all 1 for a section)
    token: str = ""  #: content token of an in-memory array (dask's); a store is identified by its path
    #: a stack: which of the leading axes is z (an index into ``lead_shape``); None for a section
    z_axis: int | None = None
    z_spacing_nm: float | None = None  #: distance between sections (nm); None when the metadata gives none
    z_origin_nm: float = 0.0  #: physical z of section 0 (nm)

    @property
    def shape(self) -> Pair:
        return self.levels[0].shape

    @property
    def depth(self) -> int:
        """Sections along z (1 for a section)."""
        return self.lead_shape[self.z_axis] if self.z_axis is not None else 1

    @property
    def is_stack(self) -> bool:
        return self.z_axis is not None

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

    def describe(self) -> str:
        lead = [f"{n} {a}" for i, (a, n) in enumerate(zip(self.axes[:-2], self.lead_shape)) if n > 1 and i != self.z_axis]
        kind = f", a stack of {' × '.join(lead)} planes" if lead else ""
        if self.is_stack:
            apart = f", {format_nm(self.z_spacing_nm)} apart" if self.z_spacing_nm else ", spacing unknown"
            kind = f", a stack of {self.depth} sections{apart}" + kind
        rows = [f"{self.source}  (OME-Zarr {self.version or '-'}, {self.dtype}, axes {''.join(self.axes)}{kind})"]
        for i, lv in enumerate(self.levels):
            px = format_nm(lv.pixel_size_nm) if lv.pixel_size_nm else "unknown pixel size"
            rows.append(f"  level {i} ({lv.path}): {lv.shape[0]} × {lv.shape[1]} px, chunks {lv.chunks[0]} × {lv.chunks[1]}, {px}")
        return "\n".join(rows)


@dataclass
class Image:
    """A lazily read section: metadata plus per-level array handles."""

    meta: ImageMeta
    _arrays: list[Any] = field(default_factory=list, repr=False)  #: zarr or dask arrays, per level
    _lead: tuple[int, ...] = ()  #: index for the leading singleton axes
    #: how to reach a URL ``meta.source`` (see :mod:`tilefeet.storage`): kept out of the metadata, so
    #: that neither the plan's fingerprint nor anything written holds credentials
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: the store's writer records that it stores every chunk (tilefeet's convert and segment), so an
    #: absent chunk is missing data, never one left out as empty (:mod:`tilefeet.chunks`)
    every_chunk_written: bool = False
    #: listings of the levels' files (:meth:`check_chunks`), shared by the sections of a stack: one per level
    _listings: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    # ---- construction

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        sections_only: bool = True,
        stacks: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        command: str = "",
    ) -> Image:
        """Open an OME-Zarr image (0.5 or 0.4) by path or ``http(s)://`` / ``s3://`` URL; only
        metadata is read. ``storage_options`` reach a URL (anonymous access, endpoint, credentials:
        :mod:`tilefeet.storage`); without them, the environment's (and the command's) are used.

        ``sections_only`` refuses leading axes longer than one (channels, time points, and stacks
        unless ``stacks``: a z axis of sections, which ``segment`` reads); ``command`` names the
        command in that refusal. ``tilefeet info`` turns it off to describe any image.
        """
        if is_url(path):
            remote = Remote.create(str(path), storage_options)
            image = _open_ome_zarr(remote.url, sections_only, dict(remote.options), stacks=stacks, command=command)
            image.storage_options = dict(remote.options)
            return image
        return _open_ome_zarr(Path(path), sections_only, stacks=stacks, command=command)

    @classmethod
    def from_array(
        cls,
        data: Any,
        pixel_size_nm: FloatPair | float | None = None,
        *,
        origin_nm: FloatPair = (0.0, 0.0),
        name: str = "array",
        z_spacing_nm: float | None = None,
    ) -> Image:
        """Wrap a numpy, dask or xarray 2-D array (xarray coordinates give the pixel size in nm), or
        a 3-D one, a stack of sections along its first axis (z; an xarray's ``z`` coordinate gives
        the section spacing, else ``z_spacing_nm``).

        The array is held as a dask array (numpy in chunks of :data:`ARRAY_CHUNK`, one section deep),
        so that a graph over the image makes each block depend on the chunks it needs, not the whole
        array, and its content token (dask's) tells two arrays of the same shape apart in dask keys.
        """
        import dask.array as da
        from dask.base import tokenize

        arr: Any = data
        px: Any = pixel_size_nm
        origin = origin_nm
        dz, z0 = z_spacing_nm, 0.0
        if hasattr(data, "dims") and hasattr(data, "coords"):  # xarray.DataArray
            arr, px2, origin2 = _from_xarray(data)
            px = px if px is not None else px2
            origin = origin2 if origin2 is not None else origin
            if dz is None and "z" in data.dims and "z" in data.coords and data.sizes["z"] > 1:
                z = np.asarray(data.coords["z"].values, dtype=np.float64)
                f = nm_per_unit(data.coords["z"].attrs.get("units", data.coords["z"].attrs.get("unit", "nm")), where="xarray coordinate 'z'")
                dz, z0 = float(z[1] - z[0]) * f, float(z[0]) * f
        if isinstance(px, (int, float)):
            px = (float(px), float(px))
        if not isinstance(arr, da.Array):
            arr = np.asarray(arr)
            arr = da.from_array(arr, chunks=(*(1 for _ in arr.shape[:-2]), *(min(ARRAY_CHUNK, max(1, s)) for s in arr.shape[-2:])))
        shape = tuple(int(s) for s in arr.shape)
        names = ("z", "y", "x") if len(shape) == 3 else tuple("?" * (len(shape) - 2)) + ("y", "x")
        lead = _check_axes_shape(shape, names, name, stacks=True)
        chunks = tuple(int(c[0]) for c in arr.chunks)[-2:]
        level = Level("0", (shape[-2], shape[-1]), (chunks[-2], chunks[-1]), px, origin)
        z_axis = 0 if len(shape) == 3 and shape[0] > 1 else None
        meta = ImageMeta(name, (level,), str(np.dtype(arr.dtype)), len(shape), "", name, names, shape[:-2], tokenize(arr),
                         z_axis, dz if z_axis is not None else None, z0)
        _check_level(meta, 0)
        return cls(meta, [arr], lead)

    def section(self, z: int) -> Image:
        """Section ``z`` of a stack, read like an image of its own (the same arrays, one plane)."""
        if self.meta.z_axis is None:
            if z != 0:
                raise IndexError(f"{self.meta.source} is a single section; there is no section {z}")
            return self
        lead = list(self._lead)
        lead[self.meta.z_axis] = z
        return replace(self, _lead=tuple(lead))

    # ---- reading

    @property
    def shape(self) -> Pair:
        return self.meta.shape

    @property
    def in_memory(self) -> bool:
        """An array given in memory (numpy, dask, xarray), not an OME-Zarr store."""
        return not self.meta.version

    def array(self, level: int) -> Any:
        """The stored array of a level (zarr or dask), leading axes included."""
        if not self._arrays:
            self._arrays = _open_level_arrays(self.meta, self.storage_options)
        return self._arrays[level]

    def read(self, level: int, box: Box) -> np.ndarray:
        """Pixels of ``box`` at ``level`` as a 2-D array; outside the image, symmetric reflection."""
        hull = self.hull(level, box)
        return Region(level, hull, self._read_inside(level, hull), self.meta.levels[level].shape).read(level, box)

    def hull(self, level: int, box: Box) -> Box:
        """The part of the level inside the image that reading ``box`` touches (reflection included)."""
        h, w = self.meta.levels[level].shape
        if Box(0, 0, h, w).contains(box):
            return box
        ys = reflect_index(np.arange(box.y0, box.y1), h)
        xs = reflect_index(np.arange(box.x0, box.x1), w)
        return Box(int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)

    def lazy_region(self, level: int, box: Box) -> Any:
        """For an in-memory image, the lazy dask array of :meth:`hull` (a task takes it as an input,
        computed by the scheduler: no compute inside a task); ``None`` for a store (its tasks read)."""
        if not self.in_memory:
            return None
        hull = self.hull(level, box)
        return self.array(level)[self._lead + (slice(hull.y0, hull.y1), slice(hull.x0, hull.x1))]

    def check_chunks(self, level: int) -> ChunkCheck | None:
        """One listing of the level's stored chunks: which are missing (:mod:`tilefeet.chunks`);
        None for an in-memory array, which has nothing missing."""
        if self.in_memory:
            return None
        path = self.meta.levels[level].path
        if path not in self._listings:
            self._listings[path] = list_array(self.meta.source, path, self.storage_options)
        return check_chunks(
            self.array(level), self.meta.source, path, what=f"level {level}", lead=self._lead,
            read=lambda box: self._read_inside(level, box), every_chunk_written=self.every_chunk_written,
            storage_options=self.storage_options, stored=self._listings[path],
        )

    def _read_inside(self, level: int, box: Box) -> np.ndarray:
        arr = self.array(level)
        index = self._lead + (slice(box.y0, box.y1), slice(box.x0, box.x1))
        if self.in_memory:  # a dask array read outside a graph (statistics, small in-process reads)
            import dask.local

            return np.asarray(arr[index].compute(scheduler=dask.local.get_sync))
        try:
            return np.asarray(arr[index])
        except Exception as e:
            if is_url(self.meta.source) and is_remote_error(e):  # the server or the network, not the data
                raise remote_error(e, Remote.create(self.meta.source, self.storage_options)) from None
            if not isinstance(e, (RuntimeError, ValueError)):
                raise
            # what zarr and numcodecs raise on bytes they cannot decode
            raise self._damaged(level, box, e) from None

    def _damaged(self, level: int, box: Box, error: Exception) -> CorruptDataError:
        """The error for bytes in ``box`` that do not decode, naming the damaged chunk: on this error
        path only, the box is read again chunk by chunk to find it."""
        lv = self.meta.levels[level]
        found = self._first_damaged(level, box)
        if found is None:  # no chunk fails on its own (or it could not be read again): name the box
            return CorruptDataError(
                f"{self.meta.source}: could not decode level {level} ({lv.path}) at y {box.y0}:{box.y1}, x {box.x0}:{box.x1}: "
                f"{_first_line(error)}; a chunk there is damaged: restore or re-convert the input"
            )
        key, cell, error = found
        return CorruptDataError(
            f"{self.meta.source}: chunk {key} of level {level} (y {cell.y0}:{cell.y1}, x {cell.x0}:{cell.x1}) cannot be decoded "
            f"({_first_line(error)}): the file is damaged; restore it (copy or convert the input again)"
        )

    def _first_damaged(self, level: int, box: Box) -> tuple[str, Box, Exception] | None:
        """The key (relative to the image), pixels and error of the first chunk in ``box`` that does not decode."""
        arr, (h, w) = self.array(level), self.meta.levels[level].shape
        ch, cw = (int(c) for c in arr.chunks[-2:])
        for y in range(box.y0 // ch * ch, box.y1, ch):
            for x in range(box.x0 // cw * cw, box.x1, cw):
                cell = Box(y, x, min(y + ch, h), min(x + cw, w))
                try:
                    arr[self._lead + (slice(cell.y0, cell.y1), slice(cell.x0, cell.x1))]
                except (RuntimeError, ValueError) as e:
                    return f"{self.meta.levels[level].path}/{chunk_key(arr, y, x, self._lead)}", cell, e
                except Exception:
                    continue
        return None

    def __getstate__(self) -> dict:
        # Arrays never travel with the image: a store's are re-opened in the receiving process, and
        # an in-memory one reaches tasks as explicit inputs (:meth:`lazy_region`), chunk by chunk.
        state = dict(self.__dict__)
        state["_arrays"] = []
        state["_listings"] = {}
        return state


@dataclass(frozen=True)
class Region:
    """Pixels of one level already read (``data`` covers ``hull``), read like an image: boxes that
    reach beyond the image are reflected into the hull, as :meth:`Image.read` does."""

    level: int
    hull: Box
    data: np.ndarray
    shape: Pair | None = None  #: the level's shape (for reflection); None when ``hull`` needs none

    def read(self, level: int, box: Box) -> np.ndarray:
        assert level == self.level, "a region serves the level it was read from"
        if self.hull.contains(box):
            return self.data[box.relative_to(self.hull)]
        h, w = self.shape if self.shape is not None else (self.hull.y1, self.hull.x1)
        ys = reflect_index(np.arange(box.y0, box.y1), h) - self.hull.y0
        xs = reflect_index(np.arange(box.x0, box.x1), w) - self.hull.x0
        return self.data[np.ix_(ys, xs)]


# ------------------------------------------------------------------------------------ OME-Zarr


def _open_ome_zarr(
    path: str | Path, sections_only: bool = True, storage_options: Mapping[str, Any] | None = None, *, stacks: bool = False, command: str = ""
) -> Image:
    from .ngff import read_multiscale

    ms = read_multiscale(path, storage_options=storage_options)
    names = ms.names
    space = [i for i, a in enumerate(ms.axes) if a.type == "space"]
    if len(space) < 2 or space[-2:] != [len(names) - 2, len(names) - 1]:
        raise InvalidImageError(f"{ms.path}: the last two axes must be spatial (y, x), got axes {names}")
    ds0 = ms.datasets[0]
    if sections_only:
        lead = _check_axes_shape(ds0.shape, names, ms.path, stacks=stacks, command=command)
    else:
        lead = (0,) * (len(names) - 2)
    z_axis = next((i for i, n in enumerate(names[:-2]) if n == "z" and ds0.shape[i] > 1), None)
    dz, z0 = _z_spacing(ms, z_axis) if z_axis is not None else (None, 0.0)
    levels = []
    for k, ds in enumerate(ms.datasets):
        if k and tuple(ds.shape[:-2]) != tuple(ds0.shape[:-2]):
            # A pyramid that also downsamples z (or another leading axis): such a level has other
            # sections than level 0, so it cannot stand in for it; sections are read from level 0's z.
            warnings.warn(TilefeetWarning(
                f"{ms.path}/{ds.path}: its leading axes {tuple(ds.shape[:-2])} differ from level 0's {tuple(ds0.shape[:-2])} "
                f"(a pyramid downsampled in z too?); this level is ignored"
            ), stacklevel=3)
            continue
        px = ms.pixel_size_nm(k)
        if px is not None and min(px) <= 0:
            raise InvalidImageError(f"{ms.path}/{ds.path}: scale must be positive, got {ds.scale[-2:]}")
        if k and not _consistent(ds.shape, ds.scale, ds0.shape, ds0.scale):
            # The level's scale says one size, its shape another: which is wrong cannot be told, and
            # reading it would put pixels in the wrong place. Level 0 defines the section; skip it.
            warnings.warn(TilefeetWarning(
                f"{ms.path}/{ds.path}: its scale {_fmt(ds.scale[-2:])} and shape {ds.shape[-2]} × {ds.shape[-1]} disagree with level 0 "
                f"({_fmt(ds0.scale[-2:])}, {ds0.shape[-2]} × {ds0.shape[-1]}); this level is ignored (fix its coordinateTransformations)"
            ), stacklevel=3)
            continue
        levels.append(Level(ds.path, (ds.shape[-2], ds.shape[-1]), (ds.chunks[-2], ds.chunks[-1]), px, ms.origin_nm(k) if px else (0.0, 0.0)))
    meta = ImageMeta(ms.path, tuple(levels), ds0.dtype, len(names), ms.version, ms.name, names, tuple(ds0.shape[:-2]), "", z_axis, dz, z0)
    _check_level(meta, 0)
    return Image(meta, [], lead, every_chunk_written=ms.metadata.get("every_chunk_written") is True)


class ZSpacingWarning(TilefeetWarning):
    """A stack that does not say how far apart its sections are."""


def _z_spacing(ms: Any, z_axis: int) -> tuple[float | None, float]:
    """(spacing, origin) of the sections in nm from the z axis's unit, scale and translation; a z axis
    without a unit gives ``(None, 0)`` and one warning line (the stack still segments: sections
    are 2-D; only physical z in measurements and metadata needs it)."""
    axis = ms.axes[z_axis]
    scale = ms.datasets[0].scale[z_axis]
    translation = ms.datasets[0].translation[z_axis] if ms.datasets[0].translation else 0.0
    if axis.unit is None:
        warnings.warn(ZSpacingWarning(
            f"{ms.path}: its z axis has no unit, so the distance between sections is unknown; z is written in section "
            f"numbers (measurements in 3-D need it: re-convert with --pixel-size Z,Y,Xnm, e.g. 50,4,4nm)"
        ), stacklevel=4)
        return None, 0.0
    f = nm_per_unit(axis.unit, where=f"{ms.path} axis 'z'")
    return float(scale) * f, float(translation) * f


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _check_axes_shape(shape: tuple[int, ...], names: tuple[str, ...], where: str, *, stacks: bool = False, command: str = "") -> tuple[int, ...]:
    """Leading axes must have size one, except (``stacks``) one z axis of sections; returns the
    index that drops them (section 0 of a stack: :meth:`Image.section` picks another)."""
    if len(shape) < 2:
        raise InvalidImageError(f"{where}: need a 2-D image (y, x), got shape {shape}")
    for size, name in zip(shape[:-2], names[:-2]):
        if size != 1:
            if name == "c":
                raise InvalidImageError(
                    f"{where} has {size} channels; tilefeet segments single-channel EM: select one channel first"
                )
            if name == "z" and stacks:
                continue
            if name == "z":
                what = f"tilefeet {command}" if command else "this command"
                raise InvalidImageError(
                    f"{where} is a stack of {size} sections (shape {shape}); {what} takes one section here "
                    f"(tilefeet segment takes whole stacks)"
                )
            axis = f"axis {name!r}" if name != "?" else f"its axis {list(shape).index(size)}"
            raise InvalidImageError(
                f"{where} has {size} planes along {axis} (shape {shape}); tilefeet segments sections (y, x) and stacks "
                f"(z, y, x): select one plane of that axis first"
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


def _open_level_arrays(meta: ImageMeta, storage_options: Mapping[str, Any] | None = None) -> list[Any]:
    """The arrays of every level, opened in this process from ``meta.source`` (a path or a URL)."""
    import zarr

    if not meta.version:
        raise RuntimeError(
            f"the in-memory image {meta.source!r} was sent to another process without its data; "
            "tasks receive its pixels as inputs (Image.lazy_region)"
        )

    if is_url(meta.source):
        from .ngff import open_group

        group = open_group(meta.source, storage_options=storage_options)
    else:
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
