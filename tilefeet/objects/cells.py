"""Cells between membranes: seeds, a watershed of bounded reach on the membrane probability, and
merging of over-segmented neighbours by the mean probability of their shared boundary.

The algorithm on the whole image (``--cells``; what a blockwise run reproduces bit for bit):

1. **Seeds** are the 4-connected components of the pixels whose membrane probability is below the
   seed threshold (``skimage.measure.label(p < t_seed, connectivity=1)``, raster order of their
   first pixels); with ``--fill-holes``, specks that do not reach the image edge (8-connected
   components of the rest) first join the seed around them.
2. **Flood** (:func:`flood`): a watershed on the membrane probability whose reach is bounded:
   ``steps`` rounds (``--grow`` nm in pixels), in each of which every pixel that is not a seed looks
   at its 8 neighbours as they were at the end of the round before, takes the one with the least
   (cost, id), and holds its id at the cost max(that cost, its own probability) when this is
   *strictly* below the cost it holds. Seeds hold cost 0. So a pixel goes to the seed it reaches by
   the path of lowest highest probability (the watershed's minimax path) among paths of at most
   ``steps`` pixels; paths of equal cost keep the first that reached it, and among those of one
   round the smaller (cost, id) of the neighbour. Pixels beyond ``steps`` of every seed stay 0.
3. **Merge** (:func:`merge_cells`): neighbouring cells (4-adjacent pixels) whose shared boundary
   has a mean probability below the merge threshold are merged, the lowest first, recomputing the
   merged cell's boundaries with its neighbours (average linkage, as waterz's mean affinity or
   GASP's average: scikit-image's ``merge_hierarchical`` on the cells' adjacency graph); then cells
   smaller than the minimum size join the neighbour with the lowest mean boundary, the smallest
   first (a cell with no neighbour is dropped). Cells are numbered in the order of their smallest seed.

Why by hand, and why bounded: scikit-image's ``watershed`` floods from a priority queue whose order
runs across the whole image, so a block cannot reproduce it from a halo. Here a pixel's cell depends
only on the seeds and probabilities within ``steps`` pixels (one round moves one pixel), so a block
computed with a halo of ``steps`` (+1 for its boundaries, +2 for the perimeter) equals the whole
image. Ties are broken by costs and ids, never by where a pixel sits in an array. The merge needs
every cell's boundaries, which blocks give as partial sums (integer sums of the stored probability
over each pair of cells' boundary pixel pairs, and their counts; exact in any order) combined per
pair of cells, as measurements are; the graph of cells is O(cells), and there a library fits.

With a flat altitude (``method="grow"``, the algorithm before the watershed: seeds below the label
threshold, ``--min-size`` dropping seeds) every cost is 0 and the flood is breadth-first growth
in which each pixel takes the smallest id among its neighbours reached the round before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

OUTSIDE = -1  #: seed value of pixels outside the image: never assigned, never spread
NONE = 1 << 62  #: the key of a pixel that holds no cell (above every cost × id; exact in float64)
FLOAT_LEVELS = 65535  #: float probabilities are compared and summed as round(p × this)
CHUNK = 1 << 20  #: frontier pixels gathered at once (8 neighbours × 8 bytes each)

CellMethod = Literal["watershed", "grow"]
CELL_METHODS: tuple[str, ...] = ("watershed", "grow")


@dataclass(frozen=True)
class CellRecipe:
    """How cells are made: the numbers every block and the reduction agree on."""

    method: CellMethod = "watershed"
    seed_threshold: float = 0.05  #: seeds: probability below this (``grow``: the label threshold)
    merge_threshold: float = 0.6  #: merge neighbours whose boundary's mean probability is below this (0: never)
    min_size_nm2: float = 0.0  #: cells smaller than this join a neighbour (``grow``: seeds smaller are dropped)
    grow_nm: float = 160.0  #: the flood's reach
    steps: int = 0  #: the reach in pixels (from ``grow_nm`` and the pixel size)

    def describe(self) -> dict:
        if self.method == "grow":  # seeds at the label threshold, never merged, small seeds dropped
            return {"cell_method": "grow", "grow_nm": self.grow_nm, "growth_steps": self.steps}
        return {"cell_method": self.method, "seed_threshold": self.seed_threshold, "merge_threshold": self.merge_threshold,
                "min_size_nm2": self.min_size_nm2, "grow_nm": self.grow_nm, "growth_steps": self.steps}


def growth_steps(grow_nm: float, pixel_size_nm: tuple[float, float]) -> int:
    """Rounds of growth that reach ``grow_nm`` (rounded to whole pixels of the mean pixel side)."""
    return max(0, round(grow_nm / ((pixel_size_nm[0] + pixel_size_nm[1]) / 2)))


def levels(prob: np.ndarray) -> tuple[np.ndarray, int]:
    """Stored probabilities as integers (uint8 as they are; floats as round(p × 65535)) and the
    integer of probability 1: what the flood compares and the boundaries sum, exactly."""
    p = np.asarray(prob)
    if p.dtype == np.uint8:
        return p.astype(np.int64), 255
    q = np.rint(np.clip(np.nan_to_num(p.astype(np.float64), nan=1.0), 0.0, 1.0) * FLOAT_LEVELS)
    return q.astype(np.int64), FLOAT_LEVELS


def seed_level(threshold: float, scale: int) -> float:
    """Seeds are the integer levels strictly below this (``threshold`` × the level of probability 1)."""
    return threshold * scale


def flood(seeds: np.ndarray, altitude: np.ndarray | None, steps: int) -> np.ndarray:
    """Cells of a window: ``seeds`` (int64: ids > 0, 0 free, :data:`OUTSIDE` off the image) flooded
    for ``steps`` rounds over ``altitude`` (int64 levels; None: flat); see the module's rule.

    Works on the frontier: a pixel can change in a round only when a neighbour changed in the round
    before, so each round looks at the neighbours of the last round's changes.
    """
    from scipy import ndimage as ndi

    lab = np.pad(np.asarray(seeds, dtype=np.int64), 1, constant_values=OUTSIDE)
    w = lab.shape[1]
    n_ids = int(lab.max()) + 1
    key = np.where(lab > 0, lab, NONE).ravel()  # cost × n_ids + id; seeds cost 0
    alt = np.zeros(lab.size, np.int64) if altitude is None else np.pad(np.asarray(altitude, np.int64), 1).ravel()
    free = (lab == 0).ravel()  # may change: not a seed, not off the image
    if steps <= 0 or n_ids <= 1:
        return lab[1:-1, 1:-1].copy()
    offsets = np.array([dy * w + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], dtype=np.int64)
    frontier = np.flatnonzero(ndi.binary_dilation(lab > 0, structure=np.ones((3, 3), bool)).ravel() & free)
    for _ in range(steps):
        if len(frontier) == 0:
            break
        changed_at, changed_key = [], []
        for start in range(0, len(frontier), CHUNK):
            f = frontier[start : start + CHUNK]
            best = key[f[None, :] + offsets[:, None]].min(axis=0)
            reach = best < NONE
            cost = np.maximum(best // n_ids, alt[f])
            new = cost * n_ids + best % n_ids
            better = reach & (cost < np.where(key[f] < NONE, key[f] // n_ids, NONE))
            changed_at.append(f[better])
            changed_key.append(new[better])
        changed = np.concatenate(changed_at)
        key[changed] = np.concatenate(changed_key)  # all of a round at once, from the round before
        nxt = (changed[None, :] + offsets[:, None]).ravel()
        frontier = np.unique(nxt[free[nxt]])
    ids = np.where(key < NONE, key % n_ids, 0).reshape(lab.shape)
    ids[lab == OUTSIDE] = OUTSIDE
    return ids[1:-1, 1:-1].copy()


def grow(seeds: np.ndarray, steps: int) -> np.ndarray:
    """Seeds grown by ``steps`` rounds of breadth-first growth, each pixel taking the smallest id
    among its neighbours reached the round before: :func:`flood` on a flat altitude."""
    return flood(seeds, None, steps)


# ------------------------------------------------------------------------------ boundaries, merge


@dataclass(frozen=True)
class Boundaries:
    """Partial sums of the cells' shared boundaries and of their areas (one block's, or combined).

    A boundary pixel pair is two 4-adjacent pixels of different cells (neither 0); it adds the two
    pixels' integer levels to ``total`` and 1 to ``count`` of its pair of cells (a < b)."""

    a: np.ndarray  #: int64
    b: np.ndarray
    total: np.ndarray  #: int64: Σ levels of both pixels of each pair
    count: np.ndarray  #: int64: pixel pairs
    ids: np.ndarray  #: cells with pixels (int64)
    area: np.ndarray  #: their pixel counts (int64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"a": self.a, "b": self.b, "total": self.total, "count": self.count, "ids": self.ids, "area": self.area}

    @classmethod
    def combine(cls, parts: list[Boundaries]) -> Boundaries:
        """Sums of several blocks' parts, one row per pair (sorted by a, then b) and per cell."""
        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts] or [np.zeros(0, np.int64)]).astype(np.int64)

        a, b, total, count, ids, area = (cat(n) for n in ("a", "b", "total", "count", "ids", "area"))
        pairs, inv = np.unique(np.stack([a, b]), axis=1, return_inverse=True) if len(a) else (np.zeros((2, 0), np.int64), np.zeros(0, np.int64))
        inv = np.asarray(inv).ravel()
        cells, cinv = np.unique(ids, return_inverse=True)
        return cls(pairs[0], pairs[1], np.bincount(inv, total, len(pairs[0])).astype(np.int64),
                   np.bincount(inv, count, len(pairs[0])).astype(np.int64),
                   cells.astype(np.int64), np.bincount(np.asarray(cinv).ravel(), area, len(cells)).astype(np.int64))


