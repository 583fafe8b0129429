"""Options of an objects run, normalized once (:meth:`ObjectSettings.create`), and the plan they
give on a given section (:class:`ObjectPlan`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Literal

from ..engine import engine_recipes
from ..errors import ConfigError, UnitError
from ..geometry import BlockGrid, Pair
from ..settings import pair
from .cells import CELL_METHODS, CellRecipe, growth_steps
from .label import Connectivity
from .volume import SKIMAGE_CONNECTIVITY, Triple, VolumeGrid

TableFormat = Literal["parquet", "csv"]
DEFAULT_BLOCK = 4096
DEFAULT_BLOCK_3D = (16, 1024, 1024)  #: (z, y, x) of a stack's blocks: 16 Mi voxels, as a 4096² section block
DEFAULT_CONNECTIVITY_3D = 26
DEFAULT_GROW_NM = 40.0  #: how far the ``grow`` method's cells (and a stack's 3-D cells in ``evaluate``) grow
#: Cells when neither the engine nor a flag says otherwise: chosen on isbi-membrane's training slices
#: (ISBI 2012 training slices 0-20, and the same slices degraded; ``benchmarks/cells_scores.py --choose``).
DEFAULT_CELLS = CellRecipe()
UINT32_LIMIT = 2**32 - 1  #: more objects than this switch the label image to uint64

_AREA = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Zµμ²2]*)\s*$")
_NM2_PER = {"": 1.0, "nm2": 1.0, "nm²": 1.0, "um2": 1e6, "um²": 1e6, "µm2": 1e6, "µm²": 1e6, "μm2": 1e6, "μm²": 1e6}
_SIZE = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Zµμ²³23]*)\s*$")
_NM3_PER = {"nm3": 1.0, "nm³": 1.0, "um3": 1e9, "um³": 1e9, "µm3": 1e9, "µm³": 1e9, "μm3": 1e9, "μm³": 1e9}


def size_kind(text: str | float | int | None) -> str:
    """What a ``--min-size`` is: ``"volume"`` (nm3, um3), ``"pixels"`` (px, voxels), or ``"area"``
    (nm2, um2, or a bare number)."""
    if text is None or isinstance(text, (int, float)):
        return "area"
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    return "volume" if unit in _NM3_PER else "pixels" if unit in ("px", "voxels", "voxel", "vx") else "area"


def parse_volume(text: str | float | int | None, *, voxel_nm3: float, where: str = "--min-size") -> float:
    """A volume in nm³ from ``"0.001um3"``, ``"5e5nm3"``, ``"20px"`` (voxels) or a number (nm³)."""
    if text is None:
        return 0.0
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise UnitError(f"cannot read {text!r} as a volume in {where}; write e.g. 0.001um3, 5e5nm3 or 20px")
        value, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("px", "voxels", "voxel", "vx"):
        nm3 = value * voxel_nm3
    elif unit in _NM3_PER or unit == "":
        nm3 = value * _NM3_PER.get(unit, 1.0)
    else:
        raise UnitError(f"{where} {text!r} is not a volume; objects of a stack are 3-D: give e.g. 0.001um3, 5e5nm3 or 20px (voxels)")
    if not math.isfinite(nm3) or nm3 < 0:
        raise ConfigError(f"{where} must be a volume of 0 or more, got {text!r}")
    return nm3


def parse_z_extent(text: str | float | int | None) -> tuple[int, float]:
    """``--min-z-extent``: a number of sections (``3``) or a length (``150nm``, ``0.15um``), as
    (sections, nm); the other is 0."""
    if text is None:
        return 0, 0.0
    if isinstance(text, bool):
        raise ConfigError(f"--min-z-extent must be a number of sections or a length, got {text!r}")
    raw = str(text).strip()
    if re.fullmatch(r"\+?\d+(\.0*)?", raw) or (isinstance(text, (int, float)) and float(text).is_integer() and text >= 0):
        return int(float(raw)), 0.0
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", raw):
        raise ConfigError(f"--min-z-extent {raw} is neither a whole number of sections nor a length; write e.g. 3 (sections) or 150nm")
    return 0, parse_distance_nm(raw, where="--min-z-extent")


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
    #: objects smaller than this are dropped (cells: join a neighbour; ``grow`` cells: seeds dropped), e.g.
    #: "0.01um2", 2000 (nm²), "20px"; a stack's: "0.001um3". None: the engine's recipe (:func:`resolve_recipe`), else 0
    min_size: str | float | None = None
    fill_holes: bool | None = None  #: fill holes (background not reaching the image edge) before labelling; None: the engine's recipe, else no
    cells: bool = False  #: cells between membranes instead of objects of the class (see :mod:`.cells`)
    grow_nm: float | None = None  #: cells: how far the flood reaches (None: the recipe's; ``grow``: 40 nm)
    seed_threshold: float | None = None  #: cells: seeds are the regions of membrane probability below this (None: the recipe's)
    merge_threshold: float | None = None  #: cells: neighbours whose boundary's mean probability is below this merge (0: never; None: the recipe's)
    cell_method: str = "watershed"  #: cells: ``watershed`` (seeds, flood, merge) or ``grow`` (regions below the label threshold grown by --grow)
    block_size: tuple[int, ...] | None = None  #: one task's block, (y, x), or (z, y, x) for a stack; a multiple of chunk_size (default: ≤ 4096; stacks 16, 1024, 1024)
    chunk_size: Pair | None = None  #: chunks of the label image (default: the probabilities')
    blocks_in_flight: int = 2  #: blocks in memory at once (local runs)
    table_format: TableFormat = "parquet"  #: "parquet" or "csv"
    uint32_limit: int = UINT32_LIMIT  #: ids above this make the label image uint64 (lowered only by tests)
    connectivity: int | None = None  #: a stack's objects: 6, 18 or 26 (default 26); a section's are 8-connected
    min_z_extent: str | int | None = None  #: a stack's objects spanning fewer sections (3) or less z (150nm) are dropped

    @classmethod
    def create(cls, **kwargs: Any) -> ObjectSettings:
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise ConfigError(f"unknown objects option(s) {sorted(unknown)}; known: {sorted(names)}")
        kw = {k: v for k, v in kwargs.items() if v is not None}
        for key in ("block_size", "chunk_size"):
            if key in kw:
                kw[key] = _sizes(kw[key], key.replace("_", "-")) if key == "block_size" else pair(kw[key], key.replace("_", "-"))
        if "connectivity" in kw:
            try:
                kw["connectivity"] = int(kw["connectivity"])
            except (TypeError, ValueError):
                raise ConfigError(f"--connectivity must be 6, 18 or 26 (a stack) or 8 (a section), got {kw['connectivity']!r}") from None
        if "grow_nm" in kw and isinstance(kw["grow_nm"], str):
            kw["grow_nm"] = parse_distance_nm(kw["grow_nm"], where="--grow")
        if "cell_method" in kw:
            kw["cell_method"] = str(kw["cell_method"]).lower()
        if "table_format" in kw:
            kw["table_format"] = str(kw["table_format"]).lower()
        return cls(**kw)

    def __post_init__(self) -> None:
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise ConfigError(f"--threshold must be a probability between 0 and 1, got {self.threshold}")
        if self.grow_nm is not None and not (isinstance(self.grow_nm, (int, float)) and self.grow_nm >= 0):
            raise ConfigError(f"--grow must be a length of 0 or more, got {self.grow_nm}")
        for name, flag in (("seed_threshold", "--seed-threshold"), ("merge_threshold", "--merge-threshold")):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0):
                raise ConfigError(f"{flag} must be a probability between 0 and 1, got {v!r}")
        if self.cell_method not in CELL_METHODS:
            raise ConfigError(f"--cell-method must be {' or '.join(CELL_METHODS)}, got {self.cell_method!r}")
        if not self.cells and (self.seed_threshold is not None or self.merge_threshold is not None or self.cell_method != "watershed"):
            raise ConfigError("--seed-threshold, --merge-threshold and --cell-method shape cells: add --cells")
        if self.cells and self.cell_method == "watershed" and self.threshold is not None:
            raise ConfigError(f"--threshold {self.threshold:g} sets the class mask, which the watershed's cells do not use: their seeds "
                              f"are the regions below --seed-threshold (or use --cell-method grow, seeded below --threshold)")
        if self.cells and self.cell_method == "grow" and (self.seed_threshold is not None or self.merge_threshold is not None):
            raise ConfigError("--cell-method grow seeds at the label threshold (--threshold) and never merges: "
                              "leave out --seed-threshold and --merge-threshold, or use the watershed")
        if self.blocks_in_flight < 1:
            raise ConfigError(f"--blocks-in-flight must be at least 1, got {self.blocks_in_flight}")
        if self.table_format not in ("parquet", "csv"):
            raise ConfigError(f"table format must be parquet or csv, got {self.table_format!r}")
        if self.min_size is not None and not isinstance(self.min_size, (int, float)):
            if size_kind(self.min_size) == "volume":
                parse_volume(self.min_size, voxel_nm3=1.0)
            else:
                parse_area(self.min_size, pixel_area_nm2=1.0)  # the unit and sign are checked now, pixels later
        if self.connectivity is not None and self.connectivity not in (*SKIMAGE_CONNECTIVITY, 8):
            raise ConfigError(f"--connectivity must be 6, 18 or 26 (a stack) or 8 (a section), got {self.connectivity}")
        parse_z_extent(self.min_z_extent)

    def min_size_nm2(self, pixel_size_nm: tuple[float, float]) -> float:
        if size_kind(self.min_size) == "volume":
            raise ConfigError(f"--min-size {self.min_size} is a volume but this output is one section (2-D); give an area, e.g. 0.01um2")
        return parse_area(self.min_size, pixel_area_nm2=pixel_size_nm[0] * pixel_size_nm[1])


def _sizes(v: Any, name: str) -> tuple[int, ...]:
    """Block sizes: one or two (y,x) integers, or three (z,y,x) for a stack."""
    parts = [p for p in v.replace("x", ",").split(",") if p.strip()] if isinstance(v, str) else v
    if isinstance(parts, (list, tuple)) and len(parts) == 3:
        try:
            out = tuple(int(x) for x in parts)
        except (TypeError, ValueError):
            out = ()
        if len(out) != 3 or min(out) < 1:
            raise ConfigError(f"{name} must be one, two (y,x) or, for a stack, three (z,y,x) positive integers, got {v!r}")
        return out
    return pair(v, name)


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
    steps: int  #: cells: rounds of the flood (0 for objects)
    cell: CellRecipe | None = None  #: cells: the recipe every block and the merge agree on
    recipe: str = ""  #: where the size, holes and cell rules came from, in one line (:func:`resolve_recipe`)

    @property
    def connectivity(self) -> Connectivity:
        """Of the objects (8-connected) or of the cells' seeds (4-connected)."""
        return 1 if self.settings.cells else 2

    def keep(self, area_px: Any) -> Any:
        """Which objects (by pixel count) are at least the minimum size; the same expression as the table's
        area. Cells of the watershed keep every seed (small cells join a neighbour after the flood)."""
        if self.cell is not None and self.cell.method == "watershed":
            return area_px >= 0
        return area_px * self.pixel_size_nm[0] * self.pixel_size_nm[1] >= self.min_size_nm2

    @property
    def min_cell_px(self) -> int:
        """Watershed cells below this many pixels join a neighbour (the same expression as :meth:`keep`)."""
        if self.cell is None or self.cell.method != "watershed" or self.min_size_nm2 <= 0:
            return 0
        return math.ceil(self.min_size_nm2 / (self.pixel_size_nm[0] * self.pixel_size_nm[1]) - 1e-9)

    def describe(self) -> dict:
        return {
            "kind": "cells" if self.settings.cells else "objects",
            "class": self.class_name,
            "connectivity": self.connectivity * 4,
            "min_size_nm2": self.min_size_nm2,
            "fill_holes": bool(self.settings.fill_holes),
            **(self.cell.describe() if self.cell is not None else {}),
            "recipe": self.recipe,
        }


