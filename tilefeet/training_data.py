"""Training data from OME-Zarr: an image (2-D, or a (z, y, x) stack of serial sections) and its label
images, read into memory and split into training and validation parts.

tilefeet segments 2-D sections, and :meth:`tilefeet.image.Image.open` refuses stacks on purpose;
training wants them (annotated serial sections), so :func:`read_stack_meta` reads the NGFF
``multiscales`` metadata of an image or label image that may be a stack (``tilefeet convert
--labels`` uses it too), and :func:`read_volume` its level 0 as a ``(z, y, x)`` array with its pixel
size. Training sets are small, so they are read whole, and refused above a size limit rather than
swapped. Validation is either chosen z-slices of a stack, or, for a single 2-D image, one band at
its far end (one band, not scattered pixels, so that few validation pixels border training ones)::

    stack (z, y, x)                  one 2-D image
    z 0 ... n-k-1 │ n-k ... n-1      ┌──────────────┬────┐
       training   │  validation      │   training   │val │  (last fraction of the longer axis)
                                     └──────────────┴────┘

Several datasets (:class:`DataSpec`, ``--data``) are each split this way, then resampled to one
pixel size (a parent engine's, or the first dataset's): images and labels alike, so a dataset at
5 nm trains a 4 nm engine with membranes as wide in nm as they were drawn.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, CorruptDataError, InputNotFoundError, InvalidImageError
from .geometry import Box
from .units import parse_pixel_size

#: Largest image (all z-slices, level 0) read for training; the trainer keeps a few float copies.
MAX_TRAINING_PIXELS = 1 << 28
#: A held-out band of a single 2-D image is at least this many pixels wide (a few network tiles' context).
MIN_VAL_BAND = 64


@dataclass(frozen=True)
class Volume:
    """Level 0 of an OME-Zarr image or label image, in memory as ``(z, y, x)`` (z = 1 for 2-D)."""

    path: str
    data: np.ndarray
    pixel_size_nm: tuple[float, float] | None  #: (y, x); None when the axes carry no unit

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.data.shape[0]), int(self.data.shape[1]), int(self.data.shape[2]))


@dataclass(frozen=True)
class ValidationSplit:
    """Which part of the data validates: z-slices of a stack, or a fraction (of the slices of a stack,
    or of the longer axis of one 2-D image). ``fraction`` 0 means no validation."""

    slices: tuple[int, ...] | None = None
    fraction: float = 0.1

    @classmethod
    def create(cls, slices: str | Sequence[int] | None = None, fraction: float | None = None) -> ValidationSplit:
        """From CLI input: ``slices="21,22,23"`` or ``fraction=0.1`` (not both; neither = 10 %)."""
        if slices is not None and fraction is not None:
            raise ConfigError("give either --val-slices or --val-fraction, not both")
        if slices is not None:
            return cls(slices=parse_slices(slices))
        return cls(fraction=0.1 if fraction is None else float(fraction))

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"--val-fraction must be at least 0 and below 1, got {self.fraction}")
        if self.slices is not None and not self.slices:
            raise ConfigError("--val-slices needs at least one z index, e.g. 21,22,23")


def parse_slices(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"21,22,23"`` or ``"21-23"`` (inclusive) or a sequence → sorted unique z indices."""
    if not isinstance(text, str):
        return tuple(sorted({int(v) for v in text}))
    out: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"--val-slices takes z indices like 21,22,23 or 21-23, got {text!r}") from None
    return tuple(sorted(out))


@dataclass(frozen=True)
class DataSpec:
    """One annotated dataset: an OME-Zarr image (2-D or a stack), one label image per class, and how
    often training draws from it relative to the other datasets."""

    image: str
    labels: tuple[str, ...]
    weight: float = 1.0
    pixel_size_nm: tuple[float, float] | None = None  #: overrides the image's metadata

    def __post_init__(self) -> None:
        if not self.labels:
            raise ConfigError(f"dataset {self.image}: give at least one label image, e.g. --labels {self.image}/labels/mito")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"dataset {self.image}: sampling weight must be a positive number, got {self.weight}")

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """``IMAGE:LABELS[:WEIGHT]`` (``--data``); several classes' label images joined by ``+``:
        ``lucchi.ome.zarr:lucchi.ome.zarr/labels/mito+lucchi.ome.zarr/labels/membrane:2``."""
        parts = text.split(":")
        weight = 1.0
        if len(parts) == 3:
            try:
                weight = float(parts[2])
            except ValueError:
                raise ConfigError(f"--data {text!r}: the weight after the second ':' must be a number, e.g. IMAGE:LABELS:2") from None
        elif len(parts) != 2:
            raise ConfigError(f"--data takes IMAGE:LABELS or IMAGE:LABELS:WEIGHT (label images of several classes joined by +), got {text!r}")
        if not parts[0] or not parts[1]:
            raise ConfigError(f"--data {text!r}: IMAGE and LABELS must not be empty")
        return cls(parts[0], tuple(p for p in parts[1].split("+") if p), weight)


