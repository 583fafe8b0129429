"""Intensity normalization: make a section's contrast look like the engine's training data.

Statistics come from a sample of the section at the level the network reads (spread over the
whole section, :func:`tilefeet.pipeline.section_sample`), computed once before any block runs:
per-tile statistics would differ between neighbouring tiles and make seams. The result is a
monotone piecewise-linear map ``raw -> matched raw`` followed by the bundle's own training
normalization, evaluated per block as a lookup table (integer data) or by interpolation (float).

Modes:

``auto``        (the default) ``bundle`` when the section's values look like the training data's,
                ``percentile`` when they do not (16-bit or float data for an engine trained on
                8-bit, another offset or contrast). The plan says what was chosen and why.
``bundle``      the training normalization alone, with the training data's constants; trusts that
                the section was acquired like the training data.
``percentile``  first stretch the section linearly so its percentiles land on the training data's.
``meanstd``     first match the section's mean and standard deviation to the training data's.
``histogram``   first match the section's whole histogram to the bundle's reference histogram.

``invert`` flips the contrast first (``max - x``), for sections whose polarity is the opposite
of the training data's (bright membranes where training had dark ones). Whether to flip is decided
by :mod:`tilefeet.polarity` from what the network makes of the section both ways (and, as a tie
breaker, :func:`polarity`, the histogram's shape), unless the user says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, TilefeetWarning


@dataclass(frozen=True)
class Normalization:
    """How raw intensities became network inputs in training: ``(x - mean) / std`` (method ``meanstd``)
    or ``(x - low) / (high - low)`` (method ``range``), plus statistics of the raw training data that
    section-adaptive modes match against (its percentiles and a reference histogram)."""

    method: Literal["meanstd", "range"] = "meanstd"
    mean: float = 0.0  #: raw mean of the training data (meanstd)
    std: float = 1.0  #: raw standard deviation of the training data (meanstd)
    low: float = 0.0  #: raw value mapped to 0 (range)
    high: float = 255.0  #: raw value mapped to 1 (range)
    percentiles: tuple[float, float] = (1.0, 99.0)  #: which percentiles ``percentile_values`` holds
    percentile_values: tuple[float, float] = (0.0, 255.0)  #: raw training values at those percentiles
    histogram_range: tuple[float, float] = (0.0, 256.0)  #: raw value range the histogram bins span
    histogram: tuple[float, ...] = ()  #: reference histogram of raw training intensities (densities)
    #: The section-adaptive intensity mode the network was trained with ("percentile" or "meanstd"),
    #: or "" when the constants above apply to any section as they are. Networks from elsewhere are
    #: often trained on per-image normalized data (bioimage.io's ``scale_range`` with percentiles,
    #: ``zero_mean_unit_variance`` per sample): their constants describe the normalized data, and a
    #: run must match each section's statistics to them (``--intensity percentile`` / ``meanstd``).
    adaptive: str = ""

    def to_network(self, x: Any) -> Any:
        """Raw intensities (array-like, already matched to the training distribution) to network input."""
        if self.method == "meanstd":
            return (x - self.mean) / self.std
        return (x - self.low) / (self.high - self.low)

    def to_toml(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "mean": self.mean,
            "std": self.std,
            "low": self.low,
            "high": self.high,
            "percentiles": list(self.percentiles),
            "percentile_values": list(self.percentile_values),
            "histogram_range": list(self.histogram_range),
            "histogram": [round(float(v), 8) for v in self.histogram],
        } | ({"adaptive": self.adaptive} if self.adaptive else {})



IntensityMode = Literal["auto", "bundle", "percentile", "meanstd", "histogram"]
INTENSITY_MODES: tuple[str, ...] = ("auto", "bundle", "percentile", "meanstd", "histogram")

# Quantile levels at which histogram matching places its knots (tails trimmed: outliers such as
# saturated pixels or black montage gaps should not bend the whole curve).
_MATCH_LEVELS = np.linspace(0.002, 0.998, 129)


@dataclass(frozen=True)
class IntensityMap:
    """``raw -> network input``: an optional flip, a piecewise-linear match, then the bundle's normalization.

    ``knots_x`` / ``knots_y`` define the match (linear extrapolation beyond the ends for two knots,
    clamped for histogram matching). Small, picklable, computed once per section.
    """

    knots_x: tuple[float, ...]
    knots_y: tuple[float, ...]
    normalization: Normalization
    invert_max: float | None = None  #: if set, x -> invert_max - x first
    extrapolate: bool = True
    mode: str = "bundle"  #: the mode applied (``auto`` resolves to ``bundle`` or ``percentile``)
    reason: str = ""  #: why, when ``auto`` chose the mode or the inversion (for the plan)

    def describe(self) -> str:
        return self.mode + (" (inverted contrast)" if self.invert_max is not None else "") + (f": {self.reason}" if self.reason else "")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Apply to raw intensities (numpy), giving float32 network input."""
        v = np.asarray(x, dtype=np.float64)
        if self.invert_max is not None:
            v = self.invert_max - v
        v = _interp(v, np.asarray(self.knots_x), np.asarray(self.knots_y), self.extrapolate)
        return np.asarray(self.normalization.to_network(v), dtype=np.float32)

    def lut(self, dtype: np.dtype) -> np.ndarray | None:
        """A float32 lookup table over every value of an 8- or 16-bit integer dtype, else ``None``."""
        dtype = np.dtype(dtype)
        if dtype.kind not in "ui" or dtype.itemsize > 2:
            return None
        info = np.iinfo(dtype)
        return self(np.arange(info.min, info.max + 1))


