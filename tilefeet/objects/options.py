"""Options of an objects run, normalized once (:meth:`ObjectSettings.create`), and the plan they
give on a given section (:class:`ObjectPlan`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Literal

from ..errors import ConfigError, UnitError
from ..geometry import BlockGrid, Pair
from ..settings import pair
from .cells import growth_steps
from .label import Connectivity

TableFormat = Literal["parquet", "csv"]
DEFAULT_BLOCK = 4096
DEFAULT_GROW_NM = 40.0
UINT32_LIMIT = 2**32 - 1  #: more objects than this switch the label image to uint64

_AREA = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Zµμ²2]*)\s*$")
_NM2_PER = {"": 1.0, "nm2": 1.0, "nm²": 1.0, "um2": 1e6, "um²": 1e6, "µm2": 1e6, "µm²": 1e6, "μm2": 1e6, "μm²": 1e6}


def parse_area(text: str | float | int | None, *, pixel_area_nm2: float | None = None, where: str = "--min-size") -> float:
    """An area in nm² from ``"0.01um2"``, ``"2000nm2"``, ``"500 nm²"``, ``"20px"`` or a number (nm²)."""
    if text is None:
        return 0.0
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _AREA.match(str(text))
        if not m:
            raise UnitError(f"cannot read {text!r} as an area in {where}; write e.g. 0.01um2, 2000nm2 or 20px")
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "px":
        if pixel_area_nm2 is None:
            raise UnitError(f"{where} {text!r} is in pixels but the pixel size is not known; give it in nm2 or um2")
        nm2 = value * pixel_area_nm2
    elif unit in _NM2_PER:
        nm2 = value * _NM2_PER[unit]
    else:
        raise UnitError(f"unknown area unit {unit!r} in {where} {text!r}; use nm2, um2 (or nm², µm²) or px")
    if not math.isfinite(nm2) or nm2 < 0:
        raise ConfigError(f"{where} must be an area of 0 or more, got {text!r}")
    return nm2


def parse_distance_nm(text: str, *, where: str) -> float:
    """A length of 0 or more in nm (``"40nm"``, ``"0.04um"``, ``"0"``)."""
    from ..units import parse_length_nm

    if re.fullmatch(r"\s*\+?(0+\.?0*|\.0+)\s*[a-zA-Zµμå]*\s*", text):
        return 0.0
    try:
        return parse_length_nm(text, where=where)
    except UnitError:
        raise UnitError(f"{where} must be a length of 0 or more with a unit, e.g. 40nm or 0.04um; got {text!r}") from None


@dataclass(frozen=True)
class ObjectSettings:
    """Options of one objects run (the ``tilefeet objects`` flags, one to one)."""

    class_name: str | None = None  #: the class whose objects are found (default: the store's only class)
    threshold: float | None = None  #: probability at and above which a pixel is in the mask (default: the run's)
    min_size: str | float | None = None  #: objects (cells: seeds) smaller than this are dropped, e.g. "0.01um2", 2000 (nm²), "20px"
    fill_holes: bool = False  #: fill holes (background not reaching the image edge) before labelling
    cells: bool = False  #: cells between membranes instead of objects of the class (see :mod:`.cells`)
    grow_nm: float = DEFAULT_GROW_NM  #: cells: how far seeds grow into the membrane
    block_size: Pair | None = None  #: side of one task's block; a multiple of chunk_size (default: ≤ 4096)
    chunk_size: Pair | None = None  #: chunks of the label image (default: the probabilities')
    blocks_in_flight: int = 2  #: blocks in memory at once (local runs)
    table_format: TableFormat = "parquet"  #: "parquet" or "csv"
    uint32_limit: int = UINT32_LIMIT  #: ids above this make the label image uint64 (lowered only by tests)

    @classmethod
    def create(cls, **kwargs: Any) -> ObjectSettings:
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise ConfigError(f"unknown objects option(s) {sorted(unknown)}; known: {sorted(names)}")
        kw = {k: v for k, v in kwargs.items() if v is not None}
        for key in ("block_size", "chunk_size"):
            if key in kw:
                kw[key] = pair(kw[key], key.replace("_", "-"))
        if "grow_nm" in kw and isinstance(kw["grow_nm"], str):
            kw["grow_nm"] = parse_distance_nm(kw["grow_nm"], where="--grow")
        if "table_format" in kw:
            kw["table_format"] = str(kw["table_format"]).lower()
        return cls(**kw)

    def __post_init__(self) -> None:
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise ConfigError(f"--threshold must be a probability between 0 and 1, got {self.threshold}")
        if not (isinstance(self.grow_nm, (int, float)) and self.grow_nm >= 0):
            raise ConfigError(f"--grow must be a length of 0 or more, got {self.grow_nm}")
        if self.blocks_in_flight < 1:
            raise ConfigError(f"--blocks-in-flight must be at least 1, got {self.blocks_in_flight}")
        if self.table_format not in ("parquet", "csv"):
            raise ConfigError(f"table format must be parquet or csv, got {self.table_format!r}")
        if self.min_size is not None and not isinstance(self.min_size, (int, float)):
            parse_area(self.min_size, pixel_area_nm2=1.0)  # the unit and sign are checked now, pixels later

    def min_size_nm2(self, pixel_size_nm: tuple[float, float]) -> float:
        return parse_area(self.min_size, pixel_area_nm2=pixel_size_nm[0] * pixel_size_nm[1])


@dataclass(frozen=True)
class ObjectPlan:
    """An objects run on one section: its block grid and everything the blocks need to agree on."""

    settings: ObjectSettings
    class_name: str
    shape: Pair
    pixel_size_nm: tuple[float, float]
    origin_nm: tuple[float, float]
    grid: BlockGrid
    chunks: Pair  #: of the label image
    min_size_nm2: float
    steps: int  #: cells: rounds of growth (0 for objects)

    @property
    def connectivity(self) -> Connectivity:
        """Of the objects (8-connected) or of the cells' seeds (4-connected)."""
        return 1 if self.settings.cells else 2

    def keep(self, area_px: Any) -> Any:
        """Which objects (by pixel count) are at least the minimum size; the same expression as the table's area."""
        return area_px * self.pixel_size_nm[0] * self.pixel_size_nm[1] >= self.min_size_nm2

    def describe(self) -> dict:
        return {
            "kind": "cells" if self.settings.cells else "objects",
            "class": self.class_name,
            "connectivity": self.connectivity * 4,
            "min_size_nm2": self.min_size_nm2,
            "fill_holes": self.settings.fill_holes,
            **({"grow_nm": self.settings.grow_nm, "growth_steps": self.steps} if self.settings.cells else {}),
        }


