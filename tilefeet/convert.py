"""``tilefeet convert``: TIFF / PNG images, montage folders and slice stacks → OME-Zarr 0.5 pyramids.

Inputs are read lazily through dask: a large TIFF tile by tile (tifffile's zarr view of its
tiles/strips, or a memory map when it is uncompressed), a montage folder tile file by tile file.
Levels are 2×2 means of the level below (labels: 2×2 maxima, so thin structures survive).

Montage layout comes from file names (``r03_c12``, ``row3_col12``, ``y3_x12``, ``3_12``) or from
``grid=(rows, cols)`` with files in natural sort order filling rows first; tiles abut (montages
are expected to be registered already).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, CorruptDataError, InputNotFoundError, InvalidImageError, OutputExistsError, TilefeetWarning
from .geometry import Pair
from .ngff import create_levels, image_metadata, multiscales, pyramid_shapes
from .storage import Url

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_GRID_PATTERNS = [
    re.compile(r"(?:^|[^a-z])r(?:ow)?[_-]?(\d+)[^0-9]*?c(?:ol(?:umn)?)?[_-]?(\d+)", re.I),
    re.compile(r"(?:^|[^a-z])y[_-]?(\d+)[^0-9]*?x[_-]?(\d+)", re.I),
    re.compile(r"^(?:\D*?)(\d+)[_x-](\d+)\D*$", re.I),
]


# ------------------------------------------------------------------------------------- reading


def natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def image_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")), key=natural_key)
    if not files:
        raise InvalidImageError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_small(path: Path) -> np.ndarray:
    """One PNG/TIFF/JPEG file fully into memory, as a 2-D array."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            a = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            a = iio.imread(path)
    except Exception as e:
        raise CorruptDataError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    return _as_2d(np.asarray(a), path)


