"""Blending windows: how much each tile's prediction counts at each of its pixels.

A window is separable, strictly positive (so Σw > 0 wherever any tile reaches) and symmetric.
``gaussian`` (σ = tile/8, as nnU-Net and MONAI use) trusts tile centres, where the network saw the
most context; ``cosine`` (Hann, sampled at pixel centres so it never reaches zero) tapers more
gently; ``constant`` averages. ``crop`` mode uses no window: each tile writes only its centre.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .geometry import Pair

#: Floor of a window relative to its peak: keeps Σw well away from zero at the image border,
#: where only one tile's far edge may reach a pixel.
MIN_WEIGHT = 1e-3


def window_1d(n: int, kind: str) -> np.ndarray:
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
    return np.maximum(w / w.max(), MIN_WEIGHT)


@lru_cache(maxsize=16)
def window(shape: Pair, kind: str) -> np.ndarray:
    """The 2-D float32 window of a tile shape (cached; treat as read-only)."""
    w = np.outer(window_1d(shape[0], kind), window_1d(shape[1], kind)).astype(np.float32)
    w.setflags(write=False)
    return w


@lru_cache(maxsize=16)
def device_window(shape: Pair, kind: str, device: str):  # -> torch.Tensor
    """:func:`window` as a torch tensor on ``device``, created once per (shape, kind, device)."""
    import torch

    return torch.from_numpy(np.array(window(shape, kind))).to(device)
