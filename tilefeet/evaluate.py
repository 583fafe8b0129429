"""Scoring a segmentation against ground truth, one class at a time (``tilefeet evaluate``): opening
the prediction and the truth (stores, label images, PNG/TIFF), and counting the scores of
:mod:`tilefeet.metrics` over them.

Memory: pixel and boundary scores are computed blockwise over dask arrays (a histogram of codes
per block, summed; boundaries with a halo of ``ceil(tolerance) + 1`` px, so every block sees what
its own pixels need), so a section of any size can be scored in the memory of a few blocks.
Instance scores label connected components of the whole region at once, which needs it in memory
(about :data:`INSTANCE_BYTES_PER_PIXEL` bytes per pixel); above ``max_instance_pixels`` they are
refused with an error, never attempted.

Stacks of sections (z, y, x: a tilefeet output of a stack, a (z, y, x) label image, a 3-D array)
are scored in 3-D: pixel counts over every voxel, boundaries section by section (each section's
outlines, blocks with a halo in y and x only), instances and objects as 3-D connected components
(:mod:`tilefeet.metrics`; objects out of core through :mod:`tilefeet.objects`). Prediction and
truth must have the same sections; a stack is never compared with one section.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .chunks import ChunkCheck, check_chunks
from .errors import ConfigError, InputNotFoundError, InvalidImageError
from .geometry import Box, Pair
from .metrics import (
    CONNECTIVITY_3D,
    INSTANCE_MODES,
    BoundaryMetrics,
    InstanceMetrics,
    Instances,
    PixelMetrics,
    boundary_codes,
    instance_metrics,
    pixel_codes,
    tolerant_codes,
)
from .storage import Url, is_url, join

#: Largest region (pixels) whose instance scores are computed; they need the region in memory.
MAX_INSTANCE_PIXELS = 1 << 26
#: Peak memory of the instance scores per pixel (two masks, labels, distance transform, contingency
#: table): 44 B/px measured on a 4096² ISBI montage, plus the masks.
INSTANCE_BYTES_PER_PIXEL = 50
#: Side of the blocks that pixel and boundary counts are computed in.
BLOCK_PX = 2048
#: Above this share of all true cell pixels in one true cell, the cells' scores come with a caution
#: (ISBI's serial sections, 50 nm apart, as a stack: 100 %; Lucchi's 5 nm FIB-SEM: 8 % and 51 %).
LARGEST_CELL_CAUTION = 0.8

# ------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class EvaluateOptions:
    """How a prediction is scored. :meth:`create` normalizes loose user input (CLI strings)."""

    class_name: str | None = None  #: the class to score in a store with several (``labels/<class>``)
    threshold: float | None = None  #: score the prediction's probabilities ``>= threshold``, not its labels
    truth_foreground: tuple[float, ...] | None = None  #: truth values inside the class (default: non-zero)
    tolerance_px: float = 2.0  #: boundary pixels this close (Euclidean, px) to the other's count as right
    pixel_tolerance_px: float = 1.0  #: the tolerant pixel scores: class pixels this close to the other's count as right
    instances: Instances = "none"  #: objects: components of the mask, of its complement, or not scored
    ignore_border_px: int = 0  #: score only the region this far inside the image edges
    max_instance_pixels: int = MAX_INSTANCE_PIXELS  #: refuse instance scores above this many pixels
    objects: bool = False  #: match predicted to true objects by IoU (:mod:`tilefeet.objects.match`), out of core
    cells: bool = False  #: ... the objects being cells between membranes, with their ARE and VI
    #: a stack's 3-D objects: 6, 18 or 26 (default: as ``tilefeet objects``, 26; cells and
    #: regions between membranes 6); a section's objects are 8-connected, its regions 4-connected
    connectivity: int | None = None

    @classmethod
    def create(
        cls, *, truth_foreground: str | Sequence[float] | float | None = None, instances: str = "none", **kwargs: Any
    ) -> EvaluateOptions:
        """Options from user input: ``truth_foreground="0"`` or ``"1,2"``, case-insensitive modes."""
        fg = parse_values(truth_foreground, "--truth-foreground")
        return cls(truth_foreground=fg, instances=str(instances).lower(), **kwargs)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.instances not in INSTANCE_MODES:
            raise ConfigError(f"--instances must be one of {', '.join(INSTANCE_MODES)}, got {self.instances!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be a probability between 0 and 1, got {self.threshold}")
        if not self.tolerance_px >= 0:
            raise ConfigError(f"--tolerance must be 0 or more pixels, got {self.tolerance_px}")
        if not self.pixel_tolerance_px >= 0:
            raise ConfigError(f"--pixel-tolerance must be 0 or more pixels, got {self.pixel_tolerance_px}")
        if self.ignore_border_px < 0:
            raise ConfigError(f"--ignore-border must be 0 or more pixels, got {self.ignore_border_px}")
        if self.max_instance_pixels < 1:
            raise ConfigError(f"--max-pixels must be positive, got {self.max_instance_pixels}")
        if self.connectivity is not None and self.connectivity not in CONNECTIVITY_3D:
            raise ConfigError(f"--connectivity is 6, 18 or 26 (the neighbours of a voxel in a stack), got {self.connectivity}")


def parse_values(text: str | Sequence[float] | float | None, where: str) -> tuple[float, ...] | None:
    """Mask values from ``"0"``, ``"1,2"``, a number or a sequence; ``None`` stays ``None``."""
    if text is None:
        return None
    items: Sequence[Any]
    if isinstance(text, str):
        items = [p for p in text.split(",") if p.strip()]
    elif isinstance(text, (int, float)):
        items = [text]
    else:
        items = list(text)
    try:
        values = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} takes mask values separated by commas, e.g. 0 or 1,2; got {text!r}") from None
    if not values:
        raise ConfigError(f"{where} needs at least one value, e.g. 0 or 1,2")
    return values


# --------------------------------------------------------------------------- blockwise counts


def pixel_metrics_blockwise(pred: Any, truth: Any) -> PixelMetrics:
    """Pixel scores of two dask (or numpy) boolean masks, computed block by block (out of core)."""
    return PixelMetrics.from_histogram(_pixel_histogram(*_aligned(pred, truth)).compute())


def _pixel_histogram(pred: Any, truth: Any) -> Any:
    return _summed_histograms(pred.map_blocks(pixel_codes, truth, dtype=np.uint8), 4)


def boundary_metrics_blockwise(pred: Any, truth: Any, tolerance_px: float = 2.0) -> BoundaryMetrics:
    """Boundary scores of two dask (or numpy) boolean masks, block by block with a halo (out of core);
    equal to :func:`boundary_metrics` on the whole arrays."""
    return BoundaryMetrics.from_histogram(_boundary_histogram(*_aligned(pred, truth), tolerance_px).compute(), tolerance_px)


def tolerant_metrics_blockwise(pred: Any, truth: Any, tolerance_px: float = 1.0) -> BoundaryMetrics:
    """Pixel scores within a tolerance (:func:`~tilefeet.metrics.tolerant_metrics`) of two dask (or
    numpy) boolean masks, block by block with a halo; equal to it on the whole arrays."""
    return BoundaryMetrics.from_histogram(_tolerant_histogram(*_aligned(pred, truth), tolerance_px).compute(), tolerance_px)


def _tolerant_histogram(pred: Any, truth: Any, tolerance_px: float) -> Any:
    # every pixel within the tolerance of an own pixel; no 4-neighbour test, so no extra ring
    return _matched_histogram(tolerant_codes, pred, truth, tolerance_px, math.ceil(tolerance_px))


def _boundary_histogram(pred: Any, truth: Any, tolerance_px: float) -> Any:
    # Each own pixel needs its 4-neighbours (is it a boundary?) and every boundary pixel within the
    # tolerance; the outermost halo ring's own boundary flags are wrong (no neighbours beyond it) but
    # lie farther than the tolerance from every own pixel. boundary="none": no padding at the image
    # edge, where the erosion's border_value gives the "edge is not a boundary" rule.
    return _matched_histogram(boundary_codes, pred, truth, tolerance_px, math.ceil(tolerance_px) + 1)


def _matched_histogram(codes_of: Any, pred: Any, truth: Any, tolerance_px: float, halo: int) -> Any:
    """Counts of the four-flag codes (:func:`~tilefeet.metrics.matched_codes`) that ``codes_of`` gives
    each block with a ``halo``; a stack's codes are each section's: the halo is in y and x only."""
    import dask.array as da

    depth = {0: 0, 1: halo, 2: halo} if pred.ndim == 3 else halo
    codes = da.map_overlap(codes_of, pred, truth, depth=depth, boundary="none", dtype=np.uint8, tolerance_px=tolerance_px)
    return _summed_histograms(codes, 16)


# ------------------------------------------------------------------------------ opening masks


@dataclass(frozen=True)
class Mask:
    """A binary mask to score: a lazy dask array of bool, (y, x) or a stack's (z, y, x), and a
    description of its origin."""

    data: Any
    source: str
    class_name: str | None = None  #: the class picked from a store that holds several
    #: a tilefeet output of a stack's sections (``segment --z START:STOP``): START, the input section
    #: of its first one; None for anything else
    first_section: int | None = None

    @property
    def shape(self) -> Pair:
        """(y, x) of each section."""
        return (int(self.data.shape[-2]), int(self.data.shape[-1]))

    @property
    def depth(self) -> int:
        """Sections: 1 for a section, the stack's for a stack."""
        return int(self.data.shape[0]) if self.data.ndim == 3 else 1

    @property
    def is_stack(self) -> bool:
        return bool(self.data.ndim == 3)


