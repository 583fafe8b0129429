"""Objects of a stack of sections: 3-D instance labels and their table, out of core (a resumable
dask graph, as :mod:`.run` for sections) and lazily (as :mod:`.lazy`).

The passes, one task per (z, y, x) block unless said (:mod:`.volume` holds what each computes)::

    holes → hole pairs → holes reduction → fill        --fill-holes: each section's holes (scratch array)
    pieces → pairs → resolve (one task) → relabel       ids at relabel, the table at resolve
    pyramid levels (y, x) → publish

A pieces task saves its record (first voxels, counts, sections spanned, partial sums) and, in a
file of its own, its six faces; a pairs task reads its own faces and its lower neighbours' and
saves the pairs of pieces that touch. The reduction reads records and pairs only, never a face:
memory is blocks in flight plus O(pieces), whatever the volume.

Holes are filled per section (``--fill-holes``): the mask of a stack comes from a 2-D network run
on each section, so a hole is what that network left open in one section (the lumen of a
mitochondrion cut across, a missed patch of matrix); a 3-D hole, background sealed on every side
in 3-D, is rare in such masks, and a hole open to the next section is still a hole in its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from dask import delayed

from . import store as st
from .options import ObjectSettings, VolumePlan, make_volume_plan
from .volume import (
    VBox,
    VolumeGrid,
    block_pairs,
    fill_block,
    holes_block,
    in_plane,
    pieces_block,
    relabel_block,
    resolve_holes,
    resolve_pieces,
    section_structure,
    structure,
    table,
)

Triple = tuple[int, int, int]


def _bid(index: Triple) -> str:
    return f"{index[0]}_{index[1]}_{index[2]}"


def background_structure(connectivity: int) -> np.ndarray:
    """Each section's background, connected as the dual of the objects within the section (4 ↔ 8)."""
    return section_structure(12 - in_plane(connectivity))


