"""Domain randomization for training: make each crop look as if another microscope had imaged it.

An engine meets sections from other labs: other contrast and gamma, other noise, other focus, other
pixel sizes (a few percent off, or resampled), uneven illumination and local defocus. Training on
crops randomized along each of these axes teaches the network to ignore them. The randomizations
come in named groups, so a run can switch each on or off and an ablation can say what each adds
(``benchmarks/train_ablation.py``):

==============  =================================================================================
group           what one crop gets (each member with its own probability)
==============  =================================================================================
``intensity``   gamma, contrast and brightness, and a random monotone warp of the histogram
``noise``       Gaussian (additive), Poisson (shot noise at a random dose), spatially correlated
``blur``        Gaussian, anisotropic Gaussian (astigmatism), a disk (defocus), of random size
``elastic``     a smooth random displacement field, applied to the image and its masks alike
``artefacts``   uneven illumination (a smooth gain field and a ramp), local defocus (a blurred
                patch with soft edges), knife chatter (periodic bands along one axis)
==============  =================================================================================

Scale jitter (random zoom) and the flips and 90° rotations are the crop sampler's
(:mod:`tilefeet.train`): they change which pixels a crop holds. ``legacy`` is the milder
intensity jitter the first shipped engines were trained with (kept so that they stay reproducible).

Everything here works on one crop in **raw units** scaled to ``[0, 1]`` by the data's maximum
(255 for 8-bit), before the bundle's normalization, as inference normalizes raw sections. All
randomness comes from one ``numpy`` generator, so a resumed training run continues the same stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from .errors import ConfigError

#: The randomization groups, in the order they are applied after the geometric ones.
GROUPS: tuple[str, ...] = ("elastic", "artefacts", "blur", "noise", "intensity")
#: What ``--augment all`` (the default of ``tilefeet train``) turns on.
ALL: tuple[str, ...] = GROUPS
#: The first engines' recipe: gamma, contrast, brightness, light blur and noise (not combinable).
LEGACY = "legacy"


def parse_augment(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"all"``, ``"none"``, ``"legacy"``, ``"intensity,noise"`` or ``"all,-elastic"`` → canonical group names.

    Names after ``all`` with a leading ``-`` are removed from it (what an ablation needs).
    """
    parts = [p.strip().lower() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if parts in (["none"], []):
        return ()
    if parts == [LEGACY]:
        return (LEGACY,)
    chosen: list[str] = []
    for p in parts:
        name = p.lstrip("-+")
        if p == "all":
            chosen += [g for g in ALL if g not in chosen]
        elif name in GROUPS and p.startswith("-"):
            if name not in chosen:
                raise ConfigError(f"--augment {spec!r}: -{name} removes a group that is not on; write all,-{name}")
            chosen.remove(name)
        elif name in GROUPS:
            chosen += [] if name in chosen else [name]
        else:
            raise ConfigError(
                f"--augment: unknown randomization {p!r}; give all, none, legacy, or a comma-separated list of "
                f"{', '.join(GROUPS)} (e.g. all,-elastic)"
            )
    return tuple(g for g in GROUPS if g in chosen)


# ------------------------------------------------------------------------------ geometric


def elastic_field(shape: tuple[int, int], rng: np.random.Generator, *, magnitude: float, spacing: float) -> np.ndarray:
    """A smooth random displacement field ``(2, H, W)`` in pixels: random vectors on a coarse grid
    ``spacing`` pixels apart (standard deviation ``magnitude``), interpolated cubically."""
    from scipy.ndimage import zoom

    h, w = shape
    coarse = (max(2, math.ceil(h / spacing) + 1), max(2, math.ceil(w / spacing) + 1))
    field = rng.normal(0.0, magnitude, (2, *coarse))
    out = np.empty((2, h, w), dtype=np.float32)
    for i in range(2):
        fine = zoom(field[i], (h / coarse[0], w / coarse[1]), order=3, mode="nearest", grid_mode=True)
        out[i] = fine[:h, :w]
    return out


def warp(image: np.ndarray, masks: np.ndarray, displacement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image (H, W)`` and ``masks (C, H, W)`` sampled at ``grid + displacement`` (linear, reflected
    at the border); masks are re-binarized at 0.5 so thin structures keep their width on average."""
    from scipy.ndimage import map_coordinates

    h, w = image.shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    coords = np.stack([yy + displacement[0], xx + displacement[1]])
    img = map_coordinates(image, coords, order=1, mode="mirror").astype(np.float32)
    out = np.stack([map_coordinates(m.astype(np.float32), coords, order=1, mode="mirror") >= 0.5 for m in masks])
    return img, out.astype(masks.dtype)


# ------------------------------------------------------------------------------ photometric


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1] varying over about ``shape / cells`` pixels."""
    from scipy.ndimage import zoom

    h, w = shape
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1))
    f = zoom(coarse, (h / (cells + 1), w / (cells + 1)), order=3, mode="nearest", grid_mode=True)[:h, :w]
    return np.clip(f, -1, 1).astype(np.float32)


