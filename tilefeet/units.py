"""Physical units: everything inside tilefeet is in nanometres.

User input comes in many forms (``"4nm"``, ``"0.004 um"``, ``"40Å"``, ``4``, ``"5,4nm"`` for
anisotropic y/x) and NGFF axis units are words (``"nanometer"``, ``"micrometer"``). Both are
normalized here, once, at the boundary; the rest of the code only sees ``pixel_size_nm`` pairs.
"""

from __future__ import annotations

import math
import re
import warnings

from .errors import TilefeetWarning, UnitError

# Nanometres per unit. Keys are lower-case; NGFF (UDUNITS-2) names, their plurals, symbols.
_NM_PER_UNIT: dict[str, float] = {
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,  # Greek mu, distinct from the micro sign above
    "micron": 1e3,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "mm": 1e6,
    "millimeter": 1e6,
    "millimetre": 1e6,
    "cm": 1e7,
    "centimeter": 1e7,
    "centimetre": 1e7,
    "m": 1e9,
    "meter": 1e9,
    "metre": 1e9,
    "pm": 1e-3,
    "picometer": 1e-3,
    "picometre": 1e-3,
    "a": 0.1,
    "å": 0.1,
    "Å".lower(): 0.1,
    "angstrom": 0.1,
    "ångström": 0.1,
    "fm": 1e-6,
    "femtometer": 1e-6,
}
KNOWN_UNITS = sorted({k for k in _NM_PER_UNIT if len(k) > 2} | {"nm", "um", "mm", "pm", "Å"})

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_QUANTITY = re.compile(rf"^\s*({_NUMBER})\s*([^\d\s,]*)\s*$")


def nm_per_unit(unit: str | None, *, where: str = "") -> float:
    """Nanometres in one ``unit`` (an NGFF axis unit or a symbol). ``None`` is an error."""
    if unit is None or not str(unit).strip():
        raise UnitError(f"no spatial unit{_at(where)}; give the pixel size with --pixel-size, e.g. 4nm")
    key = str(unit).strip().lower()
    if key.endswith("s") and key[:-1] in _NM_PER_UNIT and len(key) > 3:
        key = key[:-1]  # plurals: "nanometers"
    try:
        return _NM_PER_UNIT[key]
    except KeyError:
        raise UnitError(
            f"unknown unit {unit!r}{_at(where)}; use one of nanometer, micrometer, angstrom, "
            f"millimeter (or nm, um, Å), or override it with --pixel-size, e.g. 4nm"
        ) from None


def parse_length_nm(text: str | float | int, *, default_unit: str = "nm", where: str = "") -> float:
    """One length in nm: ``"4nm"``, ``"0.004um"``, ``"40 Å"``, ``4`` (default unit nm)."""
    if isinstance(text, (int, float)):
        value, unit = float(text), default_unit
    else:
        m = _QUANTITY.match(str(text))
        if not m:
            raise UnitError(
                f"cannot read {text!r} as a length{_at(where)}; write a number and a unit, e.g. 4nm or 0.004um"
            )
        value, unit = float(m.group(1)), (m.group(2) or default_unit)
    nm = value * nm_per_unit(unit, where=where)
    if not math.isfinite(nm) or nm <= 0:
        raise UnitError(f"pixel size must be a positive length, got {text!r}{_at(where)}")
    return nm


def parse_pixel_size(text: str | float | int | tuple | list, *, where: str = "") -> tuple[float, float]:
    """A ``(y, x)`` pixel size in nm from ``"4nm"``, ``"5,4nm"``, ``"5nm,4nm"``, ``4`` or ``(5, 4)``.

    A unit written only on the last value applies to both (``"5,4nm"``).
    """
    z, yx = parse_voxel_size(text, where=where)
    if z is not None:
        raise UnitError(f"pixel size {text!r}{_at(where)}: give one value or two (y,x), e.g. 4nm or 5,4nm")
    return yx


def parse_voxel_size(text: str | float | int | tuple | list, *, where: str = "") -> tuple[float | None, tuple[float, float]]:
    """``(z or None, (y, x))`` in nm from a pixel size (one or two values, as
    :func:`parse_pixel_size`) or a voxel size of three (z,y,x): ``"50,4,4nm"`` (a stack's section
    thickness, then its pixel size). A unit written only on the last value applies to all."""
    if isinstance(text, (tuple, list)):
        parts = [p if isinstance(p, str) else float(p) for p in text]
    elif isinstance(text, (int, float)):
        parts = [float(text)]
    else:
        parts = [p.strip() for p in str(text).replace("x", ",").replace("×", ",").split(",")]
        parts = [p for p in parts if p]
    if len(parts) not in (1, 2, 3):
        raise UnitError(f"pixel size {text!r}{_at(where)}: give one value, two (y,x) or, for a stack, three (z,y,x), e.g. 4nm, 5,4nm or 50,4,4nm")
    if isinstance(text, str) and not re.search(r"[^\d\s.,xX×eE+-]", text):
        # A bare number is read as nm; say so, since 5 meaning 5 µm is a common slip.
        warnings.warn(TilefeetWarning(f"{where or 'pixel size'} {text} has no unit: read as {text} nm (write e.g. {text}nm or {text}um to say so)"), stacklevel=3)
    unit = "nm"
    if isinstance(parts[-1], str):
        m = _QUANTITY.match(parts[-1])
        if m and m.group(2):
            unit = m.group(2)
    values = [parse_length_nm(p, default_unit=unit, where=where) for p in parts]
    if len(values) == 3:
        return values[0], (values[1], values[2])
    return None, (values[0], values[-1])


def format_nm(nm: float | tuple[float, float]) -> str:
    """``4.0 -> "4 nm"``, ``(5, 4) -> "5 × 4 nm"``."""
    if isinstance(nm, tuple):
        if math.isclose(nm[0], nm[1], rel_tol=1e-9):
            return format_nm(nm[0])
        return f"{nm[0]:.4g} × {nm[1]:.4g} nm"
    return f"{nm:.4g} nm"


def _at(where: str) -> str:
    return f" in {where}" if where else ""