def make_plan(settings: ObjectSettings, *, class_name: str, shape: Pair, pixel_size_nm: tuple[float, float],
              origin_nm: tuple[float, float], chunks: Pair) -> ObjectPlan:
    """Resolve block and chunk sizes (blocks are whole chunks, so no two tasks write one chunk)."""
    chunk = settings.chunk_size or (min(chunks[0], shape[0]), min(chunks[1], shape[1]))
    if settings.block_size is None:
        block = tuple(max(c, DEFAULT_BLOCK // c * c) for c in chunk)
    else:
        block = settings.block_size
        if settings.chunk_size is None:  # the label image's chunks follow the blocks when they must
            chunk = tuple(c if b % c == 0 else b for b, c in zip(block, chunk))  # type: ignore[assignment]
    if block[0] % chunk[0] or block[1] % chunk[1]:
        raise ConfigError(f"--block-size {block[0]},{block[1]} must be a multiple of the chunk size {chunk[0]},{chunk[1]}")
    steps = growth_steps(settings.grow_nm, pixel_size_nm) if settings.cells else 0
    return ObjectPlan(
        settings=settings, class_name=class_name, shape=shape, pixel_size_nm=pixel_size_nm, origin_nm=origin_nm,
        grid=BlockGrid(shape, (int(block[0]), int(block[1]))), chunks=(int(chunk[0]), int(chunk[1])),
        min_size_nm2=settings.min_size_nm2(pixel_size_nm), steps=steps,
    )
