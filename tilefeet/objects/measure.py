"""Measurements of objects from per-block partial sums, combined exactly per object.

A block measures each of its pieces (:func:`block_sums`): pixel count, mean position and central
second moments, bounding box, a perimeter as counts of border-pixel classes, and the sum and
maximum of the probability. Pieces of one object are combined (:func:`combine`) without ever
gathering its pixels: counts, boxes and extrema combine trivially, moments by the parallel-axis
rule (Chan et al.), so no sum of squared global coordinates (which loses precision on large
sections) is ever formed. The table then has one row per object (:func:`table`), in the same
numbers as ``skimage.measure.regionprops_table`` on the whole image (within float rounding):

=========================  ===========================================================================
column                     definition (as scikit-image's, with the pixel size as ``spacing``)
=========================  ===========================================================================
id, class                  the object's id in the label image; the class (or ``cell``)
area_px, area_nm2          pixel count; times the pixel area
centroid_y/x_nm            mean position of the pixel centres (pixel ``i`` is at origin + i·pixel)
bbox_y0/x0/y1/x1_px        ``regionprops`` ``bbox``: first row/column and one past the last
bbox_y0/x0/y1/x1_nm        the same box's outer edges in nm (pixel edges, half a pixel out)
perimeter_nm               ``skimage.measure.perimeter(object, 4)`` × pixel size (NaN when the
                           pixels are not square: scikit-image defines it for isotropic pixels only)
equivalent_diameter_nm     diameter of the disc of the same area
major/minor_axis_nm        4·sqrt of the inertia tensor's eigenvalues (axes of the same-moment ellipse)
eccentricity               sqrt(1 − λ2/λ1)
orientation_rad            angle between the rows axis and the major axis, in (−π/2, π/2]
mean/max_probability       of the class probability over the object (0..1)
touches_border             the object has a pixel on the section's outer edge (it may be cut)
=========================  ===========================================================================

The perimeter is scikit-image's local 3×3 estimator: a pixel of object k is a border pixel when a
4-neighbour is not in k (outside the image counts as not in k); each border pixel then weighs
1, √2 or (1+√2)/2 by how many of its 4- and diagonal neighbours are border pixels *of k*. So it
needs a halo of 2 pixels around the block, and "of k" means "the same label" (for 8-connected
objects, any foreground pixel in the 3×3 neighbourhood is of the same object).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .label import Runs, runs_of

PERIMETER_HALO = 2  #: pixels around a block that its perimeter terms depend on

#: perimeter weights of the three border-pixel classes (scikit-image's codes 5/7/15/17/25/27, 21/33, 13/23)
PERIMETER_WEIGHTS = np.array([1.0, math.sqrt(2), (1 + math.sqrt(2)) / 2])


def _perimeter_class_table() -> np.ndarray:
    """Class (0 none, 1..3 by weight) of a border pixel with ``a`` border 4-neighbours and ``b``
    border diagonal neighbours: scikit-image's code ``1 + 2a + 10b`` looked up in its weights."""
    by_code = {5: 1, 7: 1, 15: 1, 17: 1, 25: 1, 27: 1, 21: 2, 33: 2, 13: 3, 23: 3}
    table = np.zeros((5, 5), dtype=np.int8)
    for a in range(5):
        for b in range(5):
            table[a, b] = by_code.get(1 + 2 * a + 10 * b, 0)
    return table


_CLASS = _perimeter_class_table()