@dataclass
class TrainingSet:
    """What the trainer consumes: 2-D images at one pixel size, their ``(C, H, W)`` masks, which dataset
    each came from, and how they were chosen."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    val_images: list[np.ndarray]
    val_masks: list[np.ndarray]
    classes: tuple[str, ...]
    pixel_size_nm: tuple[float, float]
    provenance: dict[str, Any] = field(default_factory=dict)  #: recorded in the bundle's [training] table
    dataset: list[int] = field(default_factory=list)  #: dataset index of each training image (default: all 0)
    val_dataset: list[int] = field(default_factory=list)  #: ... of each validation image
    weights: tuple[float, ...] = (1.0,)  #: sampling weight of each dataset

    def __post_init__(self) -> None:
        self.dataset = self.dataset or [0] * len(self.images)
        self.val_dataset = self.val_dataset or [0] * len(self.val_images)

    def fingerprint(self) -> str:
        """sha256 of the pixels, masks, split and weights: a resumed run must train on exactly this data."""
        h = hashlib.sha256()
        for part in (self.images, self.masks, self.val_images, self.val_masks):
            h.update(str(len(part)).encode())
            for a in part:
                h.update(str((a.shape, a.dtype.str)).encode())
                h.update(np.ascontiguousarray(a).tobytes())
        if len(self.weights) > 1:  # one dataset keeps the fingerprint of earlier versions
            h.update(str((self.dataset, self.val_dataset, self.weights)).encode())
        return h.hexdigest()


# ---------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class StackMeta:
    """Metadata of an OME-Zarr image or label image that may hold a (z, y, x) stack (only metadata read)."""

    path: str
    version: str  #: NGFF version, "0.5" (zarr v3) or "0.4" (zarr v2)
    level_paths: tuple[str, ...]
    level_shapes: tuple[tuple[int, ...], ...]  #: full array shapes, leading axes included
    chunks: tuple[int, ...]  #: level 0's chunk shape
    index: tuple  #: indexes level 0 down to (z, y, x) or (y, x): keeps z, drops axes of size one
    pixel_size_nm: tuple[float, float] | None  #: (y, x) of level 0; None when the axes carry no unit


def read_stack_meta(path: str | os.PathLike, *, role: str = "image") -> StackMeta:
    """Levels, axes and pixel size of an OME-Zarr image or NGFF label image (0.4 or 0.5), read through
    :func:`tilefeet.ngff.read_multiscale` (validated, bioformats2raw followed).

    Unlike :meth:`tilefeet.image.Image.open` (2-D sections only), one spatial axis before y, x may
    have any size (z); other leading axes (t, c) must have size one. ``role`` names the input in errors.
    """
    from .ngff import read_multiscale

    p = Path(path)
    if not p.exists():
        if role == "labels" and p.parent.name == "labels":  # image.ome.zarr/labels/NAME
            hint = f"`tilefeet convert MASKS {p.parent.parent} --labels {p.name}` (--stack for a folder of slices)"
        else:
            hint = f"`tilefeet convert INPUT {p} --pixel-size 4nm` with your pixel size (--stack for a folder of slices)"
        raise InputNotFoundError(f"{role} {p} does not exist; write it from PNG/TIFF files with {hint}")
    ms = read_multiscale(p, role=role)
    shape = ms.datasets[0].shape
    axes = [{"name": a.name, "type": a.type, "unit": a.unit} for a in ms.axes]
    return StackMeta(
        path=ms.path,
        version=ms.version,
        level_paths=tuple(d.path for d in ms.datasets),
        level_shapes=tuple(d.shape for d in ms.datasets),
        chunks=ms.datasets[0].chunks,
        index=_zyx_index(shape, axes, f"{role} {p}"),
        pixel_size_nm=ms.pixel_size_nm(0),
    )


def read_volume(path: str | os.PathLike, *, max_pixels: int = MAX_TRAINING_PIXELS, role: str = "image") -> Volume:
    """Level 0 of an OME-Zarr image or NGFF label image as a ``(z, y, x)`` numpy array (z = 1 for 2-D),
    refused above ``max_pixels`` (it is read whole into memory)."""
    import zarr

    meta = read_stack_meta(path, role=role)
    n = math.prod(meta.level_shapes[0])
    if n > max_pixels:
        raise ConfigError(
            f"{role} {meta.path} has {n:,} pixels at level 0 (shape {meta.level_shapes[0]}), more than the {max_pixels:,} a "
            f"training run reads into memory; train on a cropped region or fewer slices, or raise --max-pixels"
        )
    try:
        array: Any = zarr.open_group(meta.path, mode="r")[meta.level_paths[0]]
        data = np.asarray(array[meta.index])
    except Exception as e:
        raise CorruptDataError(f"{role} {meta.path}: could not read level 0 ({type(e).__name__}: {e}); re-convert it") from None
    if np.dtype(data.dtype).kind not in "uifb":
        raise InvalidImageError(f"{role} {meta.path} has dtype {data.dtype}; expected integer or floating-point values")
    return Volume(meta.path, data if data.ndim == 3 else data[None], meta.pixel_size_nm)


def _zyx_index(shape: tuple[int, ...], axes: list[dict], where: str) -> tuple:
    """Index that keeps z (if any), y and x; refuses leading axes of more than one entry besides z."""
    names = [str(a.get("name", "?")) for a in axes]
    if len(shape) < 2 or names[-2:] not in (["y", "x"], ["?", "?"]):
        raise InvalidImageError(f"{where}: the last two axes must be y, x; got axes {tuple(names)}")
    index: list[Any] = []
    kept_z = False
    for size, name, axis in zip(shape[:-2], names[:-2], axes[:-2]):
        spatial = axis.get("type") == "space" or name == "z"
        if size > 1 and spatial and not kept_z:
            index.append(slice(None))
            kept_z = True
        elif size == 1:
            index.append(0)
        else:
            raise InvalidImageError(
                f"{where} has {size} entries along axis {name!r} (shape {shape}); training reads one channel and "
                f"one z-stack: write a single-channel (z, y, x) image"
            )
    return tuple(index) + (slice(None), slice(None))


# ---------------------------------------------------------------------------------- splitting


def split_stack(n_slices: int, split: ValidationSplit) -> tuple[list[int], list[int]]:
    """(training, validation) z indices of a stack: the chosen slices, or the last ``fraction`` of them."""
    if split.slices is not None:
        bad = [z for z in split.slices if not 0 <= z < n_slices]
        if bad:
            raise ConfigError(f"--val-slices {bad} outside the stack's z range 0..{n_slices - 1}")
        val = list(split.slices)
    else:
        k = math.ceil(split.fraction * n_slices) if split.fraction > 0 else 0
        val = list(range(n_slices - k, n_slices))
    train = [z for z in range(n_slices) if z not in val]
    if not train:
        raise ConfigError(f"all {n_slices} slices are validation slices; leave at least one for training")
    return train, val


def split_region(shape: tuple[int, int], fraction: float) -> tuple[Box, Box | None]:
    """(training, validation) boxes of one 2-D image: a band of ``fraction`` at the end of the longer axis."""
    h, w = shape
    if fraction <= 0:
        return Box(0, 0, h, w), None
    long = max(h, w)
    band = max(MIN_VAL_BAND, math.ceil(fraction * long))
    if long - band < MIN_VAL_BAND:
        raise ConfigError(
            f"the image ({h} × {w} px) is too small to hold out a {band} px validation band and keep {MIN_VAL_BAND} px "
            f"for training; give a larger image, a stack, or --val-fraction 0"
        )
    if w >= h:
        return Box(0, 0, h, w - band), Box(0, w - band, h, w)
    return Box(0, 0, h - band, w), Box(h - band, 0, h, w)


# ---------------------------------------------------------------------------------- assembling


def default_class_name(labels_path: str | os.PathLike) -> str:
    """``image.ome.zarr/labels/mito`` → ``mito``; ``mito.ome.zarr`` → ``mito``."""
    name = Path(labels_path).name
    for suffix in (".ome.zarr", ".zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_training_set(
    image: str | os.PathLike,
    labels: Sequence[str | os.PathLike],
    *,
    classes: Sequence[str] | None = None,
    pixel_size: str | float | tuple | None = None,
    split: ValidationSplit = ValidationSplit(),
    max_pixels: int = MAX_TRAINING_PIXELS,
) -> TrainingSet:
    """Read an image and one label image per class, check they match, and split off validation.

    ``pixel_size`` ("5nm", 5, (5, 5)) overrides the image's metadata; one of them must give it.
    Label images are binary (non-zero = inside the class), as ``tilefeet convert --labels`` writes them.
    """
    if not labels:
        raise ConfigError("give at least one label image with --labels, e.g. --labels IMAGE/labels/mito")
    px = parse_pixel_size(pixel_size, where="--pixel-size") if pixel_size is not None else None
    return load_training_data([DataSpec(str(image), tuple(str(p) for p in labels), 1.0, px)], classes=classes, split=split, max_pixels=max_pixels)


def class_names(spec: DataSpec, classes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The class of each label image of a dataset: ``classes`` in order, or each label image's name."""
    names = tuple(classes) if classes else tuple(default_class_name(p) for p in spec.labels)
    if len(names) != len(spec.labels):
        raise ConfigError(f"{len(spec.labels)} label images (--labels) but {len(names)} class names (--class); give one --class per --labels")
    if len(set(names)) != len(names):
        raise ConfigError(f"class names must differ, got {', '.join(names)}; name them with --class")
    return names


