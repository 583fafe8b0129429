"""Pure geometry: boxes, the global tile lattice, output blocks, maps between pixel grids.

No I/O, no torch, no dask. Everything is in integer pixels of one named grid, or in continuous
pixel-centre coordinates (pixel ``i`` has its centre at ``i``; its area is ``[i - 0.5, i + 0.5)``).

The tile lattice lives in the *network grid* (the section resampled to the engine's pixel size).
Its origin is ``-overlap // 2`` so that, in crop mode, tile ``k`` keeps exactly
``[k * stride, (k + 1) * stride)`` and every image border gets the same context as the interior::

       -o/2     0                 s               2s
        |<------|---- tile 0 ------>|               |
        |  pad  |   kept by tile 0  |  kept by 1    |          o = overlap, s = tile - overlap
        |       |                 |<------ tile 1 ------>|
                  one output block (chunk-aligned)  :
              ┌───────────────────────────┐
              │  ░░ halo: pixels of tiles  │  a block computes every lattice tile that touches it
              │  ░░ that touch the block   │  and keeps only its own pixels; each pixel so sees the
              │        ┌───────────┐       │  same tiles in the same order however the section is
              │        │ own pixels│       │  split into blocks, which makes the output
              │        └───────────┘       │  bit-identical across block sizes.
              └───────────────────────────┘

Pixels outside the image are read by half-sample symmetric reflection (:func:`reflect_index`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

Pair = tuple[int, int]


# --------------------------------------------------------------------------------------- boxes


@dataclass(frozen=True, order=True)
class Box:
    """A half-open 2-D box ``[y0, y1) × [x0, x1)`` in integer pixels of one grid."""

    y0: int
    x0: int
    y1: int
    x1: int

    @classmethod
    def from_shape(cls, shape: Pair, origin: Pair = (0, 0)) -> Box:
        return cls(origin[0], origin[1], origin[0] + shape[0], origin[1] + shape[1])

    @property
    def shape(self) -> Pair:
        return (max(0, self.y1 - self.y0), max(0, self.x1 - self.x0))

    @property
    def origin(self) -> Pair:
        return (self.y0, self.x0)

    @property
    def size(self) -> int:
        h, w = self.shape
        return h * w

    @property
    def empty(self) -> bool:
        return self.size == 0

    def axis(self, a: int) -> tuple[int, int]:
        """The ``(start, stop)`` interval of axis 0 (y) or 1 (x)."""
        return (self.y0, self.y1) if a == 0 else (self.x0, self.x1)

    def intersect(self, other: Box) -> Box:
        return Box(max(self.y0, other.y0), max(self.x0, other.x0), min(self.y1, other.y1), min(self.x1, other.x1))

    def hull(self, other: Box) -> Box:
        return Box(min(self.y0, other.y0), min(self.x0, other.x0), max(self.y1, other.y1), max(self.x1, other.x1))

    def contains(self, other: Box) -> bool:
        return self.y0 <= other.y0 and self.x0 <= other.x0 and self.y1 >= other.y1 and self.x1 >= other.x1

    def shift(self, dy: int, dx: int) -> Box:
        return Box(self.y0 + dy, self.x0 + dx, self.y1 + dy, self.x1 + dx)

    def relative_to(self, outer: Box) -> tuple[slice, slice]:
        """Slices that cut this box out of an array that covers ``outer``."""
        return (slice(self.y0 - outer.y0, self.y1 - outer.y0), slice(self.x0 - outer.x0, self.x1 - outer.x0))

    def __str__(self) -> str:
        return f"[{self.y0}:{self.y1}, {self.x0}:{self.x1}]"


# ------------------------------------------------------------------------------------ lattice


@dataclass(frozen=True)
class TileLattice:
    """The global tile lattice over the network grid (see the module drawing).

    Two layouts, each a pure function of the extent (so every block sees the same lattice):

    * ``fitted`` (for blending): the fewest tiles that cover the image, ``ceil((extent - tile) / s) + 1``
      per axis, their span centred on it; the leftover (less than a stride) becomes reflected
      context split between the two borders. A 4096-px axis with 512-px tiles and 64 px of overlap
      takes 9 tiles, not the 10 of the partition layout.
    * partition (``fitted=False``, for crop mode): tile ``k`` covers ``[k*s - o//2, k*s - o//2 + tile)``
      and keeps ``[k*s, (k+1)*s)``; ``ceil(extent / s)`` tiles, whose kept centres partition the
      image and whose origins stay on multiples of the stride (as the network's pooling needs for
      crop mode to equal whole-image inference).
    """

    shape: Pair  # network-grid extent (H, W)
    tile: Pair
    overlap: Pair
    fitted: bool = False

    def __post_init__(self) -> None:
        for a in (0, 1):
            if self.tile[a] <= 0 or self.overlap[a] < 0 or self.overlap[a] >= self.tile[a]:
                raise ValueError(f"need 0 <= overlap < tile, got tile={self.tile}, overlap={self.overlap}")
            if self.shape[a] <= 0:
                raise ValueError(f"empty lattice extent {self.shape}")

    @property
    def stride(self) -> Pair:
        return (self.tile[0] - self.overlap[0], self.tile[1] - self.overlap[1])

    @property
    def origin(self) -> Pair:
        if not self.fitted:
            return (-(self.overlap[0] // 2), -(self.overlap[1] // 2))
        (ny, nx), (sy, sx) = self.counts, self.stride
        spare_y = (ny - 1) * sy + self.tile[0] - self.shape[0]
        spare_x = (nx - 1) * sx + self.tile[1] - self.shape[1]
        return (-(spare_y // 2), -(spare_x // 2))

    @property
    def counts(self) -> Pair:
        if self.fitted:
            return tuple(  # type: ignore[return-value]
                max(1, -(-(self.shape[a] - self.tile[a]) // self.stride[a]) + 1) for a in (0, 1)
            )
        return (-(-self.shape[0] // self.stride[0]), -(-self.shape[1] // self.stride[1]))

    @property
    def n_tiles(self) -> int:
        ny, nx = self.counts
        return ny * nx

    def tile_box(self, iy: int, ix: int) -> Box:
        (sy, sx), (oy, ox) = self.stride, self.origin
        return Box(oy + iy * sy, ox + ix * sx, oy + iy * sy + self.tile[0], ox + ix * sx + self.tile[1])

    def kept_box(self, iy: int, ix: int) -> Box:
        """The part of tile ``(iy, ix)`` that crop mode keeps (its centre, one stride wide)."""
        assert not self.fitted, "kept regions belong to the partition layout (crop mode)"
        sy, sx = self.stride
        return Box(iy * sy, ix * sx, (iy + 1) * sy, (ix + 1) * sx)

    def tiles_touching(self, box: Box, *, crop: bool = False) -> tuple[range, range]:
        """Lattice indices of every tile whose extent (or, with ``crop``, kept region) meets ``box``."""
        out = []
        for a in (0, 1):
            lo, hi = box.axis(a)
            s, o, t, n = self.stride[a], self.origin[a], self.tile[a], self.counts[a]
            if crop:
                assert not self.fitted, "crop mode uses the partition layout"
                k0, k1 = lo // s, -(-hi // s) - 1
            else:  # o + k*s < hi  and  o + k*s + t > lo
                k0, k1 = (lo - o - t) // s + 1, -(-(hi - o) // s) - 1
            out.append(range(max(k0, 0), min(k1, n - 1) + 1))
        return out[0], out[1]

    def seams(self, axis: int) -> list[int]:
        """Where neighbouring tiles meet along ``axis``: the middle of each overlap."""
        n, s, o = self.counts[axis], self.stride[axis], self.origin[axis]
        return [o + k * s + self.overlap[axis] // 2 for k in range(1, n)]

    def extent(self, ys: range, xs: range) -> Box:
        """The network-grid box covered by the tiles ``ys × xs``."""
        return self.tile_box(ys.start, xs.start).hull(self.tile_box(ys.stop - 1, xs.stop - 1))


# ------------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockGrid:
    """Output blocks: a regular grid of ``block``-sized boxes from the origin, clipped at the end.

    Blocks are multiples of the output chunks, so no two blocks write the same chunk.
    """

    shape: Pair
    block: Pair

    @property
    def counts(self) -> Pair:
        return (-(-self.shape[0] // self.block[0]), -(-self.shape[1] // self.block[1]))

    def __len__(self) -> int:
        ny, nx = self.counts
        return ny * nx

    def box(self, by: int, bx: int) -> Box:
        y0, x0 = by * self.block[0], bx * self.block[1]
        return Box(y0, x0, min(y0 + self.block[0], self.shape[0]), min(x0 + self.block[1], self.shape[1]))

    def __iter__(self) -> Iterator[Pair]:
        ny, nx = self.counts
        return iter(itertools.product(range(ny), range(nx)))

    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask-style chunk sizes per axis."""
        out = []
        for a in (0, 1):
            n, b = self.shape[a], self.block[a]
            out.append(tuple(min(b, n - i) for i in range(0, n, b)))
        return out[0], out[1]


# ---------------------------------------------------------------------------------- reflection


def reflect_index(i: np.ndarray | int, n: int) -> np.ndarray:
    """Map any integer index into ``[0, n)`` by half-sample symmetric reflection (period ``2n``).

    ``... 2 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...`` (numpy's ``pad(mode="symmetric")``); defined for
    every ``n >= 1`` and any distance from the border, so images smaller than a tile just work.
    """
    if n <= 0:
        raise ValueError("cannot reflect into an empty axis")
    i = np.asarray(i, dtype=np.int64) % (2 * n)
    return np.where(i < n, i, 2 * n - 1 - i)


# ----------------------------------------------------------------------------------- grid maps


@dataclass(frozen=True)
class AxisMap:
    """An affine map between the pixel-centre coordinates of two grids on one axis: ``b = a*scale + offset``."""

    scale: float
    offset: float

    @classmethod
    def between(cls, src_pixel_nm: float, src_origin_nm: float, dst_pixel_nm: float, dst_origin_nm: float) -> AxisMap:
        """Map grid A (pixel ``a`` centred at ``origin_a + a*pixel_a`` nm) to grid B."""
        return cls(src_pixel_nm / dst_pixel_nm, (src_origin_nm - dst_origin_nm) / dst_pixel_nm)

    def __call__(self, a: np.ndarray | float) -> np.ndarray | float:
        return a * self.scale + self.offset

    def inverse(self) -> AxisMap:
        return AxisMap(1.0 / self.scale, -self.offset / self.scale)

    def then(self, other: AxisMap) -> AxisMap:
        """``other(self(a))``."""
        return AxisMap(self.scale * other.scale, self.offset * other.scale + other.offset)

    @property
    def is_integer_shift(self) -> bool:
        """True when the map is ``b = a + k`` for an integer ``k``: no resampling needed."""
        return self.scale == 1.0 and float(self.offset).is_integer()


@dataclass(frozen=True)
class GridMap:
    """Per-axis maps from one grid to another (y, x)."""

    y: AxisMap
    x: AxisMap

    def axis(self, a: int) -> AxisMap:
        return self.y if a == 0 else self.x

    def inverse(self) -> GridMap:
        return GridMap(self.y.inverse(), self.x.inverse())

    def then(self, other: GridMap) -> GridMap:
        return GridMap(self.y.then(other.y), self.x.then(other.x))

    @property
    def is_integer_shift(self) -> bool:
        return self.y.is_integer_shift and self.x.is_integer_shift

    @property
    def shift(self) -> Pair:
        """The integer shift of an :attr:`is_integer_shift` map."""
        return (int(self.y.offset), int(self.x.offset))


# ------------------------------------------------------------------------------ resampling taps


def tap_count(in_per_out: float, antialias: bool) -> int:
    """Taps per output pixel of the triangle filter; constant per axis so all blocks share shapes."""
    radius = max(1.0, in_per_out) if antialias else 1.0
    return math.floor(2 * radius) + 1


def resample_taps(out_start: int, out_stop: int, amap: AxisMap, *, antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights that resample one axis: ``out[i] = Σ_t w[i,t] · in[idx[i,t]]``.

    ``amap`` maps output coordinates to input coordinates. The filter is a triangle (linear
    interpolation); when shrinking (``|scale| > 1``) it is widened to ``|scale|`` input pixels,
    which low-passes before decimation (antialiasing, as PIL's bilinear reduce does). Each output
    pixel's taps and weights depend only on its own global index, never on which block asks,
    so resampling commutes with blocking bit for bit. Weights sum to one.
    """
    r = abs(amap.scale)
    radius = max(1.0, r) if antialias else 1.0
    n_taps = tap_count(r, antialias)
    i = np.arange(out_start, out_stop, dtype=np.float64)
    u = i * amap.scale + amap.offset
    first = np.floor(u - radius).astype(np.int64) + 1
    idx = first[:, None] + np.arange(n_taps, dtype=np.int64)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs(idx - u[:, None]) / radius)
    w /= w.sum(axis=1, keepdims=True)
    return idx, w.astype(np.float32)
