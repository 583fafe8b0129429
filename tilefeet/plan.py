"""The plan of a run: which level to read, the three grids, the tile lattice, the output blocks.

Pure: built from an :class:`~tilefeet.image.ImageMeta`, an engine's declarations
(:class:`EngineSpec`) and the :class:`~tilefeet.settings.Settings`, with no I/O. Planning is one
pass (:func:`tilefeet.pipeline.plan_run`): :func:`read_level` chooses the pyramid level (and
refuses pixel sizes too far from the engine's, before anything is read), the caller computes the
section's intensity map from that level, then :func:`make_plan` builds the plan once. A plan holds
everything a block task needs and pickles small enough to travel with every task.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from .chunks import ChunkCheck
from .errors import ConfigError, InvalidImageError, TilefeetWarning, UnitError
from .geometry import BlockGrid, Box, GridMap, Pair, TileLattice, resample_taps
from .image import ImageMeta
from .intensity import IntensityMap
from .mask import TissueMask, tile_activity
from .resolution import Grid, choose_level, mismatch, network_grid, scale_factor
from .settings import DEFAULT_BLOCK, Settings
from .units import format_nm

#: A section whose pixel size is this far from the engine's gets a loud warning (it still runs).
LOUD_MISMATCH = 8.0
#: ... and this far is refused: a unit slip (5 um for 5 nm) would otherwise plan millions of tiles
#: and exhaust memory. 16 still admits 1 nm data for a 16 nm engine (or the reverse).
MAX_SCALE = 20.0
#: Network-grid pixels along one side of a block that the automatic block size stays under; an
#: explicit --block-size may reach MAX_NETWORK_BLOCK (memory holds a few float copies of a block).
AUTO_NETWORK_BLOCK = 6144
MAX_NETWORK_BLOCK = 16384


class SeamWarning(TilefeetWarning):
    """Crop mode with an overlap that does not cover the engine's receptive field: tiles meet at seams."""


class PixelSizeWarning(TilefeetWarning):
    """The section's pixel size is far from the engine's; results may be poor (or metadata wrong)."""


@dataclass(frozen=True)
class EngineSpec:
    """The parts of an engine bundle that planning needs (picklable, no weights)."""

    name: str
    path: str
    pixel_size_nm: tuple[float, float]
    classes: tuple[str, ...]
    divisor: int
    receptive_field: int
    tile: int
    overlap: int
    fingerprint: str = ""

    @classmethod
    def from_bundle(cls, bundle: Any) -> EngineSpec:
        return cls(
            bundle.name,
            str(bundle.path),
            tuple(bundle.pixel_size_nm),
            tuple(bundle.classes),
            bundle.divisor,
            bundle.receptive_field,
            bundle.tile,
            bundle.overlap,
            bundle.fingerprint,
        )


@dataclass(frozen=True)
class BlockGeometry:
    """Where one output block reads and computes.

    ``out_box``    the output pixels this block owns (output grid)
    ``need``       network-grid pixels the output resampling reads (== out_box when grids agree)
    ``tiles``      lattice indices (ys, xs) of every tile that touches ``need``
    ``net_box``    network-grid extent of those tiles (beyond the image: reflection)
    ``src_box``    source-level pixels the network-grid resampling reads (beyond the image: reflection)
    """

    index: Pair
    out_box: Box
    need: Box
    tiles: tuple[range, range]
    net_box: Box
    src_box: Box

    @property
    def n_tiles(self) -> int:
        return len(self.tiles[0]) * len(self.tiles[1])


