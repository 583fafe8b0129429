"""Objects of a stack of sections, (z, y, x), block by block, exactly as if the whole volume were labelled at once.

The 2-D machinery (:mod:`.label`) joins pieces along whole block borders kept in the reduction;
in 3-D a border is a plane through the whole volume, so that would grow with the volume. Here
the reduction keeps only *pairs*:

- a block labels its own voxels (``scipy.ndimage.label``, raster order of first voxels) into
  pieces and keeps its six faces (its first and last layer along z, y and x: planes of the block,
  saved with its record);
- a *pairs* task per block reads its faces and those of its lower neighbours (the 13 of the 26
  that come before it in (z, y, x) order: each pair of blocks is met once) and returns the
  distinct pairs of pieces that touch under the connectivity, a few per object on a face;
- the reduction joins them (:func:`tilefeet.objects.label.components`) and numbers the objects in
  raster order of their first voxel, as ``skimage.measure.label`` and ``cc3d`` do.

So memory is one block (plus its neighbours' faces) per task, and O(pieces) in the reduction.

Which neighbour blocks a voxel pair can cross::

      δ = (0, 0, −1)  face   shares a plane       pairs: the two facing planes, shifted in (z, y)
      δ = (0, −1, −1) edge   shares a line        pairs: two lines of those planes, shifted in z
      δ = (−1, −1, −1) corner shares a point      pairs: one voxel each (26-connectivity only)

A pair of voxels (u in block B, v in block N) has v − u = s, an offset of the structure; along
an axis where B and N differ, s equals their difference δ; along the others u and v run over the
same extent (the blocks share it), shifted by s. The regions are slices of the face planes.

Connectivity (``structure``): objects are 6-, 18- or 26-connected (scikit-image's
``connectivity`` 1, 2, 3); a *section* structure (no z offsets) labels each section on its own,
which is how holes are filled per section (:func:`section_structure`).

Measurements (:class:`VolumeSums`) are per-piece partial sums combined exactly per object, as in
:mod:`.measure`: voxel count, mean position and central second moments (parallel-axis rule),
bounding box, exposed voxel faces per axis (the surface), and the probability's sum and maximum.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .label import runs_of

Triple = tuple[int, int, int]
AXES = ("z", "y", "x")
#: scikit-image's ``connectivity`` of each face connectivity of 3-D objects
SKIMAGE_CONNECTIVITY = {6: 1, 18: 2, 26: 3}


# ------------------------------------------------------------------------------ boxes and blocks


@dataclass(frozen=True)
class VBox:
    """A half-open box ``[start, stop)`` in voxels, (z, y, x)."""

    start: Triple
    stop: Triple

    @property
    def shape(self) -> Triple:
        return tuple(max(0, b - a) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def empty(self) -> bool:
        return min(self.shape) == 0

    def grow(self, by: Triple) -> VBox:
        return VBox(tuple(a - h for a, h in zip(self.start, by)), tuple(b + h for b, h in zip(self.stop, by)))  # type: ignore[arg-type]

    def intersect(self, other: VBox) -> VBox:
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        return VBox(start, tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop)))  # type: ignore[arg-type]

    def relative_to(self, outer: VBox) -> tuple[slice, slice, slice]:
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, outer.start))  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeGrid:
    """Blocks of a volume: a regular (z, y, x) grid of ``block``-sized boxes, clipped at the end."""

    shape: Triple
    block: Triple

    @property
    def counts(self) -> Triple:
        return tuple(-(-n // b) for n, b in zip(self.shape, self.block))  # type: ignore[return-value]

    def __len__(self) -> int:
        return math.prod(self.counts)

    def __iter__(self) -> Iterator[Triple]:
        return iter(itertools.product(*(range(c) for c in self.counts)))  # type: ignore[arg-type]

    def flat(self, index: Triple) -> int:
        """Row-major position of block ``index`` (the order of records and piece offsets)."""
        _, cy, cx = self.counts
        return (index[0] * cy + index[1]) * cx + index[2]

    def box(self, index: Triple) -> VBox:
        start = tuple(i * b for i, b in zip(index, self.block))
        return VBox(start, tuple(min(s + b, n) for s, b, n in zip(start, self.block, self.shape)))  # type: ignore[arg-type]

    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Dask-style chunk sizes per axis."""
        return tuple(tuple(min(b, n - i) for i in range(0, n, b)) for n, b in zip(self.shape, self.block))


