"""Colours for object ids, for previews and overlays: one stable colour per id.

The hue of id ``i`` is the fractional part of ``i × φ⁻¹`` (the golden-ratio sequence), so ids next
to each other in raster order (neighbouring objects, mostly) get far-apart hues, and an object keeps
its colour at every pyramid level, in every crop and in every run. Saturation and value alternate
between two settings so that the 2nd neighbour in hue differs too.
"""

from __future__ import annotations

import numpy as np

_PHI = 0.6180339887498949


def id_colors(ids: np.ndarray) -> np.ndarray:
    """RGB (uint8, shape ``ids.shape + (3,)``) of each id; id 0 (no object) is black."""
    ids = np.asarray(ids)
    i = ids.astype(np.uint64, copy=False)
    hue = ((i % np.uint64(1 << 52)).astype(np.float64) * _PHI) % 1.0
    sat = np.where(i % np.uint64(2) == 0, 0.65, 0.9)
    val = np.where(i % np.uint64(3) == 0, 0.8, 1.0)
    h6 = hue * 6.0
    sector = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    choices = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)]
    rgb = np.zeros(ids.shape + (3,), dtype=np.float64)
    for k, (r, g, b) in enumerate(choices):
        sel = sector == k
        rgb[sel] = np.stack([r[sel], g[sel], b[sel]], axis=-1)
    rgb[ids == 0] = 0
    return np.round(rgb * 255).astype(np.uint8)


def outlines(ids: np.ndarray) -> np.ndarray:
    """Pixels of an object with a 4-neighbour outside it (another id, nothing, or the image edge)."""
    ids = np.asarray(ids)
    pad = np.pad(ids, 1, mode="constant", constant_values=0)
    c = pad[1:-1, 1:-1]
    edge = (pad[:-2, 1:-1] != c) | (pad[2:, 1:-1] != c) | (pad[1:-1, :-2] != c) | (pad[1:-1, 2:] != c)
    return (c != 0) & edge