def perimeter_classes(window: np.ndarray, halo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Border pixels of the core of ``window`` and their perimeter class (1..3; 0 omitted).

    ``window``: labels (0 = nothing) of the core plus ``halo`` ≥ 2 pixels on every side, 0
    outside the image. Returns core-relative rows, columns and classes.
    """
    if halo < PERIMETER_HALO:
        raise ValueError(f"the perimeter needs a halo of {PERIMETER_HALO} pixels, got {halo}")
    cut = halo - PERIMETER_HALO
    a = window[cut : window.shape[0] - cut, cut : window.shape[1] - cut]  # core + 2
    c = a[1:-1, 1:-1]  # core + 1
    border = (c != 0) & ((a[:-2, 1:-1] != c) | (a[2:, 1:-1] != c) | (a[1:-1, :-2] != c) | (a[1:-1, 2:] != c))
    flat = np.flatnonzero(border[1:-1, 1:-1])
    ys, xs = np.divmod(flat, border.shape[1] - 2)
    if len(ys) == 0:
        return ys, xs, np.zeros(0, np.int8)
    yy, xx = ys + 1, xs + 1  # in core + 1 coordinates
    own = c[yy, xx]
    n4 = np.zeros(len(ys), dtype=np.int64)
    nd = np.zeros(len(ys), dtype=np.int64)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        n4 += border[yy + dy, xx + dx] & (c[yy + dy, xx + dx] == own)
    for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        nd += border[yy + dy, xx + dx] & (c[yy + dy, xx + dx] == own)
    cls = _CLASS[n4, nd]
    keep = cls > 0
    return ys[keep], xs[keep], cls[keep]


# --------------------------------------------------------------------------------- partial sums


@dataclass(frozen=True)
class PartialSums:
    """Sums over the pixels of some pieces (one row each): what every measurement is made of.

    Positions are global pixel indices; moments are central (about the piece's own mean).
    """

    ids: np.ndarray  #: the pieces' labels (int64 or uint64)
    count: np.ndarray  #: pixels (int64)
    mean_y: np.ndarray  #: mean row (float64)
    mean_x: np.ndarray
    m2_yy: np.ndarray  #: Σ (y − mean_y)² (float64)
    m2_xy: np.ndarray
    m2_xx: np.ndarray
    y0: np.ndarray  #: bounding box, first row (int64)
    x0: np.ndarray
    y1: np.ndarray  #: one past the last row
    x1: np.ndarray
    perimeter: np.ndarray  #: (n, 3) int64 counts of border pixels per perimeter class
    prob_sum: np.ndarray  #: Σ probability as stored (int64 for integer dtypes, else float64)
    prob_max: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def concat(cls, parts: Sequence[PartialSums], prob_dtype: Any) -> PartialSums:
        if not parts:
            return cls.empty(prob_dtype)
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    @classmethod
    def empty(cls, prob_dtype: Any) -> PartialSums:
        z = np.zeros(0, np.int64)
        zf = np.zeros(0, np.float64)
        sum_dtype = np.int64 if np.dtype(prob_dtype).kind in "uib" else np.float64
        return cls(z, z, zf, zf, zf, zf, zf, z, z, z, z, np.zeros((0, 3), np.int64), np.zeros(0, sum_dtype), np.zeros(0, prob_dtype))


def block_sums(
    labels: np.ndarray, origin: tuple[int, int], prob: np.ndarray, window: np.ndarray, halo: int, *, runs: Runs | None = None
) -> PartialSums:
    """Partial sums of every label of one block.

    ``labels``: the block's labels (0 = nothing); ``origin``: its global (y, x); ``prob``: the
    class probability over the block as stored; ``window``: what decides "the same object" for the
    perimeter, over the block plus ``halo`` pixels (0 outside the image): the labels themselves,
    or for 8-connected objects simply the mask. ``runs``: the labels' runs, if already known.
    """
    runs = runs_of(labels) if runs is None else runs
    if not len(runs):
        return PartialSums.empty(prob.dtype)
    ids, inv = np.unique(runs.label, return_inverse=True)
    k = len(ids)
    length = runs.length
    lf = length.astype(np.float64)
    count = np.bincount(inv, weights=lf, minlength=k)
    cx = (runs.x0 + runs.x1 - 1) * 0.5  # a run's mean column
    mean_y = np.bincount(inv, weights=lf * runs.y, minlength=k) / count
    mean_x = np.bincount(inv, weights=lf * cx, minlength=k) / count
    dy = runs.y - mean_y[inv]
    dx = cx - mean_x[inv]
    # Σ over a run of (x − μ)² = L·(cx − μ)² + Σ (x − cx)², and Σ (x − cx)² over L consecutive integers = L(L² − 1)/12
    m2_yy = np.bincount(inv, weights=lf * dy * dy, minlength=k)
    m2_xy = np.bincount(inv, weights=lf * dy * dx, minlength=k)
    m2_xx = np.bincount(inv, weights=lf * dx * dx + lf * (lf * lf - 1) / 12, minlength=k)
    y0, x0, y1, x1 = _boxes(inv, k, runs.y, runs.x0, runs.y + 1, runs.x1)
    prob_sum, prob_max = _run_probabilities(runs, prob, inv, k)
    ys, xs, cls = perimeter_classes(window, halo)
    at = np.searchsorted(ids, labels[ys, xs])
    perimeter = np.bincount(at * 3 + (cls.astype(np.int64) - 1), minlength=3 * k).reshape(k, 3)
    oy, ox = origin
    return PartialSums(
        ids=ids, count=np.round(count).astype(np.int64), mean_y=mean_y + oy, mean_x=mean_x + ox,
        m2_yy=m2_yy, m2_xy=m2_xy, m2_xx=m2_xx, y0=y0 + oy, x0=x0 + ox, y1=y1 + oy, x1=x1 + ox,
        perimeter=perimeter.astype(np.int64), prob_sum=prob_sum, prob_max=prob_max,
    )


def _boxes(group: np.ndarray, n: int, y0: np.ndarray, x0: np.ndarray, y1: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, ...]:
    """Bounding boxes of ``n`` groups: least starts and greatest ends of their members' boxes."""
    out_y0, out_x0 = np.full(n, np.iinfo(np.int64).max, np.int64), np.full(n, np.iinfo(np.int64).max, np.int64)
    out_y1, out_x1 = np.zeros(n, np.int64), np.zeros(n, np.int64)
    np.minimum.at(out_y0, group, y0)
    np.minimum.at(out_x0, group, x0)
    np.maximum.at(out_y1, group, y1)
    np.maximum.at(out_x1, group, x1)
    return out_y0, out_x0, out_y1, out_x1


def _run_probabilities(runs: Runs, prob: np.ndarray, inv: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-label sum (exact integers for integer probabilities) and maximum of ``prob`` over the runs."""
    # the runs' pixels, in raster order, one run after the other: then each run is one reduceat segment
    flat = np.ascontiguousarray(prob).ravel()
    length = runs.length
    inside = np.repeat(runs.y * prob.shape[1] + runs.x0 - np.cumsum(length) + length, length) + np.arange(int(length.sum()))
    values = flat[inside]
    bounds = np.cumsum(length) - length
    integer = flat.dtype.kind in "uib"
    run_sum = np.add.reduceat(values, bounds, dtype=np.int64 if integer else np.float64)
    run_max = np.maximum.reduceat(values, bounds)
    if integer:
        total = np.zeros(k, np.int64)
        np.add.at(total, inv, run_sum)
    else:
        total = np.bincount(inv, weights=run_sum, minlength=k)
    top = np.full(k, _lowest(flat.dtype), dtype=flat.dtype)
    np.maximum.at(top, inv, run_max)
    return total, top


def _lowest(dtype: Any) -> Any:
    dtype = np.dtype(dtype)
    return np.iinfo(dtype).min if dtype.kind in "ui" else (False if dtype.kind == "b" else -np.inf)


# -------------------------------------------------------------------------------- combination


def combine(parts: PartialSums, obj: np.ndarray, n: int) -> PartialSums:
    """Sums of ``n`` objects from pieces, piece ``i`` belonging to object ``obj[i]`` (0-based;
    negative: dropped). Object ``j``'s row has ``ids[j] = j + 1``."""
    keep = obj >= 0
    if not keep.all():
        parts = PartialSums(**{k: v[keep] for k, v in parts.arrays().items()})
        obj = obj[keep]
    cnt = np.bincount(obj, weights=parts.count.astype(np.float64), minlength=n)
    safe = np.maximum(cnt, 1)
    mean_y = np.bincount(obj, weights=parts.count * parts.mean_y, minlength=n) / safe
    mean_x = np.bincount(obj, weights=parts.count * parts.mean_x, minlength=n) / safe
    dy = parts.mean_y - mean_y[obj]
    dx = parts.mean_x - mean_x[obj]
    m2_yy = np.bincount(obj, weights=parts.m2_yy + parts.count * dy * dy, minlength=n)
    m2_xy = np.bincount(obj, weights=parts.m2_xy + parts.count * dy * dx, minlength=n)
    m2_xx = np.bincount(obj, weights=parts.m2_xx + parts.count * dx * dx, minlength=n)
    y0, x0, y1, x1 = _boxes(obj, n, parts.y0, parts.x0, parts.y1, parts.x1)
    perimeter = np.zeros((n, 3), np.int64)
    np.add.at(perimeter, obj, parts.perimeter)
    prob_sum = np.zeros(n, parts.prob_sum.dtype)
    np.add.at(prob_sum, obj, parts.prob_sum)
    prob_max = np.full(n, _lowest(parts.prob_max.dtype), parts.prob_max.dtype)
    np.maximum.at(prob_max, obj, parts.prob_max)
    return PartialSums(
        ids=np.arange(1, n + 1, dtype=np.int64), count=np.round(cnt).astype(np.int64), mean_y=mean_y, mean_x=mean_x,
        m2_yy=m2_yy, m2_xy=m2_xy, m2_xx=m2_xx, y0=y0, x0=x0, y1=y1, x1=x1, perimeter=perimeter,
        prob_sum=prob_sum, prob_max=prob_max,
    )


# ------------------------------------------------------------------------------------- table

TABLE_COLUMNS: tuple[str, ...] = (
    "id", "class", "area_px", "area_nm2", "centroid_y_nm", "centroid_x_nm",
    "bbox_y0_px", "bbox_x0_px", "bbox_y1_px", "bbox_x1_px", "bbox_y0_nm", "bbox_x0_nm", "bbox_y1_nm", "bbox_x1_nm",
    "perimeter_nm", "equivalent_diameter_nm", "major_axis_nm", "minor_axis_nm", "eccentricity", "orientation_rad",
    "mean_probability", "max_probability", "touches_border",
)  # fmt: skip


def table(
    sums: PartialSums,
    *,
    class_name: str,
    pixel_size_nm: tuple[float, float],
    origin_nm: tuple[float, float],
    shape: tuple[int, int],
    prob_scale: float,
    id_dtype: Any = np.uint32,
) -> Any:
    """The measurements table (a pandas DataFrame, one row per object, :data:`TABLE_COLUMNS`).

    ``prob_scale``: the stored value of probability 1 (255 for uint8 probabilities, else 1).
    """
    import pandas as pd

    py, px = pixel_size_nm
    oy, ox = origin_nm
    n = sums.count.astype(np.float64)
    area_nm2 = n * py * px
    # inertia tensor in nm² (scikit-image's, with spacing): [[mu_xx, -mu_xy], [-mu_xy, mu_yy]] / n
    with np.errstate(invalid="ignore", divide="ignore"):
        a = sums.m2_xx * px * px / n
        b = -sums.m2_xy * py * px / n
        c = sums.m2_yy * py * py / n
        half = np.sqrt(((a - c) / 2) ** 2 + b * b)
        l1 = np.clip((a + c) / 2 + half, 0, None)
        l2 = np.clip((a + c) / 2 - half, 0, None)
        ecc = np.where(l1 == 0, 0.0, np.sqrt(np.clip(1 - l2 / l1, 0, None)))
        orient = np.where(a - c == 0, np.where(b < 0, math.pi / 4, -math.pi / 4), 0.5 * np.arctan2(-2 * b, c - a))
    if math.isclose(py, px, rel_tol=1e-12):
        perim = (sums.perimeter.astype(np.float64) @ PERIMETER_WEIGHTS) * py
    else:  # scikit-image defines this perimeter for square pixels only
        perim = np.full(len(n), np.nan)
    h, w = shape
    columns = {
        "id": sums.ids.astype(id_dtype),
        "class": pd.Categorical([class_name] * len(n)),
        "area_px": sums.count,
        "area_nm2": area_nm2,
        "centroid_y_nm": oy + sums.mean_y * py,
        "centroid_x_nm": ox + sums.mean_x * px,
        "bbox_y0_px": sums.y0,
        "bbox_x0_px": sums.x0,
        "bbox_y1_px": sums.y1,
        "bbox_x1_px": sums.x1,
        "bbox_y0_nm": oy + (sums.y0 - 0.5) * py,
        "bbox_x0_nm": ox + (sums.x0 - 0.5) * px,
        "bbox_y1_nm": oy + (sums.y1 - 0.5) * py,
        "bbox_x1_nm": ox + (sums.x1 - 0.5) * px,
        "perimeter_nm": perim,
        "equivalent_diameter_nm": np.sqrt(4 * area_nm2 / math.pi),
        "major_axis_nm": 4 * np.sqrt(l1),
        "minor_axis_nm": 4 * np.sqrt(l2),
        "eccentricity": ecc,
        "orientation_rad": orient,
        "mean_probability": sums.prob_sum / np.maximum(n, 1) / prob_scale,
        "max_probability": sums.prob_max.astype(np.float64) / prob_scale,
        "touches_border": (sums.y0 == 0) | (sums.x0 == 0) | (sums.y1 == h) | (sums.x1 == w),
    }
    return pd.DataFrame(columns, columns=list(TABLE_COLUMNS))