# ------------------------------------------------------------------------------------ structures


def structure(connectivity: int) -> np.ndarray:
    """The 3×3×3 structure of 6-, 18- or 26-connected objects."""
    from scipy import ndimage as ndi

    if connectivity not in SKIMAGE_CONNECTIVITY:
        raise ValueError(f"3-D connectivity is 6, 18 or 26, got {connectivity}")
    return ndi.generate_binary_structure(3, SKIMAGE_CONNECTIVITY[connectivity])


def section_structure(connectivity_2d: int) -> np.ndarray:
    """A structure that joins voxels within a section only (4- or 8-connected there): labelling
    with it labels every section on its own."""
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = np.ones((3, 3), bool) if connectivity_2d == 8 else np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    return s


def in_plane(connectivity: int) -> int:
    """The connectivity within one section of 3-D objects (6 → 4; 18, 26 → 8)."""
    return 4 if connectivity == 6 else 8


def offsets(struct: np.ndarray) -> list[Triple]:
    """The non-zero offsets of a structure."""
    return [tuple(int(v) - 1 for v in i) for i in zip(*np.nonzero(struct)) if any(v != 1 for v in i)]  # type: ignore[misc]


def label_block(mask: np.ndarray, struct: np.ndarray) -> tuple[np.ndarray, int]:
    """Local labels (int32, 1..n in raster order of first voxels, 0 = background) of one block."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask, structure=struct)
    return labels, int(n)


# ------------------------------------------------------------------------------------ faces, pairs


def faces_of(labels: np.ndarray) -> dict[str, np.ndarray]:
    """A block's six faces: ``z0`` its first section, ``z1`` its last, and so on for y and x."""
    out = {}
    for d, name in enumerate(AXES):
        out[f"{name}0"] = np.ascontiguousarray(np.take(labels, 0, axis=d))
        out[f"{name}1"] = np.ascontiguousarray(np.take(labels, -1, axis=d))
    return out


def lower_neighbours(struct: np.ndarray) -> list[Triple]:
    """Block offsets δ before a block in (z, y, x) order that a structure offset can cross."""
    offs = offsets(struct)
    out = []
    for delta in itertools.product((-1, 0, 1), repeat=3):
        if delta >= (0, 0, 0):
            continue
        if any(all(s[d] == delta[d] for d in range(3) if delta[d]) for s in offs):
            out.append(delta)
    return out  # type: ignore[return-value]


def _region(faces: Callable[[str], np.ndarray], delta: Triple, near: bool) -> np.ndarray:
    """The voxels of a block that face its neighbour at ``delta`` (``near``: the block itself; else
    the neighbour, seen from the other side), as a 3-D array with size 1 along the axes of δ."""
    nonzero = [d for d in range(3) if delta[d]]
    first = nonzero[0]
    last_side = (delta[first] > 0) == near  # the block's last layer faces a neighbour after it
    plane = faces(f"{AXES[first]}{1 if last_side else 0}")
    region = np.expand_dims(plane, first)
    for d in nonzero[1:]:
        last_side = (delta[d] > 0) == near
        index = region.shape[d] - 1 if last_side else 0
        region = np.take(region, [index], axis=d)
    return region