def load_training_data(
    specs: Sequence[DataSpec],
    *,
    classes: Sequence[str] | None = None,
    pixel_size_nm: tuple[float, float] | None = None,
    split: ValidationSplit = ValidationSplit(),
    max_pixels: int = MAX_TRAINING_PIXELS,
) -> TrainingSet:
    """Read several annotated datasets, split each, and resample them all to one pixel size.

    ``classes`` names the label images of every dataset in order (default: their names); every
    dataset must annotate the same classes (their label images may come in any order). The pixel
    size is ``pixel_size_nm`` (a parent engine's), else the first dataset's; a dataset at another
    pixel size is resampled to it, image and labels alike (:func:`resample`), after the split, so a
    validation band or slice is chosen in the data's own pixels. ``split`` applies to each dataset.
    """
    if not specs:
        raise ConfigError("no training data: give IMAGE --labels LABELS, or --data IMAGE:LABELS (repeatable)")
    names = class_names(specs[0], classes)
    target = pixel_size_nm
    parts: list[tuple[list[np.ndarray], ...]] = []
    records: list[dict[str, Any]] = []
    for spec in specs:
        own = class_names(spec, classes)
        if set(own) != set(names):
            raise ConfigError(
                f"dataset {spec.image} annotates {', '.join(own)} but {specs[0].image} annotates {', '.join(names)}; "
                f"every dataset needs a label image of each class (name them with --class)"
            )
        img = read_volume(spec.image, max_pixels=max_pixels, role="image")
        px = spec.pixel_size_nm or img.pixel_size_nm
        if px is None:
            raise ConfigError(
                f"image {img.path} records no physical pixel size (its y/x axes have no unit); give it with --pixel-size, "
                f"e.g. --pixel-size 5nm, or write it with `tilefeet convert ... --pixel-size 5nm`"
            )
        target = target or (float(px[0]), float(px[1]))
        order = [own.index(n) for n in names]
        masks = np.stack([_read_mask(spec.labels[k], img, names[j], max_pixels) for j, k in enumerate(order)], axis=1)  # (z, C, y, x)
        (tr_i, tr_m, va_i, va_m), where = _split(img, masks, split)
        _check_has_foreground(tr_m, names, img.path)
        if needs_resampling(px, target):
            tr_i, tr_m = _resample_all(tr_i, tr_m, px, target)
            va_i, va_m = _resample_all(va_i, va_m, px, target)
            n = sum(a.size for a in tr_i) + sum(a.size for a in va_i)
            if n > max_pixels:
                raise ConfigError(
                    f"image {img.path} resampled from {px[0]:g} to {target[0]:g} nm has {n:,} pixels, more than the "
                    f"{max_pixels:,} a training run reads into memory; train on a cropped region, or raise --max-pixels"
                )
        parts.append((list(tr_i), list(tr_m), list(va_i), list(va_m)))
        records.append({
            "image": spec.image,
            "labels": [spec.labels[k] for k in order],
            "weight": spec.weight,
            "pixel_size_nm": [float(px[0]), float(px[1])],
            **where,
            "training_pixels": int(sum(a.size for a in tr_i)),
            "validation_pixels": int(sum(a.size for a in va_i)),
        })
    assert target is not None
    provenance: dict[str, Any] = {
        "training_pixels": sum(r["training_pixels"] for r in records),
        "validation_pixels": sum(r["validation_pixels"] for r in records),
    }
    if len(records) == 1:  # one dataset: its description at the top of [training], as before several existed
        provenance = {**records[0], **provenance}
        del provenance["weight"]
        provenance["data_pixel_size_nm"] = provenance.pop("pixel_size_nm")  # [training] pixel_size_nm is the engine's
    else:
        provenance.update({f"data_{i + 1}": r for i, r in enumerate(records)})
    return TrainingSet(
        images=[a for p in parts for a in p[0]],
        masks=[m for p in parts for m in p[1]],
        val_images=[a for p in parts for a in p[2]],
        val_masks=[m for p in parts for m in p[3]],
        classes=names,
        pixel_size_nm=(float(target[0]), float(target[1])),
        provenance=provenance,
        dataset=[i for i, p in enumerate(parts) for _ in p[0]],
        val_dataset=[i for i, p in enumerate(parts) for _ in p[2]],
        weights=tuple(float(s.weight) for s in specs),
    )


