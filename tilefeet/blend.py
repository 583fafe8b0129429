"""Blending windows: how much each tile's prediction counts at each of its pixels.

A tile's window is the product of a *centre shape* and *edge ramps*, separable in y and x:

``gaussian`` (σ = tile/8, as nnU-Net and MONAI use) trusts tile centres, where the network saw the
most context; ``cosine`` (Hann) tapers more gently; ``constant`` is flat (so, with the ramps, a
plain cross-fade). ``crop`` mode uses no window: each tile writes only its centre.

The ramps make the blended map continuous across the lattice's lines. On each side of a tile that
faces a neighbour, the window is multiplied by a raised-cosine ramp ``sin²(π/2 · d/overlap)`` that
rises from 0 at the tile's edge (``d`` = 0) to 1 at the overlap's far side, sampled at pixel
centres (``d`` = 0.5, 1.5, …): a neighbour's weight grows from zero with zero slope instead of
jumping in at the tile's edge, so the lattice's lines do not show as steps in the probabilities.
(A window floored at a small positive value — 1e-3 of the peak before — lets each tile edge add a
step of that floor relative to the other tile's weight there: about 9 % of the two tiles'
disagreement for a gaussian with overlap = tile/8.) Sides that face the image border (the first
and last tile of each lattice axis) keep the plain centre shape: only that tile reaches the
pixels there, so its weight must not vanish. Because neighbouring tiles overlap by exactly
``overlap`` pixels, the two ramps of an overlap sum to 1 at every pixel (sin² + cos²): constant
windows form a partition of unity (where only neighbours overlap, i.e. overlap ≤ tile / 2).

Every window is strictly positive inside its tile (ramps at pixel centres never reach 0, the
centre shapes never do), so Σw > 0 wherever a tile reaches; with a separable window per lattice
row and column, Σw is a product of per-axis sums, each positive. A tile's window depends on its
lattice position only (first, inner or last along each axis), never on the block that computes it,
so outputs stay bit-identical however the section is split.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .geometry import Pair

if TYPE_CHECKING:
    from .geometry import TileLattice

#: (low side, high side) ramp widths of one axis of a window, in pixels; 0 = no ramp.
Ramps = tuple[int, int]


def centre_1d(n: int, kind: str) -> np.ndarray:
    """The centre shape along one axis of an ``n``-pixel tile, peak 1, sampled at pixel centres."""
    i = np.arange(n, dtype=np.float64) + 0.5
    if kind == "gaussian":
        sigma = n / 8
        w = np.exp(-0.5 * ((i - n / 2) / sigma) ** 2)
    elif kind == "cosine":
        w = np.sin(np.pi * i / n) ** 2
    elif kind in ("constant", "crop"):
        w = np.ones(n)
    else:
        raise ValueError(f"unknown window {kind!r}")
    return w / w.max()


def ramp_1d(width: int) -> np.ndarray:
    """The rising edge of a window over ``width`` pixels: ``sin²(π/2 · d/width)`` at ``d`` = 0.5 … width − 0.5.
    Its mirror image sums with it to 1 at every pixel."""
    d = np.arange(width, dtype=np.float64) + 0.5
    return np.sin(0.5 * np.pi * d / width) ** 2


def window_1d(n: int, kind: str, ramps: Ramps = (0, 0)) -> np.ndarray:
    """One axis of a window: the centre shape with a ramp of ``ramps[0]`` pixels at the low end and
    ``ramps[1]`` at the high end (each at most ``n``)."""
    w = centre_1d(n, kind)
    lo, hi = ramps
    if lo:
        w[:lo] *= ramp_1d(lo)
    if hi:
        w[n - hi :] *= ramp_1d(hi)[::-1]
    return w


@lru_cache(maxsize=64)
def window(shape: Pair, kind: str, ramps: tuple[Ramps, Ramps] = ((0, 0), (0, 0))) -> np.ndarray:
    """The 2-D float32 window of a tile shape with the given ramps per axis (cached; read-only)."""
    w = np.outer(window_1d(shape[0], kind, ramps[0]), window_1d(shape[1], kind, ramps[1])).astype(np.float32)
    w.setflags(write=False)
    return w


def tile_ramps(lattice: TileLattice, iy: int, ix: int) -> tuple[Ramps, Ramps]:
    """The ramps of tile ``(iy, ix)``: one overlap wide on every side that faces another tile of the
    lattice, none on the sides that face the image border."""
    out: list[Ramps] = []
    for a, k in ((0, iy), (1, ix)):
        o, n = lattice.overlap[a], lattice.counts[a]
        out.append((o if k > 0 else 0, o if k < n - 1 else 0))
    return out[0], out[1]


def tile_window(lattice: TileLattice, iy: int, ix: int, kind: str) -> np.ndarray:
    """The window of lattice tile ``(iy, ix)`` (see the module docstring)."""
    return window(lattice.tile, kind, tile_ramps(lattice, iy, ix))


@lru_cache(maxsize=64)
def device_window(shape: Pair, kind: str, ramps: tuple[Ramps, Ramps], device: str):  # -> torch.Tensor
    """:func:`window` as a torch tensor on ``device``, created once per (shape, kind, ramps, device)."""
    import torch

    return torch.from_numpy(np.array(window(shape, kind, ramps))).to(device)
