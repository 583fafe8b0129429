"""The lazy call: objects of a segment output, a mask or probabilities as a dask array, plus the table.

:func:`label_objects` runs the passes that every id depends on (holes, pieces) at once, with the
default dask scheduler (a ``dask.distributed`` client when one is active), and returns the label
image as a dask array whose blocks are computed when asked (a block reads its own mask again and
maps its pieces to their final ids), with the table as a pandas DataFrame. Memory: the blocks dask
has in flight (and the neighbouring chunks their halos read) plus O(objects); :func:`write_objects`
is the call with a hard bound (blocks in flight). For cells the table needs the grown cells of every
block, so those are computed once for the table and again for the blocks you ask for
(``measure=False``: ids only, computed once).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidImageError, TilefeetWarning
from ..geometry import BlockGrid
from .blocks import (
    boundary_block,
    cells_block,
    combine_cells,
    fill_block,
    flood_block,
    holes_block,
    pieces_block,
    relabel_block,
    resolve_cells,
    resolve_holes,
    resolve_pieces,
)
from .cells import OUTSIDE
from .label import dual
from .measure import PERIMETER_HALO, PartialSums, table
from .options import ObjectPlan, ObjectSettings, make_plan, resolve_recipe
from .run import id_dtype


@dataclass(frozen=True)
class Objects:
    """Objects of one class: the label image (lazy) and the measurements (computed)."""

    labels: Any  #: dask array (y, x), or (z, y, x) of a stack, of ids, uint32 (uint64 past 2³²−1 objects); 0 = no object
    table: Any  #: pandas DataFrame, one row per object (see :mod:`tilefeet.objects.measure`, a stack's :mod:`.volume`); None when not asked
    plan: Any  #: :class:`ObjectPlan`, or a stack's :class:`~tilefeet.objects.options.VolumePlan`
    n_objects: int


def label_objects(
    source: Any,
    *,
    class_name: str | None = None,
    threshold: float | None = None,
    probabilities: Any = None,
    pixel_size_nm: Any = None,
    origin_nm: tuple[float, ...] = (0.0, 0.0),
    min_size: str | float | None = None,
    fill_holes: bool | None = None,
    cells: bool = False,
    grow: str | float | None = None,
    connectivity: int | None = None,
    min_z_extent: str | int | None = None,
    block_size: Any = None,
    measure: bool = True,
    engine: str | os.PathLike | None = None,
    **advanced: Any,
) -> Objects:
    """Objects (connected components, 8-connected) or ``cells`` of a mask, exactly as if labelled whole.

    ``source``: a tilefeet segment output (path; ``class_name`` and ``threshold`` as for
    ``tilefeet objects``), a 2-D boolean mask, or 2-D probabilities (numpy, dask or xarray;
    ``threshold`` default 0.5, uint8 as 0..255). Arrays need ``pixel_size_nm`` (xarray coordinates
    give it); a boolean mask's table has probability columns only with ``probabilities``.
    ``measure=False`` skips the table (ids only: cheaper, and for cells nothing is computed twice).

    A stack (a segment output with axes c, z, y, x, or a (z, y, x) array with ``pixel_size_nm``
    of three values, e.g. ``"50,5,5nm"``) gives 3-D objects (``connectivity`` 6, 18 or 26, default
    26; ``min_size`` a volume such as ``"0.001um3"``; ``min_z_extent`` sections or a length): ids
    equal ``skimage.measure.label`` of the whole volume, the table is :mod:`.volume`'s.

    ``engine`` (arrays only: a segment output records its own) applies that engine's object recipe
    for ``class_name`` to the rules no argument sets, as ``tilefeet objects`` does.
    """

    settings = ObjectSettings.create(
        class_name=class_name, threshold=threshold, min_size=min_size, fill_holes=fill_holes, cells=cells, grow_nm=grow,
        block_size=block_size, connectivity=connectivity, min_z_extent=min_z_extent, **advanced,
    )
    mask, prob, scale, meta = _open(source, settings, probabilities, pixel_size_nm, origin_nm)
    if engine is not None:
        if isinstance(source, (str, os.PathLike)):
            raise ConfigError("engine= applies an engine's object recipe to an array; a segment output records its own engine")
        from .options import engine_recipe

        meta = {**meta, "engine": str(engine), "recipe": engine_recipe(str(engine), meta["class_name"])}
    settings, recipe = resolve_recipe(settings, meta.get("recipe"), meta.get("engine"),
                                      z_spacing_nm=meta["spacing_nm"][0] if mask.ndim == 3 else None)
    if mask.ndim == 3:
        from .options import make_volume_plan
        from .stack import label_stack

        vplan = make_volume_plan(settings, class_name=meta["class_name"], shape=tuple(int(n) for n in mask.shape),  # type: ignore[arg-type]
                                 spacing_nm=meta["spacing_nm"], origin_nm=meta["origin_nm"], chunks=meta["chunks"], recipe=recipe)
        return label_stack(mask, prob, vplan, prob_scale=scale, measure=measure, no_probabilities=meta["no_probabilities"])  # type: ignore[no-any-return]
    h, w = mask.shape
    plan = make_plan(settings, class_name=meta["class_name"], shape=(h, w), pixel_size_nm=meta["pixel_size_nm"],
                     origin_nm=meta["origin_nm"], chunks=meta["chunks"], recipe=recipe)
    grid = plan.grid
    mask = mask.rechunk(grid.chunks())
    prob = prob.rechunk(grid.chunks())
    if plan.cell is not None and plan.cell.method == "watershed":
        mask = prob < plan.cell.seed_threshold * scale  # the seeds' region
    elif cells:
        mask = ~mask
    if settings.fill_holes:
        mask = _filled(mask, grid, dual(plan.connectivity))
    halo = 0 if cells else PERIMETER_HALO
    windows = _windows(mask, grid, halo, False)
    shape = (h, w)
    records = _compute([
        _delayed(pieces_block)(windows[k], halo, grid.box(*i), shape, plan.connectivity,
                               None if cells or not measure else _block(prob, grid, k))
        for k, i in enumerate(grid)
    ])
    res = resolve_pieces(grid, records, plan.connectivity, plan.keep, prob.dtype)
    dtype = id_dtype(res.n_objects, settings.uint32_limit)
    labels = _assemble(grid, [
        _delayed(relabel_block)(_block(mask, grid, k), res.block(k), plan.connectivity, dtype) for k in range(len(grid))
    ], dtype)
    sums = res.sums
    n_objects = res.n_objects
    if cells:
        labels, sums, n_objects = _cells(labels, prob, grid, plan, res.n_objects, dtype, measure)
    if not measure:
        return Objects(labels, None, plan, n_objects)
    assert sums is not None
    df = table(sums, class_name="cell" if cells else plan.class_name, pixel_size_nm=plan.pixel_size_nm,
               origin_nm=plan.origin_nm, shape=shape, prob_scale=scale, id_dtype=dtype)
    if meta["no_probabilities"]:
        df["mean_probability"] = np.nan
        df["max_probability"] = np.nan
    return Objects(labels, df, plan, n_objects)


def _cells(seeds: Any, prob: Any, grid: BlockGrid, plan: ObjectPlan, n_seeds: int, dtype: Any,
           measure: bool) -> tuple[Any, PartialSums | None, int]:
    """The merged cells (lazy), their sums, and their number: the flood's boundary sums are computed
    at once (the merge needs all of them); each block of the labels floods its window again."""
    from dask import delayed

    cell = plan.cell
    assert cell is not None
    seeds64 = seeds.astype(np.int64)
    ring = 1
    halo = cell.steps + ring
    flooded = [
        delayed(flood_block, nout=2)(s, p, halo, ring, cell)
        for s, p in zip(_windows(seeds64, grid, halo, OUTSIDE), _windows(prob, grid, halo, 0))
    ]
    parts = _compute([delayed(boundary_block)(f[0], f[1]) for f in flooded])
    lut, n = resolve_cells(n_seeds, parts, cell, plan.min_cell_px, prob.dtype)
    halo = cell.steps + PERIMETER_HALO

    def one(s: np.ndarray, p: np.ndarray, core: np.ndarray, box: Any) -> tuple[np.ndarray, PartialSums]:
        basins, _ = flood_block(s, p, halo, PERIMETER_HALO, cell)
        return cells_block(basins, lut, box, core)

    tasks = [
        delayed(one, nout=2)(s, p, _block(prob, grid, k), grid.box(*i))
        for k, (i, s, p) in enumerate(zip(grid, _windows(seeds64, grid, halo, OUTSIDE), _windows(prob, grid, halo, 0)))
    ]
    labels = _assemble(grid, [delayed(np.ndarray.astype)(t[0], dtype) for t in tasks], dtype)
    if not measure:
        return labels, None, n
    return labels, combine_cells(_compute([t[1] for t in tasks]), n, prob.dtype), n


def _filled(mask: Any, grid: BlockGrid, connectivity: int) -> Any:
    records = _compute([_delayed(holes_block)(_block(mask, grid, k), grid.box(*i), grid.shape, connectivity) for k, i in enumerate(grid)])
    holes, offsets = resolve_holes(grid, records, connectivity)
    return _assemble(grid, [
        _delayed(fill_block)(_block(mask, grid, k), holes[offsets[k] : offsets[k + 1]], connectivity) for k in range(len(grid))
    ], bool)


# ------------------------------------------------------------------------------------ helpers


def _delayed(fn: Any) -> Any:
    from dask import delayed

    return delayed(fn, pure=True)


def _compute(tasks: list[Any]) -> list[Any]:
    import dask

    return list(dask.compute(*tasks))


def _block(arr: Any, grid: BlockGrid, k: int) -> Any:
    by, bx = divmod(k, grid.counts[1])
    return arr.blocks[by, bx]


def _windows(arr: Any, grid: BlockGrid, halo: int, fill: Any) -> list[Any]:
    """Each block of ``arr`` with ``halo`` pixels around it (``fill`` off the image), as dask arrays."""
    import dask.array as da

    padded = da.pad(arr, halo, mode="constant", constant_values=fill) if halo else arr
    out = []
    for i in grid:
        b = grid.box(*i)
        out.append(padded[b.y0 : b.y1 + 2 * halo, b.x0 : b.x1 + 2 * halo])
    return out


def _assemble(grid: BlockGrid, tasks: list[Any], dtype: Any) -> Any:
    import dask.array as da

    ny, nx = grid.counts
    rows = []
    for by in range(ny):
        rows.append([da.from_delayed(tasks[by * nx + bx], grid.box(by, bx).shape, dtype=dtype) for bx in range(nx)])
    return da.block(rows)


def _open(source: Any, settings: ObjectSettings, probabilities: Any, pixel_size_nm: Any, origin_nm: tuple[float, ...]) -> tuple[Any, Any, float, dict]:
    """(mask, probabilities, stored value of probability 1, facts) as dask arrays from any source."""
    import dask.array as da

    if isinstance(source, (str, os.PathLike)):
        from . import store as st

        src = st.open_class(source, settings.class_name, settings.threshold)
        prob = da.from_zarr(src.array(src.prob_path))[src.channel]
        if src.is_stack:
            mask = (da.from_zarr(src.array(src.mask_path)) != 0 if src.mask_path is not None
                    else prob >= src.threshold * src.prob_scale)
            return mask, prob, src.prob_scale, {"class_name": src.class_name, "spacing_nm": src.spacing_nm, "origin_nm": src.origin3_nm,
                                                "chunks": src.chunks, "no_probabilities": False, "recipe": src.recipe, "engine": src.engine}
        if src.mask_path is not None:
            labels = da.from_zarr(src.array(src.mask_path))
            mask = labels[(0,) * (labels.ndim - 2)] != 0
        else:
            mask = prob >= src.threshold * src.prob_scale
        meta = {"class_name": src.class_name, "pixel_size_nm": src.pixel_size_nm, "origin_nm": src.origin_nm,
                "chunks": src.chunks, "no_probabilities": False, "recipe": src.recipe, "engine": src.engine}
        return mask, prob, src.prob_scale, meta
    data, px, origin, dz = _unwrap(source, pixel_size_nm, origin_nm)
    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=4096)
    while arr.ndim > (2 if dz is None else 3) and arr.shape[0] == 1:  # a voxel size keeps even one section a stack
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise InvalidImageError(f"objects need a 2-D (y, x) or a stack's 3-D (z, y, x) mask or probability map, got shape {tuple(arr.shape)}")
    if arr.ndim == 3 and dz is None:
        raise ConfigError(f"a stack of shape {tuple(arr.shape)} needs its voxel size (z,y,x), e.g. pixel_size_nm='50,5,5nm'")
    if arr.ndim == 2 and dz is not None:
        raise ConfigError(f"pixel_size_nm has a z size but the array is one section of shape {tuple(arr.shape)}; give y,x")
    chunks = tuple(int(c[0]) for c in arr.chunks)
    name = settings.class_name or "object"
    if arr.ndim == 3:
        if probabilities is not None and np.shape(probabilities) != tuple(arr.shape):
            raise InvalidImageError(f"probabilities of shape {tuple(np.shape(probabilities))} do not match the mask's {tuple(arr.shape)}")
        oz, (oy, ox) = (origin[0], origin[1:]) if len(origin) == 3 else (0.0, origin)
        px, origin = (dz, *px), (float(oz), float(oy), float(ox))  # type: ignore[assignment]
    if arr.dtype == bool:
        if settings.threshold is not None:
            warnings.warn(TilefeetWarning("threshold is ignored for a boolean mask (it is the mask already)"), stacklevel=3)
        mask = arr
        if probabilities is None:  # the mask as probabilities 0 and 1 (cells flood it as a flat map: ``grow``'s growth)
            return mask, mask.astype(np.uint8) * np.uint8(255), 255.0, {"class_name": name, "pixel_size_nm": px, "spacing_nm": px,
                                                                        "origin_nm": origin, "chunks": chunks, "no_probabilities": True}
        prob = probabilities if isinstance(probabilities, da.Array) else da.from_array(np.asarray(probabilities), chunks=chunks)
    else:
        prob = arr
        t = 0.5 if settings.threshold is None else settings.threshold
        mask = prob >= t * _scale(prob.dtype)
    if prob.shape != mask.shape:
        raise InvalidImageError(f"probabilities of shape {tuple(prob.shape)} do not match the mask's {tuple(mask.shape)}")
    return mask, prob, _scale(prob.dtype), {"class_name": name, "pixel_size_nm": px, "spacing_nm": px, "origin_nm": origin,
                                            "chunks": chunks, "no_probabilities": False}


def _scale(dtype: Any) -> float:
    return 255.0 if np.dtype(dtype) == np.uint8 else 1.0


def _unwrap(source: Any, pixel_size_nm: Any, origin_nm: tuple[float, ...]) -> tuple[Any, tuple[float, float], tuple[float, ...], float | None]:
    """The array, its (y, x) pixel size, origin, and z spacing (a stack's; None when not given)."""
    from ..units import parse_voxel_size

    dz, px = parse_voxel_size(pixel_size_nm) if pixel_size_nm is not None else (None, None)  # type: ignore[assignment]
    origin = origin_nm
    data = source
    if hasattr(source, "dims") and hasattr(source, "coords"):  # xarray: the pixel size from coordinates
        from ..image import Image

        meta = Image.from_array(source).meta.levels[0]
        data = source.data
        px = px or meta.pixel_size_nm
        origin = meta.origin_nm
    if px is None:
        raise ConfigError("give the pixel size of an array, e.g. pixel_size_nm='5nm' (a stack's voxel size: '50,5,5nm'; the table is in nm)")
    return data, px, origin, dz

