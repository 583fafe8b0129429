"""Cells between membranes: seeds grown into the membrane by a bounded number of steps.

The algorithm, on the whole image (which is what a blockwise run reproduces bit for bit):

1. **Seeds** are the 4-connected components of the non-membrane region (probability below the
   threshold), numbered in raster order of their first pixel (``skimage.measure.label(~membrane,
   connectivity=1)``); with ``--fill-holes``, membrane specks that do not reach the image edge
   (8-connected components of the membrane) first join the region around them; seeds smaller than
   ``--min-size`` are dropped.
2. **Growth**: ``steps`` rounds in which every unassigned pixel (membrane, or a dropped seed) with
   an assigned 8-neighbour takes the *smallest* id among its assigned 8-neighbours, all pixels of a
   round at once. Pixels farther than ``steps`` (chessboard distance) from every seed stay 0.

A cell keeps its seed's id. Growth moves one pixel per round, so a pixel's cell depends only on the
seeds within ``steps`` pixels: a block computed with a halo of ``steps`` (plus 2 for the perimeter)
equals the whole-image result. Ties go to the smallest id, a rule about ids, never about where a
pixel sits in an array, so block size cannot change them.
"""

from __future__ import annotations

import numpy as np

OUTSIDE = -1  #: seed value of pixels outside the image: never assigned, never spread


def growth_steps(grow_nm: float, pixel_size_nm: tuple[float, float]) -> int:
    """Rounds of growth that reach ``grow_nm`` (rounded to whole pixels of the mean pixel side)."""
    return max(0, round(grow_nm / ((pixel_size_nm[0] + pixel_size_nm[1]) / 2)))


def grow(seeds: np.ndarray, steps: int) -> np.ndarray:
    """Seeds (int64: ids > 0, 0 unassigned, :data:`OUTSIDE` off the image) grown by ``steps`` rounds.

    Works on the frontier only: each round looks at the unassigned pixels next to the ones
    assigned in the round before, so the cost follows the grown area, not the image.
    """
    from scipy import ndimage as ndi

    lab = np.pad(np.asarray(seeds, dtype=np.int64), 1, constant_values=OUTSIDE)
    w = lab.shape[1]
    flat = lab.ravel()
    offsets = np.array([dy * w + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], dtype=np.int64)
    big = np.iinfo(np.int64).max
    if steps <= 0 or not (flat > 0).any():
        return lab[1:-1, 1:-1].copy()
    frontier = np.flatnonzero(ndi.binary_dilation(lab > 0, structure=np.ones((3, 3), bool)) & (lab == 0))
    for _ in range(steps):
        if len(frontier) == 0:
            break
        around = flat[frontier[None, :] + offsets[:, None]]
        best = np.where(around > 0, around, big).min(axis=0)
        flat[frontier] = best  # every frontier pixel has an assigned neighbour: it is on the frontier for that
        nxt = (frontier[None, :] + offsets[:, None]).ravel()
        nxt = np.unique(nxt[flat[nxt] == 0])
        frontier = nxt
    return lab[1:-1, 1:-1].copy()