@dataclass(frozen=True)
class Plan:
    """Everything that decides the output bits of a run, and the geometry of its blocks (pure, picklable).

    ``source``, ``network`` and ``output`` are the three pixel grids (see :mod:`tilefeet.resolution`);
    ``lattice`` lives in the network grid, ``blocks`` in the output grid.
    """

    image: ImageMeta
    engine: EngineSpec
    settings: Settings
    level: int  #: pyramid level read
    source: Grid  #: that level's grid
    network: Grid
    output: Grid
    lattice: TileLattice
    blocks: BlockGrid
    intensity: IntensityMap
    mask: TissueMask | None = None  #: where the network runs (``--mask``); None: everywhere
    #: the stored chunks of each level read (one listing each): missing ones were allowed
    #: (``--allow-missing-chunks``); empty for an in-memory input
    chunks: tuple[ChunkCheck, ...] = ()
    #: the contrast polarity decision and its evidence, for people (:mod:`tilefeet.polarity`); the
    #: decision itself is in ``intensity`` (its ``invert_max``)
    polarity: str = ""
    #: a stack: the input's sections this run segments (z indices; output section k is input
    #: section ``sections[k]``), each with its own intensity map and tissue mask, as if segmented
    #: alone. Empty for a section. ``intensity``/``mask`` are then section 0's.
    sections: tuple[int, ...] = ()
    section_maps: tuple[IntensityMap, ...] = ()
    section_masks: tuple[TissueMask | None, ...] = ()
    #: the output section a plan made by :meth:`for_section` computes (None: the whole run)
    section: int | None = None

    # ---- stacks

    @property
    def is_stack(self) -> bool:
        return bool(self.sections)

    @property
    def depth(self) -> int:
        """Output sections (1 for a section)."""
        return len(self.sections) or 1

    def for_section(self, k: int | None) -> Plan:
        """The plan of output section ``k`` alone: its intensity map and mask (a section's plan, or
        ``k`` None, is the plan itself)."""
        if not self.sections or k is None:
            return self
        return replace(self, intensity=self.section_maps[k], mask=self.section_masks[k] if self.section_masks else None, section=k)

    def z_blocks(self) -> list[range]:
        """The output sections of each task along z: ``block_depth`` at a time."""
        d = self.settings.block_depth
        return [range(z, min(z + d, self.depth)) for z in range(0, self.depth, d)]

    # ---- maps between grids

    @cached_property
    def src_from_net(self) -> GridMap:
        """Network-grid coordinates → source-level coordinates."""
        return self.network.map_to(self.source)

    @cached_property
    def net_from_out(self) -> GridMap:
        """Output-grid coordinates → network-grid coordinates."""
        return self.output.map_to(self.network)

    @property
    def resamples_input(self) -> bool:
        return not self.src_from_net.is_integer_shift

    @property
    def resamples_output(self) -> bool:
        return not self.net_from_out.is_integer_shift

    @property
    def crop(self) -> bool:
        return self.settings.blend == "crop"

    @cached_property
    def _active_tiles(self) -> np.ndarray | None:
        return None if self.mask is None else tile_activity(self.mask, self.network, self.lattice)

    def tile_runs(self, iy: int, ix: int) -> bool:
        """Does lattice tile (iy, ix) run (no mask, or it meets the grown mask)?"""
        active = self._active_tiles
        return True if active is None else bool(active[iy, ix])

    def block_active(self, by: int, bx: int) -> bool:
        """Does output block (by, bx) hold any pixel of the mask (else it computes and writes nothing)?"""
        return self.mask is None or self.mask.any_in(self.output, self.blocks.box(by, bx))

    def kept_pixels(self, box: Box) -> np.ndarray | None:
        """(h, w) bool of the output pixels of ``box`` inside the mask; None without a mask."""
        return None if self.mask is None else self.mask.pixels(self.output, box)

    @property
    def tta(self) -> tuple[int, ...]:
        """The test-time transforms each tile is run under (indices into ``block.TRANSFORMS``)."""
        return tuple(range(self.settings.tta))

    @property
    def channels(self) -> int:
        """Channels a block computes: one per class, plus the uncertainty with ``--uncertainty``."""
        return len(self.engine.classes) + (1 if self.settings.uncertainty else 0)

    # ---- per block

    def block(self, by: int, bx: int) -> BlockGeometry:
        out_box = self.blocks.box(by, bx)
        if self.resamples_output:
            ty, _ = resample_taps(out_box.y0, out_box.y1, self.net_from_out.y)
            tx, _ = resample_taps(out_box.x0, out_box.x1, self.net_from_out.x)
            h, w = self.network.shape
            ty, tx = np.clip(ty, 0, h - 1), np.clip(tx, 0, w - 1)
            need = Box(int(ty.min()), int(tx.min()), int(ty.max()) + 1, int(tx.max()) + 1)
        else:
            need = out_box.shift(*self.net_from_out.shift)
        tiles = self.lattice.tiles_touching(need, crop=self.crop)
        net_box = self.lattice.extent(*tiles)
        return BlockGeometry((by, bx), out_box, need, tiles, net_box, self.source_box(net_box))

    def tile_geometry(self, iy: int, ix: int) -> BlockGeometry:
        """The geometry of lattice tile ``(iy, ix)`` alone, as a block that needs just that tile (the
        polarity probe runs single tiles; ``out_box`` is the tile's box in the network grid)."""
        box = self.lattice.tile_box(iy, ix)
        return BlockGeometry((-1, -1), box, box, (range(iy, iy + 1), range(ix, ix + 1)), box, self.source_box(box))

    def source_box(self, net_box: Box) -> Box:
        """The source-level pixels that resampling ``net_box`` (network grid) reads."""
        if self.resamples_input:
            ty, _ = resample_taps(net_box.y0, net_box.y1, self.src_from_net.y)
            tx, _ = resample_taps(net_box.x0, net_box.x1, self.src_from_net.x)
            return Box(int(ty.min()), int(tx.min()), int(ty.max()) + 1, int(tx.max()) + 1)
        return net_box.shift(*self.src_from_net.shift)

    # ---- reporting

    def fingerprint(self) -> str:
        """Identifies everything that determines the output bits (for resume)."""
        doc = {
            "image": asdict(self.image),
            "engine": self.engine.fingerprint or self.engine.path,
            "settings": self.settings.fingerprint_items(),
            "level": self.level,
            "intensity": _bits(self.intensity),
            "mask": self.mask.token() if self.mask is not None else None,
        }
        if self.sections:
            doc["sections"] = list(self.sections)
            doc["section"] = self.section
            if self.section is None:  # the whole run: every section's map and mask decide bits
                doc["section_maps"] = [_bits(m) for m in self.section_maps]
                doc["section_masks"] = [m.token() if m is not None else None for m in self.section_masks]
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """Counts for ``--dry-run`` and logs: tiles, blocks, and the extra work of overlap and straddling."""
        per_block = [self._running(self.block(by, bx)) for by, bx in self.blocks if self.block_active(by, bx)]
        evaluated = int(sum(per_block))
        net_px = self.network.shape[0] * self.network.shape[1]
        tile_px = self.lattice.tile[0] * self.lattice.tile[1]
        return {
            "level": self.level,
            "source_shape": self.source.shape,
            "source_pixel_nm": self.source.pixel_size_nm,
            "network_shape": self.network.shape,
            "network_pixel_nm": self.network.pixel_size_nm,
            "scale_factor": scale_factor(self.source, self.network),
            "output_shape": self.output.shape,
            "output_pixel_nm": self.output.pixel_size_nm,
            "tile": self.lattice.tile,
            "overlap": self.lattice.overlap,
            "lattice_tiles": self.lattice.n_tiles,
            "blocks": len(self.blocks),
            "block_size": self.blocks.block,
            "tiles_evaluated": evaluated,
            "overlap_factor": self.lattice.n_tiles * tile_px / net_px,
            "straddle_factor": evaluated / self.lattice.n_tiles,
            "total_factor": evaluated * tile_px / net_px,
            "tta": self.settings.tta,
            "network_factor": evaluated * tile_px / net_px * self.settings.tta,
            "intensity": self.intensity.mode,
            **self._mask_summary(),
        }

    def _running(self, geo: BlockGeometry) -> int:
        active = self._active_tiles
        if active is None:
            return geo.n_tiles
        return int(active[geo.tiles[0].start : geo.tiles[0].stop, geo.tiles[1].start : geo.tiles[1].stop].sum())

    def _mask_summary(self) -> dict[str, Any]:
        active = self._active_tiles
        if active is None or self.mask is None:
            return {}
        return {"mask": self.mask.source, "tiles_skipped": 1 - float(active.mean()), "area_skipped": 1 - self.mask.fraction}

    def describe(self, backend: str = "") -> str:
        """The plan for people (``--dry-run``, the CLI's header); ``backend`` is the runner's line."""
        s = self.summary()
        f = s["scale_factor"]
        fy, fx = (f"{v:.4g}" for v in f)
        factor = f"{fy}" if fy == fx else f"{fy} × {fx}"
        lines = [
            f"engine      {self.engine.name} ({format_nm(self.engine.pixel_size_nm)}, classes {', '.join(self.engine.classes)})",
            f"read        level {s['level']}: {s['source_shape'][0]} × {s['source_shape'][1]} px at {format_nm(s['source_pixel_nm'])}",
            f"resample    × {factor} to the network grid: {s['network_shape'][0]} × {s['network_shape'][1]} px at "
            f"{format_nm(s['network_pixel_nm'])}" + ("" if self.resamples_input else " (no resampling)"),
            f"output      {s['output_shape'][0]} × {s['output_shape'][1]} px at {format_nm(s['output_pixel_nm'])} "
            f"({self.settings.output_grid} grid), {self.settings.output_dtype}, chunks {self.settings.chunk_size}",
            *self._stack_lines(),
            f"intensity   {'section ' + str(self.sections[0]) + ': ' if self.sections else ''}{self.intensity.describe()}",
            *([f"contrast    {self.polarity}"] if self.polarity else []),
            *([f"backend     {backend}"] if backend else []),
            f"tiles       {s['tile'][0]} × {s['tile'][1]}, overlap {s['overlap'][0]}, blend {self.settings.blend}: "
            f"{s['lattice_tiles']} lattice tiles",
            f"blocks      {s['blocks']} of {s['block_size'][0]} × {s['block_size'][1]} output px"
            + (f" × {self.depth} sections, {self.settings.block_depth} per task" if self.sections else "")
            + f", {self.settings.blocks_in_flight} in flight",
            f"work        {s['tiles_evaluated']} tile evaluations{' per section' if self.sections else ''} = "
            f"{s['total_factor']:.2f} × the section's pixels "
            f"(overlap × {s['overlap_factor']:.2f}, block straddling × {s['straddle_factor']:.2f}"
            + (", at most: tiles shared by neighbouring blocks run once per process" if s["straddle_factor"] > 1 else "")
            + (f"; test-time augmentation × {self.settings.tta} network calls per tile" if self.settings.tta > 1 else "")
            + ")",
            *(["uncertainty the TTA members' disagreement, written to uncertainty/"] if self.settings.uncertainty else []),
            *(f"chunks      {c.describe()}" for c in self.chunks),
            *(
                [f"mask        {s['mask']}: {s['area_skipped']:.0%} of the section is not tissue; {s['tiles_skipped']:.0%} of the "
                 f"lattice tiles skipped (outside it the output reads 0)"]
                if "mask" in s else []
            ),
        ]
        return "\n".join(lines)

    def _stack_lines(self) -> list[str]:
        if not self.sections:
            return []
        meta = self.image
        first, last = self.sections[0], self.sections[-1]
        apart = f"{format_nm(meta.z_spacing_nm)} apart" if meta.z_spacing_nm else "spacing unknown (z in section numbers)"
        chosen = "all" if len(self.sections) == meta.depth else f"z {first}:{last + 1}"
        return [
            f"sections    {len(self.sections)} of the stack's {meta.depth} ({chosen}), {apart}; each section with its own "
            f"intensity statistics{' and tissue mask' if self.mask is not None else ''}, as if segmented alone"
            + (f"; then the median of {self.settings.z_median} neighbouring sections" if self.settings.z_median > 1 else "")
        ]


