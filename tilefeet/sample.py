"""The bundled real EM sample: six held-out ISBI 2012 slices (4 nm TEM) and their membrane masks.

Used by the quickstart (``tilefeet sample``), by ``tilefeet bench`` to build large sections with
real texture (mirror-tiled montages, so every tile border is continuous), and by the tests.
In a source checkout it is ``tests/data/isbi``; a wheel carries it as ``tilefeet/_sample/isbi``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputNotFoundError

SLICES = (24, 25, 26, 27, 28, 29)
PIXEL_SIZE_NM = (4.0, 4.0)


def sample_dir() -> Path:
    here = Path(__file__).resolve().parent
    for d in (here.parent / "tests" / "data" / "isbi", here / "_sample" / "isbi"):
        if (d / "image").is_dir():
            return d
    raise InputNotFoundError("the bundled ISBI sample is missing from this installation; reinstall tilefeet")


def isbi_sample() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The six slices (uint8, 512²) and their membrane masks (1 = membrane)."""
    import imageio.v3 as iio

    d = sample_dir()
    imgs = [iio.imread(d / "image" / f"{i}.png") for i in SLICES]
    mems = [(iio.imread(d / "label" / f"{i}.png") < 128).astype(np.uint8) for i in SLICES]
    return imgs, mems


def montage(rows: int, cols: int, *, mirror: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A rows × cols montage of the sample slices (image, membrane mask).

    With ``mirror``, neighbouring tiles are flipped so that texture runs continuously across tile
    borders (a montage of real texture without artificial edges, for benchmarks and large tests).
    """
    imgs, mems = isbi_sample()
    img_rows, mem_rows = [], []
    for r in range(rows):
        ir, mr = [], []
        for c in range(cols):
            k = (r * cols + c) % len(imgs) if not mirror else 0
            a, m = imgs[k], mems[k]
            if mirror:
                if r % 2:
                    a, m = a[::-1], m[::-1]
                if c % 2:
                    a, m = a[:, ::-1], m[:, ::-1]
            ir.append(a)
            mr.append(m)
        img_rows.append(ir)
        mem_rows.append(mr)
    return np.block(img_rows), np.block(mem_rows)


def texture_section(size: int, chunk: int = 1024):  # -> dask.array.Array
    """A lazy ``size × size`` uint8 dask array of mirror-tiled real EM texture (any size, O(1) memory)."""
    import dask.array as da

    unit, _ = montage(2, 2, mirror=True)  # 1024², continuous when repeated
    reps = -(-size // unit.shape[0])
    return da.tile(da.from_array(unit, chunks=unit.shape), (reps, reps))[:size, :size].rechunk(chunk)
