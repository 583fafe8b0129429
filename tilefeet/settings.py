"""One home for the options of a segmentation run.

:meth:`Settings.create` is the boundary: it normalizes user input once (``512`` or ``(512, 384)``
tiles, ``"4nm"`` pixel sizes, case-insensitive modes), reads the environment's defaults
(``$TILEFEET_BACKEND``, ``$TILEFEET_PRECISION``, ``$TILEFEET_TILE_CACHE_MB``) and checks what can be checked without the
image or the engine; the rest of the code sees one canonical, frozen form and never reads the
environment itself. CLI flags map onto these fields one to one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .errors import ConfigError
from .geometry import Pair
from .intensity import INTENSITY_MODES
from .units import parse_length_nm, parse_voxel_size

Blend = Literal["gaussian", "cosine", "constant", "crop"]
BLENDS: tuple[str, ...] = ("gaussian", "cosine", "constant", "crop")
OutputDtype = Literal["uint8", "float16", "float32"]
OUTPUT_DTYPES: tuple[str, ...] = ("uint8", "float16", "float32")
OUTPUT_GRIDS: tuple[str, ...] = ("input", "network")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16", "int8")
TTA_CHOICES: tuple[int, ...] = (1, 2, 4, 8)
#: Output block side when none is given: large blocks amortize the tiles straddling their borders.
DEFAULT_BLOCK = 4096
#: Default device memory (MiB) for tiles shared by neighbouring blocks (:mod:`tilefeet.tilecache`).
DEFAULT_TILE_CACHE_MB = 512
#: Settings that change no output bit (left out of the resume fingerprint and dask keys).
NOT_IN_FINGERPRINT = ("blocks_in_flight", "device", "tile_cache_mb", "allow_missing_chunks")


@dataclass(frozen=True)
class Settings:
    """Options of one run; ``None`` means "the engine bundle's recommendation" (or "decide from the data")."""

    tile: Pair | None = None  #: tile side (network grid), a multiple of the engine's divisor
    overlap: Pair | None = None  #: overlap between neighbouring tiles (network grid)
    blend: Blend = "gaussian"  #: window for blending overlapping tiles, or "crop" (overlap-tile)
    #: output block (output grid), a multiple of chunk_size; None: up to 4096, smaller when the
    #: network grid is finer than the output grid (a block's network pixels stay bounded)
    block_size: Pair | None = None
    chunk_size: Pair = (1024, 1024)  #: output chunk (output grid)
    shard_size: Pair | None = None  #: zarr v3 shard (output grid), a multiple of chunk_size
    batch_size: int = 4  #: tiles per runner call (fixed: the last batch is padded)
    threshold: float = 0.5  #: probability at and above which a pixel is labelled
    output_dtype: OutputDtype = "uint8"  #: probabilities stored as 0..255 (uint8) or floats
    output_grid: Literal["input", "network"] = "input"  #: level 0 of the input, or the network's pixel size
    pixel_size_nm: tuple[float, float] | None = None  #: overrides (or supplies) the input's level-0 pixel size
    intensity: str = "auto"  #: intensity normalization mode (see tilefeet.intensity)
    invert: bool | None = None  #: inverted contrast: True, False, or None (``auto`` decides)
    resample_tolerance: float = 0.01  #: relative pixel-size mismatch below which no resampling is done
    #: "auto" (the fastest backend that works where the network runs), "torch", "onnxruntime" or
    #: "tensorrt". :meth:`create` takes the default from ``$TILEFEET_BACKEND``.
    backend: str = "auto"
    backend_options: tuple[tuple[str, Any], ...] = ()  #: backend-specific, e.g. (("compile", True),)
    device: str = "auto"
    #: "auto" (fp16 on a GPU with tensor cores where the accuracy guard passes, else fp32; on a CPU the
    #: fastest of fp32, bf16 where native, and OpenVINO int8 that passes the accuracy guard:
    #: tilefeet.runners.guard), "fp32", "fp16", "bf16" or "int8" (OpenVINO on the CPU, unguarded when
    #: asked for: tilefeet.runners.quantize). :meth:`create` takes the default from ``$TILEFEET_PRECISION``.
    precision: str = "auto"
    threads: int | None = None  #: CPU threads for the network (None: the library's default)
    blocks_in_flight: int = 2  #: blocks read/computed/written at once (bounds memory)
    labels: bool = True  #: also write labels/<class>
    tile_cache_mb: int = DEFAULT_TILE_CACHE_MB  #: device memory for tiles shared by neighbouring blocks; 0 = off
    #: test-time augmentation: each tile's prediction averaged over its first N dihedral transforms
    #: (1 = off, 2 = + left-right flip, 4 = + up-down flip and half turn, 8 = all flips and quarter turns)
    tta: int = 1
    #: also write the disagreement of the TTA members (``uncertainty/``); turns on TTA (8, or 4 for non-square tiles) if off
    uncertainty: bool = False
    #: where the network runs: "none" (everywhere), "auto" (where the section has tissue, see
    #: tilefeet.mask), or the path of a label image (non-zero = run there)
    mask: str = "none"
    #: run although chunk files of the level read are missing (they read as the fill value, a hole in
    #: the result); off, such an input is refused (tilefeet.chunks tells them from chunks left out as empty)
    allow_missing_chunks: bool = False
    #: a stack: the sections segmented, ``(start, stop)`` (stop excluded); None: all of them
    z_range: tuple[int, int | None] | None = None
    #: a stack: sections per task (any depth gives the same bits; deeper blocks make fewer tasks)
    block_depth: int = 1
    #: a stack: each probability replaced by the median over this many neighbouring sections (odd;
    #: 1 = off), for consistency across sections (as empanada does for MitoNet); exact across blocks
    z_median: int = 1
    #: a stack's section spacing in nm (overrides or supplies the metadata's; ``--pixel-size Z,Y,X``)
    z_spacing_nm: float | None = None

    @classmethod
    def create(cls, **kwargs: Any) -> Settings:
        """Build from loosely typed user input; unknown names are an error. Options not given take
        their defaults, and ``backend``/``precision``/``tile_cache_mb`` the environment's
        (``$TILEFEET_BACKEND``, ``$TILEFEET_PRECISION``, ``$TILEFEET_TILE_CACHE_MB``)."""
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
        kw = {k: v for k, v in kwargs.items() if v is not None}
        kw.setdefault("backend", os.environ.get("TILEFEET_BACKEND") or "auto")
        kw.setdefault("precision", os.environ.get("TILEFEET_PRECISION") or "auto")
        if "tile_cache_mb" not in kw and os.environ.get("TILEFEET_TILE_CACHE_MB", "").strip():
            kw["tile_cache_mb"] = _env_int("TILEFEET_TILE_CACHE_MB")
        for key in ("tile", "overlap", "block_size", "chunk_size", "shard_size"):
            if key in kw:
                kw[key] = pair(kw[key], key)
        if "pixel_size_nm" in kw:
            z, kw["pixel_size_nm"] = parse_voxel_size(kw["pixel_size_nm"], where="--pixel-size")
            if z is not None:
                kw.setdefault("z_spacing_nm", z)
        if "z_spacing_nm" in kw and not isinstance(kw["z_spacing_nm"], float):
            kw["z_spacing_nm"] = parse_length_nm(kw["z_spacing_nm"], where="the section spacing")
        if "z_range" in kw:
            kw["z_range"] = z_range(kw["z_range"])
        for key in ("blend", "output_dtype", "output_grid", "intensity", "precision", "backend"):
            if key in kw:
                kw[key] = str(kw[key]).lower()
        if "backend_options" in kw:
            kw["backend_options"] = _options(kw["backend_options"])
        return cls(**kw)

    def __post_init__(self) -> None:
        _choice(self.blend, BLENDS, "blend")
        _choice(self.output_dtype, OUTPUT_DTYPES, "output dtype")
        _choice(self.output_grid, OUTPUT_GRIDS, "output grid")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        _choice(self.intensity, INTENSITY_MODES, "intensity mode")
        _choice(self.precision, PRECISIONS, "precision")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.batch_size < 1 or self.blocks_in_flight < 1:
            raise ConfigError("batch size and blocks in flight must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.tta not in TTA_CHOICES:
            raise ConfigError(f"--tta takes {', '.join(map(str, TTA_CHOICES))} (transforms per tile), got {self.tta}")
        if self.block_depth < 1:
            raise ConfigError(f"--block-depth is a number of sections per task, at least 1; got {self.block_depth}")
        if self.z_median < 1 or self.z_median % 2 == 0:
            raise ConfigError(f"--z-median takes an odd number of sections (3, 5, ...; 1 = off), got {self.z_median}")
        if self.tile_cache_mb < 0:
            raise ConfigError(f"the tile cache budget must be 0 (off) or more MiB, got {self.tile_cache_mb}")
        for a in (0, 1):
            if self.chunk_size[a] < 1 or (self.block_size is not None and self.block_size[a] % self.chunk_size[a]):
                raise ConfigError(
                    f"block size {self.block_size} must be a multiple of the output chunk size {self.chunk_size}, "
                    f"so that no two blocks write one chunk; e.g. --block-size {self.chunk_size[a] * 4}"
                )
            if self.shard_size is not None and (
                self.shard_size[a] % self.chunk_size[a] or (self.block_size is not None and self.block_size[a] % self.shard_size[a])
            ):
                raise ConfigError(
                    f"shard size {self.shard_size} must be a multiple of the chunk size {self.chunk_size} "
                    f"and divide the block size {self.block_size}"
                )

    def replace(self, **kwargs: Any) -> Settings:
        return replace(self, **kwargs)

    def fingerprint_items(self) -> dict[str, Any]:
        """The settings that can change output bits, as plain values (resume checks, dask keys)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NOT_IN_FINGERPRINT}