@dataclass(frozen=True)
class StackJob:
    """What every task of one stack run shares (one dask leaf): the plan, the source, where to write."""

    plan: VolumePlan
    source: st.ClassSource
    store: str
    name: str
    location: st.Layer  #: where the layer is written (staged, resumed, published)

    @property
    def grid(self) -> VolumeGrid:
        return self.plan.grid

    @property
    def shape(self) -> Triple:
        return self.plan.shape

    def mask(self, box: VBox) -> np.ndarray:
        """The object mask (holes filled when asked: the fill pass's scratch array), False off the volume."""
        if not self.plan.settings.fill_holes:
            return self.source.read_mask3(box)
        arr = _scratch(self, "filled")
        inner = box.intersect(VBox((0, 0, 0), self.shape))
        out = np.zeros(box.shape, dtype=bool)
        if not inner.empty:
            out[inner.relative_to(box)] = arr[inner.slices]
        return out

    def save(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        self.location.save_record(name, arrays)

    def load(self, name: str) -> dict[str, np.ndarray]:
        with self.location.open_record(name) as d:
            return {k: d[k] for k in d.files}

    def label_array(self, level: int) -> Any:
        return self.location.label_array(level)


def _scratch(job: StackJob, name: str) -> Any:
    return job.location.scratch(name)


class _Faces:
    """Faces of blocks read from their records, each file opened once per task."""

    def __init__(self, job: StackJob, prefix: str):
        self.job, self.prefix, self.open = job, prefix, {}  # type: ignore[var-annotated]

    def __call__(self, index: Triple, name: str) -> np.ndarray:
        if index not in self.open:
            self.open[index] = self.job.location.open_record(f"{self.prefix}{_bid(index)}")
        return self.open[index][name]

    def close(self) -> None:
        for f in self.open.values():
            f.close()


# ------------------------------------------------------------------------------------------ tasks


def _holes(job: StackJob, index: Triple, *_after: Any) -> str:
    box = job.grid.box(index)
    record, faces = holes_block(job.source.read_mask3(box), box, job.shape, background_structure(job.plan.connectivity))
    job.save(f"HF{_bid(index)}", faces)
    job.save(f"h{_bid(index)}", record)
    job.location.mark(f"h{_bid(index)}", "")
    return f"h{_bid(index)}"


def _pairs(job: StackJob, index: Triple, prefix: str, *_after: Any) -> str:
    struct = background_structure(job.plan.connectivity) if prefix == "h" else structure(job.plan.connectivity)
    faces = _Faces(job, prefix.upper() + "F")
    try:
        pairs = block_pairs(faces, job.grid, index, struct)
    finally:
        faces.close()
    job.save(f"{prefix}p{_bid(index)}", pairs)
    job.location.mark(f"{prefix}p{_bid(index)}", "")
    return f"{prefix}p{_bid(index)}"


def _holes_reduce(job: StackJob, *_after: Any) -> str:
    records = [job.load(f"h{_bid(i)}") for i in job.grid]
    pairs = [job.load(f"hp{_bid(i)}") for i in job.grid]
    holes, offsets = resolve_holes([int(r["n"]) for r in records], [r["on_edge"] for r in records], pairs)
    job.save("holes", {"holes": holes, "offsets": offsets})
    job.location.create_scratch("filled", job.shape, job.plan.chunks, bool)
    job.location.mark("holes", "")
    return "holes"


def _fill(job: StackJob, index: Triple, *_after: Any) -> str:
    box = job.grid.box(index)
    k = job.grid.flat(index)
    with job.location.open_record("holes") as d:
        off = d["offsets"]
        holes = d["holes"][off[k] : off[k + 1]]
    filled = fill_block(job.source.read_mask3(box), holes, background_structure(job.plan.connectivity))
    _scratch(job, "filled")[box.slices] = filled
    job.location.mark(f"f{_bid(index)}", "")
    return f"f{_bid(index)}"


def _pieces(job: StackJob, index: Triple, *_after: Any) -> str:
    box = job.grid.box(index)
    window = job.mask(box.grow((1, 1, 1)))
    record, faces = pieces_block(window, box, job.shape, structure(job.plan.connectivity), job.source.read_prob3(box))
    job.save(f"AF{_bid(index)}", faces)
    job.save(f"a{_bid(index)}", record)
    job.location.mark(f"a{_bid(index)}", "")
    return f"a{_bid(index)}"


def _resolve(job: StackJob, *_after: Any) -> int:
    from .run import id_dtype

    records = [job.load(f"a{_bid(i)}") for i in job.grid]
    pairs = [job.load(f"ap{_bid(i)}") for i in job.grid]
    res = resolve_pieces(records, pairs, job.plan.keep, np.dtype(job.source.prob_dtype))
    del records, pairs
    dtype = id_dtype(res.n_objects, job.plan.settings.uint32_limit)
    job.save("resolve", {"final": res.final.astype(dtype), "offsets": res.offsets, "n": np.array(res.n_objects)})
    st.create_label_volume(
        job.location, job.name, shapes=st.volume_level_shapes(job.shape, job.source.levels), chunks=job.plan.chunks, dtype=dtype,
        spacing_nm=job.plan.spacing_nm, origin_nm=job.plan.origin_nm, metadata=_provenance(job, res.n_objects, dtype),
    )
    assert res.sums is not None
    df = table(res.sums, class_name=job.plan.class_name, spacing_nm=job.plan.spacing_nm, origin_nm=job.plan.origin_nm,
               shape=job.shape, prob_scale=job.source.prob_scale, id_dtype=dtype)
    job.location.write_table(df, job.plan.settings.table_format)
    job.location.mark("resolve", "")
    return res.n_objects


def _relabel(job: StackJob, index: Triple, *_after: Any) -> str:
    box = job.grid.box(index)
    k = job.grid.flat(index)
    with job.location.open_record("resolve") as resolved:
        off, final = resolved["offsets"], resolved["final"]
    ids = relabel_block(job.mask(box), final[off[k] : off[k + 1]], structure(job.plan.connectivity), final.dtype)
    for level in range(direct_levels(job.plan, job.source.levels)):
        f = 1 << level
        (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
        job.label_array(level)[z0:z1, y0 // f : -(-y1 // f), x0 // f : -(-x1 // f)] = ids[:, ::f, ::f]
    job.location.mark(f"b{_bid(index)}", "")
    return f"b{_bid(index)}"


def direct_levels(plan: VolumePlan, n_levels: int) -> int:
    """How many levels a block writes itself (its part of them is whole chunks in y and x)."""
    k = 1
    while k < n_levels and all((b >> k) % c == 0 and b % (1 << k) == 0 for b, c in zip(plan.grid.block[1:], plan.chunks[1:])):
        k += 1
    return k


def _pyramid(job: StackJob, level: int, box: VBox, record: str, *_after: Any) -> str:
    """Level ``level`` over ``box``: every other pixel in y and x of the level below, every section."""
    src, dst = job.label_array(level - 1), job.label_array(level)
    _, h, w = src.shape
    (z0, y0, x0), (z1, y1, x1) = box.start, box.stop
    part = np.asarray(src[z0:z1, 2 * y0 : min(2 * y1, h), 2 * x0 : min(2 * x1, w)])
    dst[box.slices] = part[:, ::2, ::2]
    job.location.mark(record, "")
    return record


def _pyramid_boxes(plan: VolumePlan, shape: Triple, level: int) -> list[tuple[str, VBox]]:
    side = (plan.grid.block[0], *(max(c, b // 2 // c * c) for b, c in zip(plan.grid.block[1:], plan.chunks[1:])))
    grid = VolumeGrid(shape, side)  # type: ignore[arg-type]
    return [(f"p{level}_{_bid(i)}", grid.box(i)) for i in grid]


def _publish(job: StackJob, *_after: Any) -> str:
    return str(job.location.publish())


def _barrier(*records: Any) -> int:
    return len(records)


def _provenance(job: StackJob, n: int, dtype: Any) -> dict:
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


# ------------------------------------------------------------------------------------------ graph


def prepare_stack_job(source: st.ClassSource, settings: ObjectSettings, store: Any, *, overwrite: bool,
                      resume: bool, recipe: str = "", storage_options: Any = None) -> tuple[StackJob, set[str]]:
    plan = make_volume_plan(settings, class_name=source.class_name, shape=source.shape,  # type: ignore[arg-type]
                            spacing_nm=source.spacing_nm, origin_nm=source.origin3_nm, chunks=source.chunks,  # type: ignore[arg-type]
                            where=source.store, recipe=recipe)
    name = st.layer_name(source.class_name, False)
    identity = {"source": source.identity(), "plan": plan.describe(), "block": list(plan.grid.block),
                "chunks": list(plan.chunks), "table": settings.table_format, "uint32_limit": settings.uint32_limit}
    location = st.layer_location(store, name, storage_options)
    done = st.prepare(location, identity, overwrite=overwrite, resume=resume)
    return StackJob(plan, source, str(location.final), name, location), done


def stack_graph(job: StackJob, done: set[str], after: Any = None) -> Any:
    """A dask ``Delayed`` that runs every unfinished task of a stack run and returns the layer's path."""
    leaf = delayed(job, traverse=False)
    token = st.fingerprint({"staging": str(job.location.staging), "plan": repr(job.plan)})[:10]
    blocks = list(job.grid)

    def per_block(fn: Any, prefix: str, after: Any, *args: Any) -> Any:
        tasks = [
            delayed(fn, pure=False)(leaf, i, *args, after, dask_key_name=f"tilefeet-objects-{prefix}-{token}-{_bid(i)}")
            for i in blocks
            if f"{prefix}{_bid(i)}" not in done
        ]
        return delayed(_barrier)(after, *tasks, dask_key_name=f"tilefeet-objects-{prefix}-all-{token}")

    def once(fn: Any, record: str, after: Any) -> Any:
        if record in done:
            return after
        return delayed(fn, pure=False)(leaf, after, dask_key_name=f"tilefeet-objects-{record}-{token}")

    if job.plan.settings.fill_holes:
        after = per_block(_pairs, "hp", per_block(_holes, "h", after), "h")
        after = per_block(_fill, "f", once(_holes_reduce, "holes", after))
    after = per_block(_pairs, "ap", per_block(_pieces, "a", after), "a")
    after = per_block(_relabel, "b", once(_resolve, "resolve", after))
    shapes = st.volume_level_shapes(job.shape, job.source.levels)
    for level in range(direct_levels(job.plan, len(shapes)), len(shapes)):
        tasks = [
            delayed(_pyramid, pure=False)(leaf, level, box, record, after, dask_key_name=f"tilefeet-objects-{record}-{token}")
            for record, box in _pyramid_boxes(job.plan, shapes[level], level)
            if record not in done
        ]
        after = delayed(_barrier)(after, *tasks, dask_key_name=f"tilefeet-objects-level{level}-{token}")
    return delayed(_publish, pure=False)(leaf, after, dask_key_name=f"tilefeet-objects-publish-{token}")


# ------------------------------------------------------------------------------------- lazy call


def label_stack(mask: Any, prob: Any, plan: VolumePlan, *, prob_scale: float, measure: bool, no_probabilities: bool) -> Any:
    """Objects of a stack's mask (dask arrays, (z, y, x)): the passes every id depends on run now
    (the default dask scheduler, a ``dask.distributed`` client when one is active), the label
    image stays lazy (see :func:`tilefeet.objects.label_objects`).

    Each pass is one ``map_blocks`` layer whose blocks are one-element object arrays (a block's
    record); a pairs block sees its neighbours' records through a one-block overlap, so the faces
    are intermediates that dask frees, never gathered."""
    import dask
    import dask.array as da

    from .lazy import Objects
    from .run import id_dtype

    grid = plan.grid
    mask = mask.rechunk(grid.chunks())
    prob = prob.rechunk(grid.chunks())
    struct = structure(plan.connectivity)
    ones = tuple((1,) * c for c in grid.counts)

    def per_block(fn: Any, *arrays: Any) -> Any:
        def one(*blocks: Any, block_info: Any = None) -> np.ndarray:
            index = tuple(block_info[None]["chunk-location"])
            out = np.empty((1, 1, 1), dtype=object)
            out[0, 0, 0] = fn(index, *blocks)
            return out

        return da.map_blocks(one, *arrays, chunks=ones, dtype=object, meta=np.empty((0, 0, 0), object))

    def pairs(records: Any, struct: np.ndarray) -> Any:
        """Per block, the pairs of pieces with its lower neighbours, from their faces."""
        near = da.overlap.overlap(records, depth=1, boundary="none")

        def one(index: Triple, block: np.ndarray) -> dict[str, np.ndarray]:
            lo = tuple(min(i, 1) for i in index)  # where this block sits in its (clipped) 3×3×3 neighbourhood
            faces = {tuple(i + o - c for i, o, c in zip(index, offset, lo)): block[offset][1] for offset in np.ndindex(block.shape)}
            return block_pairs(lambda j, name: faces[j][name], grid, index, struct)

        return per_block(one, near)

    def first(index: Triple, block: np.ndarray) -> dict[str, np.ndarray]:
        return dict(block[0, 0, 0][0])

    if plan.settings.fill_holes:
        bg = background_structure(plan.connectivity)
        holes_records = per_block(lambda i, m: holes_block(m, grid.box(i), plan.shape, bg), mask)
        recs, hp = dask.compute(per_block(first, holes_records), pairs(holes_records, bg))
        recs, hp = [recs[i][0, 0, 0] if recs.ndim == 6 else recs[i] for i in grid], [hp[i] for i in grid]
        holes, offsets = resolve_holes([int(r["n"]) for r in recs], [r["on_edge"] for r in recs], hp)
        cut = {i: holes[offsets[k] : offsets[k + 1]] for k, i in enumerate(grid)}
        mask = da.map_blocks(lambda m, block_info=None: fill_block(m, cut[tuple(block_info[None]["chunk-location"])], bg),
                             mask, dtype=bool)
    windows = da.overlap.overlap(mask, depth=1, boundary=False)  # each block with one voxel around it, False off the volume
    if measure:
        pieces = per_block(lambda i, w, p: pieces_block(w, grid.box(i), plan.shape, struct, p), windows, prob)
    else:
        pieces = per_block(lambda i, w: pieces_block(w, grid.box(i), plan.shape, struct, None), windows)
    recs, ap = dask.compute(per_block(first, pieces), pairs(pieces, struct))
    res = resolve_pieces([recs[i] for i in grid], [ap[i] for i in grid], plan.keep, prob.dtype)
    dtype = id_dtype(res.n_objects, plan.settings.uint32_limit)
    final = {i: res.block(k) for k, i in enumerate(grid)}
    labels = da.map_blocks(lambda m, block_info=None: relabel_block(m, final[tuple(block_info[None]["chunk-location"])], struct, dtype),
                           mask, dtype=dtype)
    if not measure:
        return Objects(labels, None, plan, res.n_objects)
    assert res.sums is not None
    df = table(res.sums, class_name=plan.class_name, spacing_nm=plan.spacing_nm, origin_nm=plan.origin_nm, shape=plan.shape,
               prob_scale=prob_scale, id_dtype=dtype)
    if no_probabilities:
        df["mean_probability"] = np.nan
        df["max_probability"] = np.nan
    return Objects(labels, df, plan, res.n_objects)


def _lower(struct: np.ndarray) -> list[Triple]:
    from .volume import lower_neighbours

    return lower_neighbours(struct)


def _nest(grid: VolumeGrid, flat: list[Any]) -> list[Any]:
    cz, cy, cx = grid.counts
    return [[[flat[(z * cy + y) * cx + x] for x in range(cx)] for y in range(cy)] for z in range(cz)]
