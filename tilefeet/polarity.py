"""Contrast polarity: is the section's contrast the training data's, or its mirror image?

An engine trained on dark membranes sees nothing it knows in a section with bright ones, and
writes a confident wrong answer. Whether a section is inverted is decided here from evidence,
for any engine (shipped, fine-tuned, imported), when the user has not said (``--invert`` /
``--no-invert``):

1. **The network** (the primary evidence): a few lattice tiles with tissue are run as they are
   and inverted, each also mirrored left-right. On data like its training data a network trained
   with flips finds the same structures in a tile and in its mirror image, and is sure of what it
   calls foreground; on contrast it never saw, its masks disagree with their mirror images' and
   its foreground is hesitant or missing. Two statistics per class, compared between the two
   polarities: the *consistency* (Dice of the masks of a tile and of its mirror image) and the
   *confidence* (mean 2p − 1 over the pixels called foreground). Measured on this project's data
   (whole images, both shipped engines, ISBI, Lucchi, PSSR 2/8 nm): the true polarity has the
   higher consistency and confidence wherever the network finds its class (by 0.10–0.98 and
   0.10–0.95), except PSSR through the membrane engine, where both differ by under 0.05 and
   point the wrong way: evidence that small is *weak* and decides nothing alone.
   Statistics the bundle records of its own training data (``[reference]``: class fractions,
   consistency, confidence) are shown beside them; the class fraction is not used to decide:
   on PSSR the wrong polarity's membrane fraction is the one nearer the training data's.
2. **The histogram** (shown, never decisive): the section's histogram against the training data's
   and its mirror image (:func:`tilefeet.intensity.polarity`). It only speaks where the training
   histogram is clearly skewed, and even then a single slice's histogram misleads: the asymmetry
   of single Lucchi slices ranges over 0.003–0.08, and a fine-tuned engine's one-slice reference
   made its own data look inverted (F1 0.04, when the histogram decided). It is reported in the
   plan and in the warning when the network cannot decide.

Decision: only strong network evidence flips the contrast: both margins past their thresholds, a
confident network, and most probed tiles agreeing on their own (a section of about one tile is
judged by the four quarters of its tile, all of which must agree: :data:`QUARTER_AGREEMENT`).
Anything less (weak or mixed evidence, no tile with anything of the engine's classes) keeps it as
it is and warns, in one line with the evidence (the histogram's included) and the flags that
settle it: a silent flip, or a silent keep of a section the network cannot read, are what this
module exists to prevent. The plan
(``--dry-run``) and the output's provenance show the decision and its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import TilefeetWarning

#: Network evidence is strong when consistency and confidence both favour one polarity by at
#: least these margins (see the module docstring for the measurements behind them), ...
STRONG_CONSISTENCY = 0.06
STRONG_CONFIDENCE = 0.04
#: ... the favoured polarity's foreground confidence is at least this (a network unsure of what it
#: calls foreground either way vouches for neither: a random network's is about 0.5), ...
CONFIDENT = 0.6
#: ... and at least this fraction of the probed tiles that show the classes favour it on their own;
TILE_AGREEMENT = 0.75
#: a probe of a single tile (a section of about one tile) splits it into quarters, and all of them
#: that show the classes must favour it: quarters of one patch of tissue are not independent
#: samples, and one patch can fool a network as a whole. Measured: em-membrane on the PSSR 8 nm
#: image (one tile at 4 nm, membranes near Nyquist) favours the wrong polarity by 0.10 consistency
#: and 0.13 confidence pooled, with 3 of 4 quarters; every correct one-tile decision here (ISBI
#: slices, PSSR 2 nm) has 4 of 4.
QUARTER_AGREEMENT = 1.0
#: A class counts as found in a probe when at least this fraction of its pixels is foreground.
MIN_FOREGROUND = 1e-4


class PolarityWarning(TilefeetWarning):
    """The contrast polarity could not be told from the evidence (or the evidence disagreed)."""


@dataclass(frozen=True)
class OutputStats:
    """What a network's output looks like on some data, per class: foreground ``fraction``,
    ``consistency`` (Dice of the masks of each tile and of its left-right mirror image's, NaN when
    neither has foreground) and ``confidence`` (mean 2p − 1 over foreground pixels, NaN without)."""

    fraction: tuple[float, ...]
    consistency: tuple[float, ...]
    confidence: tuple[float, ...]
    #: the same statistics of each probed tile alone (a probe's; empty for a bundle's record), or of
    #: the four quarters of the only tile a probe of a small section has (``quarters``)
    tiles: tuple[OutputStats, ...] = ()
    quarters: bool = False

    def to_toml(self, data: str = "") -> dict[str, Any]:
        doc: dict[str, Any] = {
            "fraction": [_round(v) for v in self.fraction],
            "consistency": [_round(v) for v in self.consistency],
            "confidence": [_round(v) for v in self.confidence],
        }
        return doc | ({"data": data} if data else {})

    @classmethod
    def from_toml(cls, doc: Mapping[str, Any] | None) -> OutputStats | None:
        if not doc:
            return None
        try:
            fraction, consistency, confidence = (tuple(float(v) for v in doc[k]) for k in ("fraction", "consistency", "confidence"))
            return cls(fraction, consistency, confidence)
        except (KeyError, TypeError, ValueError):
            return None

    def brief(self) -> str:
        return f"consistency {_fmt(self.consistency)}, confidence {_fmt(self.confidence)}, fraction {_fmt(self.fraction)}"


def _round(v: float) -> float:
    return float("nan") if not math.isfinite(v) else round(float(v), 4)


def _fmt(values: Sequence[float]) -> str:
    parts = ["-" if not math.isfinite(v) else f"{v:.2f}" for v in values]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def output_stats(p: np.ndarray, p_mirror: np.ndarray, activation: str, valid: np.ndarray | None = None) -> OutputStats:
    """Statistics of probabilities ``p`` ``(N, C, H, W)`` and of the predictions for the mirrored
    inputs, mirrored back (``p_mirror``, same shape), over the pixels where ``valid`` ``(N, H, W)``
    is true (default: all)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    q = np.clip(np.asarray(p_mirror, dtype=np.float64), 0.0, 1.0)
    a, b = _masks(p, activation), _masks(q, activation)
    if valid is None:
        valid = np.ones((p.shape[0], *p.shape[2:]), dtype=bool)
    a &= valid[:, None]
    b &= valid[:, None]
    size = int(valid.sum())
    fraction, consistency, confidence = [], [], []
    for c in range(p.shape[1]):
        ac, bc = a[:, c], b[:, c]
        n = int(ac.sum()) + int(bc.sum())
        fraction.append(float(ac.sum()) / max(size, 1))
        if n < MIN_FOREGROUND * 2 * size or n == 0:
            consistency.append(float("nan"))
            confidence.append(float("nan"))
            continue
        consistency.append(2.0 * float((ac & bc).sum()) / n)
        confidence.append(float(np.concatenate([2 * p[:, c][ac] - 1, 2 * q[:, c][bc] - 1]).mean()))
    return OutputStats(tuple(fraction), tuple(consistency), tuple(confidence))