def boundaries(ids: np.ndarray, lev: np.ndarray, ring: int) -> Boundaries:
    """The boundary and area sums a block owns: ``ids`` and ``lev`` cover its core plus ``ring`` ≥ 1
    pixels (ids ≤ 0 hold no cell); a pair belongs to the block of its left (upper) pixel."""
    h, w = ids.shape[0] - 2 * ring, ids.shape[1] - 2 * ring
    core = slice(ring, ring + h), slice(ring, ring + w)
    ya, xa = core
    parts_a, parts_b, parts_s = [], [], []
    for (y2, x2) in ((ya, slice(ring + 1, ring + w + 1)), (slice(ring + 1, ring + h + 1), xa)):
        one, two = ids[ya, xa].ravel(), ids[y2, x2].ravel()
        keep = (one > 0) & (two > 0) & (one != two)
        parts_a.append(np.minimum(one[keep], two[keep]))
        parts_b.append(np.maximum(one[keep], two[keep]))
        parts_s.append(lev[ya, xa].ravel()[keep] + lev[y2, x2].ravel()[keep])
    a, b, s = (np.concatenate(x).astype(np.int64) for x in (parts_a, parts_b, parts_s))
    inner = ids[core].ravel()
    cells, area = np.unique(inner[inner > 0], return_counts=True)
    one_block = Boundaries(a, b, s, np.ones(len(a), np.int64), cells.astype(np.int64), area.astype(np.int64))
    return Boundaries.combine([one_block])