def binarize(values: Any, *, threshold: float | None = None, foreground: Sequence[float] | None = None) -> Any:
    """Class membership of stored values: one of ``foreground``, or ``>= threshold`` (integers as
    fractions of their dtype's maximum, so uint8 probabilities 0..255 compare with threshold × 255,
    as tilefeet's writer does), or non-zero."""
    import dask.array as da

    if foreground is not None:
        return da.isin(values, list(foreground))
    if threshold is not None:
        dtype = np.dtype(values.dtype)
        top = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0
        return values >= threshold * top
    return values != 0


def open_mask(
    source: Any,
    *,
    role: str = "prediction",
    class_name: str | None = None,
    threshold: float | None = None,
    foreground: Sequence[float] | None = None,
    class_hint: str | None = None,
) -> Mask:
    """A binary mask from a path or an array (only metadata is read; pixels stay lazy).

    Paths: an OME-Zarr store that holds classes (``labels/<class>``, or named probability channels
    like tilefeet's output) gives the class ``class_name`` (or its only one): its label image,
    or with ``threshold`` its probabilities ``>= threshold``; any other OME-Zarr image or label
    image, and PNG/TIFF files and montage folders, give their level 0 through :func:`binarize`.
    ``class_hint`` picks among several classes when ``class_name`` is not given (the truth takes
    the class found in the prediction). ``role`` ("prediction", "truth") names the input in errors.
    """
    if is_url(source):  # an OME-Zarr store behind a URL (reached with the command's storage options)
        return _open_zarr(Url(str(source)), role, class_name or class_hint, class_name is None, threshold, foreground)
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), role, class_name or class_hint, class_name is None, threshold, foreground)
    data = getattr(source, "data", source) if hasattr(source, "dims") else source  # xarray → its array
    return Mask(binarize(_as_planes(data, f"{role} array"), threshold=threshold, foreground=foreground), f"{role} array")


