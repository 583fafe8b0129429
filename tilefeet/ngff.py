"""NGFF metadata and storage defaults shared by everything that writes OME-Zarr (convert, segment).

Pyramids here are 2× per level: level ``k``'s pixel ``i`` covers level-0 pixels ``[i·2^k, (i+1)·2^k)``,
so its centre sits at ``origin + (2^k − 1)/2`` level-0 pixels: the translation each level records.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .geometry import Pair

#: Display colours of label classes, in class order (NGFF image-label "colors").
LABEL_COLORS = [(255, 64, 0), (0, 170, 255), (255, 200, 0), (170, 0, 255), (0, 220, 90), (255, 0, 140)]


def label_name(cls: str) -> str:
    """A class name as a safe group name (``"Mito boundary" -> "mito-boundary"``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", cls.strip()).strip("-").lower() or "class"


def pyramid_shapes(shape: Pair, chunk: Pair, max_levels: int = 12) -> list[Pair]:
    """Level shapes, halving (rounding up) until the image fits in one chunk."""
    shapes = [shape]
    while len(shapes) < max_levels and (shapes[-1][0] > chunk[0] or shapes[-1][1] > chunk[1]) and min(shapes[-1]) > 1:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def compressor() -> Any:
    """Blosc with zstd at a low level: EM, probabilities and masks compress well, and writing must keep up with a GPU."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def multiscales(
    name: str,
    pixel_size_nm: tuple[float, float],
    n_levels: int,
    *,
    origin_nm: tuple[float, float] = (0.0, 0.0),
    lead_axes: Sequence[dict] = (),
    method: str = "mean",
    metadata: dict | None = None,
    unit: str = "nanometer",
    unit_scale: float = 1.0,
) -> dict:
    """NGFF multiscales metadata for 2×-per-level pyramids (pixel centres at ``origin + i·pixel``)."""
    (py, px), (oy, ox) = pixel_size_nm, origin_nm
    lead = [1.0] * len(lead_axes)
    datasets = []
    for k in range(n_levels):
        f = 2**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [*lead, py * f * unit_scale, px * f * unit_scale]},
                    {"type": "translation", "translation": [*(0.0 for _ in lead), (oy + py * (f - 1) / 2) * unit_scale, (ox + px * (f - 1) / 2) * unit_scale]},
                ],
            }
        )
    ms: dict[str, Any] = {
        "name": name,
        "axes": [*lead_axes, {"name": "y", "type": "space", "unit": unit}, {"name": "x", "type": "space", "unit": unit}],
        "datasets": datasets,
        "type": f"2x2 {method}",
    }
    if metadata:
        ms["metadata"] = metadata
    return ms