def merge_cells(n_seeds: int, sums: Boundaries, *, threshold: float, scale: int, min_px: int) -> tuple[np.ndarray, int]:
    """The cell of every seed after merging (``lut[seed id]``, 0 = dropped; ``lut[0]`` = 0) and the
    number of cells; see the module's rule. Only cells that could merge (an edge below the
    threshold, or smaller than ``min_px``, and their neighbours) enter the graph: an edge at or
    above the threshold stays there however its ends merge (a mean of such means is as high)."""
    lut = np.arange(n_seeds + 1, dtype=np.int64)
    area = np.zeros(n_seeds + 1, np.int64)
    area[sums.ids] = sums.area
    mean = sums.total / np.maximum(2 * sums.count * scale, 1)
    low = mean < threshold if threshold > 0 else np.zeros(len(mean), bool)
    small = np.flatnonzero((area < min_px) & (lut > 0)) if min_px > 0 else np.zeros(0, np.int64)
    if low.any() or len(small):
        active = np.zeros(n_seeds + 1, bool)
        active[sums.a[low]] = active[sums.b[low]] = True
        active[small] = True
        near_small = np.isin(sums.a, small) | np.isin(sums.b, small)
        active[sums.a[near_small]] = active[sums.b[near_small]] = True
        edges = np.flatnonzero(active[sums.a] & active[sums.b])
        groups, dropped = _merge_graph(np.flatnonzero(active), area, sums, edges, mean, threshold, scale, min_px)
        for members in groups:
            lut[members] = min(members)
        for members in dropped:
            lut[members] = 0
    present = np.zeros(n_seeds + 1, bool)
    present[lut[lut > 0]] = True
    present[0] = False
    number = np.cumsum(present) * present  # cells in the order of their smallest seed
    out = number[lut]
    out[0] = 0
    return out.astype(np.int64), int(present.sum())