def block_pairs(faces: Callable[[Triple, str], np.ndarray], grid: VolumeGrid, index: Triple, struct: np.ndarray) -> dict[str, np.ndarray]:
    """The distinct pairs of pieces of block ``index`` and of its lower neighbours that touch.

    ``faces(block_index, name)``: a face plane of a block (:func:`faces_of`). Returns ``a`` (local
    labels here), ``block`` (the neighbour's row-major position) and ``b`` (its local labels).
    """
    offs = offsets(struct)
    a_parts, k_parts, b_parts = [], [], []
    for delta in lower_neighbours(struct):
        other = tuple(i + d for i, d in zip(index, delta))
        if any(o < 0 or o >= c for o, c in zip(other, grid.counts)):
            continue
        mine = _region(lambda name: faces(index, name), delta, near=True)
        theirs = _region(lambda name, other=other: faces(other, name), delta, near=False)  # type: ignore[misc]
        found = []
        for s in offs:
            if any(s[d] != delta[d] for d in range(3) if delta[d]):
                continue
            sa, sb = [], []
            for d in range(3):
                if delta[d]:
                    sa.append(slice(None))
                    sb.append(slice(None))
                else:
                    n = mine.shape[d]
                    sa.append(slice(max(0, -s[d]), n - max(0, s[d])))
                    sb.append(slice(max(0, s[d]), n - max(0, -s[d])))
            a, b = mine[tuple(sa)].ravel(), theirs[tuple(sb)].ravel()
            keep = (a > 0) & (b > 0)
            if keep.any():
                found.append(np.stack([a[keep], b[keep]]).astype(np.int64))
        if found:
            pairs = np.unique(np.concatenate(found, axis=1), axis=1)
            a_parts.append(pairs[0])
            b_parts.append(pairs[1])
            k_parts.append(np.full(pairs.shape[1], grid.flat(other), np.int64))  # type: ignore[arg-type]
    empty = np.zeros(0, np.int64)
    return {"a": np.concatenate(a_parts) if a_parts else empty, "block": np.concatenate(k_parts) if k_parts else empty,
            "b": np.concatenate(b_parts) if b_parts else empty}


def global_pairs(pairs: Sequence[dict[str, np.ndarray]], offsets_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of global piece indices (0-based) from every block's :func:`block_pairs` (row-major)."""
    a = [p["a"] + offsets_[k] - 1 for k, p in enumerate(pairs) if len(p["a"])]
    b = [p["b"] + offsets_[p["block"]] - 1 for p in pairs if len(p["b"])]
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a), np.concatenate(b)


def first_voxels(runs: Any, n: int, box: VBox, shape: Triple) -> np.ndarray:
    """The global raster index (``(z·H + y)·W + x``) of each local label's first voxel (1..n);
    ``runs`` are those of the block's labels seen as (z·h + y, x) rows."""
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    if len(runs):
        h = box.shape[1]
        ids, at = np.unique(runs.label, return_index=True)
        z, y = np.divmod(runs.y[at], h)
        first[ids.astype(np.int64) - 1] = ((z + box.start[0]) * shape[1] + y + box.start[1]) * shape[2] + runs.x0[at] + box.start[2]
    return first


def lateral_edge(labels: np.ndarray, box: VBox, shape: Triple) -> np.ndarray:
    """Local labels (unique) with a voxel on the volume's y or x edge (each section's image edge)."""
    edges = []
    if box.start[1] == 0:
        edges.append(labels[:, 0].ravel())
    if box.stop[1] == shape[1]:
        edges.append(labels[:, -1].ravel())
    if box.start[2] == 0:
        edges.append(labels[:, :, 0].ravel())
    if box.stop[2] == shape[2]:
        edges.append(labels[:, :, -1].ravel())
    if not edges:
        return np.zeros(0, np.int64)
    found = np.unique(np.concatenate(edges)).astype(np.int64)
    return found[found > 0]


# ---------------------------------------------------------------------------------- partial sums