def _open_path(
    path: Path, role: str, class_name: str | None, hinted: bool, threshold: float | None, foreground: Sequence[float] | None
) -> Mask:
    if not path.exists():
        raise InputNotFoundError(
            f"{role} {path} does not exist; give an OME-Zarr image or label image "
            f"(e.g. image.ome.zarr/labels/membrane) or a PNG/TIFF file"
        )
    if _is_zarr(path):
        return _open_zarr(path, role, class_name, hinted, threshold, foreground)
    from .convert import open_input

    values = _as_planes(open_input(path), str(path))
    if threshold is None and foreground is None:
        check_mask_like(values, str(path), role)
    data = binarize(values, threshold=threshold, foreground=foreground)
    return Mask(data, f"{path}{_rule_text(threshold, foreground)}")


#: A mask has a few values (0/1, 0/255, a handful of classes); more than this and "non-zero"
#: would make a grey image into a wrong mask, silently.
MAX_MASK_VALUES = 16


def check_mask_like(values: Any, source: str, role: str) -> None:
    """Refuse to read a grey image as a mask (every non-zero pixel "in the class"): it has many
    distinct values. Counted on up to 16 chunk-sized windows spread over the image (cheap on a
    gigapixel; a stack's middle section). Label images (NGFF image-label) may hold any number of ids
    and are not checked."""
    if values.ndim == 3:
        values = values[values.shape[0] // 2]
    h, w = (int(n) for n in values.shape)
    ch, cw = (min(int(c[0]), 512) for c in values.chunks)
    ys = np.unique(np.linspace(0, max(h - ch, 0), 4).astype(int))
    xs = np.unique(np.linspace(0, max(w - cw, 0), 4).astype(int))
    seen: set = set()
    for y in ys:
        for x in xs:
            seen.update(np.unique(np.asarray(values[y : y + ch, x : x + cw])).tolist())
            if len(seen) > MAX_MASK_VALUES:
                example = ", ".join(f"{v:g}" for v in sorted(seen)[:4])
                raise ConfigError(
                    f"the {role} {source} has more than {MAX_MASK_VALUES} distinct values ({example}, ...): a grey image, "
                    f"not a mask; give its label image (IMAGE.ome.zarr/labels/NAME, written by `tilefeet convert MASKS IMAGE "
                    f"--labels NAME`), or say which values are the class with --truth-foreground (or --threshold for probabilities)"
                )


def _open_zarr(
    path: Path | Url, role: str, class_name: str | None, hinted: bool, threshold: float | None, foreground: Sequence[float] | None
) -> Mask:
    """A store's label image of the class; with a threshold, its probability channel of the class;
    otherwise (no classes) the image itself. Metadata through :func:`tilefeet.ngff.read_multiscale`."""
    import dask.array as da

    from .ngff import open_group, read_multiscale
    from .objects.store import is_objects_layer

    rule = _rule_text(threshold, foreground)
    ms = read_multiscale(path, role=role)
    root = open_group(ms.path, role=role)
    complete = ms.metadata.get("every_chunk_written") is True  # a tilefeet output: its label images too
    # Object layers of `tilefeet objects` hold ids, not a class.
    names = [n for n in ms.labels if not is_objects_layer(root["labels"], n)]
    if threshold is None and names:
        name = _choose_class(names, class_name, hinted, path, role, "label images")
        labels = join(path, "labels", name)
        mask = _image_mask(labels, f"{labels}{rule}", foreground=foreground, class_name=name, role=role, complete=complete)
        return replace(mask, first_section=_first_section(ms))
    if threshold is not None and ms.is_label:
        raise ConfigError(f"--threshold scores probabilities, but the {role} {path} is a label image; leave out --threshold")
    data = da.from_zarr(root[ms.datasets[0].path])
    axes = ms.names
    n_channels = int(data.shape[axes.index("c")]) if "c" in axes[:-2] else 0
    channels = list(ms.channels) if len(ms.channels) == n_channels else [str(i) for i in range(n_channels)]
    if threshold is not None and channels:
        name = _choose_class(channels, class_name, hinted, path, role, "probabilities")
        if complete:
            z_axis = next((i for i, a in enumerate(axes[:-2]) if a == "z"), None)
            for z in range(int(data.shape[z_axis]) if z_axis is not None else 1):
                lead = tuple(channels.index(name) if a == "c" else z if i == z_axis else 0 for i, a in enumerate(axes[:-2]))
                _refuse_missing(check_chunks(root[ms.datasets[0].path], str(path), ms.datasets[0].path, what=f"the {name} probabilities",
                                             lead=lead, every_chunk_written=True), role)
        plane = _plane(data, axes, channels.index(name), path)
        return Mask(binarize(plane, threshold=threshold), f"{path} probabilities[{name}]{rule}", name, _first_section(ms))
    if len(channels) > 1:
        raise ConfigError(
            f"{role} {path} holds {len(channels)} probability channels ({', '.join(channels)}) and no label images; "
            f"pass --threshold T (and --class NAME) to score one of them"
        )
    return _image_mask(path, f"{path}{rule}", foreground=foreground, threshold=threshold, role=role, is_label=ms.is_label)


def _image_mask(
    path: Path | Url,
    source: str,
    *,
    foreground: Sequence[float] | None = None,
    threshold: float | None = None,
    class_name: str | None = None,
    role: str = "input",
    is_label: bool = True,
    complete: bool = False,
) -> Mask:
    """Level 0 of an OME-Zarr image or label image, read through :class:`Image` (validation, axes);
    an image that is not a label image is checked to look like a mask (:func:`check_mask_like`).
    Missing chunk files are refused (:mod:`tilefeet.chunks`; ``complete``: its store, a tilefeet
    output, wrote every chunk): they would read as 0, scored as background."""
    import dask.array as da

    from .image import Image, ZSpacingWarning

    with warnings.catch_warnings():  # scores count voxels: a stack's unknown z spacing changes none of them
        warnings.simplefilter("ignore", ZSpacingWarning)
        image = Image.open(path, stacks=True)
    if complete:
        image = replace(image, every_chunk_written=True)
    for z in range(image.meta.depth):  # every section's plane (one listing each)
        found = image.section(z).check_chunks(0)
        if found is not None:
            _refuse_missing(found, role)
    arr = image.array(0)
    z_axis = image.meta.z_axis
    data = da.from_zarr(arr)[tuple(slice(None) if i == z_axis else 0 for i in range(arr.ndim - 2))]
    if threshold is None and foreground is None and not is_label:
        check_mask_like(data, source, role)
    return Mask(binarize(data, threshold=threshold, foreground=foreground), source, class_name)


def _refuse_missing(found: ChunkCheck, role: str) -> None:
    if found.missing:
        raise found.error("scored as background", f"restore them (copy, convert or segment the {role} again)")


def _first_section(ms: Any) -> int | None:
    """The input section of a tilefeet stack output's first section (its ``--z`` start), else None."""
    if "z" not in ms.names or ms.metadata.get("method") != "tilefeet.segment":
        return None
    z_range = (ms.metadata.get("settings") or {}).get("z_range")
    return int(z_range[0] or 0) if z_range else 0


def align_sections(pred: Mask, truth: Mask) -> Mask:
    """The truth's sections that a ``segment --z START:STOP`` output holds, when the truth is the
    whole stack's (it has more sections than the output, and START + the output's reach into it)."""
    start = pred.first_section
    if start is None or not truth.is_stack or truth.depth == pred.depth or start + pred.depth > truth.depth:
        return truth
    stop = start + pred.depth
    data = truth.data[start] if pred.depth == 1 else truth.data[start:stop]
    return replace(truth, data=data, source=f"{truth.source} (sections {start}:{stop}, as the prediction's --z {start}:{stop})")


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zattrs"))


def _plane(data: Any, axes: tuple[str, ...], channel: int, path: Path | Url) -> Any:
    index: list[Any] = []
    for name, size in zip(axes[:-2], data.shape[:-2]):
        if name == "c":
            index.append(channel)
        elif size == 1:
            index.append(0)
        elif name == "z":  # a stack of sections, scored in 3-D
            index.append(slice(None))
        else:
            raise InvalidImageError(f"{path} has {size} planes along axis {name!r}; evaluate scores a section or a z stack of sections")
    return data[tuple(index)]


def _choose_class(names: Sequence[str], class_name: str | None, hinted: bool, path: Path | Url, role: str, what: str) -> str:
    """The entry of ``names`` for ``class_name`` (spelt as given or as its label group name); a
    hinted name (not the user's) only chooses among several, and a single class needs none."""
    from .ngff import label_name

    if hinted and len(names) == 1:
        return names[0]
    found = [n for n in names if class_name is not None and (n == class_name or label_name(n) == label_name(class_name))]
    if found:
        return found[0]
    if class_name is None or hinted:
        raise ConfigError(f"{role} {path} holds {what} of several classes ({', '.join(names)}); choose one with --class")
    raise ConfigError(f"{role} {path} has no class {class_name!r}; it has: {', '.join(names)}")


def _as_planes(data: Any, where: str) -> Any:
    """A dask array of a 2-D (y, x) image or a stack's 3-D (z, y, x), leading axes of size one dropped."""
    import dask.array as da

    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=(1,) * max(np.ndim(data) - 2, 0) + (BLOCK_PX, BLOCK_PX))
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3):
        raise InvalidImageError(f"{where} has shape {tuple(arr.shape)}; expected a 2-D (y, x) image or a (z, y, x) stack of sections")
    return arr


