"""Tissue masks: which parts of a section hold tissue, so the network runs only there.

A :class:`TissueMask` is a coarse boolean image (cells of a few network tiles' pixels) placed in
physical space like any other grid. It decides two things, both pure functions of the mask:

* which lattice tiles run: those whose extent meets the mask *grown by one cell* (the margin
  covers the output resampling's reach, so every tile that contributes to a pixel inside the mask
  runs: inside the mask the output is bit for bit that of a run without one);
* which output pixels are kept: those whose cell is in the mask; the others read as the fill
  value (0). A block with no pixel in the mask computes nothing and writes no chunk.

:func:`auto_mask` finds tissue from the section itself (``--mask auto``): it averages a level (the
read level, or a coarser one that still gives a cell 16 × 16 pixels:
:func:`tilefeet.pipeline.mask_level`) into cells and calls a cell empty only when two things hold:
it is constant or white-noise-like (neighbouring pixels differ as much as independent ones would;
tissue is correlated from pixel to pixel), and its mean does not stand out of its 5 × 5
neighbourhood beyond a multiple of the noise of a cell mean (:func:`tissue_cells`). Empty regions
smaller than a tile count as tissue (real resin, holes and padding are large). Neither the
section's contrast nor its bit depth matters. The mask is then closed, its holes filled, and grown
by :data:`GROW_CELLS` cells: losing tissue is silent, running on some resin is not.
:func:`mask_from_labels` takes a label image instead (``--mask PATH``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .errors import ConfigError, InvalidImageError
from .geometry import Box
from .resolution import Grid

#: A cell spans this many network-grid pixels per side (at a 512-px tile, 16 cells per tile).
CELL_PX = 32
#: A cell's mean stands out (tissue) beyond this many times the noise of a cell mean.
NOISE_FACTOR = 6.0
#: Neighbour differences at least this fraction of white noise's make a cell noise-like.
WHITE = 0.9
#: The found tissue is grown by this many cells before use.
GROW_CELLS = 2


def _unpack_mask(bits: np.ndarray, shape: tuple[int, int], grid: Any, source: str) -> TissueMask:
    return TissueMask(np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool), grid, source)


@dataclass(frozen=True)
class TissueMask:
    """A coarse boolean mask in physical space (see the module docstring)."""

    cells: np.ndarray  #: (h, w) bool, True = tissue
    grid: Grid  #: where the cells sit: pixel centres at ``origin + i * pixel_size`` (nm)
    source: str = "auto"  #: "auto" or the label image it came from

    def __post_init__(self) -> None:
        self.cells.setflags(write=False)

    def __reduce__(self):  # pickles as packed bits (a stack's plan carries one mask per section)
        return (_unpack_mask, (np.packbits(self.cells), self.cells.shape, self.grid, self.source))

    @cached_property
    def fraction(self) -> float:
        return float(self.cells.mean())

    @cached_property
    def _grown(self) -> np.ndarray:
        from scipy import ndimage as ndi

        return ndi.binary_dilation(self.cells, structure=np.ones((3, 3), bool))

    @cached_property
    def _integral(self) -> np.ndarray:
        return np.pad(self._grown.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def token(self) -> str:
        import hashlib

        return hashlib.sha256(np.packbits(self.cells).tobytes() + repr((self.cells.shape, self.grid)).encode()).hexdigest()

    def cell_range(self, grid: Grid, box: Box) -> tuple[int, int, int, int]:
        """The cells (y0, x0, y1, x1, clipped) whose extent meets ``box`` of pixels of ``grid``."""
        out = []
        for a, (lo, hi) in enumerate((box.axis(0), box.axis(1))):
            px, o = grid.pixel_size_nm[a], grid.origin_nm[a]
            start_nm, stop_nm = o + (lo - 0.5) * px, o + (hi - 0.5) * px  # pixel edges
            cp, co = self.grid.pixel_size_nm[a], self.grid.origin_nm[a]
            c0 = int(np.floor((start_nm - (co - cp / 2)) / cp))
            c1 = int(np.ceil((stop_nm - (co - cp / 2)) / cp))
            n = self.cells.shape[a]
            out.append((min(max(c0, 0), n), min(max(c1, 0), n)))
        return out[0][0], out[1][0], out[0][1], out[1][1]

    def runs(self, grid: Grid, box: Box) -> bool:
        """Does a tile covering ``box`` (pixels of ``grid``) run: does it meet the grown mask?"""
        y0, x0, y1, x1 = self.cell_range(grid, box)
        if y1 <= y0 or x1 <= x0:
            return False
        s = self._integral
        return bool(s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0] > 0)

    def pixels(self, grid: Grid, box: Box) -> np.ndarray:
        """(h, w) bool: which pixels of ``box`` (of ``grid``) lie in a tissue cell."""
        idx = []
        for a, (lo, hi) in enumerate((box.axis(0), box.axis(1))):
            centres = grid.origin_nm[a] + np.arange(lo, hi) * grid.pixel_size_nm[a]
            cp, co = self.grid.pixel_size_nm[a], self.grid.origin_nm[a]
            i = np.floor((centres - (co - cp / 2)) / cp).astype(np.int64)
            idx.append(np.clip(i, 0, self.cells.shape[a] - 1))
        return self.cells[np.ix_(idx[0], idx[1])]

    def any_in(self, grid: Grid, box: Box) -> bool:
        y0, x0, y1, x1 = self.cell_range(grid, box)
        return bool(self.cells[y0:y1, x0:x1].any())


def cell_grid(network: Grid) -> Grid:
    """The cells' grid: :data:`CELL_PX` network pixels per cell, edges aligned with the network grid's."""
    shape = tuple(-(-n // CELL_PX) for n in network.shape)
    px = tuple(p * CELL_PX for p in network.pixel_size_nm)
    origin = tuple(o - p / 2 + c / 2 for o, p, c in zip(network.origin_nm, network.pixel_size_nm, px))
    return Grid(shape, px, origin)  # type: ignore[arg-type]


def tissue_cells(means: np.ndarray, stds: np.ndarray, diff_stds: np.ndarray, pixels_per_cell: float, min_empty: int) -> np.ndarray:
    """The tissue decision on cell statistics (pure; see the module docstring).

    Per cell: the mean, the standard deviation of raw intensities, and that of differences between
    horizontal neighbours (NaN outside the image). A cell is *empty* when both hold:

    * it is constant or white noise: neighbour differences vary as much as independent pixels would
      (``diff_std ≥ WHITE × √2 · std``, both pooled over the 3 × 3 cells around it; tissue,
      correlated from pixel to pixel, stays well below);
    * its mean does not stand out of its 5 × 5 neighbourhood: their standard deviation is within
      ``NOISE_FACTOR`` times the noise of a mean (``diff_std / √2 / √pixels``).

    Empty regions smaller than ``min_empty`` cells (about a tile) count as tissue: real resin, holes
    and padding are large, and a small flat patch inside tissue is tissue. The rest is closed,
    filled and grown by :data:`GROW_CELLS` cells.
    """
    from scipy import ndimage as ndi

    valid = np.isfinite(means)
    m = np.where(valid, means, np.nanmean(means) if valid.any() else 0.0)
    local = np.sqrt(np.maximum(ndi.uniform_filter(m * m, 5, mode="nearest") - ndi.uniform_filter(m, 5, mode="nearest") ** 2, 0))
    noise = ndi.maximum_filter(np.where(valid, diff_stds, 0.0), 5, mode="nearest") / np.sqrt(2 * max(pixels_per_cell, 1.0))
    constant = np.where(valid, stds, 0.0) <= 1e-6 * (1 + np.abs(m))  # float cancellation in Σx² − n·mean²
    # Whiteness is judged on the 3 × 3 cells around each (variances pooled): nine times the pixels
    # of one cell, so a coarse level's smaller cells do not make noise look correlated by chance.
    var = np.maximum(ndi.uniform_filter(np.where(valid, stds, 0.0) ** 2, 3, mode="nearest"), 0.0)  # running sums can dip below 0
    dvar = np.maximum(ndi.uniform_filter(np.where(valid, diff_stds, 0.0) ** 2, 3, mode="nearest"), 0.0)
    white = constant | (np.sqrt(dvar) >= WHITE * np.sqrt(2 * var))
    flat = local <= NOISE_FACTOR * noise + 1e-6 * (1 + np.abs(m))
    empty = valid & white & flat
    labels, n = ndi.label(empty)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        empty &= sizes[labels] >= min_empty
    tissue = valid & ~empty
    tissue = ndi.binary_closing(tissue, structure=np.ones((3, 3), bool), iterations=2, border_value=0) | tissue
    tissue = ndi.binary_fill_holes(tissue)
    if GROW_CELLS:
        tissue = ndi.binary_dilation(tissue, structure=np.ones((3, 3), bool), iterations=GROW_CELLS)
    return tissue & valid


def auto_mask(image: Any, level: int, source: Grid, network: Grid) -> TissueMask:
    """Tissue cells of a section from the pixels of ``level`` (whose grid is ``source``), read block
    by block: each cell's mean and standard deviation of raw intensities (non-finite pixels ignored)."""
    grid = cell_grid(network)
    h, w = source.shape
    # Source pixels -> cell index, by pixel centres.
    rows = _cell_index(source, grid, 0, h)
    cols = _cell_index(source, grid, 1, w)
    ch, cw = grid.shape
    sums = np.zeros((4, ch, cw))  # count, Σx, Σx², Σ(neighbour difference)² (and its count below)
    dcount = np.zeros((ch, cw))
    dsum = np.zeros((ch, cw))
    step = 2048
    for y in range(0, h, step):
        for x in range(0, w, step):
            box = Box(y, x, min(y + step, h), min(x + step, w))
            a = np.asarray(image.read(level, box), dtype=np.float64)
            ok = np.isfinite(a)
            a = np.where(ok, a, 0.0)
            r, c = rows[box.y0 : box.y1], cols[box.x0 : box.x1]
            flat = (r[:, None] * cw + c[None, :]).ravel()
            for i, v in enumerate((ok, a, a * a)):
                sums[i] += np.bincount(flat, weights=v.ravel().astype(np.float64), minlength=ch * cw).reshape(ch, cw)
            d = np.diff(a, axis=1)
            dok = ok[:, 1:] & ok[:, :-1]
            dflat = (r[:, None] * cw + c[None, :-1]).ravel()
            dsum += np.bincount(dflat, weights=np.where(dok, d, 0.0).ravel(), minlength=ch * cw).reshape(ch, cw)
            sums[3] += np.bincount(dflat, weights=np.where(dok, d * d, 0.0).ravel(), minlength=ch * cw).reshape(ch, cw)
            dcount += np.bincount(dflat, weights=dok.ravel().astype(np.float64), minlength=ch * cw).reshape(ch, cw)
    count = sums[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(count > 0, sums[1] / count, np.nan)
        stds = np.sqrt(np.maximum(sums[2] / count - means**2, 0))
        dmean = dsum / dcount
        diff_stds = np.where(dcount > 1, np.sqrt(np.maximum(sums[3] / dcount - dmean**2, 0)), stds * np.sqrt(2))
    per_cell = float(np.median(count[count > 0])) if (count > 0).any() else 1.0
    tile_cells = max(1, round(512 / CELL_PX)) ** 2
    return TissueMask(tissue_cells(means, stds, diff_stds, per_cell, tile_cells), grid, "auto")


def _cell_index(src: Grid, cells: Grid, axis: int, n: int) -> np.ndarray:
    centres = src.origin_nm[axis] + np.arange(n) * src.pixel_size_nm[axis]
    cp, co = cells.pixel_size_nm[axis], cells.origin_nm[axis]
    return np.clip(np.floor((centres - (co - cp / 2)) / cp).astype(np.int64), 0, cells.shape[axis] - 1)


def mask_from_labels(path: str, network: Grid, level0: Grid, *, section: int | None = None, depth: int = 1) -> TissueMask:
    """A mask from a label image (non-zero = tissue), on the cells of ``network``. Its pixel size and
    origin come from its NGFF metadata; without units it must cover the section's extent (its shape
    proportional to level 0's within a pixel), and is stretched over it. For section ``section`` of a
    stack of ``depth`` sections, a (z, y, x) label image gives that section's plane (a 2-D one serves
    every section)."""
    from .ngff import open_group, read_multiscale

    ms = read_multiscale(path, role="mask")
    k = len(ms.datasets) - 1  # the coarsest level: a mask is coarse anyway
    stored = open_group(ms.path, role="mask")[ms.datasets[k].path]
    lead = [n for n in stored.shape[:-2] if n != 1]
    if section is not None and lead == [depth] and depth > 1:
        index = tuple(section if n == depth else 0 for n in stored.shape[:-2])
        arr = np.asarray(stored[index])
    else:
        arr = np.asarray(stored)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        what = f"; for a stack of {depth} sections it must have {depth} planes (or one)" if section is not None else ""
        raise InvalidImageError(f"mask {path} has shape {arr.shape}; a mask is one 2-D label image{what}")
    px, origin = ms.pixel_size_nm(k), ms.origin_nm(k)
    if px is None:
        h0, w0 = level0.shape
        ratio = (h0 / arr.shape[0], w0 / arr.shape[1])
        if abs(ratio[0] - ratio[1]) * min(arr.shape) > max(ratio):
            raise ConfigError(
                f"mask {path} is {arr.shape[0]} × {arr.shape[1]} px without a pixel size, and not proportional to the "
                f"section's {h0} × {w0} px; give the mask a pixel size (tilefeet convert --pixel-size) or the section's shape"
            )
        px = (level0.pixel_size_nm[0] * ratio[0], level0.pixel_size_nm[1] * ratio[1])
        origin = (level0.origin_nm[0] + level0.pixel_size_nm[0] * (ratio[0] - 1) / 2,
                  level0.origin_nm[1] + level0.pixel_size_nm[1] * (ratio[1] - 1) / 2)
    labels = Grid((arr.shape[0], arr.shape[1]), px, origin)
    grid = cell_grid(network)
    # A cell is tissue when any label pixel inside it is (coarse cells: max over its label pixels).
    cells = np.zeros(grid.shape, bool)
    rows = _cell_index(labels, grid, 0, arr.shape[0])
    cols = _cell_index(labels, grid, 1, arr.shape[1])
    # label pixels outside the cells' extent are clipped to the border cells; drop those
    inside_r = _inside(labels, grid, 0, arr.shape[0])
    inside_c = _inside(labels, grid, 1, arr.shape[1])
    on = (arr != 0) & inside_r[:, None] & inside_c[None, :]
    ys, xs = np.nonzero(on)
    cells[rows[ys], cols[xs]] = True
    if labels.pixel_size_nm[0] > grid.pixel_size_nm[0] or labels.pixel_size_nm[1] > grid.pixel_size_nm[1]:
        # A mask coarser than the cells: each cell takes the label pixel at its centre.
        cy = _cell_index(grid, labels, 0, grid.shape[0])
        cx = _cell_index(grid, labels, 1, grid.shape[1])
        cells |= (arr[np.ix_(cy, cx)] != 0) & _inside(grid, labels, 0, grid.shape[0])[:, None] & _inside(grid, labels, 1, grid.shape[1])[None, :]
    if not cells.any():
        raise ConfigError(f"mask {path} marks no tissue over the section (it is all background there); check the mask or leave out --mask")
    return TissueMask(cells, grid, str(path))


def _inside(src: Grid, dst: Grid, axis: int, n: int) -> np.ndarray:
    """Which pixels of ``src`` along ``axis`` have their centre inside ``dst``'s extent."""
    centres = src.origin_nm[axis] + np.arange(n) * src.pixel_size_nm[axis]
    lo = dst.origin_nm[axis] - dst.pixel_size_nm[axis] / 2
    hi = lo + dst.shape[axis] * dst.pixel_size_nm[axis]
    return (centres >= lo) & (centres < hi)


def tile_activity(mask: TissueMask, network: Grid, lattice: Any) -> np.ndarray:
    """(ny, nx) bool over the lattice: which tiles run (meet the grown mask)."""
    ny, nx = lattice.counts
    return np.array([[mask.runs(network, lattice.tile_box(iy, ix)) for ix in range(nx)] for iy in range(ny)], bool).reshape(ny, nx)