def _bits(imap: IntensityMap) -> dict[str, Any]:
    """What of an intensity map decides output bits (not the prose of its reason)."""
    return {k: v for k, v in asdict(imap).items() if k != "reason"}


def read_level(image: ImageMeta, engine: EngineSpec, settings: Settings) -> tuple[ImageMeta, int]:
    """The image as planned (``--pixel-size`` applied) and the pyramid level to read: the one closest
    to the engine's pixel size without being coarser. Refuses, before anything is read, a pixel
    size the engine cannot be run at (none known, or more than :data:`MAX_SCALE` × off)."""
    given = settings.pixel_size_nm is not None
    if settings.pixel_size_nm is not None:
        image = image.with_pixel_size(settings.pixel_size_nm)
    px0 = image.levels[0].pixel_size_nm
    if px0 is None:
        raise InvalidImageError(
            f"{image.source} does not say its pixel size (no units in its axes metadata); "
            f"supply it with --pixel-size, e.g. --pixel-size 4nm (in Python: pixel_size_nm=\"4nm\")"
        )
    sizes = [lv.pixel_size_nm or px0 for lv in image.levels]
    level = choose_level(sizes, engine.pixel_size_nm, settings.resample_tolerance)
    ratio = mismatch(sizes[level], engine.pixel_size_nm)
    origin = "--pixel-size" if given else "the input's metadata"
    if ratio > MAX_SCALE:
        finer = sizes[level][0] < engine.pixel_size_nm[0]
        raise UnitError(
            f"the section's pixel size {format_nm(px0)} (from {origin}) is {ratio:.0f}× {'finer' if finer else 'coarser'} "
            f"than engine {engine.name!r}'s {format_nm(engine.pixel_size_nm)}, beyond the {MAX_SCALE:.0f}× tilefeet resamples: "
            f"a unit slip? (e.g. 5um written for 5nm) Fix {'--pixel-size' if given else 'the pixel size with --pixel-size'}"
            + ("" if given else " (or the input's metadata)")
            + ", or use an engine trained near this pixel size"
        )
    if mismatch(px0, engine.pixel_size_nm) >= LOUD_MISMATCH:
        warnings.warn(
            PixelSizeWarning(
                f"the section's pixel size {format_nm(px0)} (from {origin}) is {mismatch(px0, engine.pixel_size_nm):.0f}× off "
                f"the engine's {format_nm(engine.pixel_size_nm)}: check it; running anyway"
            ),
            stacklevel=2,
        )
    return image, level