def _rule_text(threshold: float | None, foreground: Sequence[float] | None) -> str:
    if foreground is not None:
        return f" (values {', '.join(f'{v:g}' for v in foreground)})"
    return f" >= {threshold:g}" if threshold is not None else ""


# --------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    """All scores of one prediction against one truth, for one class."""

    prediction: str  #: what was read as the prediction
    truth: str  #: what was read as the truth
    region: Box  #: the scored region, in level-0 pixels of both
    options: EvaluateOptions
    pixel: PixelMetrics
    boundary: BoundaryMetrics
    instances: InstanceMetrics | None
    tolerant: BoundaryMetrics | None = None  #: pixel scores within ``options.pixel_tolerance_px``
    objects: Any = None  #: :class:`tilefeet.objects.match.ObjectScores` with ``--objects`` or ``--cells``
    cells: InstanceMetrics | None = None  #: ARE and VI of the cells with ``--cells``
    objects_source: str = ""  #: what the predicted objects are (a stored layer, or how they were made)
    sections: int = 1  #: sections scored: 1 for a section, the stack's (all of them, in 3-D)
    connectivity: int | None = None  #: a stack's objects' connectivity (6, 18, 26), when objects were scored
    largest_true_cell: float | None = None  #: ``cells``: the largest true cell's share of all true cell pixels

    @property
    def is_stack(self) -> bool:
        return self.sections > 1

    @property
    def truth_cells_join(self) -> bool:
        """The truth's cells are mostly one (its largest holds over :data:`LARGEST_CELL_CAUTION` of their
        pixels): in a stack, its regions between membranes join across sections, and ARE/VOI say
        little about the prediction."""
        return self.largest_true_cell is not None and self.largest_true_cell > LARGEST_CELL_CAUTION

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (NaN becomes None)."""
        return {
            "prediction": self.prediction,
            "truth": self.truth,
            "region": {"y0": self.region.y0, "x0": self.region.x0, "y1": self.region.y1, "x1": self.region.x1},
            "shape": list(self.region.shape),
            "sections": self.sections,
            "dimensions": 3 if self.is_stack else 2,
            "connectivity": self.connectivity,
            "options": asdict(self.options),
            "pixel": self.pixel.to_dict(),
            "pixel_tolerant": self.tolerant.to_dict() if self.tolerant else None,
            "boundary": self.boundary.to_dict(),
            "instances": self.instances.to_dict() if self.instances else None,
            "objects": {**self.objects.to_dict(), "predicted": self.objects_source} if self.objects else None,
            "cells": {**self.cells.to_dict(), "largest_true_cell": self.largest_true_cell} if self.cells else None,
        }


def evaluate(
    prediction: Any,
    truth: Any,
    *,
    class_name: str | None = None,
    threshold: float | None = None,
    truth_foreground: str | Sequence[float] | float | None = None,
    tolerance_px: float = 2.0,
    pixel_tolerance_px: float = 1.0,
    instances: str = "none",
    ignore_border_px: int = 0,
    max_instance_pixels: int = MAX_INSTANCE_PIXELS,
    objects: bool = False,
    cells: bool = False,
    connectivity: int | None = None,
) -> Evaluation:
    """Score ``prediction`` against ``truth`` for one class (see :func:`open_mask` for what each may be).

    Pixel and boundary scores are computed blockwise, out of core; instance scores (``instances``
    "foreground" or "background") need the scored region in memory and are refused above
    ``max_instance_pixels``. Both inputs must have the same level-0 shape. ``ignore_border_px``
    scores the inner region as if both were cropped to it (outlines and objects end at the crop).
    Membranes scored with ``instances="background"`` against truth whose membranes are the class
    is close to the ISBI 2012 challenge's foreground-restricted scores after border thinning.
    ``objects`` (and ``cells``) match objects by IoU out of core (:func:`tilefeet.objects.match.score_objects`).

    Stacks (z, y, x) are scored in 3-D (the module's docstring): ``ignore_border_px`` crops y and x,
    ``max_instance_pixels`` counts voxels, and ``connectivity`` (6, 18 or 26) says which voxels
    touch: objects are 26-connected by default, as ``tilefeet objects`` labels a stack (a stored
    objects layer keeps its own), regions between membranes (``instances="background"``, ``cells``)
    6-connected.
    """
    opts = EvaluateOptions.create(
        class_name=class_name,
        threshold=threshold,
        truth_foreground=truth_foreground,
        tolerance_px=float(tolerance_px),
        pixel_tolerance_px=float(pixel_tolerance_px),
        instances=instances,
        ignore_border_px=int(ignore_border_px),
        max_instance_pixels=int(max_instance_pixels),
        objects=bool(objects or cells),
        cells=bool(cells),
        connectivity=None if connectivity is None else int(connectivity),
    )
    pred = open_mask(prediction, role="prediction", class_name=opts.class_name, threshold=opts.threshold)
    true = open_mask(
        truth, role="truth", class_name=opts.class_name, foreground=opts.truth_foreground, class_hint=pred.class_name
    )
    true = align_sections(pred, true)
    check_same_shape(pred, true)
    if opts.connectivity is not None and not pred.is_stack:
        raise ConfigError(
            f"--connectivity {opts.connectivity} is for stacks (z, y, x), but {pred.source} is one section: its objects are "
            f"8-connected and the regions between membranes 4-connected; leave out --connectivity"
        )
    region = scored_region(pred.shape, opts.ignore_border_px)
    if opts.instances != "none":
        check_fits_in_memory(region, opts.max_instance_pixels, pred.depth)
    crop = region.relative_to(Box.from_shape(pred.shape))
    p, t = (m.data[(..., *crop)].rechunk(score_chunks(pred.depth if m.is_stack else 0, region.shape)) for m in (pred, true))
    result = replace(_score(pred.source, true.source, region, opts, p, t), sections=pred.depth)
    if opts.objects:
        from .objects.match import score_objects

        found = score_objects(prediction, p, t, class_name=pred.class_name, cells=opts.cells,
                              use_stored=opts.threshold is None and opts.ignore_border_px == 0, connectivity=opts.connectivity)
        result = replace(result, objects=found.scores, cells=found.cells, objects_source=found.source, connectivity=found.connectivity,
                         largest_true_cell=found.largest_true_cell)
    return result


def score_chunks(depth: int, shape: Pair) -> tuple[int, ...]:
    """Blocks of the scores: :data:`BLOCK_PX` squares, and for a stack (``depth`` > 0) as many
    whole sections as keep a block near ``BLOCK_PX``² voxels."""
    h, w = (min(BLOCK_PX, s) for s in shape)
    return (h, w) if not depth else (min(depth, max(1, BLOCK_PX * BLOCK_PX // (h * w))), h, w)



def _score(pred_source: str, truth_source: str, region: Box, opts: EvaluateOptions, p: Any, t: Any) -> Evaluation:
    import dask.threaded

    lazy = [_pixel_histogram(p, t), _boundary_histogram(p, t, opts.tolerance_px), _tolerant_histogram(p, t, opts.pixel_tolerance_px)]
    if opts.instances != "none":
        lazy += [p, t]  # computed with the counts, so the inputs are read once
    out = dask.compute(*lazy, scheduler=dask.threaded.get)
    inst = instance_metrics(out[3], out[4], opts.instances, opts.connectivity) if opts.instances != "none" else None  # type: ignore[arg-type]
    return Evaluation(
        pred_source,
        truth_source,
        region,
        opts,
        PixelMetrics.from_histogram(out[0]),
        BoundaryMetrics.from_histogram(out[1], opts.tolerance_px),
        inst,
        tolerant=BoundaryMetrics.from_histogram(out[2], opts.pixel_tolerance_px),
    )


def check_same_shape(pred: Mask, truth: Mask) -> None:
    """Scores compare pixel by pixel, so both must lie on the same grid (and a stack's, the same sections)."""
    if pred.is_stack or truth.is_stack:
        if pred.depth != truth.depth or pred.shape != truth.shape:
            def what(m: Mask) -> str:
                return f"a stack of {m.depth} sections of" if m.is_stack else "one section of"

            raise InvalidImageError(
                f"the prediction {pred.source} is {what(pred)} {pred.shape[0]} × {pred.shape[1]} px but the truth {truth.source} is "
                f"{what(truth)} {truth.shape[0]} × {truth.shape[1]} px; score a stack against the truth of the same sections "
                f"(segment --z START:STOP selects sections; a section's truth scores that section's own output)"
            )
        return
    if pred.shape != truth.shape:
        (ph, pw), (th, tw) = pred.shape, truth.shape
        raise InvalidImageError(
            f"the prediction {pred.source} is {ph} × {pw} px but the truth {truth.source} is {th} × {tw} px; "
            f"score them on the same grid (tilefeet writes outputs on the input's level-0 grid unless --output-grid network)"
        )


def scored_region(shape: Pair, ignore_border_px: int) -> Box:
    """The region left when a border of ``ignore_border_px`` is dropped from each side."""
    b = ignore_border_px
    region = Box(b, b, shape[0] - b, shape[1] - b)
    if region.y1 <= region.y0 or region.x1 <= region.x0:
        raise ConfigError(f"--ignore-border {b} leaves nothing of a {shape[0]} × {shape[1]} px image; use a smaller border")
    return region


def check_fits_in_memory(region: Box, max_pixels: int, depth: int = 1) -> None:
    """Instance scores label the whole region (of every section of a stack) at once; refuse
    regions above the limit."""
    size = region.size * depth
    if size > max_pixels:
        h, w = region.shape
        mb = size * INSTANCE_BYTES_PER_PIXEL / 1e6
        need = f"{mb / 1e3:.1f} GB" if mb >= 1e3 else f"{mb:.0f} MB"
        what = f"{depth} × {h} × {w} voxel stack" if depth > 1 else f"{h} × {w} px region"
        unit = "voxels" if depth > 1 else "px"
        crop = "score fewer sections or a crop (--objects and --cells score objects out of core)" if depth > 1 else "score a crop"
        raise ConfigError(
            f"instance scores need the whole {what} in memory (about {need}), above the limit of "
            f"{max_pixels} {unit}; pass --instances none, {crop}, or raise --max-pixels"
        )


# -------------------------------------------------------------------------------------- helpers


def _summed_histograms(codes: Any, n: int) -> Any:
    """A lazy count of each code ``0 .. n-1`` of a dask array (dask's histogram: one per block, summed)."""
    import dask.array as da

    counts, _ = da.histogram(codes, bins=n, range=(0, n))
    return counts


def _aligned(pred: Any, truth: Any) -> tuple[Any, Any]:
    """Both masks as dask arrays of bool on the prediction's blocks (numpy: blocks of :data:`BLOCK_PX`)."""
    import dask.array as da

    p, t = (x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=BLOCK_PX) for x in (pred, truth))
    if p.shape != t.shape:
        raise InvalidImageError(f"masks of shapes {tuple(p.shape)} and {tuple(t.shape)} cannot be compared; they must match")
    return p.astype(bool), t.astype(bool).rechunk(p.chunks)
