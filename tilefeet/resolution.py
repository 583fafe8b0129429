"""Resolution normalization, the pure part: pixel grids in physical space, level choice, grid maps.

Three grids take part in a run::

    source level  (the pyramid level read)      ──src_from_net──┐
    network grid  (the engine's pixel size)     ◄───────────────┘   tiles, blending
    output grid   (input level 0, or network)   ──net_from_out──►   what is written

Each is a :class:`Grid`: pixel ``(i, j)`` has its centre at ``origin + (i, j) · pixel_size`` nm (the
NGFF scale/translation convention). The network grid spans the same physical extent as level 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .geometry import AxisMap, GridMap, Pair

FloatPair = tuple[float, float]


@dataclass(frozen=True)
class Grid:
    """A regular pixel grid placed in physical space (nm)."""

    shape: Pair
    pixel_size_nm: FloatPair
    origin_nm: FloatPair = (0.0, 0.0)

    def map_to(self, other: Grid) -> GridMap:
        """The map from this grid's pixel coordinates to ``other``'s."""
        return GridMap(
            AxisMap.between(self.pixel_size_nm[0], self.origin_nm[0], other.pixel_size_nm[0], other.origin_nm[0]),
            AxisMap.between(self.pixel_size_nm[1], self.origin_nm[1], other.pixel_size_nm[1], other.origin_nm[1]),
        )

    @property
    def extent_nm(self) -> tuple[FloatPair, FloatPair]:
        """Physical ``(start, stop)`` per axis: pixel edges, half a pixel beyond the centres."""
        return tuple(  # type: ignore[return-value]
            (self.origin_nm[a] - self.pixel_size_nm[a] / 2, self.origin_nm[a] + (self.shape[a] - 0.5) * self.pixel_size_nm[a])
            for a in (0, 1)
        )


def close(a: float, b: float, tolerance: float) -> bool:
    return abs(a / b - 1.0) <= tolerance


def choose_level(pixel_sizes_nm: Sequence[FloatPair], target_nm: FloatPair, tolerance: float = 0.01) -> int:
    """The level closest to ``target_nm`` without being coarser (on either axis); the finest if all are coarser.

    "Closest" compares pixel areas, so an anisotropic level is judged by both axes.
    """
    best, best_area = None, -1.0
    for i, (py, px) in enumerate(pixel_sizes_nm):
        if py <= target_nm[0] * (1 + tolerance) and px <= target_nm[1] * (1 + tolerance):
            area = py * px
            if area > best_area:
                best, best_area = i, area
    if best is not None:
        return best
    return min(range(len(pixel_sizes_nm)), key=lambda i: pixel_sizes_nm[i][0] * pixel_sizes_nm[i][1])


def network_grid(level0: Grid, read: Grid, target_nm: FloatPair, tolerance: float = 0.01) -> Grid:
    """The grid the network runs in.

    When the level read is within ``tolerance`` of the engine's pixel size, it *is* the network
    grid (no resampling, no blur). Otherwise the engine's pixel size over level 0's extent, with
    pixel edges aligned at the start and ``round(extent / pixel)`` pixels per axis.
    """
    if close(read.pixel_size_nm[0], target_nm[0], tolerance) and close(read.pixel_size_nm[1], target_nm[1], tolerance):
        return read
    (y0, y1), (x0, x1) = level0.extent_nm
    shape = (max(1, round((y1 - y0) / target_nm[0])), max(1, round((x1 - x0) / target_nm[1])))
    origin = (y0 + target_nm[0] / 2, x0 + target_nm[1] / 2)
    return Grid(shape, target_nm, origin)


def scale_factor(read: Grid, net: Grid) -> FloatPair:
    """Network pixels per source pixel (>1: the network grid is finer, the source is upsampled)."""
    return (read.pixel_size_nm[0] / net.pixel_size_nm[0], read.pixel_size_nm[1] / net.pixel_size_nm[1])


def mismatch(pixel_nm: FloatPair, target_nm: FloatPair) -> float:
    """How far apart two pixel sizes are, as a factor >= 1 (worst axis)."""
    return max(max(a / b, b / a) for a, b in zip(pixel_nm, target_nm))