@dataclass(frozen=True)
class Grids:
    """The level read and the grids of a run (:func:`grids`): level 0, the level read, network, output."""

    image: ImageMeta  #: with ``--pixel-size`` applied
    level: int
    level0: Grid
    source: Grid
    network: Grid
    output: Grid


def grids(image: ImageMeta, engine: EngineSpec, settings: Settings) -> Grids:
    """The level to read and the three grids (pure): what statistics and the tissue mask are taken
    on before the plan is built, and what :func:`make_plan` builds it on."""
    image, level = read_level(image, engine, settings)
    px0 = image.levels[0].pixel_size_nm
    assert px0 is not None  # read_level refuses images without one
    sizes = [lv.pixel_size_nm or px0 for lv in image.levels]
    lv0, lv = image.levels[0], image.levels[level]
    grid0 = Grid(lv0.shape, px0, lv0.origin_nm)
    source = Grid(lv.shape, sizes[level], lv.origin_nm)
    network = network_grid(grid0, source, engine.pixel_size_nm, settings.resample_tolerance)
    output = grid0 if settings.output_grid == "input" else network
    return Grids(image, level, grid0, source, network, output)


def make_plan(
    image: ImageMeta, engine: EngineSpec, settings: Settings, intensity: IntensityMap, mask: TissueMask | None = None,
    chunks: tuple[ChunkCheck, ...] = (),
) -> Plan:
    """Build the grids, lattice and blocks for ``image`` (pixel size applied by :func:`read_level`),
    and check the options against the engine."""
    g = grids(image, engine, settings)
    image, level, source, network, output = g.image, g.level, g.source, g.network, g.output

    tile = settings.tile or (engine.tile, engine.tile)
    overlap = settings.overlap if settings.overlap is not None else (engine.overlap, engine.overlap)
    for a in (0, 1):
        if tile[a] % engine.divisor:
            lo = tile[a] // engine.divisor * engine.divisor or engine.divisor
            raise ConfigError(
                f"tile size {tile[a]} is not a multiple of {engine.divisor}, which engine {engine.name!r} needs "
                f"(its network halves the image {engine.divisor.bit_length() - 1} times); use --tile {lo} or {lo + engine.divisor}"
            )
        if not 0 <= overlap[a] < tile[a]:
            raise ConfigError(f"overlap {overlap[a]} must be at least 0 and smaller than the tile ({tile[a]}); e.g. --overlap {tile[a] // 8}")
    if settings.blend == "crop":
        _check_crop_context(engine, tile, overlap)
    tta = settings.tta
    if settings.uncertainty and tta == 1:
        tta = 8 if tile[0] == tile[1] else 4  # disagreement needs members
    if tta == 8 and tile[0] != tile[1]:
        raise ConfigError(f"--tta 8 turns tiles by quarter turns, which needs square tiles, not {tile[0]} × {tile[1]}; use --tta 4 or a square --tile")
    lattice = TileLattice(network.shape, tile, overlap, fitted=settings.blend != "crop")
    zoom = (output.pixel_size_nm[0] / network.pixel_size_nm[0], output.pixel_size_nm[1] / network.pixel_size_nm[1])
    block = block_size(settings, zoom)
    settings = settings.replace(block_size=block, tile=tile, overlap=overlap, tta=tta)  # the plan's settings are concrete
    blocks = BlockGrid(output.shape, block)
    return Plan(image, engine, settings, level, source, network, output, lattice, blocks, intensity, mask, chunks)