class IntensityWarning(TilefeetWarning):
    """The section's intensities, as the chosen mode maps them, look nothing like the training data's."""


#: How much wider or narrower than the training data's the section's mapped 1st–99th percentile
#: range may be before tilefeet warns. Loose on purpose: it catches a wrong bit depth or value
#: range (float data in [0, 1], 16-bit data, an empty or constant image), not a contrast a few
#: tens of percent off, which the engine's training augmentation covers.
SPREAD_TOLERANCE = 8.0


def mismatch(imap: IntensityMap, sample: np.ndarray | None) -> str | None:
    """Why the section, mapped by ``imap``, cannot look like the training data to the network, or
    ``None`` when it plausibly does: its mapped 1st–99th percentile range misses the training data's
    or is ``SPREAD_TOLERANCE`` times wider or narrower. ``sample``: raw section data."""
    if sample is None:
        return None
    norm = imap.normalization
    lo, hi = quantiles(sample, np.asarray(norm.percentiles) / 100)
    if not np.isfinite(lo):
        return "the section has no finite pixel values; check the input"
    where = f"{_ordinal(norm.percentiles[0])}–{_ordinal(norm.percentiles[1])} percentiles"
    if hi <= lo:
        return f"the section has no contrast (its {where} are both {lo:.4g}); the output will be meaningless; check the input"
    m_lo, m_hi = imap(np.array([lo, hi]))
    r_lo, r_hi = norm.to_network(np.asarray(norm.percentile_values, dtype=np.float64))
    m_lo, m_hi = sorted((float(m_lo), float(m_hi)))
    spread, ref_spread = m_hi - m_lo, float(r_hi - r_lo)
    disjoint = m_hi < r_lo or m_lo > r_hi
    if not disjoint and 1 / SPREAD_TOLERANCE <= spread / ref_spread <= SPREAD_TOLERANCE:
        return None
    t_lo, t_hi = norm.percentile_values
    return (
        f"the section's intensities ({lo:.3g} to {hi:.3g} at the {where}) look nothing like the engine's training "
        f"data ({t_lo:.3g} to {t_hi:.3g}) with --intensity {imap.mode}; the result will be poor: "
        "use --intensity percentile (or histogram) to match them"
    )