def _masks(p: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax" and p.shape[1] > 1:
        return np.argmax(p, axis=1)[:, None] == np.arange(p.shape[1])[None, :, None, None]
    return p >= 0.5


Strength = Literal["strong", "weak", "none", "given"]
_STRENGTH = {"strong": "strong evidence", "weak": "weak evidence", "none": "no clear evidence", "given": "given"}


@dataclass(frozen=True)
class Polarity:
    """The decision and its evidence (shown in the plan; the warning, if any, is issued by the caller)."""

    invert: bool
    strength: Strength  #: of the network evidence; "given": the user said (--invert / --no-invert)
    plain: OutputStats | None = None  #: the network's output on the section as it is
    inverted: OutputStats | None = None  #: ... and inverted
    histogram: tuple[float, float] | None = None  #: distances to the training histogram, as is and mirrored
    reference: OutputStats | None = None  #: the bundle's record of its own training data
    tiles: int = 0
    warning: str | None = None

    def _agreement(self) -> str:
        if self.plain is None or self.inverted is None or self.strength == "none":
            return ""
        margins = network_margins(self.plain, self.inverted)
        return _agreement_text(self.plain, self.inverted, margins is not None and margins[0] < 0)

    def describe(self) -> str:
        """One line for the plan: what was decided and on what evidence."""
        if self.strength == "given":
            return "inverted (--invert)" if self.invert else "as it is (--no-invert)"
        verdict = "inverted" if self.invert else "as it is"
        parts = []
        if self.plain is not None and self.inverted is not None:
            parts.append(
                f"network on {self.tiles} tile{'s' if self.tiles != 1 else ''}: consistency {_fmt(self.plain.consistency)} as is vs "
                f"{_fmt(self.inverted.consistency)} inverted, confidence {_fmt(self.plain.confidence)} vs "
                f"{_fmt(self.inverted.confidence)}{self._agreement()} ({_STRENGTH[self.strength]})"
            )
        if self.histogram is not None:
            d, m = self.histogram
            parts.append(f"histogram distance {d:.2f} as is vs {m:.2f} mirrored")
        if self.reference is not None:
            parts.append(f"training data: {self.reference.brief()}")
        return verdict + (": " + "; ".join(parts) if parts else "")


def _agreement_text(plain: OutputStats, inverted: OutputStats, invert: bool) -> str:
    agree, n = tile_votes(plain, inverted, -1 if invert else 1)
    return f", {agree} of {n} {'quarters' if plain.quarters else 'tiles'} agree" if n > 1 else ""


def network_margins(plain: OutputStats, inverted: OutputStats) -> tuple[float, float] | None:
    """Mean over classes of (as is − inverted) consistency and confidence; a class found in one
    polarity only counts 0 for the other; classes found in neither are left out (None: no class)."""
    dc, df = [], []
    for cp, ci, fp, fi in zip(plain.consistency, inverted.consistency, plain.confidence, inverted.confidence):
        if math.isnan(cp) and math.isnan(ci):
            continue
        dc.append(_nz(cp) - _nz(ci))
        df.append(_nz(fp) - _nz(fi))
    if not dc:
        return None
    return float(np.mean(dc)), float(np.mean(df))


def _nz(v: float) -> float:
    return 0.0 if math.isnan(v) else v


def network_vote(plain: OutputStats | None, inverted: OutputStats | None) -> tuple[int, Strength]:
    """+1 (as it is) / −1 (inverted) / 0, and how strong: both margins past the thresholds in one
    direction is strong, both in one direction below them is weak, anything else is none."""
    if plain is None or inverted is None:
        return 0, "none"
    margins = network_margins(plain, inverted)
    if margins is None:
        return 0, "none"
    dc, df = margins
    sign = int(np.sign(dc))
    if sign == 0 or int(np.sign(df)) != sign:
        return 0, "none"
    winner = plain if sign > 0 else inverted
    confident = float(np.mean([_nz(v) for v in winner.confidence])) >= CONFIDENT
    if abs(dc) >= STRONG_CONSISTENCY and abs(df) >= STRONG_CONFIDENCE and confident and _tiles_agree(plain, inverted, sign):
        return sign, "strong"
    return sign, "weak"


def tile_votes(plain: OutputStats, inverted: OutputStats, sign: int) -> tuple[int, int]:
    """(tiles favouring polarity ``sign`` in consistency and confidence both, tiles showing the classes)."""
    votes = []
    for a, b in zip(plain.tiles, inverted.tiles):
        m = network_margins(a, b)
        if m is not None:
            votes.append(bool(np.sign(m[0]) == sign and np.sign(m[1]) == sign))
    return sum(votes), len(votes)


def _tiles_agree(plain: OutputStats, inverted: OutputStats, sign: int) -> bool:
    """Do most probed tiles favour the polarity the pooled statistics favour? True when the probe
    kept no per-tile statistics."""
    agree, n = tile_votes(plain, inverted, sign)
    return n == 0 or agree / n >= (QUARTER_AGREEMENT if plain.quarters else TILE_AGREEMENT)


def histogram_vote(histogram: tuple[float, float] | None) -> int:
    """+1 (as it is) / −1 (inverted) / 0 from :func:`tilefeet.intensity.polarity`'s distances."""
    from .intensity import FAR, NEAR

    if histogram is None:
        return 0
    direct, mirrored = histogram
    if mirrored < NEAR and direct > FAR:
        return -1
    if direct < NEAR and mirrored > FAR:
        return 1
    return 0


def decide(
    plain: OutputStats | None,
    inverted: OutputStats | None,
    histogram: tuple[float, float] | None,
    *,
    reference: OutputStats | None = None,
    tiles: int = 0,
) -> Polarity:
    """Flip only on strong network evidence for it; anything short of strong evidence either way
    keeps the contrast and warns, with the evidence (the histogram's included) and the flags."""
    net, strength = network_vote(plain, inverted)
    invert = strength == "strong" and net < 0
    result = Polarity(invert, strength, plain, inverted, histogram, reference, tiles)
    if strength == "strong":
        return result
    hist = histogram_vote(histogram)
    leans = {1: "as it is", -1: "inverted", 0: "neither way"}
    if plain is None or inverted is None or network_margins(plain, inverted) is None:
        why = "no probed tile has anything of the engine's classes, either way"
    else:
        why = f"the network's outputs lean {leans[net]}, too little to act on"
    evidence = result.describe().partition(": ")[2]
    warning = (
        f"could not tell whether the section's contrast is inverted relative to the engine's training data: {why}; "
        f"the histogram suggests {leans[hist]}" + (f" ({evidence})" if evidence else "") + "; kept it as it is: pass --invert "
        "if the engine's classes look the opposite way here (bright membranes where training had dark ones), or --no-invert to confirm"
    )
    return Polarity(invert, strength, plain, inverted, histogram, reference, tiles, warning)


# ------------------------------------------------------------------------------------ references


def reference_stats(model: Any, images: Sequence[np.ndarray], to_network: Any, *, activation: str = "sigmoid", divisor: int = 16) -> OutputStats:
    """:class:`OutputStats` of a torch ``model`` (returning probabilities) on whole ``images``
    (raw; ``to_network`` normalizes them), each padded by reflection to a multiple of ``divisor``:
    what a bundle records of its own training data (``[reference]``)."""
    import torch

    p_all, q_all = [], []
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    model.eval()
    for img in images:
        x = np.asarray(to_network(np.asarray(img)), dtype=np.float32)
        h, w = x.shape
        ph, pw = -h % divisor, -w % divisor
        x = np.pad(x, ((0, ph), (0, pw)), mode="reflect") if ph or pw else x
        t = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(device)
        with torch.no_grad():
            p = model(t)[..., :h, :w].float().cpu().numpy()
            q = torch.flip(model(torch.flip(t, dims=(3,))), dims=(3,))[..., :h, :w].float().cpu().numpy()
        p_all.append(p)
        q_all.append(q)
    # images differ in size: statistics over all pixels of all images
    return _pooled([output_stats(p, q, activation) for p, q in zip(p_all, q_all)], [p.size for p in p_all])


def _pooled(stats: Sequence[OutputStats], weights: Sequence[float]) -> OutputStats:
    w = np.asarray(weights, dtype=np.float64)

    def mean(values: list[tuple[float, ...]]) -> tuple[float, ...]:
        a = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(a)
        num = np.where(ok, a, 0.0) * w[:, None]
        den = (ok * w[:, None]).sum(axis=0)
        return tuple(float(v) for v in np.where(den > 0, num.sum(axis=0) / np.maximum(den, 1e-300), np.nan))

    return OutputStats(mean([s.fraction for s in stats]), mean([s.consistency for s in stats]), mean([s.confidence for s in stats]))


def record_reference(bundle: Any, images: Sequence[np.ndarray], data: str) -> Any:
    """Record the network's :class:`OutputStats` on ``images`` (raw, at the engine's pixel size:
    its validation data) in the bundle's ``engine.toml`` as ``[reference]``; returns the reloaded
    bundle. Tiles of a section are compared with these in the plan (:func:`decide` shows them)."""
    import tomllib

    from .engine import ENGINE_FILE, dump_toml, load_engine

    model = bundle.build_model()
    stats = reference_stats(model, images, bundle.normalization.to_network, activation=bundle.activation, divisor=bundle.divisor)
    path = bundle.path / ENGINE_FILE
    doc = tomllib.loads(path.read_text())
    doc["reference"] = stats.to_toml(data)
    text = dump_toml(doc)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return load_engine(bundle.path)
