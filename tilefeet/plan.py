"""The plan of a run: which level to read, the three grids, the tile lattice, the output blocks.

Pure: built from an :class:`~tilefeet.image.ImageMeta`, an engine bundle's declarations and the
:class:`~tilefeet.settings.Settings`, with no I/O. The intensity map (section statistics) is
computed by the caller and carried along, so the plan holds everything a block task needs and
pickles small enough to travel with every task.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .errors import ConfigError, InvalidImageError, TilefeetWarning
from .geometry import BlockGrid, Box, GridMap, Pair, TileLattice, resample_taps
from .image import ImageMeta
from .intensity import IntensityMap
from .resolution import Grid, choose_level, mismatch, network_grid, scale_factor
from .settings import Settings
from .units import format_nm

#: A section whose pixel size is this far from the engine's gets a loud warning (it still runs).
LOUD_MISMATCH = 8.0


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
    backend_reason: str = ""  #: why the backend in ``settings`` was chosen (``--backend auto``)

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
        if self.resamples_input:
            ty, _ = resample_taps(net_box.y0, net_box.y1, self.src_from_net.y)
            tx, _ = resample_taps(net_box.x0, net_box.x1, self.src_from_net.x)
            src_box = Box(int(ty.min()), int(tx.min()), int(ty.max()) + 1, int(tx.max()) + 1)
        else:
            src_box = net_box.shift(*self.src_from_net.shift)
        return BlockGeometry((by, bx), out_box, need, tiles, net_box, src_box)

    # ---- reporting

    def fingerprint(self) -> str:
        """Identifies everything that determines the output bits (for resume)."""
        doc = {
            "image": asdict(self.image),
            "engine": self.engine.fingerprint or self.engine.path,
            "settings": {k: v for k, v in asdict(self.settings).items() if k not in ("blocks_in_flight", "device")},
            "level": self.level,
            "intensity": asdict(self.intensity),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """Counts for ``--dry-run`` and logs: tiles, blocks, and the extra work of overlap and straddling."""
        per_block = [self.block(by, bx).n_tiles for by, bx in self.blocks]
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
            "intensity": self.intensity.mode,
        }

    def describe(self) -> str:
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
            f"intensity   {s['intensity']}" + (" (inverted contrast)" if self.settings.invert else ""),
            f"backend     {self.settings.backend}"
            + "".join(f", {k}={v}" for k, v in self.settings.backend_options)
            + f" on {self.settings.device}, {self.settings.precision}"
            + (f" ({self.backend_reason})" if self.backend_reason else ""),
            f"tiles       {s['tile'][0]} × {s['tile'][1]}, overlap {s['overlap'][0]}, blend {self.settings.blend}: "
            f"{s['lattice_tiles']} lattice tiles",
            f"blocks      {s['blocks']} of {s['block_size'][0]} × {s['block_size'][1]} output px, "
            f"{self.settings.blocks_in_flight} in flight",
            f"work        {s['tiles_evaluated']} tile evaluations = {s['total_factor']:.2f} × the section's pixels "
            f"(overlap × {s['overlap_factor']:.2f}, block straddling × {s['straddle_factor']:.2f}"
            + (", at most: tiles shared by neighbouring blocks run once per process)" if s["straddle_factor"] > 1 else ")"),
        ]
        return "\n".join(lines)


def make_plan(image: ImageMeta, engine: EngineSpec, settings: Settings, intensity: IntensityMap) -> Plan:
    """Choose the level, build the grids, lattice and blocks, and check the options against the engine."""
    if settings.pixel_size_nm is not None:
        image = image.with_pixel_size(settings.pixel_size_nm)
    px0 = image.levels[0].pixel_size_nm
    if px0 is None:
        raise InvalidImageError(
            f"{image.source} does not say its pixel size (no units in its axes metadata); "
            f"supply it with --pixel-size, e.g. --pixel-size 4nm"
        )
    ratio = mismatch(px0, engine.pixel_size_nm)
    if ratio >= LOUD_MISMATCH:
        warnings.warn(
            f"the section's pixel size {format_nm(px0)} is {ratio:.0f}× off the engine's "
            f"{format_nm(engine.pixel_size_nm)}: check the metadata (or --pixel-size); running anyway",
            PixelSizeWarning,
            stacklevel=2,
        )
    sizes = [lv.pixel_size_nm or px0 for lv in image.levels]
    level = choose_level(sizes, engine.pixel_size_nm, settings.resample_tolerance)
    lv0, lv = image.levels[0], image.levels[level]
    grid0 = Grid(lv0.shape, px0, lv0.origin_nm)
    source = Grid(lv.shape, sizes[level], lv.origin_nm)
    network = network_grid(grid0, source, engine.pixel_size_nm, settings.resample_tolerance)
    output = grid0 if settings.output_grid == "input" else network

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
    lattice = TileLattice(network.shape, tile, overlap, fitted=settings.blend != "crop")
    blocks = BlockGrid(output.shape, settings.block_size)
    return Plan(image, engine, settings, level, source, network, output, lattice, blocks, intensity)