def _merge_graph(nodes: np.ndarray, area: np.ndarray, sums: Boundaries, edges: np.ndarray, mean: np.ndarray,
                 threshold: float, scale: int, min_px: int) -> tuple[list[list[int]], list[list[int]]]:
    """Groups of seeds merged on the cells' adjacency graph (:class:`skimage.graph.RAG`, a
    ``networkx`` graph), and the groups dropped (small, without a neighbour)."""
    import heapq

    from skimage.graph import RAG, merge_hierarchical

    g = RAG()
    for n in nodes.tolist():
        g.add_node(n, labels=[n], area=int(area[n]))
    for e in edges.tolist():
        g.add_edge(int(sums.a[e]), int(sums.b[e]), weight=float(mean[e]), total=int(sums.total[e]), count=int(sums.count[e]))

    def weight(graph: Any, src: int, dst: int, n: int) -> dict:
        total = count = 0
        for x in (src, dst):
            if graph.has_edge(x, n):
                total += graph[x][n]["total"]
                count += graph[x][n]["count"]
        return {"weight": total / (2 * count * scale), "total": total, "count": count}

    def join(graph: Any, src: int, dst: int) -> None:
        graph.nodes[dst]["area"] += graph.nodes[src]["area"]

    if threshold > 0:
        merge_hierarchical(np.array([int(nodes.max())]), g, threshold, rag_copy=False, in_place_merge=True, merge_func=join, weight_func=weight)
    dropped: set[int] = set()
    if min_px > 0:
        heap = [(d["area"], min(d["labels"]), n) for n, d in g.nodes(data=True) if d["area"] < min_px]
        heapq.heapify(heap)
        while heap:
            size, _, n = heapq.heappop(heap)
            if n not in g or g.nodes[n]["area"] != size:
                continue  # merged into another, or grown since
            if g.degree(n) == 0:
                dropped.add(n)
                continue
            dst = min(g[n], key=lambda m: (g[n][m]["weight"], min(g.nodes[m]["labels"])))
            join(g, n, dst)
            g.merge_nodes(n, dst, weight)
            if g.nodes[dst]["area"] < min_px:
                heapq.heappush(heap, (g.nodes[dst]["area"], min(g.nodes[dst]["labels"]), dst))
    groups = [list(d["labels"]) for n, d in g.nodes(data=True) if n not in dropped]
    return groups, [list(g.nodes[n]["labels"]) for n in dropped]