def _disk(radius: float) -> np.ndarray:
    r = math.ceil(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    k = (yy**2 + xx**2 <= radius**2).astype(np.float32)
    return k / k.sum()


def artefacts(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Section and acquisition artefacts: uneven illumination, local defocus, knife chatter."""
    from scipy.ndimage import gaussian_filter

    h, w = u.shape
    if rng.random() < 0.5:  # uneven illumination: a smooth gain field plus a ramp
        gain = 1 + rng.uniform(0.05, 0.3) * _smooth_field(u.shape, rng, int(rng.integers(1, 4)))
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = (math.cos(angle) * yy / h + math.sin(angle) * xx / w) * rng.uniform(-0.2, 0.2)
        u = u * gain + ramp
    if rng.random() < 0.3:  # local defocus: a soft-edged region blurred
        sharp_to_blurred = np.clip(_smooth_field(u.shape, rng, 2) * 2 + rng.uniform(-1, 1), 0, 1)
        u = u + sharp_to_blurred * (gaussian_filter(u, rng.uniform(1.0, 3.0)) - u)
    if rng.random() < 0.2:  # knife chatter: periodic bands across the cutting direction
        axis = int(rng.integers(2))
        n = u.shape[axis]
        bands = 1 + rng.uniform(0.02, 0.1) * np.sin(2 * math.pi * np.arange(n) / rng.uniform(8, 64) + rng.uniform(0, 2 * math.pi))
        u = u * (bands[:, None] if axis == 0 else bands[None, :])
    return u


def blur(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of: Gaussian, anisotropic Gaussian (astigmatism), disk (defocus); or none."""
    from scipy.ndimage import convolve, gaussian_filter

    kind = rng.choice(4, p=[0.35, 0.15, 0.15, 0.35])
    if kind == 0:
        return gaussian_filter(u, rng.uniform(0.3, 1.5))
    if kind == 1:
        return gaussian_filter(u, (rng.uniform(0.2, 2.0), rng.uniform(0.2, 2.0)))
    if kind == 2:
        return convolve(u, _disk(rng.uniform(1.0, 2.5)), mode="mirror")
    return u


def noise(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of: additive Gaussian, Poisson (shot noise at a random dose), correlated Gaussian; or none."""
    from scipy.ndimage import gaussian_filter

    kind = rng.choice(4, p=[0.3, 0.2, 0.2, 0.3])
    if kind == 0:
        return u + rng.normal(0, rng.uniform(0.01, 0.08), u.shape)
    if kind == 1:
        dose = rng.uniform(20, 300)  #: photons (electrons) at full scale: fewer = noisier
        return rng.poisson(np.clip(u, 0, None) * dose) / dose
    if kind == 2:
        n = gaussian_filter(rng.normal(0, 1, u.shape), rng.uniform(0.7, 1.5))
        return u + n / (n.std() + 1e-9) * rng.uniform(0.01, 0.06)
    return u


def intensity(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast and brightness, and (on half the crops) a random monotone histogram warp."""
    u = np.clip(u, 0, 1) ** math.exp(rng.uniform(-0.5, 0.5))
    mean = float(u.mean())
    u = (u - mean) * rng.uniform(0.5, 1.5) + mean + rng.uniform(-0.15, 0.15)
    if rng.random() < 0.5:
        u = histogram_warp(u, rng)
    return u


def histogram_warp(u: np.ndarray, rng: np.random.Generator, knots: int = 5) -> np.ndarray:
    """A random monotone piecewise-linear curve over [0, 1] (increments drawn from a Dirichlet
    distribution): stretches some grey ranges and compresses others, keeping their order."""
    x = np.linspace(0, 1, knots + 1)
    y = np.concatenate([[0.0], np.cumsum(rng.dirichlet(np.full(knots, 4.0)))])
    return np.interp(np.clip(u, 0, 1), x, y)


def legacy_jitter(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The first engines' intensity jitter (contrast, brightness, gamma, blur, noise), draw for draw."""
    from scipy.ndimage import gaussian_filter

    u = np.clip(u, 0, 1) ** math.exp(rng.uniform(-0.35, 0.35))
    mean = u.mean()
    u = (u - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.3:
        u = gaussian_filter(u, rng.uniform(0.3, 1.2))
    if rng.random() < 0.5:
        u = u + rng.normal(0, rng.uniform(0.0, 0.06), u.shape)
    return u


_PHOTOMETRIC = {"artefacts": artefacts, "blur": blur, "noise": noise, "intensity": intensity}


def randomize(
    image: np.ndarray, masks: np.ndarray, groups: Sequence[str], rng: np.random.Generator, *, top: float, probability: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the chosen groups to one crop: ``image (H, W)`` in raw units up to ``top``, ``masks (C, H, W)``.

    Each group acts with ``probability`` (the network also sees clean crops); elastic deformation
    moves the masks with the image, the other groups change intensities only. Returns raw units
    clipped to ``[0, top]``, float32.
    """
    if not groups:
        return image.astype(np.float32), masks
    if tuple(groups) == (LEGACY,):
        return (np.clip(legacy_jitter(np.clip(image / top, 0, 1), rng), 0, 1) * top).astype(np.float32), masks
    u = np.asarray(image, dtype=np.float64) / top
    if "elastic" in groups and rng.random() < probability:
        side = min(u.shape)
        disp = elastic_field(u.shape, rng, magnitude=rng.uniform(1.0, 4.0), spacing=max(16.0, side / rng.uniform(3, 6)))
        u, masks = warp(u.astype(np.float32), masks, disp)
        u = u.astype(np.float64)
    for name in GROUPS[1:]:
        if name in groups and rng.random() < probability:
            u = _PHOTOMETRIC[name](u, rng)
    return (np.clip(u, 0, 1) * top).astype(np.float32), masks
