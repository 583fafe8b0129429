"""The out-of-core objects run: a dask graph over a segment output, block by block, resumable.

Each pass (:mod:`.blocks`) is one task per block that reads its block (plus a halo) from the store,
computes, saves a small record or writes whole chunks, and only then writes its completion record;
each reduction is one task over the records. Tasks return record names, never data, so a local run
with ``blocks_in_flight`` threads holds at most that many blocks, plus the reductions' O(objects)
tables and the faces (O(height × block columns + width × block rows)). ``--resume`` skips every
finished task; the result does not depend on where a crash happened. The same graph runs on
``dask.distributed`` (``compute=False``): tasks carry the plan and paths, never arrays.

    holes → fill                                      --fill-holes: a filled mask (scratch array)
    pieces → resolve → relabel                        objects: the table at resolve, ids at relabel
    pieces → resolve → relabel (seeds) → flood → merge → cells → table
                                                      --cells: seeds, then the flooded cells (scratch
                                                      arrays), every seed's merged id, the merged cells
    pyramid levels → publish

A block writes its ids to level 0 and to every coarser level where its part is still whole chunks
(:func:`direct_levels`: level k keeps every 2^k-th pixel, so that part is ``ids[::2^k, ::2^k]``);
the pyramid tasks make the rest, each from the level below. Scratch arrays and records live in
the layer's run state (``.tilefeet/``) and go with it once the layer is published
(:mod:`.store`: a folder beside the store, or the layer's own prefix on S3).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.threaded
import numpy as np
from dask import delayed

from ..geometry import BlockGrid, Box
from ..storage import OutputLocation, Remote, Url, is_url, join
from . import store as st
from .blocks import (
    BlockRecord,
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
from .cells import OUTSIDE, Boundaries
from .label import dual
from .measure import PERIMETER_HALO, PartialSums, table
from .options import ObjectPlan, ObjectSettings, make_plan, resolve_recipe


@dataclass(frozen=True)
class ObjectsJob:
    """What every task of one run shares (one dask leaf): the plan, the source, where to write."""

    plan: ObjectPlan
    source: st.ClassSource
    store: str
    name: str
    location: st.Layer  #: where the layer is written (staged, resumed, published)

    @property
    def grid(self) -> BlockGrid:
        return self.plan.grid

    @property
    def cells(self) -> bool:
        return self.plan.settings.cells

    def object_mask(self, box: Box) -> np.ndarray:
        """The mask whose components are the objects (cells: their seeds, the region of membrane
        probability below the seed threshold, or for ``grow`` below the label threshold), False off the image."""
        cell = self.plan.cell
        if cell is not None and cell.method == "watershed":
            return (self.source.read_prob_window(box) < cell.seed_threshold * self.source.prob_scale) & _inside(box, self.plan.shape)
        m = self.source.read_mask(box)
        return ~m & _inside(box, self.plan.shape) if self.cells else m

    def mask(self, box: Box) -> np.ndarray:
        """The object mask after hole filling (from the fill pass's scratch array), False off the image."""
        if not self.plan.settings.fill_holes:
            return self.object_mask(box)
        return st.read_window(_scratch(self, "filled"), box, self.plan.shape, False, bool)

    def save(self, name: str, record: BlockRecord | dict) -> None:
        self.location.save_record(name, record.to_arrays() if isinstance(record, BlockRecord) else record)

    def load(self, name: str) -> BlockRecord:
        with self.location.open_record(name) as d:
            return BlockRecord.from_arrays({k: d[k] for k in d.files})

    def label_array(self, level: int) -> Any:
        return self.location.label_array(level)


def _bid(index: tuple[int, int]) -> str:
    return f"{index[0]}_{index[1]}"


# ---------------------------------------------------------------------------------- tasks


def _holes(job: ObjectsJob, index: tuple[int, int], *_after: Any) -> str:
    box = job.grid.box(*index)
    job.save(f"h{_bid(index)}", holes_block(job.object_mask(box), box, job.plan.shape, dual(job.plan.connectivity)))
    job.location.mark(f"h{_bid(index)}", "")
    return f"h{_bid(index)}"


def _holes_reduce(job: ObjectsJob, *_after: Any) -> str:
    records = [job.load(f"h{_bid(i)}") for i in job.grid]
    holes, offsets = resolve_holes(job.grid, records, dual(job.plan.connectivity))
    job.save("holes", {"holes": holes, "offsets": offsets})
    job.location.create_scratch("filled", job.plan.shape, job.plan.chunks, bool)
    job.location.mark("holes", "")
    return "holes"


def _fill(job: ObjectsJob, index: tuple[int, int], *_after: Any) -> str:
    box = job.grid.box(*index)
    k = index[0] * job.grid.counts[1] + index[1]
    with job.location.open_record("holes") as d:
        off = d["offsets"]
        holes = d["holes"][off[k] : off[k + 1]]
    filled = fill_block(job.object_mask(box), holes, dual(job.plan.connectivity))
    arr = _scratch(job, "filled")
    arr[box.y0 : box.y1, box.x0 : box.x1] = filled
    job.location.mark(f"f{_bid(index)}", "")
    return f"f{_bid(index)}"


def _pieces(job: ObjectsJob, index: tuple[int, int], *_after: Any) -> str:
    box = job.grid.box(*index)
    halo = 0 if job.cells else PERIMETER_HALO
    window = job.mask(Box(box.y0 - halo, box.x0 - halo, box.y1 + halo, box.x1 + halo))
    prob = None if job.cells else job.source.read_prob(box)
    job.save(f"a{_bid(index)}", pieces_block(window, halo, box, job.plan.shape, job.plan.connectivity, prob))
    job.location.mark(f"a{_bid(index)}", "")
    return f"a{_bid(index)}"


def _resolve(job: ObjectsJob, *_after: Any) -> int:
    records = [job.load(f"a{_bid(i)}") for i in job.grid]
    res = resolve_pieces(job.grid, records, job.plan.connectivity, job.plan.keep, np.dtype(job.source.prob_dtype))
    dtype = id_dtype(res.n_objects, job.plan.settings.uint32_limit)
    job.save("resolve", {"final": res.final.astype(dtype), "offsets": res.offsets, "n": np.array(res.n_objects)})
    if job.cells:  # seeds, then the flooded cells before merging: ids of seeds
        job.location.create_scratch("seeds", job.plan.shape, job.plan.chunks, dtype)
        job.location.create_scratch("basins", job.plan.shape, job.plan.chunks, dtype)
    else:
        _create_layer(job, res.n_objects, dtype)
        assert res.sums is not None
        _write_table(job, res.sums, dtype)
    job.location.mark("resolve", "")
    return res.n_objects


def _create_layer(job: ObjectsJob, n: int, dtype: Any) -> None:
    st.create_label_image(
        job.location, job.name, shapes=st.level_shapes(job.plan.shape, job.source.levels), chunks=job.plan.chunks, dtype=dtype,
        pixel_size_nm=job.plan.pixel_size_nm, origin_nm=job.plan.origin_nm, metadata=_provenance(job, n, dtype),
    )


def _relabel(job: ObjectsJob, index: tuple[int, int], *_after: Any) -> str:
    box = job.grid.box(*index)
    k = index[0] * job.grid.counts[1] + index[1]
    with job.location.open_record("resolve") as resolved:
        off, final = resolved["offsets"], resolved["final"]
    ids = relabel_block(job.mask(box), final[off[k] : off[k + 1]], job.plan.connectivity, final.dtype)
    if job.cells:
        _scratch(job, "seeds")[box.y0 : box.y1, box.x0 : box.x1] = ids
    else:
        _write_levels(job, box, ids)
    job.location.mark(f"b{_bid(index)}", "")
    return f"b{_bid(index)}"


def _flood(job: ObjectsJob, index: tuple[int, int], *_after: Any) -> str:
    box = job.grid.box(*index)
    cell = job.plan.cell
    assert cell is not None
    halo = cell.steps + 1
    window = Box(box.y0 - halo, box.x0 - halo, box.y1 + halo, box.x1 + halo)
    seeds = st.read_window(_scratch(job, "seeds"), window, job.plan.shape, 0, np.int64)
    seeds[~_inside(window, job.plan.shape)] = OUTSIDE
    ids, lev = flood_block(seeds, job.source.read_prob_window(window), halo, 1, cell)
    arr = _scratch(job, "basins")
    arr[box.y0 : box.y1, box.x0 : box.x1] = ids[1:-1, 1:-1].astype(arr.dtype)
    job.save(f"w{_bid(index)}", boundary_block(ids, lev).arrays())
    job.location.mark(f"w{_bid(index)}", "")
    return f"w{_bid(index)}"


def _merge(job: ObjectsJob, *_after: Any) -> int:
    assert job.plan.cell is not None
    with job.location.open_record("resolve") as resolved:
        n_seeds, dtype = int(resolved["n"]), resolved["final"].dtype
    parts = []
    for i in job.grid:
        with job.location.open_record(f"w{_bid(i)}") as d:
            parts.append(Boundaries(**{k: d[k] for k in d.files}))
    lut, n = resolve_cells(n_seeds, parts, job.plan.cell, job.plan.min_cell_px, job.source.prob_dtype)
    job.save("merge", {"lut": lut, "n": np.array(n)})
    _create_layer(job, n, dtype)  # ids never exceed the seeds': the seeds' dtype holds them
    job.location.mark("merge", "")
    return n


def _cells(job: ObjectsJob, index: tuple[int, int], *_after: Any) -> str:
    box = job.grid.box(*index)
    h = PERIMETER_HALO
    window = Box(box.y0 - h, box.x0 - h, box.y1 + h, box.x1 + h)
    basins = st.read_window(_scratch(job, "basins"), window, job.plan.shape, 0, np.int64)
    with job.location.open_record("merge") as merged:
        lut = merged["lut"]
    ids, sums = cells_block(basins, lut, box, job.source.read_prob(box))
    _write_levels(job, box, ids.astype(job.label_array(0).dtype))
    job.save(f"c{_bid(index)}", {f"s_{k}": v for k, v in sums.arrays().items()})
    job.location.mark(f"c{_bid(index)}", "")
    return f"c{_bid(index)}"


def _cells_reduce(job: ObjectsJob, *_after: Any) -> str:
    with job.location.open_record("merge") as merged:
        n = int(merged["n"])
    parts = []
    for i in job.grid:
        with job.location.open_record(f"c{_bid(i)}") as d:
            parts.append(PartialSums(**{k[2:]: d[k] for k in d.files}))
    sums = combine_cells(parts, n, np.dtype(job.source.prob_dtype))
    _write_table(job, sums, job.label_array(0).dtype)
    job.location.mark("cells", "")
    return "cells"


def direct_levels(plan: ObjectPlan, n_levels: int) -> int:
    """How many levels a block writes itself: those where its part is still whole chunks (level k
    keeps every 2^k-th pixel, so a block's part of it is its own ids[::2^k, ::2^k])."""
    k = 1
    while k < n_levels and all((b >> k) % c == 0 and b % (1 << k) == 0 for b, c in zip(plan.grid.block, plan.chunks)):
        k += 1
    return k


def _write_levels(job: ObjectsJob, box: Box, ids: np.ndarray) -> None:
    """A block's ids into level 0 and the levels it owns whole chunks of (:func:`direct_levels`)."""
    for level in range(direct_levels(job.plan, job.source.levels)):
        f = 1 << level
        job.label_array(level)[box.y0 // f : -(-box.y1 // f), box.x0 // f : -(-box.x1 // f)] = ids[::f, ::f]


def _pyramid(job: ObjectsJob, level: int, box: Box, record: str, *_after: Any) -> str:
    """Level ``level`` over ``box``: every other pixel of the level below (ids are never averaged)."""
    src, dst = job.label_array(level - 1), job.label_array(level)
    h, w = src.shape
    part = np.asarray(src[2 * box.y0 : min(2 * box.y1, h), 2 * box.x0 : min(2 * box.x1, w)])
    dst[box.y0 : box.y1, box.x0 : box.x1] = part[::2, ::2]
    job.location.mark(record, "")
    return record


def _publish(job: ObjectsJob, *_after: Any) -> str:
    return str(job.location.publish())


def _barrier(*records: Any) -> int:
    return len(records)


def _scratch(job: ObjectsJob, name: str) -> Any:
    return job.location.scratch(name)


def _inside(box: Box, shape: tuple[int, int]) -> np.ndarray:
    inside = np.zeros(box.shape, dtype=bool)
    inside[box.intersect(Box(0, 0, *shape)).relative_to(box)] = True
    return inside


def id_dtype(n_objects: int, uint32_limit: int = 2**32 - 1) -> Any:
    """uint32 ids while they fit (``uint32_limit``), uint64 beyond."""
    return np.dtype(np.uint32) if n_objects <= uint32_limit else np.dtype(np.uint64)


def _write_table(job: ObjectsJob, sums: PartialSums, dtype: Any) -> None:
    df = table(
        sums, class_name="cell" if job.cells else job.plan.class_name, pixel_size_nm=job.plan.pixel_size_nm,
        origin_nm=job.plan.origin_nm, shape=job.plan.shape, prob_scale=job.source.prob_scale, id_dtype=dtype,
    )
    job.location.write_table(df, job.plan.settings.table_format)


def _provenance(job: ObjectsJob, n: int, dtype: Any) -> dict:
    from .. import __version__

    return {
        "method": "tilefeet.objects",
        "version": __version__,
        **job.plan.describe(),
        "threshold": job.source.threshold,
        "mask": job.source.mask_path or f"probabilities >= {job.source.threshold:g}",
        "objects": n,
        "dtype": str(dtype),
        "table": st.TABLE_NAMES[job.plan.settings.table_format],
    }


# ---------------------------------------------------------------------------------- graph


def objects_graph(job: ObjectsJob, done: set[str], after: Any = None) -> Any:
    """A dask ``Delayed`` that runs every unfinished task of the run and returns the layer's path;
    its first tasks wait for ``after`` (a ``Delayed``, e.g. the segment run's last pyramid level)."""
    leaf = delayed(job, traverse=False)
    token = st.fingerprint({"staging": str(job.location.staging), "plan": repr(job.plan)})[:10]
    blocks = list(job.grid)  # row-major

    def per_block(fn: Any, prefix: str, after: Any) -> Any:
        tasks = [
            delayed(fn, pure=False)(leaf, i, after, dask_key_name=f"tilefeet-objects-{prefix}-{token}-{i[0]}-{i[1]}")
            for i in blocks
            if f"{prefix}{_bid(i)}" not in done
        ]
        return delayed(_barrier)(after, *tasks, dask_key_name=f"tilefeet-objects-{prefix}-all-{token}")

    def once(fn: Any, record: str, after: Any) -> Any:
        if record in done:
            return after
        return delayed(fn, pure=False)(leaf, after, dask_key_name=f"tilefeet-objects-{record}-{token}")

    if job.plan.settings.fill_holes:
        after = once(_holes_reduce, "holes", per_block(_holes, "h", after))
        after = per_block(_fill, "f", after)
    after = once(_resolve, "resolve", per_block(_pieces, "a", after))
    after = per_block(_relabel, "b", after)
    if job.cells:
        after = once(_merge, "merge", per_block(_flood, "w", after))
        after = once(_cells_reduce, "cells", per_block(_cells, "c", after))
    shapes = st.level_shapes(job.plan.shape, job.source.levels)
    for level in range(direct_levels(job.plan, len(shapes)), len(shapes)):
        tasks = [
            delayed(_pyramid, pure=False)(leaf, level, box, record, after, dask_key_name=f"tilefeet-objects-{record}-{token}")
            for record, box in _pyramid_boxes(job.plan, shapes[level], level)
            if record not in done
        ]
        after = delayed(_barrier)(after, *tasks, dask_key_name=f"tilefeet-objects-level{level}-{token}")
    return delayed(_publish, pure=False)(leaf, after, dask_key_name=f"tilefeet-objects-publish-{token}")


def _pyramid_boxes(plan: ObjectPlan, shape: tuple[int, int], level: int) -> list[tuple[str, Box]]:
    # Half a block per task in whole chunks: a task reads one block's worth of the level below.
    side = tuple(max(c, b // 2 // c * c) for b, c in zip(plan.grid.block, plan.chunks))
    grid = BlockGrid(shape, (side[0], side[1]))
    return [(f"p{level}_{by}_{bx}", grid.box(by, bx)) for by, bx in grid]


# ------------------------------------------------------------------------------ public call


@dataclass(frozen=True)
class ObjectsResult:
    """A finished objects layer."""

    path: Path | Url  #: ``store/labels/<class>-objects`` (or ``-cells``)
    table_path: Path | Url
    n_objects: int
    dtype: str
    seconds: float
    section_um2: float  #: area of the section the layer covers (of one section of a stack)
    volume_um3: float | None = None  #: a stack's volume (sections × spacing × section area); None for a section
    recipe: str = ""  #: where the minimum size, hole filling (and cells' rules) came from, in one line
    options: tuple = field(default=(), repr=False)  #: storage options of an ``s3://`` layer

    @property
    def density_per_um2(self) -> float:
        return self.n_objects / self.section_um2 if self.section_um2 else float("nan")

    def table(self) -> Any:
        """The measurements as a pandas DataFrame."""
        return st.read_table(self.path, dict(self.options) or None)


def prepare_job(store: str | os.PathLike | OutputLocation, settings: ObjectSettings, *, overwrite: bool = False, resume: bool = False,
                storage_options: Mapping[str, Any] | None = None) -> tuple[Any, set[str]]:
    """Open the class, plan the run and create (or reopen) its layer's staging store (a stack's: :mod:`.stack`)."""
    source = st.open_class(store, settings.class_name, settings.threshold, storage_options)
    settings, recipe = resolve_recipe(settings, source.recipe, source.engine, z_spacing_nm=source.z_spacing_nm if source.is_stack else None)
    if source.is_stack:
        from .stack import prepare_stack_job

        return prepare_stack_job(source, settings, store, overwrite=overwrite, resume=resume, recipe=recipe, storage_options=storage_options)
    plan = make_plan(settings, class_name=source.class_name, shape=source.shape, pixel_size_nm=source.pixel_size_nm,  # type: ignore[arg-type]
                     origin_nm=source.origin_nm, chunks=source.chunks, recipe=recipe)  # type: ignore[arg-type]
    name = st.layer_name(source.class_name, settings.cells)
    identity = {"source": source.identity(), "plan": plan.describe(), "block": list(plan.grid.block),
                "chunks": list(plan.chunks), "table": settings.table_format, "uint32_limit": settings.uint32_limit}
    location = st.layer_location(store, name, storage_options)
    done = st.prepare(location, identity, overwrite=overwrite, resume=resume)
    return ObjectsJob(plan, source, str(location.final), name, location), done


def write_objects(
    store: str | os.PathLike | OutputLocation,
    *,
    class_name: str | None = None,
    threshold: float | None = None,
    min_size: str | float | None = None,
    fill_holes: bool | None = None,
    cells: bool = False,
    grow: str | float | None = None,
    connectivity: int | None = None,
    min_z_extent: str | int | None = None,
    block_size: Any = None,
    chunk_size: Any = None,
    blocks_in_flight: int = 2,
    table_format: str = "parquet",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    compute: bool = True,
    after: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    **advanced: Any,
) -> ObjectsResult | Any:
    """Find the objects (or ``cells``) of one class of a segment output and add them to it as
    ``labels/<class>-objects`` (``-cells``) with a measurements table; see :mod:`tilefeet.objects`.
    ``min_size`` and ``fill_holes`` left as None take the engine's recipe for the class (cells: the
    seed and merge thresholds, reach and minimum size too; ``advanced``: ``seed_threshold``,
    ``merge_threshold``, ``cell_method``), as the layer's ``recipe`` says.
    On a stack (c, z, y, x) the objects are 3-D (``connectivity`` 6, 18 or 26, default 26;
    ``min_size`` a volume, ``min_z_extent`` sections or a length; :mod:`.stack`).

    ``store`` is a finished segment output (a folder, or an ``s3://`` URL reached with
    ``storage_options``, by default the command's) or a segment run's output location, whose
    staging store the layer is published into before the run itself is. ``compute=False`` returns the dask ``Delayed`` of the whole
    job (for a ``dask.distributed`` client; computing it returns the layer's path); its first tasks
    wait for ``after`` (a ``Delayed``: chain it behind a segment graph that is still to run; the
    store's metadata and ``labels/<class>`` listing must exist already, only its pixels may not).
    """
    settings = ObjectSettings.create(
        class_name=class_name, threshold=threshold, min_size=min_size, fill_holes=fill_holes, cells=cells, grow_nm=grow,
        block_size=block_size, chunk_size=chunk_size, blocks_in_flight=blocks_in_flight, table_format=table_format,
        connectivity=connectivity, min_z_extent=min_z_extent, **advanced,
    )
    t0 = time.perf_counter()
    job, done = prepare_job(store, settings, overwrite=overwrite, resume=resume, storage_options=storage_options)
    if isinstance(job, ObjectsJob):
        graph = objects_graph(job, done, after)
    else:
        from .stack import stack_graph

        graph = stack_graph(job, done, after)
    if not compute:
        return graph
    with _Progress(enabled=progress):
        (path,) = dask.compute(graph, scheduler=dask.threaded.get, num_workers=settings.blocks_in_flight)
    return finished(path, time.perf_counter() - t0, storage_options=storage_options)


def finished(path: str | os.PathLike, seconds: float = 0.0, *, storage_options: Mapping[str, Any] | None = None) -> ObjectsResult:
    """Describe a published layer (after ``compute=False`` graphs, too); a URL is reached with
    ``storage_options`` (by default the command's)."""
    import zarr

    where: Path | Url = Path(path)
    options: tuple = ()
    if is_url(path):
        remote = Remote.create(str(path), storage_options)
        where, options = Url(remote.url), remote.options
    store = st.zarr_store(where, options)
    ms: Any = st.ome_attrs(zarr.open_group(store, mode="r").attrs)["multiscales"][0]
    meta = ms["metadata"]
    scale = next(t["scale"] for t in ms["datasets"][0]["coordinateTransformations"] if t["type"] == "scale")
    shape = zarr.open_array(store, path="0", mode="r").shape
    h, w = shape[-2:]
    area = h * w * float(scale[-2]) * float(scale[-1]) / 1e6
    volume = area * shape[0] * float(scale[0]) / 1e3 if len(shape) == 3 else None
    return ObjectsResult(where, join(where, meta["table"]), int(meta["objects"]), str(meta["dtype"]), seconds, area, volume,
                         str(meta.get("recipe", "")), options)


class _Progress(dask.callbacks.Callback):
    """A tqdm bar over every task of the run."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.enabled, self.bar = enabled, None

    def _start_state(self, dsk: Any, state: Any) -> None:
        from tqdm.auto import tqdm

        total = sum(1 for k in state["ready"] + list(state["waiting"]) if str(k).startswith("tilefeet-objects-"))
        self.bar = tqdm(total=total, desc="objects", unit="task", disable=not self.enabled, dynamic_ncols=True)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self.bar is not None and str(key).startswith("tilefeet-objects-"):
            self.bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        if self.bar is not None:
            self.bar.close()
