"""Connected components of a mask, block by block, exactly as if the whole mask were labelled at once.

Each block labels its own pixels (:func:`label_block`, ``scipy.ndimage.label``) into *pieces*,
keeps its four faces (:class:`Faces`) and the raster position of each piece's first pixel.
:func:`resolve` joins the pieces that touch across block faces (a vectorized union-find: one sparse
connected-components call over the pieces found on faces) and numbers the objects in raster order
of their first pixel, which is how ``skimage.measure.label`` numbers them. So the ids equal a
whole-image labelling bit for bit, whatever the block size or the order blocks ran in.

Why faces are enough: a pair of neighbouring pixels in different blocks crosses a vertical or a
horizontal block border (or both, at a corner). Each border is one line through the whole image
(all block rows, or all block columns), so the diagonal pairs across a block corner are pairs of
that line like any other::

        column X-1 | column X           pairs across the line (8-connectivity):
     y-1   .       |   b                  (L[y], R[y]), (L[y], R[y+1]), (L[y+1], R[y])
     y     a       |   .                → a (block above-left) joins b (block above-right)
     ------------- + -------- block row border
     y+1   .       |   c                → a joins c across the corner (L[y], R[y+1])

Connectivity: objects of a class are 8-connected (diagonal neighbours join: scikit-image's
``connectivity=2``, as :func:`tilefeet.metrics.instance_labels` scores them) and their holes are
the 4-connected components of the background that do not reach the image edge
(``scipy.ndimage.binary_fill_holes``). Cells are the reverse: the regions between membranes are
4-connected, so a membrane drawn as a diagonal line of pixels still separates its two sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..geometry import BlockGrid, Box

Connectivity = int  #: 1 (4-neighbours) or 2 (8-neighbours), as scikit-image's ``connectivity``

_STRUCTURES = {
    1: np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool),
    2: np.ones((3, 3), dtype=bool),
}


def dual(connectivity: Connectivity) -> Connectivity:
    """The connectivity of the background of objects with ``connectivity`` (4 ↔ 8)."""
    return 3 - connectivity


def label_block(mask: np.ndarray, connectivity: Connectivity) -> tuple[np.ndarray, int]:
    """Local labels (int32, 1..n in raster order of first pixels, 0 = background) of one block."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask, structure=_STRUCTURES[connectivity])
    return labels, int(n)


# ----------------------------------------------------------------------------------- pixel runs


@dataclass(frozen=True)
class Runs:
    """Horizontal runs of one non-zero label in a 2-D label image, in raster order.

    A blob of area A has about sqrt(A) runs, so measuring from runs touches far fewer values than
    measuring from pixels; sums over a run of consecutive columns have closed forms.
    """

    label: np.ndarray  #: the run's label
    y: np.ndarray  #: its row (int64)
    x0: np.ndarray  #: its first column (int64)
    x1: np.ndarray  #: the column after its last one (int64)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def length(self) -> np.ndarray:
        return self.x1 - self.x0


def runs_of(labels: np.ndarray) -> Runs:
    """The runs of a label image (any integer dtype; 0 = background)."""
    w = labels.shape[1]
    nz = labels != 0
    starts = nz.copy()
    starts[:, 1:] &= labels[:, 1:] != labels[:, :-1]
    ends = nz
    ends[:, :-1] &= labels[:, :-1] != labels[:, 1:]
    first = np.flatnonzero(starts)  # flat indices: several times faster than 2-D nonzero
    last = np.flatnonzero(ends)  # one end per start, in the same raster order
    y = first // w
    return Runs(labels.ravel()[first], y, first - y * w, last - y * w + 1)


# ----------------------------------------------------------------------------- one block's pieces


@dataclass(frozen=True)
class Faces:
    """The local labels along a block's four sides (its first/last row and column)."""

    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray) -> Faces:
        return cls(labels[0].copy(), labels[-1].copy(), labels[:, 0].copy(), labels[:, -1].copy())


def first_pixels(runs: Runs, n: int, box: Box, width: int) -> np.ndarray:
    """The global raster index (``y * width + x``) of the first pixel of each local label 1..n.

    Within a block, raster order is global raster order, so a piece's first run is where its
    global first pixel lies; the first pixel of an object is the least over its pieces.
    """
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    if len(runs):
        ids, at = np.unique(runs.label, return_index=True)
        first[ids.astype(np.int64) - 1] = (runs.y[at] + box.y0) * width + runs.x0[at] + box.x0
    return first