def z_range(v: Any) -> tuple[int, int | None]:
    """``(start, stop)`` sections from ``"10:20"``, ``"10:"``, ``":20"``, ``"7"`` (one section) or a pair;
    stop excluded, as in Python slices; non-negative."""
    if isinstance(v, str):
        text = v.strip()
        a, sep, b = text.partition(":")
        try:
            start = int(a) if a.strip() else 0
            stop = (int(b) if b.strip() else None) if sep else start + 1
        except ValueError:
            raise ConfigError(f"--z takes sections as START:STOP (stop excluded), START: or N, e.g. --z 10:20; got {v!r}") from None
    elif isinstance(v, int) and not isinstance(v, bool):
        start, stop = v, v + 1
    else:
        start, stop = (int(v[0]), None if v[1] is None else int(v[1]))
    if start < 0 or (stop is not None and stop <= start):
        raise ConfigError(f"--z {v}: sections START:STOP need 0 <= START < STOP (stop excluded), e.g. --z 10:20")
    return start, stop


def pair(v: Any, name: str) -> Pair:
    """One or two positive integers (y, x) from an int, ``"512"``, ``"512,384"``, ``"512x384"`` or a sequence."""
    if isinstance(v, str):
        v = [p for p in v.replace("x", ",").split(",") if p.strip()]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = (v, v)
    try:
        out = tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer or two (y,x), got {v!r}") from None
    if len(out) == 1:
        out = (out[0], out[0])
    if len(out) != 2 or min(out) < 0 or (name != "overlap" and min(out) < 1):
        raise ConfigError(f"{name} must be one or two positive integers (y,x), got {v!r}")
    return out  # type: ignore[return-value]


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(float(raw))
    except ValueError:
        raise ConfigError(f"${name} must be a number of MiB (0 turns the cache off), got {raw!r}; fix or unset it") from None


def _options(v: Any) -> tuple[tuple[str, Any], ...]:
    """Backend options from a dict, pairs, or CLI strings ``"compile=true"``, as sorted pairs."""
    if isinstance(v, dict):
        items = list(v.items())
    else:
        items = []
        for item in v:
            if isinstance(item, str):
                key, sep, raw = item.partition("=")
                if not sep or not key.strip():
                    raise ConfigError(f"backend option {item!r} must look like KEY=VALUE, e.g. compile=true")
                items.append((key.strip(), _literal(raw.strip())))
            else:
                items.append(tuple(item))
    return tuple(sorted((str(k), val) for k, val in items))


def _literal(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; use one of: {', '.join(allowed)}")