def block_size(settings: Settings, zoom: tuple[float, float]) -> Pair:
    """The output block: ``--block-size``, or the largest multiple of the chunk (shard) up to
    4096 whose network-grid extent (``zoom`` network pixels per output pixel) stays under
    :data:`AUTO_NETWORK_BLOCK`. An explicit block whose network extent passes
    :data:`MAX_NETWORK_BLOCK` is refused: a block holds a few float copies of it in memory."""
    unit = settings.shard_size or settings.chunk_size
    if settings.block_size is None:
        return tuple(  # type: ignore[return-value]
            max(unit[a], min(DEFAULT_BLOCK, int(AUTO_NETWORK_BLOCK / zoom[a])) // unit[a] * unit[a]) for a in (0, 1)
        )
    side = max(b * z for b, z in zip(settings.block_size, zoom))
    if side > MAX_NETWORK_BLOCK:
        fits = max(unit[0], int(AUTO_NETWORK_BLOCK / max(zoom)) // unit[0] * unit[0])
        raise ConfigError(
            f"--block-size {settings.block_size[0]} spans {side:.0f} network pixels per side at this scale (× {max(zoom):.3g}), "
            f"about {side * side * 16 / 2**30:.0f} GiB per block in flight; use --block-size {fits}"
            + (f" (and --chunk-size {min(unit[0], fits)})" if fits < unit[0] else "")
        )
    return settings.block_size


def _check_crop_context(engine: EngineSpec, tile: Pair, overlap: Pair) -> None:
    """Crop mode equals whole-image inference only when each tile's kept centre has the engine's
    receptive field of context inside the tile: overlap ≥ receptive field − 1."""
    rf = engine.receptive_field
    if not rf or min(overlap) >= rf - 1:
        return
    t = max(tile)
    fix = next((o for o in range(rf - 1, t) if (t - o) % engine.divisor == 0), None)
    advice = f"use --overlap {fix}" if fix is not None else f"use a larger --tile (above {rf + engine.divisor}) with --overlap {rf - 1} or more"
    warnings.warn(
        SeamWarning(
            f"crop mode keeps each tile's centre, which equals whole-image inference only when the overlap covers engine "
            f"{engine.name!r}'s receptive field ({rf} px); with overlap {min(overlap)} there will be seams: {advice}, "
            f"or blend (--blend gaussian)"
        ),
        stacklevel=3,
    )