def touching_edges(labels: np.ndarray, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """Local labels (unique, sorted) with a pixel on the image's outer edge."""
    edges = []
    if box.y0 == 0:
        edges.append(labels[0])
    if box.y1 == shape[0]:
        edges.append(labels[-1])
    if box.x0 == 0:
        edges.append(labels[:, 0])
    if box.x1 == shape[1]:
        edges.append(labels[:, -1])
    if not edges:
        return np.zeros(0, dtype=np.int64)
    found = np.unique(np.concatenate(edges)).astype(np.int64)
    return found[found > 0]


# ---------------------------------------------------------------------------------- resolution


def face_pairs(
    grid: BlockGrid, counts: Sequence[int], faces: Sequence[Faces], connectivity: Connectivity
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of global piece indices (0-based) that touch across block borders.

    ``counts`` and ``faces`` are per block in row-major order; piece ``j`` of block ``k`` has the
    global index ``offsets[k] + j - 1``.
    """
    ny, nx = grid.counts
    offsets = piece_offsets(counts)

    def glob(k: int, face: np.ndarray) -> np.ndarray:
        f = face.astype(np.int64)
        return np.where(f > 0, f + (offsets[k] - 1), -1)

    a_parts: list[np.ndarray] = []
    b_parts: list[np.ndarray] = []

    def add(one: np.ndarray, two: np.ndarray) -> None:
        shifts = [(slice(None), slice(None))]
        if connectivity == 2:
            shifts += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))]
        for s1, s2 in shifts:
            a, b = one[s1], two[s2]
            keep = (a >= 0) & (b >= 0)
            a_parts.append(a[keep])
            b_parts.append(b[keep])

    for bx in range(1, nx):  # vertical borders: whole columns X-1 | X through every block row
        left = np.concatenate([glob(by * nx + bx - 1, faces[by * nx + bx - 1].right) for by in range(ny)])
        right = np.concatenate([glob(by * nx + bx, faces[by * nx + bx].left) for by in range(ny)])
        add(left, right)
    for by in range(1, ny):  # horizontal borders: whole rows Y-1 / Y through every block column
        top = np.concatenate([glob((by - 1) * nx + bx, faces[(by - 1) * nx + bx].bottom) for bx in range(nx)])
        bottom = np.concatenate([glob(by * nx + bx, faces[by * nx + bx].top) for bx in range(nx)])
        add(top, bottom)
    if not a_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a_parts), np.concatenate(b_parts)


def piece_offsets(counts: Sequence[int]) -> np.ndarray:
    """Start of each block's pieces in the global piece list (row-major blocks), plus the total."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For ``n`` nodes joined by edges ``a[i] – b[i]``: a component index per node.

    A vectorized union-find: only the nodes on some edge enter a sparse connected-components call;
    every other node is its own component.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    comp = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return comp
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    m = len(nodes)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (inv[: len(a)], inv[len(a) :])), shape=(m, m))
    _, lab = connected_components(graph, directed=False)
    # name each joined component by its smallest node, so components stay node indices
    rep = np.full(lab.max() + 1, n, dtype=np.int64)
    np.minimum.at(rep, lab, nodes)
    comp[nodes] = rep[lab]
    return comp


def resolve(
    grid: BlockGrid, counts: Sequence[int], faces: Sequence[Faces], first: np.ndarray, connectivity: Connectivity
) -> np.ndarray:
    """The object index (0-based, in raster order of the objects' first pixels) of every piece.

    ``first``: each piece's global raster index of its first pixel (:func:`first_pixels`,
    concatenated in row-major block order).
    """
    a, b = face_pairs(grid, counts, faces, connectivity)
    comp = components(len(first), a, b)
    # An object's first pixel is the least of its pieces'; distinct objects have distinct ones.
    key = np.full(len(first), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(key, comp, first)
    _, obj = np.unique(key[comp], return_inverse=True)
    return obj.astype(np.int64)


def renumber(obj: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Final ids (1.., raster order kept; 0 for dropped objects) of each piece, given the object
    index of each piece and which objects are kept (e.g. large enough)."""
    ids = np.cumsum(keep, dtype=np.int64) * keep
    return ids[obj]


def holes_of(grid: BlockGrid, counts: Sequence[int], faces: Sequence[Faces], on_edge: np.ndarray, connectivity: Connectivity) -> np.ndarray:
    """For background pieces: True where the piece's component never reaches the image edge (a hole)."""
    a, b = face_pairs(grid, counts, faces, connectivity)
    comp = components(int(np.sum(counts)), a, b)
    open_ = np.zeros(len(comp), dtype=bool)
    open_[comp[on_edge]] = True
    return ~open_[comp]