def _as_2d(a: np.ndarray, where: Any) -> np.ndarray:
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # RGB(A) exports of grey EM images
        if not (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
            raise InvalidImageError(f"{where} is a colour image; EM sections are greyscale: convert it to one channel first")
        a = a[..., 0]
    a = np.squeeze(a) if a.ndim > 2 else a
    if a.ndim != 2:
        raise InvalidImageError(f"{where} has shape {a.shape}; expected a 2-D greyscale image")
    return a


def _grey_plane(block: np.ndarray, where: str) -> np.ndarray:
    """The first channel of an RGB(A) piece whose colour channels are equal; a colour piece is refused."""
    return _as_2d(block, where) if block.size else block[..., 0]


class TiffRegions:
    """Array-like view of a TIFF's first image, read region by region.

    Each read opens the file, decodes only the tiles or strips the region touches (through
    tifffile's zarr view of them) and closes it again: no file handle outlives a read, and the
    object pickles (a path), so a dask graph over it runs on any scheduler.
    """

    def __init__(self, path: Path):
        import tifffile

        self.path = Path(path)
        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                self.shape, self.dtype = tuple(series.shape), np.dtype(series.dtype)
                page: Any = tif.pages[0]
                # Uncompressed, contiguous pixels are memory-mapped: any region reads only its pages.
                self.contiguous = bool(page.is_contiguous) and page.compression == 1 and len(tif.series) == 1
                if self.contiguous:
                    self.chunks = (1, 1)
                else:
                    self.chunks = (page.tilelength or page.rowsperstrip or self.shape[0], page.tilewidth or self.shape[1])
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as e:
            raise CorruptDataError(f"cannot read TIFF {self.path}: {e}") from None
        self.ndim = len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        import tifffile
        import zarr

        try:
            if self.contiguous:
                mm = tifffile.memmap(self.path, mode="r")
                region = np.array(mm[index])
                del mm  # unmapped here (reference counting): no handle outlives the read
                return region
            with tifffile.imread(self.path, aszarr=True) as store:
                z: Any = zarr.open(store, mode="r")
                if isinstance(z, zarr.Group):  # pyramidal TIFF: level 0
                    z = z[sorted(z.array_keys())[0]]
                return np.asarray(z[index])
        except (tifffile.TiffFileError, OSError, ValueError, RuntimeError) as e:
            raise CorruptDataError(f"cannot decode {self.path} at {index}: {e}") from None


def lazy_tiff(path: Path, chunk: int = 1024) -> Any:
    """A dask array over one (possibly huge) TIFF: never read whole, only tile by tile / strip by strip."""
    import dask.array as da

    regions = TiffRegions(path)
    # Read in pieces that are whole tiles/strips and about ``chunk`` on a side.
    cy = max(regions.chunks[0], chunk // regions.chunks[0] * regions.chunks[0])
    cx = max(regions.chunks[1], chunk // regions.chunks[1] * regions.chunks[1]) if regions.chunks[1] < regions.shape[-1] else regions.shape[-1]
    chunks = (*regions.shape[:-2], cy, cx) if regions.ndim >= 2 else regions.shape
    if regions.ndim == 3 and regions.shape[-1] in (3, 4):  # RGB(A) samples last
        chunks = (cy, cx, regions.shape[-1])
    arr = da.from_array(regions, chunks=chunks[: regions.ndim], asarray=True, lock=False, fancy=False, name=f"tiff-{regions.path}")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # A grey image saved as RGB(A) is common; a colour one is not EM. Which it is shows only in the
        # pixels, so each piece is checked as it is read (conversion reads every piece anyway).
        arr = arr.map_blocks(_grey_plane, str(path), drop_axis=2, dtype=arr.dtype)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InvalidImageError(f"{path} has shape {arr.shape} (dtype {regions.dtype}); expected one 2-D greyscale plane")
    return arr


def grid_positions(files: Sequence[Path], grid: Pair | None) -> list[Pair]:
    """(row, col) of each montage tile, from ``grid`` (row-major order) or from the file names."""
    if grid is not None:
        rows, cols = grid
        if rows * cols != len(files):
            raise ConfigError(f"--grid {rows}x{cols} needs {rows * cols} tiles but the folder holds {len(files)}")
        return [(i // cols, i % cols) for i in range(len(files))]
    for pattern in _GRID_PATTERNS:
        found = [pattern.search(f.stem) for f in files]
        if all(found):
            pos = [(int(m.group(1)), int(m.group(2))) for m in found]  # type: ignore[union-attr]
            if len(set(pos)) == len(pos):
                r0, c0 = min(p[0] for p in pos), min(p[1] for p in pos)
                return [(r - r0, c - c0) for r, c in pos]
    raise ConfigError(
        f"cannot tell the montage layout from file names such as {files[0].name!r}; name tiles like r0_c1.tif, "
        f"give --grid ROWSxCOLS (files in sorted order fill rows first), or use --stack for a stack of slices"
    )


def lazy_montage(files: Sequence[Path], grid: Pair | None) -> Any:
    """A dask array that places equally sized tiles on their grid (missing positions are zero)."""
    import dask.array as da
    from dask import delayed

    positions = grid_positions(files, grid)
    first = read_small(files[0])
    shape, dtype = first.shape, first.dtype
    rows, cols = max(p[0] for p in positions) + 1, max(p[1] for p in positions) + 1
    by_pos = dict(zip(positions, files))
    missing = [f"r{r}_c{c}" for r in range(rows) for c in range(cols) if (r, c) not in by_pos]
    if missing:
        # Legitimate (irregular sections leave corners unimaged), but worth a line: a tile that
        # failed to copy looks exactly the same.
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        warnings.warn(TilefeetWarning(
            f"the montage grid is {rows} × {cols} but {len(missing)} position(s) have no tile ({shown}); they are written as 0"
        ), stacklevel=2)

    def load(f: Path) -> np.ndarray:
        a = read_small(f)
        if a.shape != shape or a.dtype != dtype:
            raise InvalidImageError(f"montage tile {f} is {a.shape} {a.dtype}, but {files[0].name} is {shape} {dtype}; tiles must match")
        return a

    blocks = [
        [
            da.from_delayed(delayed(load)(by_pos[(r, c)]), shape, dtype=dtype) if (r, c) in by_pos else da.zeros(shape, dtype=dtype)
            for c in range(cols)
        ]
        for r in range(rows)
    ]
    return da.block(blocks)


def lazy_stack(files: Sequence[Path]) -> Any:
    import dask.array as da
    from dask import delayed

    first = read_small(files[0])
    return da.stack([da.from_delayed(delayed(read_small)(f), first.shape, dtype=first.dtype) for f in files])


def open_input(path: Path, *, grid: Pair | None = None, stack: bool = False) -> Any:
    """A lazy dask array for a TIFF/PNG file, a montage folder, or (``stack``) a folder of slices."""
    import dask.array as da

    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if (path / "zarr.json").exists() or (path / ".zattrs").exists() or (path / ".zgroup").exists():
            raise InvalidImageError(f"{path} is already a Zarr store; tilefeet reads OME-Zarr directly (see `tilefeet info {path}`)")
        files = image_files(path)
        return lazy_stack(files) if stack else lazy_montage(files, grid)
    if path.suffix.lower() in (".tif", ".tiff"):
        return lazy_tiff(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return da.from_array(read_small(path), chunks=(1024, 1024))
    raise InvalidImageError(f"{path}: unsupported file type {path.suffix!r}; give a TIFF, PNG or a folder of them")


def open_ome_zarr(location: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, tuple[float, float] | None]:
    """Level 0 of an OME-Zarr section (a path or an ``http(s)://`` / ``s3://`` URL) as a lazy dask
    array, and its pixel size in nm (None when its metadata has no units): to copy a remote section
    into a local (or differently chunked) pyramid."""
    import dask.array as da

    from .image import Image

    image = Image.open(location, storage_options=storage_options)
    arr = image.array(0)
    return da.from_zarr(arr)[(0,) * (arr.ndim - 2)], image.meta.pixel_size_nm


# ------------------------------------------------------------------------------------- writing


def downsample2(a: Any, method: str = "mean") -> Any:
    """2×2 mean (rounded, for integers) or max of the last two axes of a dask array; odd edges repeat."""
    import dask.array as da

    pad = [(0, 0)] * (a.ndim - 2) + [(0, a.shape[-2] % 2), (0, a.shape[-1] % 2)]
    if any(p[1] for p in pad):
        a = da.pad(a, pad, mode="edge")
    axes = {a.ndim - 2: 2, a.ndim - 1: 2}
    if method == "max":
        return da.coarsen(np.max, a, axes, trim_excess=False)
    m = da.coarsen(np.mean, a.astype(np.float32), axes, trim_excess=False)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        m = da.clip(da.round(m), info.min, info.max)
    return m.astype(a.dtype)


def write_image(
    data: Any,
    path: str | os.PathLike,
    pixel_size_nm: tuple[float, float],
    *,
    chunk: int = 1024,
    levels: int | None = None,
    version: str = "0.5",
    name: str = "image",
    overwrite: bool = False,
    progress: bool = False,
    unit: str = "nanometer",
    storage_options: Mapping[str, Any] | None = None,
    z_spacing_nm: float | None = None,
) -> Path | Url:
    """Write a 2-D (y, x) or 3-D (z, y, x) array (numpy or dask) as an OME-Zarr image with a pyramid,
    at a path or an ``s3://`` URL (reached with ``storage_options``). A stack's sections are
    ``z_spacing_nm`` apart (default: the pixel size, isotropic); its pyramid is in y and x only.

    ``version`` "0.5" writes zarr v3 (the default), "0.4" zarr v2. Written to a staging folder
    and moved into place (:mod:`tilefeet.storage`), so a failed conversion never leaves a
    half-written store and an existing one is replaced only once the new one is complete. On S3
    (no rename) the store is written in place with its metadata published last, and an existing
    one is deleted first.
    """
    import dask.array as da

    from .console import dask_progress
    from .storage import output_location

    location = output_location(path, storage_options)
    if location.exists() and not overwrite:
        raise OutputExistsError(f"{location.final} already exists; pass --overwrite to replace it")
    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=chunk)
    if arr.ndim not in (2, 3):
        raise InvalidImageError(f"expected a 2-D (y, x) or 3-D (z, y, x) array, got shape {arr.shape}")
    if min(arr.shape) == 0:
        raise InvalidImageError(f"the input is empty (shape {arr.shape}); nothing to convert")
    location.check_writable()
    lead_axes = [{"name": "z", "type": "space", "unit": unit}] if arr.ndim == 3 else []
    ch = (1,) * (arr.ndim - 2) + (chunk, chunk)
    shapes = pyramid_shapes(arr.shape[-2:], (chunk, chunk)) if levels is None else [
        (-(-arr.shape[-2] // 2**k), -(-arr.shape[-1] // 2**k)) for k in range(levels)
    ]
    unit_scale = 1.0
    if unit != "nanometer":
        from .units import nm_per_unit

        unit_scale = 1.0 / nm_per_unit(unit)
    # Every chunk is written, empty ones too, and the store says so: a chunk absent later was lost
    # (tilefeet.chunks), which is then told apart from one a writer left out as empty.
    ms = multiscales(name, pixel_size_nm, len(shapes), lead_axes=lead_axes, lead_scale=[(z_spacing_nm or pixel_size_nm[0]) * unit_scale] if lead_axes else None,
                     unit=unit, unit_scale=unit_scale, metadata={"method": "tilefeet.convert", "every_chunk_written": True})
    fmt: Literal[2, 3] = 3 if version.startswith("0.5") else 2
    try:
        if location.has_staging():
            location.discard_staging()
        root = location.open_group("w", zarr_format=fmt)
        root.attrs.update(image_metadata(ms, version=version))
        full = [(*arr.shape[:-2], *shape) for shape in shapes]
        arrays = create_levels(root, full, chunks=ch, dtype=arr.dtype, dimension_names=[a["name"] for a in ms["axes"]] if fmt == 3 else None,
                               compressors="auto" if fmt == 2 else "default")
        arrays = [z.with_config({"write_empty_chunks": True}) for z in arrays]
        with dask_progress("convert", enabled=progress, unit="chunk", counts=_is_store_task):
            for k, z in enumerate(arrays):
                # Each level is computed from the one just written, so the input is read only once.
                src = arr if k == 0 else downsample2(da.from_zarr(arrays[k - 1]))
                settled_compute(da.store(src.rechunk(z.chunks), z, lock=False, compute=False))
        return location.publish()
    except OSError as e:
        with contextlib.suppress(OSError):
            location.discard_staging()
        raise location.write_error(e, kept=None) from None
    except BaseException:  # bad pixels found mid-way, Ctrl-C: convert has no --resume, so nothing is kept
        with contextlib.suppress(OSError):
            location.discard_staging()
        raise


def settled_compute(*collections: Any) -> None:
    """``dask.compute`` on threads that returns or raises only once no task is running. Dask's
    threaded scheduler raises a task's error at once, while its other threads go on writing their
    chunks: a staging folder deleted on that error was recreated by a late write, and a refused
    conversion left ``OUT.partial`` behind (a flaky test found it). Here the pool is shut down,
    queued tasks cancelled and running ones waited for, before the error goes on."""
    from concurrent.futures import ThreadPoolExecutor

    import dask

    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        dask.compute(*collections, scheduler="threads", pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _is_store_task(key: Any) -> bool:
    name = key[0] if isinstance(key, tuple) else key
    return str(name).startswith("store-")


def _z_scale_nm(image: Any, px: tuple[float, float]) -> tuple[float, float]:
    """(section spacing, z origin) of a stack image in nm, for its label images (the pixel size when
    its z axis says no unit)."""
    from .units import nm_per_unit

    names = list(image.names)
    if "z" not in names:
        return px[0], 0.0
    k, axis, ds = names.index("z"), image.axes[names.index("z")], image.datasets[0]
    f = nm_per_unit(axis.unit) if axis.unit else 1.0
    return float(ds.scale[k]) * f, (float(ds.translation[k]) * f if ds.translation else 0.0)


def write_labels(
    mask: Any, image_path: str | os.PathLike, name: str, *, foreground: Sequence[float] | None = None, overwrite: bool = False
) -> Path:
    """Add a binary NGFF label image ``labels/<name>`` (1 = class) to an existing OME-Zarr 0.5 image.

    ``foreground`` lists the mask values that mean "inside the class" (default: every non-zero value).
    The label image is listed in ``labels/`` only once it is complete, so a failed write leaves no
    label image a reader would find.
    """
    import dask.array as da
    import zarr

    from .ngff import add_label, label_metadata, read_multiscale

    image = read_multiscale(Path(image_path), role="image")
    m = mask if isinstance(mask, da.Array) else da.from_array(np.asarray(mask), chunks=1024)
    img_shape = image.datasets[0].shape
    spatial = [i for i, a in enumerate(image.axes) if a.type == "space"]
    if m.shape[-2:] != img_shape[-2:] or (m.ndim == 3 and len(spatial) == 3 and m.shape[0] != img_shape[spatial[0]]):
        raise InvalidImageError(f"label image of shape {m.shape} does not match image {image_path} of shape {img_shape}")
    if not image.version.startswith("0.5"):
        raise InvalidImageError(f"{image_path} is OME-Zarr {image.version}; labels are written into 0.5 (zarr v3) images only")
    if foreground is None:
        binary = (m != 0).astype(np.uint8)
    else:
        binary = da.isin(m, list(foreground)).astype(np.uint8)
    root = zarr.open_group(image.path, mode="r+")
    if name in image.labels and not overwrite:
        raise OutputExistsError(f"{image_path}/labels/{name} exists; pass --overwrite to replace it")
    g = root.require_group("labels").create_group(name, overwrite=True)
    lead = [{"name": "z", "type": "space", "unit": "nanometer"}] if binary.ndim == 3 else []
    px = image.pixel_size_nm(0) or (1.0, 1.0)
    n = len(image.datasets)
    shapes = [(*binary.shape[:-2], *image.datasets[k].shape[-2:]) for k in range(n)]
    chunks = (1,) * (binary.ndim - 2) + image.datasets[0].chunks[-2:]
    arrays = create_levels(g, shapes, chunks=chunks, dtype="uint8", dimension_names=[*(a["name"] for a in lead), "y", "x"])
    arrays = [z.with_config({"write_empty_chunks": True}) for z in arrays]  # every chunk, as write_image
    tasks, level = [], binary
    for k, z in enumerate(arrays):
        if k:
            level = downsample2(level, "max")
        tasks.append(da.store(level[..., : z.shape[-2], : z.shape[-1]].rechunk(z.chunks), z, lock=False, compute=False))
    settled_compute(*tasks)
    ms = multiscales(name, px, n, lead_axes=lead, lead_scale=[_z_scale_nm(image, px)[0]] if lead else None,
                     lead_origin=[_z_scale_nm(image, px)[1]] if lead else None, method="max",
                     metadata={"method": "tilefeet.convert", "every_chunk_written": True})
    g.attrs.update(label_metadata(ms, colors=[{"label-value": 1, "rgba": [255, 64, 0, 255]}]))
    add_label(root, name)
    return Path(image.path) / "labels" / name