#: Relative pixel-size difference below which training data is used as is (as inference does).
RESAMPLE_TOLERANCE = 0.01


def needs_resampling(px: Sequence[float], target: Sequence[float]) -> bool:
    return any(abs(a / b - 1) > RESAMPLE_TOLERANCE for a, b in zip(px, target))


def _resample_all(images: list[np.ndarray], masks: list[np.ndarray], px: Sequence[float], target: Sequence[float]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    pairs = [resample(a, m, px, target) for a, m in zip(images, masks)]
    return [a for a, _ in pairs], [m for _, m in pairs]


def resample(image: np.ndarray, masks: np.ndarray, px: Sequence[float], target: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """An image ``(H, W)`` and its masks ``(C, H, W)`` from pixel size ``px`` to ``target`` (nm, y and x).

    Linear interpolation, antialiased when shrinking (as inference resamples sections); integer
    images are rounded back to their dtype, so the bundle's normalization and histogram see the
    same value range. Masks are resampled as coverage and kept where at least half a pixel is
    inside, so a structure keeps its width in nm.
    """
    from skimage.transform import resize

    h, w = image.shape
    shape = (max(1, round(h * px[0] / target[0])), max(1, round(w * px[1] / target[1])))
    shrink = shape[0] < h or shape[1] < w
    out = resize(image.astype(np.float32), shape, order=1, anti_aliasing=shrink, preserve_range=True)
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
    m = np.stack([resize(c.astype(np.float32), shape, order=1, anti_aliasing=shrink, preserve_range=True) >= 0.5 for c in masks])
    return out, m.astype(np.uint8)


def _split(img: Volume, masks: np.ndarray, split: ValidationSplit) -> tuple[tuple[list[np.ndarray], ...], dict[str, Any]]:
    """(train images, train masks, val images, val masks) and a description of the validation part."""
    data = img.data
    if data.shape[0] > 1 or split.slices is not None:
        if data.shape[0] == 1:
            raise ConfigError(f"--val-slices picks z-slices, but image {img.path} is a single 2-D image; use --val-fraction")
        train, val = split_stack(data.shape[0], split)
        parts = ([data[z] for z in train], [masks[z] for z in train], [data[z] for z in val], [masks[z] for z in val])
        return parts, {"validation_slices": val}
    tbox, vbox = split_region(img.shape[1:], split.fraction)
    train_parts = [_crop(data[0], tbox)], [_crop(masks[0], tbox)]
    if vbox is None:
        return (*train_parts, [], []), {"validation_region": []}
    return (*train_parts, [_crop(data[0], vbox)], [_crop(masks[0], vbox)]), {"validation_region": [vbox.y0, vbox.x0, vbox.y1, vbox.x1]}


def _crop(a: np.ndarray, box: Box) -> np.ndarray:
    """The box of the last two axes, as its own contiguous array (so the full image can be freed)."""
    return np.ascontiguousarray(a[..., box.y0 : box.y1, box.x0 : box.x1])


def _read_mask(path: str | os.PathLike, image: Volume, name: str, max_pixels: int) -> np.ndarray:
    lab = read_volume(path, max_pixels=max_pixels, role="labels")
    if lab.shape != image.shape:
        raise InvalidImageError(
            f"label image {lab.path} has shape {lab.shape} (z, y, x) but image {image.path} has shape {image.shape}; "
            f"labels must cover the image pixel for pixel (add them with `tilefeet convert MASKS {image.path} --labels {name}`)"
        )
    return (lab.data != 0).astype(np.uint8)


def _check_has_foreground(masks: list[np.ndarray], names: tuple[str, ...], where: str) -> None:
    counts = np.sum([m.reshape(m.shape[0], -1).sum(1) for m in masks], axis=0)
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        raise ConfigError(
            f"class {', '.join(empty)} has no labelled pixels in the training part of {where}; check the label image "
            f"(non-zero = inside; convert masks whose class is 0 with --foreground 0)"
        )