@dataclass(frozen=True)
class VolumeSums:
    """Sums over the voxels of some pieces (one row each). Positions are global voxel indices;
    moments are central (about the piece's own mean), in the order zz, zy, zx, yy, yx, xx."""

    ids: np.ndarray  #: the pieces' labels (int64)
    count: np.ndarray  #: voxels (int64)
    mean: np.ndarray  #: (n, 3) mean z, y, x (float64)
    m2: np.ndarray  #: (n, 6) central second moments (float64)
    lo: np.ndarray  #: (n, 3) bounding box, first z, y, x (int64)
    hi: np.ndarray  #: (n, 3) one past the last
    faces: np.ndarray  #: (n, 3) exposed voxel faces normal to z, y, x (int64)
    prob_sum: np.ndarray  #: Σ probability as stored (int64 for integer dtypes, else float64)
    prob_max: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def concat(cls, parts: Sequence[VolumeSums], prob_dtype: Any) -> VolumeSums:
        if not parts:
            return cls.empty(prob_dtype)
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    @classmethod
    def empty(cls, prob_dtype: Any) -> VolumeSums:
        z = np.zeros(0, np.int64)
        sum_dtype = np.int64 if np.dtype(prob_dtype).kind in "uib" else np.float64
        return cls(z, z, np.zeros((0, 3)), np.zeros((0, 6)), np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64),
                   np.zeros((0, 3), np.int64), np.zeros(0, sum_dtype), np.zeros(0, prob_dtype))


