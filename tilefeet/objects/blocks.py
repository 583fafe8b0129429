"""What one block computes in each pass, and the small reductions between passes: pure functions
of arrays, shared by the out-of-core run (:mod:`.run`) and the lazy call (:mod:`.lazy`).

==========  =====================================================  ===========================
pass        a block computes (reads)                               the reduction gives
==========  =====================================================  ===========================
holes       background pieces, faces, which reach the image edge   which background pieces are
            (its mask)                                             holes (:func:`resolve_holes`)
fill        mask | holes (its mask)                                 –
pieces      pieces, faces, first pixels, counts, partial sums      the final id of every piece
            (its mask + 2 px, probabilities)                       and the table (:func:`resolve_pieces`)
relabel     final ids (its mask)                                   –
flood       cells before merging (seed ids), their boundary and    every seed's cell after the
            area sums (seeds and probabilities + ``steps`` + 1 px) merge (:func:`merge_cells`)
cells       the merged ids, partial sums                           the cells' table
            (flooded ids + 2 px, probabilities)
==========  =====================================================  ===========================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..geometry import BlockGrid, Box, Pair
from .cells import OUTSIDE, Boundaries, CellRecipe, boundaries, flood, levels
from .label import (
    Connectivity,
    Faces,
    first_pixels,
    holes_of,
    label_block,
    piece_offsets,
    renumber,
    resolve,
    runs_of,
    touching_edges,
)
from .measure import PERIMETER_HALO, PartialSums, block_sums, combine


@dataclass(frozen=True)
class BlockRecord:
    """What a block hands to the reduction: its pieces (local labels 1..n), their faces, and for
    the pieces pass their first pixels, counts and (for objects) partial sums."""

    n: int
    faces: Faces
    first: np.ndarray | None = None
    count: np.ndarray | None = None
    on_edge: np.ndarray | None = None  #: local labels reaching the image's outer edge (holes pass)
    sums: PartialSums | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"n": np.array(self.n), "top": self.faces.top, "bottom": self.faces.bottom, "left": self.faces.left, "right": self.faces.right}
        for name in ("first", "count", "on_edge"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        if self.sums is not None:
            out.update({f"s_{k}": v for k, v in self.sums.arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, d: Any) -> BlockRecord:
        keys = set(d.keys()) if hasattr(d, "keys") else set(d)
        sums = None
        if "s_ids" in keys:
            sums = PartialSums(**{k[2:]: d[k] for k in keys if k.startswith("s_")})
        return cls(
            n=int(d["n"]), faces=Faces(d["top"], d["bottom"], d["left"], d["right"]),
            first=d["first"] if "first" in keys else None, count=d["count"] if "count" in keys else None,
            on_edge=d["on_edge"] if "on_edge" in keys else None, sums=sums,
        )


def _core(window: np.ndarray, halo: int) -> np.ndarray:
    return window[halo : window.shape[0] - halo, halo : window.shape[1] - halo]


# ---------------------------------------------------------------------------------- passes


def holes_block(mask: np.ndarray, box: Box, shape: Pair, connectivity: Connectivity) -> BlockRecord:
    """Background pieces (``connectivity`` is the background's) of one block, and which reach the edge."""
    labels, n = label_block(~mask, connectivity)
    return BlockRecord(n, Faces.of(labels), on_edge=touching_edges(labels, box, shape))


def fill_block(mask: np.ndarray, holes: np.ndarray, connectivity: Connectivity) -> np.ndarray:
    """``mask`` with its holes filled; ``holes`` says, per background piece of this block (1..n), if it is one."""
    labels, n = label_block(~mask, connectivity)
    lut = np.concatenate([[False], holes[:n].astype(bool)])
    return mask | lut[labels]


def pieces_block(window: np.ndarray, halo: int, box: Box, shape: Pair, connectivity: Connectivity,
                 prob: np.ndarray | None = None) -> BlockRecord:
    """Pieces of one block's mask; with ``prob``, their partial sums too (``window`` then has a
    halo of at least 2 px, False outside the image, for the perimeter)."""
    mask = _core(window, halo)
    labels, n = label_block(mask, connectivity)
    runs = runs_of(labels)
    first = first_pixels(runs, n, box, shape[1])
    count = np.bincount(runs.label, weights=runs.length, minlength=n + 1)[1:].round().astype(np.int64)
    sums = None
    if prob is not None:
        sums = block_sums(labels, box.origin, prob, window, halo, runs=runs)
        assert len(sums) == n and (n == 0 or sums.ids[-1] == n)
    return BlockRecord(n, Faces.of(labels), first=first, count=count, sums=sums)


def relabel_block(mask: np.ndarray, final: np.ndarray, connectivity: Connectivity, dtype: Any) -> np.ndarray:
    """The block's final ids: its pieces (labelled again, the same way) through their final ids."""
    labels, n = label_block(mask, connectivity)
    lut = np.zeros(n + 1, dtype=dtype)
    lut[1:] = final[:n]
    out = np.zeros(mask.shape, dtype=dtype)
    inside = np.flatnonzero(mask)  # objects are a small part of most masks: map only their pixels
    out.ravel()[inside] = lut[labels.ravel()[inside]]
    return out


def flood_block(seeds: np.ndarray, prob: np.ndarray, halo: int, ring: int, cell: CellRecipe) -> tuple[np.ndarray, np.ndarray]:
    """Cells before merging (seed ids; 0: none or off the image) of a block's core plus ``ring`` px,
    and the probabilities there as integer levels: from its seeds (:data:`OUTSIDE` off the image) and
    probabilities over the core plus ``halo`` ≥ ``cell.steps`` + ``ring`` px."""
    lev, _ = levels(prob)
    grown = flood(seeds, lev if cell.method == "watershed" else None, cell.steps)
    cut = halo - ring
    inner = (slice(cut, grown.shape[0] - cut), slice(cut, grown.shape[1] - cut))
    ids = grown[inner]
    return np.where(ids == OUTSIDE, 0, ids), lev[inner]


def boundary_block(ids: np.ndarray, lev: np.ndarray) -> Boundaries:
    """The boundary and area sums a block owns, from its cells before merging and levels over its core + 1 px."""
    return boundaries(ids, lev, 1)


def cells_block(basins: np.ndarray, lut: np.ndarray, box: Box, prob: np.ndarray) -> tuple[np.ndarray, PartialSums]:
    """The merged cells of a block and their partial sums, from its cells before merging over the core
    + 2 px (0 off the image) and each seed's merged id (``lut``)."""
    window = lut[basins]
    core = _core(window, PERIMETER_HALO)
    return core, block_sums(core, box.origin, prob, window, PERIMETER_HALO)


# ------------------------------------------------------------------------------- reductions


def resolve_holes(grid: BlockGrid, records: Sequence[BlockRecord], connectivity: Connectivity) -> tuple[np.ndarray, np.ndarray]:
    """Per background piece (global order), whether it is a hole; and each block's offset."""
    counts = [r.n for r in records]
    offsets = piece_offsets(counts)
    on_edge = np.concatenate([r.on_edge.astype(np.int64) - 1 + offsets[k] for k, r in enumerate(records) if r.on_edge is not None and len(r.on_edge)] or [np.zeros(0, np.int64)])
    return holes_of(grid, counts, [r.faces for r in records], on_edge, connectivity), offsets


@dataclass(frozen=True)
class Resolution:
    """Every piece's final id (0: dropped as too small), per-block offsets into it, and the objects' sums."""

    final: np.ndarray  #: int64, one per piece, in row-major block order
    offsets: np.ndarray  #: block k's pieces are final[offsets[k]:offsets[k+1]]
    n_objects: int
    sums: PartialSums | None  #: combined, one row per object (ids 1..n_objects), when measured

    def block(self, k: int) -> np.ndarray:
        return self.final[self.offsets[k] : self.offsets[k + 1]]


def resolve_pieces(grid: BlockGrid, records: Sequence[BlockRecord], connectivity: Connectivity, keep: Any,
                   prob_dtype: Any = np.uint8) -> Resolution:
    """Join pieces across faces, number objects in raster order, drop those ``keep(area_px)`` rejects,
    and combine the partial sums of the rest."""
    counts = [r.n for r in records]
    offsets = piece_offsets(counts)
    first = np.concatenate([r.first for r in records if r.first is not None] or [np.zeros(0, np.int64)])
    count = np.concatenate([r.count for r in records if r.count is not None] or [np.zeros(0, np.int64)])
    obj = resolve(grid, counts, [r.faces for r in records], first, connectivity)
    n_all = int(obj.max()) + 1 if len(obj) else 0
    area = np.bincount(obj, weights=count.astype(np.float64), minlength=n_all).round().astype(np.int64)
    kept = np.asarray(keep(area), dtype=bool)
    final = renumber(obj, kept)
    n = int(kept.sum())
    sums = None
    if all(r.sums is not None for r in records) and records:
        parts = PartialSums.concat([r.sums for r in records if r.sums is not None], prob_dtype)
        sums = combine(parts, final - 1, n)
    return Resolution(final, offsets, n, sums)


def resolve_cells(n_seeds: int, parts: Sequence[Boundaries], cell: CellRecipe, min_px: int, prob_dtype: Any) -> tuple[np.ndarray, int]:
    """Every seed's merged cell id (0: dropped) and the number of cells, from the blocks' boundary sums."""
    from .cells import merge_cells

    scale = levels(np.zeros(1, dtype=np.dtype(prob_dtype)))[1]
    return merge_cells(n_seeds, Boundaries.combine(list(parts)), threshold=cell.merge_threshold, scale=scale, min_px=min_px)


def combine_cells(parts: Sequence[PartialSums], n: int, prob_dtype: Any) -> PartialSums:
    """The cells' sums from their blocks' partial sums (rows named by global id)."""
    allp = PartialSums.concat(list(parts), prob_dtype)
    return combine(allp, allp.ids.astype(np.int64) - 1, n)