#: Float samples above this many values are thinned (evenly) before quantiles are taken.
FLOAT_QUANTILE_VALUES = 1 << 22


def quantiles(sample: np.ndarray, q: Sequence[float] | np.ndarray) -> np.ndarray:
    """``np.quantile(sample, q)`` (linear interpolation) over the finite values, fast: 8/16-bit
    integers are counted (exact, bit for bit numpy's result, ~20× faster than sorting 16 Mpx);
    float samples above ``FLOAT_QUANTILE_VALUES`` are thinned evenly first. Empty → NaNs."""
    a = np.asarray(sample).ravel()
    q = np.asarray(q, dtype=np.float64)
    if a.dtype.kind in "ui" and a.dtype.itemsize <= 2:
        offset = int(np.iinfo(a.dtype).min)
        counts = np.bincount(a if offset == 0 else (a.astype(np.int32) - offset))
        cum = np.cumsum(counts)
        n = int(cum[-1]) if len(cum) else 0
        if n == 0:
            return np.full(q.shape, np.nan)
        pos = q * (n - 1)
        lo = np.floor(pos)
        hi = np.minimum(lo + 1, n - 1)
        x_lo = np.searchsorted(cum, lo, side="right").astype(np.float64) + offset
        x_hi = np.searchsorted(cum, hi, side="right").astype(np.float64) + offset
        t = pos - lo
        diff = x_hi - x_lo
        return np.where(t >= 0.5, x_hi - diff * (1 - t), x_lo + diff * t)  # numpy's _lerp, for identical bits
    v = a.astype(np.float64, copy=False)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.full(q.shape, np.nan)
    if v.size > FLOAT_QUANTILE_VALUES:
        v = v[:: -(-v.size // FLOAT_QUANTILE_VALUES)]
    return np.quantile(v, q)


def _ordinal(q: float) -> str:
    if q != int(q):
        return f"{q:g}th"
    n = int(q)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _interp(v: np.ndarray, xp: np.ndarray, fp: np.ndarray, extrapolate: bool) -> np.ndarray:
    out = np.interp(v, xp, fp)
    if extrapolate and len(xp) >= 2:
        lo_slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
        hi_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        out = np.where(v < xp[0], fp[0] + (v - xp[0]) * lo_slope, out)
        out = np.where(v > xp[-1], fp[-1] + (v - xp[-1]) * hi_slope, out)
    return out


def dtype_max(dtype: np.dtype) -> float:
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def training_normalization(
    arrays: Sequence[np.ndarray], *, percentiles: tuple[float, float] = (1.0, 99.0), bins: int = 256
) -> Normalization:
    """The normalization a new engine records from its raw training images (meanstd + references)."""
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    lo_hi = (0.0, 256.0) if all(np.asarray(a).dtype == np.uint8 for a in arrays) else (float(flat.min()), float(flat.max()) + 1e-6)
    hist, _ = np.histogram(flat, bins=bins, range=lo_hi, density=True)
    p = np.percentile(flat, percentiles)
    return Normalization(
        method="meanstd",
        mean=float(flat.mean()),
        std=float(flat.std()) or 1.0,
        percentiles=(float(percentiles[0]), float(percentiles[1])),
        percentile_values=(float(p[0]), float(p[1])),
        histogram_range=lo_hi,
        histogram=tuple(float(v) for v in hist),
    )


def reference_quantiles(norm: Normalization, levels: np.ndarray) -> np.ndarray:
    """Raw intensities of the training data at quantile ``levels``, from its reference histogram."""
    if not norm.histogram:
        raise ConfigError("this engine bundle records no reference histogram; use --intensity percentile or bundle")
    hist = np.asarray(norm.histogram, dtype=np.float64)
    edges = np.linspace(norm.histogram_range[0], norm.histogram_range[1], len(hist) + 1)
    cdf = np.concatenate([[0.0], np.cumsum(hist * np.diff(edges))])
    cdf /= cdf[-1]
    # Invert the piecewise-linear CDF; flat stretches (empty bins) map to their left edge.
    keep = np.concatenate([[True], np.diff(cdf) > 0])
    return np.interp(levels, cdf[keep], edges[keep])


def make_intensity_map(
    mode: str,
    norm: Normalization,
    sample: np.ndarray | None,
    *,
    dtype: np.dtype,
    invert: bool | None = False,
) -> IntensityMap:
    """The per-section map for ``mode``; ``sample`` is raw section data at the level the network reads.

    ``invert``: flip the contrast first (True) or not (False, or None: the decision is
    :mod:`tilefeet.polarity`'s, made with both maps).
    """
    if mode not in INTENSITY_MODES:
        raise ConfigError(f"unknown intensity mode {mode!r}; use one of {', '.join(INTENSITY_MODES)}")
    if mode == "auto":
        return _auto(norm, sample, np.dtype(dtype), invert)
    invert_max = _invert_max(dtype, sample) if invert else None
    if mode == "bundle":
        return IntensityMap((0.0, 1.0), (0.0, 1.0), norm, invert_max, True, mode)
    if sample is None or np.asarray(sample).size == 0:
        raise ConfigError(f"intensity mode {mode!r} needs section statistics, but the section sample is empty")

    def section_quantiles(q: Sequence[float] | np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        if invert_max is None:
            return quantiles(sample, q)
        return invert_max - quantiles(sample, 1.0 - q)  # the quantiles of max - x, without forming it

    if mode == "percentile":
        src = section_quantiles(np.asarray(norm.percentiles) / 100)
        dst = np.asarray(norm.percentile_values)
        if src[1] <= src[0]:
            raise ConfigError(
                f"the section's {norm.percentiles[0]:g}th and {norm.percentiles[1]:g}th percentiles are equal "
                f"({src[0]:g}): the image has no contrast to normalize; check the input or use --intensity bundle"
            )
        return IntensityMap(tuple(src), tuple(dst), norm, invert_max, True, mode)
    if mode == "meanstd":
        v = np.asarray(sample, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        if invert_max is not None:
            v = invert_max - v
        mean, std = float(v.mean()), float(v.std())
        ref_mean, ref_std = norm.mean, norm.std
        if std == 0:
            raise ConfigError("the section has zero standard deviation: nothing to normalize; check the input")
        return IntensityMap((mean, mean + std), (ref_mean, ref_mean + ref_std), norm, invert_max, True, mode)
    # histogram
    src = section_quantiles(_MATCH_LEVELS)
    dst = reference_quantiles(norm, _MATCH_LEVELS)
    src, dst = _strictly_increasing(src, dst)
    if len(src) < 2:
        raise ConfigError("the section has a single intensity value: nothing to match; check the input")
    return IntensityMap(tuple(src), tuple(dst), norm, invert_max, False, mode)


def _strictly_increasing(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop repeated x knots (many pixels of one value), averaging their targets."""
    ux, inv = np.unique(x, return_inverse=True)
    uy = np.bincount(inv, weights=y) / np.bincount(inv)
    return ux, uy


# ------------------------------------------------------------------------------------ auto


#: The training data's histogram must be at least this asymmetric (mean distance between its
#: standardized quantile curve and its mirror image's) for polarity to be told from a histogram.
MIN_ASYMMETRY = 0.02
#: A section looks inverted when it is within this fraction of that asymmetry of the mirrored
#: reference, and farther than the whole asymmetry from the reference itself.
NEAR, FAR = 0.5, 1.0
_SHAPE_LEVELS = np.linspace(0.02, 0.98, 97)


def _shape(q: np.ndarray) -> np.ndarray:
    return (q - q[len(q) // 2]) / (q[-1] - q[0])


def polarity(norm: Normalization, sample: np.ndarray | None) -> tuple[float, float] | None:
    """How far the section's histogram is from the training data's, as is and mirrored, in units of
    the training histogram's own asymmetry; None when it cannot be told (no reference histogram, a
    nearly symmetric one, no contrast).

    Shapes are quantile curves standardized by their median and 2nd–98th percentile span, so a
    section's offset, gain and bit depth do not matter. This works where the training data's
    histogram is clearly skewed (ISBI's ssTEM: a tail of dark membranes): measured on the project's
    data, ISBI and PSSR sections sit at (0.3–0.7, 0.8–1.5) as they are and the reverse inverted.
    Lucchi's FIB-SEM histogram is nearly symmetric (asymmetry 0.01): for an engine trained on it
    polarity cannot be told this way, and nothing is decided or warned.
    """
    if sample is None or not norm.histogram:
        return None
    ref = reference_quantiles(norm, _SHAPE_LEVELS)
    sec = quantiles(sample, _SHAPE_LEVELS)
    if not np.all(np.isfinite(sec)) or sec[-1] <= sec[0] or ref[-1] <= ref[0]:
        return None
    asymmetry = float(np.abs(_shape(ref) - _shape(-ref[::-1])).mean())
    if asymmetry < MIN_ASYMMETRY:
        return None
    direct = float(np.abs(_shape(sec) - _shape(ref)).mean())
    mirrored = float(np.abs(_shape(-sec[::-1]) - _shape(ref)).mean())
    return direct / asymmetry, mirrored / asymmetry


def looks_inverted(norm: Normalization, sample: np.ndarray | None) -> bool:
    """The section's histogram is near the mirrored training histogram and far from the histogram itself."""
    p = polarity(norm, sample)
    return p is not None and p[1] < NEAR and p[0] > FAR


def _auto(norm: Normalization, sample: np.ndarray | None, dtype: np.dtype, invert: bool | None) -> IntensityMap:
    """``bundle`` or ``percentile``, with or without a flip, and the reason (see the module docstring)."""
    reasons: list[str] = []
    flip = bool(invert)
    if norm.adaptive in ("percentile", "meanstd") and sample is not None and np.asarray(sample).size:
        # The network was trained on each image normalized by its own statistics (an imported
        # network's zero_mean_unit_variance / scale_range): do the same with the section's.
        why = f"the engine normalizes each image by its own statistics ({norm.adaptive})"
        return replace(make_intensity_map(norm.adaptive, norm, sample, dtype=dtype, invert=flip), reason="; ".join([why, *reasons]))
    bundle = make_intensity_map("bundle", norm, sample, dtype=dtype, invert=flip)
    problem = mismatch(bundle, sample)
    if problem is None or "no contrast" in problem or "no finite" in problem:
        return replace(bundle, reason="; ".join(["the section's values match the training data's", *reasons]))
    lo, hi = quantiles(sample, np.asarray(norm.percentiles) / 100)  # type: ignore[arg-type]
    t_lo, t_hi = norm.percentile_values
    why = (
        f"the section's values ({lo:.4g} to {hi:.4g} at the {_ordinal(norm.percentiles[0])}–{_ordinal(norm.percentiles[1])} "
        f"percentiles) differ from the training data's ({t_lo:.4g} to {t_hi:.4g}): matched linearly"
    )
    return replace(make_intensity_map("percentile", norm, sample, dtype=dtype, invert=flip), reason="; ".join([why, *reasons]))


def _invert_max(dtype: np.dtype, sample: np.ndarray | None) -> float:
    """What ``x`` is subtracted from to flip the contrast: the dtype's maximum for integers (an
    inverted 8-bit section becomes 8-bit again), the sample's min + max for floats (their range is
    kept, whatever it is)."""
    if np.dtype(dtype).kind in "ui" or sample is None:
        return dtype_max(dtype)
    lo, hi = quantiles(sample, [0.0, 1.0])
    return float(lo + hi) if np.isfinite(lo) else 1.0