_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def block_sums(labels: np.ndarray, n: int, box: VBox, prob: np.ndarray, window: np.ndarray, *, runs: Any = None) -> VolumeSums:
    """Partial sums of the pieces 1..n of one block. ``window``: the block's mask with one voxel
    around it (False outside the volume): a face of a voxel is exposed where its neighbour across
    it is not in the mask (a neighbour in the mask is in the same object, for any connectivity)."""
    if n == 0:
        return VolumeSums.empty(prob.dtype)
    d, h, w = labels.shape
    runs = runs_of(labels.reshape(d * h, w)) if runs is None else runs
    inv = runs.label.astype(np.int64) - 1
    lf = runs.length.astype(np.float64)
    count = np.bincount(inv, weights=lf, minlength=n)
    z, y = np.divmod(runs.y, h)
    pos = [z.astype(np.float64), y.astype(np.float64), (runs.x0 + runs.x1 - 1) * 0.5]
    mean = np.stack([np.bincount(inv, weights=lf * p, minlength=n) / count for p in pos], axis=1)
    dev = [p - mean[inv, i] for i, p in enumerate(pos)]
    m2 = np.stack([np.bincount(inv, weights=lf * dev[i] * dev[j], minlength=n) for i, j in _PAIRS], axis=1)
    m2[:, 5] += np.bincount(inv, weights=lf * (lf * lf - 1) / 12, minlength=n)  # Σ (x − cx)² within runs
    lo = np.full((n, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((n, 3), np.int64)
    for i, (a, b) in enumerate(((z, z + 1), (y, y + 1), (runs.x0, runs.x1))):
        np.minimum.at(lo[:, i], inv, a)
        np.maximum.at(hi[:, i], inv, b)
    faces = np.zeros((n, 3), np.int64)
    core = window[1:-1, 1:-1, 1:-1]
    for axis in range(3):
        for side in (0, 2):
            sl = [slice(1, -1)] * 3
            sl[axis] = slice(side, side + labels.shape[axis])
            exposed = core & ~window[tuple(sl)]
            faces[:, axis] += np.bincount(labels[exposed], minlength=n + 1)[1:]
    fg = labels.ravel() != 0
    lab = labels.ravel()[fg].astype(np.int64) - 1
    values = np.ascontiguousarray(prob).ravel()[fg]
    integer = values.dtype.kind in "uib"
    prob_sum = np.bincount(lab, weights=values.astype(np.float64), minlength=n)
    prob_sum = np.round(prob_sum).astype(np.int64) if integer else prob_sum
    prob_max = np.full(n, _lowest(values.dtype), values.dtype)
    np.maximum.at(prob_max, lab, values)
    origin = np.asarray(box.start, np.int64)
    return VolumeSums(
        ids=np.arange(1, n + 1, dtype=np.int64), count=np.round(count).astype(np.int64), mean=mean + origin, m2=m2,
        lo=lo + origin, hi=hi + origin, faces=faces, prob_sum=prob_sum, prob_max=prob_max,
    )


def _lowest(dtype: Any) -> Any:
    dtype = np.dtype(dtype)
    return np.iinfo(dtype).min if dtype.kind in "ui" else (False if dtype.kind == "b" else -np.inf)


def combine(parts: VolumeSums, obj: np.ndarray, n: int) -> VolumeSums:
    """Sums of ``n`` objects from pieces, piece ``i`` belonging to object ``obj[i]`` (0-based;
    negative: dropped). Object ``j``'s row has ``ids[j] = j + 1``."""
    keep = obj >= 0
    if not keep.all():
        parts = VolumeSums(**{k: v[keep] for k, v in parts.arrays().items()})
        obj = obj[keep]
    cnt = np.bincount(obj, weights=parts.count.astype(np.float64), minlength=n)
    safe = np.maximum(cnt, 1)
    mean = np.stack([np.bincount(obj, weights=parts.count * parts.mean[:, i], minlength=n) / safe for i in range(3)], axis=1)
    dev = parts.mean - mean[obj]
    m2 = np.stack([np.bincount(obj, weights=parts.m2[:, k] + parts.count * dev[:, i] * dev[:, j], minlength=n)
                   for k, (i, j) in enumerate(_PAIRS)], axis=1)
    lo = np.full((n, 3), np.iinfo(np.int64).max, np.int64)
    hi = np.zeros((n, 3), np.int64)
    np.minimum.at(lo, obj, parts.lo)
    np.maximum.at(hi, obj, parts.hi)
    faces = np.zeros((n, 3), np.int64)
    np.add.at(faces, obj, parts.faces)
    prob_sum = np.zeros(n, parts.prob_sum.dtype)
    np.add.at(prob_sum, obj, parts.prob_sum)
    prob_max = np.full(n, _lowest(parts.prob_max.dtype), parts.prob_max.dtype)
    np.maximum.at(prob_max, obj, parts.prob_max)
    return VolumeSums(np.arange(1, n + 1, dtype=np.int64), np.round(cnt).astype(np.int64), mean, m2, lo, hi, faces, prob_sum, prob_max)


# ----------------------------------------------------------------------------------------- table

TABLE_COLUMNS_3D: tuple[str, ...] = (
    "id", "class", "volume_voxels", "volume_nm3", "surface_area_nm2", "centroid_z_nm", "centroid_y_nm", "centroid_x_nm",
    "bbox_z0_px", "bbox_y0_px", "bbox_x0_px", "bbox_z1_px", "bbox_y1_px", "bbox_x1_px",
    "bbox_z0_nm", "bbox_y0_nm", "bbox_x0_nm", "bbox_z1_nm", "bbox_y1_nm", "bbox_x1_nm",
    "z_sections", "z_extent_nm", "equivalent_diameter_nm", "major_axis_nm", "minor_axis_nm",
    "mean_probability", "max_probability", "touches_border",
)  # fmt: skip


def table(sums: VolumeSums, *, class_name: str, spacing_nm: tuple[float, float, float], origin_nm: tuple[float, float, float],
          shape: Triple, prob_scale: float, id_dtype: Any = np.uint32) -> Any:
    """The measurements table of 3-D objects (a pandas DataFrame, :data:`TABLE_COLUMNS_3D`), in
    scikit-image's ``regionprops`` numbers with ``spacing=(dz, py, px)``; see :mod:`tilefeet.objects`."""
    import pandas as pd

    sp = np.asarray(spacing_nm, np.float64)
    org = np.asarray(origin_nm, np.float64)
    n = sums.count.astype(np.float64)
    volume = n * float(np.prod(sp))
    face_area = np.array([sp[1] * sp[2], sp[0] * sp[2], sp[0] * sp[1]])
    # inertia tensor in nm² (scikit-image's): T_ii = Σ_{j≠i} C_jj, T_ij = −C_ij, C the covariance
    cov = np.zeros((len(n), 3, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        for k, (i, j) in enumerate(_PAIRS):
            cov[:, i, j] = cov[:, j, i] = sums.m2[:, k] * sp[i] * sp[j] / n
    trace = np.trace(cov, axis1=1, axis2=2)
    inertia = trace[:, None, None] * np.eye(3) - cov
    ev = np.sort(np.linalg.eigvalsh(inertia), axis=1)[:, ::-1] if len(n) else np.zeros((0, 3))
    major = np.sqrt(np.clip(10 * (ev[:, 0] + ev[:, 1] - ev[:, 2]), 0, None))
    minor = np.sqrt(np.clip(10 * (-ev[:, 0] + ev[:, 1] + ev[:, 2]), 0, None))
    lo, hi = sums.lo, sums.hi
    columns: dict[str, Any] = {
        "id": sums.ids.astype(id_dtype),
        "class": pd.Categorical([class_name] * len(n)),
        "volume_voxels": sums.count,
        "volume_nm3": volume,
        "surface_area_nm2": sums.faces.astype(np.float64) @ face_area,
    }
    for i, a in enumerate(AXES):
        columns[f"centroid_{a}_nm"] = org[i] + sums.mean[:, i] * sp[i]
    for i, a in enumerate(AXES):
        columns[f"bbox_{a}0_px"] = lo[:, i]
    for i, a in enumerate(AXES):
        columns[f"bbox_{a}1_px"] = hi[:, i]
    for i, a in enumerate(AXES):
        columns[f"bbox_{a}0_nm"] = org[i] + (lo[:, i] - 0.5) * sp[i]
    for i, a in enumerate(AXES):
        columns[f"bbox_{a}1_nm"] = org[i] + (hi[:, i] - 0.5) * sp[i]
    columns.update({
        "z_sections": hi[:, 0] - lo[:, 0],
        "z_extent_nm": (hi[:, 0] - lo[:, 0]) * sp[0],
        "equivalent_diameter_nm": np.cbrt(6 * volume / math.pi),
        "major_axis_nm": major,
        "minor_axis_nm": minor,
        "mean_probability": sums.prob_sum / np.maximum(n, 1) / prob_scale,
        "max_probability": sums.prob_max.astype(np.float64) / prob_scale,
        "touches_border": (lo == 0).any(axis=1) | (hi == np.asarray(shape)).any(axis=1),
    })
    return pd.DataFrame(columns, columns=list(TABLE_COLUMNS_3D))


# ----------------------------------------------------------------------------- passes of one block


def holes_block(mask: np.ndarray, box: VBox, shape: Triple, background: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Background pieces of one block, each section on its own (``background``: a section
    structure), and which reach the section's edge: (record, faces)."""
    labels, n = label_block(~mask, background)
    return {"n": np.array(n), "on_edge": lateral_edge(labels, box, shape)}, faces_of(labels)


def fill_block(mask: np.ndarray, holes: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled; ``holes`` says, per background piece of this block, if it is one."""
    labels, n = label_block(~mask, background)
    lut = np.concatenate([[False], holes[:n].astype(bool)])
    return mask | lut[labels]


def pieces_block(window: np.ndarray, box: VBox, shape: Triple, struct: np.ndarray, prob: np.ndarray | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pieces of one block (``window``: its mask with one voxel around it, False off the volume):
    (record, faces). The record has each piece's first voxel, voxel count and sections (first,
    one past the last), and with ``prob`` the partial sums (``s_*``)."""
    mask = window[1:-1, 1:-1, 1:-1]
    labels, n = label_block(mask, struct)
    d, h, w = labels.shape
    runs = runs_of(labels.reshape(d * h, w))
    inv = runs.label.astype(np.int64) - 1
    z = runs.y // h
    record: dict[str, np.ndarray] = {
        "n": np.array(n), "first": first_voxels(runs, n, box, shape),
        "count": np.bincount(inv, weights=runs.length, minlength=n).round().astype(np.int64),
    }
    zlo, zhi = np.full(n, np.iinfo(np.int64).max, np.int64), np.zeros(n, np.int64)
    np.minimum.at(zlo, inv, z + box.start[0])
    np.maximum.at(zhi, inv, z + box.start[0] + 1)
    record["zlo"], record["zhi"] = zlo, zhi
    if prob is not None:
        sums = block_sums(labels, n, box, prob, window, runs=runs)
        record.update({f"s_{k}": v for k, v in sums.arrays().items()})
    return record, faces_of(labels)


def relabel_block(mask: np.ndarray, final: np.ndarray, struct: np.ndarray, dtype: Any) -> np.ndarray:
    """The block's final ids: its pieces (labelled again, the same way) through their final ids."""
    labels, n = label_block(mask, struct)
    lut = np.zeros(n + 1, dtype=dtype)
    lut[1:] = final[:n]
    out = np.zeros(mask.shape, dtype=dtype)
    inside = np.flatnonzero(mask)
    out.ravel()[inside] = lut[labels.ravel()[inside]]
    return out


def sums_of(record: Any) -> VolumeSums | None:
    keys = set(record.keys()) if hasattr(record, "keys") else set(record)
    if "s_ids" not in keys:
        return None
    return VolumeSums(**{k[2:]: np.asarray(record[k]) for k in keys if k.startswith("s_")})


# ------------------------------------------------------------------------------------ reductions


def piece_offsets(counts: Sequence[int]) -> np.ndarray:
    """Start of each block's pieces in the global piece list (row-major blocks), plus the total."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def resolve_holes(counts: Sequence[int], on_edge: Sequence[np.ndarray], pairs: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per background piece (global order), whether it is a hole; and each block's offset."""
    from .label import components

    offs = piece_offsets(counts)
    a, b = global_pairs(pairs, offs)
    comp = components(int(offs[-1]), a, b)
    edge = np.concatenate([e.astype(np.int64) - 1 + offs[k] for k, e in enumerate(on_edge) if len(e)] or [np.zeros(0, np.int64)])
    open_ = np.zeros(len(comp), dtype=bool)
    open_[comp[edge]] = True
    return ~open_[comp], offs


@dataclass(frozen=True)
class Resolution:
    """Every piece's final id (0: dropped), per-block offsets into it, and the objects' sums."""

    final: np.ndarray  #: int64, one per piece, in row-major block order
    offsets: np.ndarray  #: block k's pieces are final[offsets[k]:offsets[k+1]]
    n_objects: int
    sums: VolumeSums | None  #: combined, one row per object (ids 1..n_objects), when measured

    def block(self, k: int) -> np.ndarray:
        return self.final[self.offsets[k] : self.offsets[k + 1]]


def resolve_pieces(records: Sequence[Any], pairs: Sequence[dict[str, np.ndarray]], keep: Callable[[np.ndarray, np.ndarray], Any],
                   prob_dtype: Any = np.uint8) -> Resolution:
    """Join pieces across blocks, number objects in raster order of first voxels, drop those
    ``keep(voxels, sections)`` rejects, and combine the partial sums of the rest."""
    from .label import components, renumber

    counts = [int(r["n"]) for r in records]
    offs = piece_offsets(counts)
    cat = {k: np.concatenate([np.asarray(r[k]) for r in records] or [np.zeros(0, np.int64)]) for k in ("first", "count", "zlo", "zhi")}
    a, b = global_pairs(pairs, offs)
    comp = components(int(offs[-1]), a, b)
    key = np.full(len(comp), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(key, comp, cat["first"])
    _, obj = np.unique(key[comp], return_inverse=True)
    obj = obj.astype(np.int64).ravel()
    n_all = int(obj.max()) + 1 if len(obj) else 0
    voxels = np.bincount(obj, weights=cat["count"].astype(np.float64), minlength=n_all).round().astype(np.int64)
    zlo, zhi = np.full(n_all, np.iinfo(np.int64).max, np.int64), np.zeros(n_all, np.int64)
    np.minimum.at(zlo, obj, cat["zlo"])
    np.maximum.at(zhi, obj, cat["zhi"])
    kept = np.asarray(keep(voxels, zhi - zlo), dtype=bool)
    final = renumber(obj, kept)
    n = int(kept.sum())
    sums = None
    parts = [sums_of(r) for r in records]
    if records and all(p is not None for p in parts):
        sums = combine(VolumeSums.concat([p for p in parts if p is not None], prob_dtype), final - 1, n)
    return Resolution(final, offs, n, sums)