def make_plan(settings: ObjectSettings, *, class_name: str, shape: Pair, pixel_size_nm: tuple[float, float],
              origin_nm: tuple[float, float], chunks: Pair, recipe: str = "") -> ObjectPlan:
    """Resolve block and chunk sizes (blocks are whole chunks, so no two tasks write one chunk)."""
    if settings.block_size is not None and len(settings.block_size) == 3:
        raise ConfigError(f"--block-size {','.join(map(str, settings.block_size))} has a z size but this output is one section (2-D); give y,x")
    if settings.connectivity not in (None, 8):
        raise ConfigError(f"--connectivity {settings.connectivity} is for stacks; objects of a section are 8-connected (leave it out)")
    if settings.min_z_extent is not None:
        raise ConfigError("--min-z-extent is for stacks; this output is one section (2-D): leave it out")
    chunk = settings.chunk_size or (min(chunks[0], shape[0]), min(chunks[1], shape[1]))
    if settings.block_size is None:
        block = tuple(max(c, DEFAULT_BLOCK // c * c) for c in chunk)
    else:
        block = settings.block_size
        if settings.chunk_size is None:  # the label image's chunks follow the blocks when they must
            chunk = tuple(c if b % c == 0 else b for b, c in zip(block, chunk))  # type: ignore[assignment]
    if block[0] % chunk[0] or block[1] % chunk[1]:
        raise ConfigError(f"--block-size {block[0]},{block[1]} must be a multiple of the chunk size {chunk[0]},{chunk[1]}")
    cell = None
    min_size_nm2 = settings.min_size_nm2(pixel_size_nm)
    if settings.cells:
        grow_nm = settings.grow_nm if settings.grow_nm is not None else DEFAULT_CELLS.grow_nm if settings.cell_method == "watershed" else DEFAULT_GROW_NM
        cell = CellRecipe(
            method=settings.cell_method,  # type: ignore[arg-type]
            seed_threshold=DEFAULT_CELLS.seed_threshold if settings.seed_threshold is None else float(settings.seed_threshold),
            merge_threshold=(DEFAULT_CELLS.merge_threshold if settings.merge_threshold is None else float(settings.merge_threshold))
            if settings.cell_method == "watershed" else 0.0,
            min_size_nm2=min_size_nm2, grow_nm=float(grow_nm), steps=growth_steps(float(grow_nm), pixel_size_nm),
        )
    return ObjectPlan(
        settings=settings, class_name=class_name, shape=shape, pixel_size_nm=pixel_size_nm, origin_nm=origin_nm,
        grid=BlockGrid(shape, (int(block[0]), int(block[1]))), chunks=(int(chunk[0]), int(chunk[1])),
        min_size_nm2=min_size_nm2, steps=cell.steps if cell is not None else 0, cell=cell, recipe=recipe,
    )


@dataclass(frozen=True)
class VolumePlan:
    """An objects run on a stack of sections: its (z, y, x) block grid and what blocks agree on."""

    settings: ObjectSettings
    class_name: str
    shape: Triple  #: (sections, y, x)
    spacing_nm: tuple[float, float, float]  #: (section thickness, pixel y, pixel x)
    origin_nm: tuple[float, float, float]
    grid: VolumeGrid
    chunks: Triple  #: of the label image
    connectivity: int  #: 6, 18 or 26
    min_size_nm3: float
    min_z_sections: int
    min_z_nm: float
    recipe: str = ""  #: where the size and holes rules came from, in one line (:func:`resolve_recipe`)

    @property
    def pixel_size_nm(self) -> tuple[float, float]:
        return (self.spacing_nm[1], self.spacing_nm[2])

    def keep(self, voxels: Any, sections: Any) -> Any:
        """Which objects (voxel count, sections spanned) are at least the minimum size and z extent
        (the same expressions as the table's volume_nm3 and z_extent_nm)."""
        import numpy as np

        ok = voxels * float(np.prod(self.spacing_nm)) >= self.min_size_nm3
        return ok & (sections >= self.min_z_sections) & (sections * self.spacing_nm[0] >= self.min_z_nm)

    def describe(self) -> dict:
        return {
            "kind": "objects",
            "class": self.class_name,
            "dimensions": 3,
            "connectivity": self.connectivity,
            "min_size_nm3": self.min_size_nm3,
            "min_z_sections": self.min_z_sections,
            "min_z_nm": self.min_z_nm,
            "fill_holes": "per section" if self.settings.fill_holes else False,
            "surface": "exposed voxel faces",
            "recipe": self.recipe,
        }


def make_volume_plan(settings: ObjectSettings, *, class_name: str, shape: Triple, spacing_nm: tuple[float, float, float],
                     origin_nm: tuple[float, float, float], chunks: Triple, where: str = "", recipe: str = "") -> VolumePlan:
    """A stack's plan: blocks of whole chunks in z, y and x (see :func:`make_plan`)."""
    at = f"{where} is a stack of {shape[0]} sections: " if where else "a stack: "
    if settings.cells:
        raise ConfigError(f"{at}--cells finds cells between membranes of one section and has no 3-D form here; "
                          f"find 3-D objects without --cells, or run --cells on each section's own output")
    if settings.connectivity == 8:
        raise ConfigError(f"{at}objects are 3-D: --connectivity is 6, 18 or 26 (26, the default, is 8-connected within a section)")
    if isinstance(settings.min_size, str) and size_kind(settings.min_size) == "area":
        m = _SIZE.match(settings.min_size)
        if m is None or m.group(2):
            raise ConfigError(f"{at}objects are 3-D and --min-size {settings.min_size} is an area; give a volume, e.g. 0.001um3 (or 20px: voxels)")
    voxel = spacing_nm[0] * spacing_nm[1] * spacing_nm[2]
    z_sections, z_nm = parse_z_extent(settings.min_z_extent)
    cz = chunks[0]
    chunk_yx = settings.chunk_size or (min(chunks[1], shape[1]), min(chunks[2], shape[2]))
    chunk = (min(cz, shape[0]), int(chunk_yx[0]), int(chunk_yx[1]))
    if settings.block_size is None:
        block = (max(chunk[0], DEFAULT_BLOCK_3D[0] // chunk[0] * chunk[0]),
                 *(max(c, b // c * c) for b, c in zip(DEFAULT_BLOCK_3D[1:], chunk[1:])))
    else:
        given = settings.block_size
        block = tuple(given) if len(given) == 3 else (max(chunk[0], DEFAULT_BLOCK_3D[0] // chunk[0] * chunk[0]), *given)
        if settings.chunk_size is None:  # the label image's y/x chunks follow the blocks when they must
            chunk = tuple(c if b % c == 0 else b for b, c in zip(block, chunk))  # type: ignore[assignment]
    if any(b % c for b, c in zip(block, chunk)):
        raise ConfigError(f"--block-size {','.join(map(str, block))} must be a multiple of the chunk size {','.join(map(str, chunk))} (z,y,x)")
    return VolumePlan(
        settings=settings, class_name=class_name, shape=shape, spacing_nm=spacing_nm, origin_nm=origin_nm,
        grid=VolumeGrid(shape, tuple(int(b) for b in block)), chunks=tuple(int(c) for c in chunk),  # type: ignore[arg-type]
        connectivity=settings.connectivity or DEFAULT_CONNECTIVITY_3D,
        min_size_nm3=parse_volume(settings.min_size, voxel_nm3=voxel),
        min_z_sections=z_sections, min_z_nm=z_nm, recipe=recipe,
    )


# ------------------------------------------------------------------------------------- recipes


def engine_recipe(engine: str | None, class_name: str) -> dict | None:
    """The engine's object recipe for a class (``[objects.<class>]`` of its ``engine.toml``), or None."""
    table = engine_recipes(engine).get(class_name)
    return dict(table) if isinstance(table, dict) else None


def _um2(nm2: float) -> str:
    return f"{nm2 / 1e6:.4g} µm²"


def resolve_recipe(settings: ObjectSettings, recipe: Any, engine: str | None, *,
                   z_spacing_nm: float | None = None) -> tuple[ObjectSettings, str]:
    """The settings with every rule a flag left open taken from the engine's ``recipe`` (its
    ``[objects.<class>]`` table: ``min_size_nm2``, ``fill_holes``, ``why``; ``cells``: ``seed_threshold``,
    ``merge_threshold``, ``min_size_nm2``, ``grow_nm``, ``why``), and one line saying where each came
    from. A stack's minimum size is the recipe's area times the section spacing (one section's worth
    of the smallest object). Without a recipe: objects keep every size and their holes; cells take
    :data:`DEFAULT_CELLS`."""
    from dataclasses import replace

    recipe = dict(recipe or {})
    src = f"the engine {engine}" if engine else "the engine"
    if settings.cells:
        if settings.cell_method == "grow":
            size = "min seed size " + (_um2(settings.min_size_nm2((1.0, 1.0))) if settings.min_size is not None and size_kind(settings.min_size) != "pixels" else str(settings.min_size or 0))
            return settings, f"cells grown {settings.grow_nm or DEFAULT_GROW_NM:g} nm from the regions below the label threshold, {size} (--cell-method grow)"
        table = dict(recipe.get("cells") or {})
        base = table if table else {}
        chosen: dict[str, Any] = {}
        given = []
        for field, flag in (("seed_threshold", "--seed-threshold"), ("merge_threshold", "--merge-threshold"),
                            ("grow_nm", "--grow"), ("min_size", "--min-size")):
            v = getattr(settings, field)
            if v is not None:
                given.append(flag)
                continue
            key = "min_size_nm2" if field == "min_size" else field
            default = getattr(DEFAULT_CELLS, key)
            chosen[field] = float(base.get(key, default))
        out = replace(settings, **chosen)
        area = out.min_size_nm2((1.0, 1.0)) if size_kind(out.min_size) != "pixels" else None
        size = "no min size" if area == 0 else f"min size {_um2(area) if area is not None else out.min_size}"
        merge = (f"neighbours merged below a mean boundary of {out.merge_threshold:g}" if out.merge_threshold
                 else "neighbours never merged")
        rules = f"seeds below p {out.seed_threshold:g}, a watershed reaching {out.grow_nm:g} nm, {merge}, {size}"
        if table:
            where = f"recipe from {src}" + (f": {table['why']}" if table.get("why") else "")
        else:
            where = ("defaults chosen on isbi-membrane's training slices" + (f"; {src} records no cell recipe" if engine else ""))
        if given:
            where += f"; {', '.join(given)} given"
        return out, f"cells: {rules} ({where})"
    chosen = {}
    notes = []
    why = f" ({recipe['why']})" if recipe.get("why") else ""
    if settings.min_size is not None:
        notes.append(f"min size {settings.min_size} (--min-size)")
    elif "min_size_nm2" in recipe:
        nm2 = float(recipe["min_size_nm2"])
        chosen["min_size"] = nm2 * z_spacing_nm if z_spacing_nm else nm2
        per = f" per section ({nm2 * z_spacing_nm / 1e9:.3g} µm³ at {z_spacing_nm:g} nm sections)" if z_spacing_nm else ""
        notes.append(f"min size {_um2(nm2)}{per}{why}")
    else:
        notes.append("no min size")
    if settings.fill_holes is not None:
        notes.append("holes filled (--fill-holes)" if settings.fill_holes else "holes kept (--no-fill-holes)")
    elif "fill_holes" in recipe:
        chosen["fill_holes"] = bool(recipe["fill_holes"])
        notes.append("holes filled" if chosen["fill_holes"] else "holes kept")
    else:
        notes.append("holes kept")
    if chosen:
        head = f"recipe from {src}"
    elif settings.min_size is not None or settings.fill_holes is not None:
        head = "flags"
    else:
        head = f"{src} records no object recipe for this class" if engine else "no engine recipe"
    return replace(settings, **chosen), f"{head}: {', '.join(notes)}"
