"""A PNG to look at: the input with the labels overlaid, beside the probability map.

Reads one pyramid level of the output (the finest that fits ``max_size``), so previews of whole
sections are cheap. The input is the image the output records (by absolute path) unless
``image`` names another; when it cannot be found that is an error, not a grey panel. A preview
that cannot be written (a read-only folder, a folder in its place, a full disk) is refused in one
line before anything is read, or said in one line when the OS refuses it later; the file is
written beside its name and renamed into place, so there is never half a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputNotFoundError, InvalidImageError, OutputExistsError, RemoteStorageError, TilefeetError


def render_preview(
    output: str | Path, png: Path, *, image: str | Path | None = None, max_size: int = 2048, class_index: int = 0, objects: bool = False
) -> Path:
    """The preview of ``output`` (a path or URL; URLs are reached with the command's storage options).
    With ``objects``, the class's objects (``labels/<class>-objects`` or ``-cells``, from ``tilefeet
    objects`` or ``segment --objects``) are drawn instead of its mask: each object in its own stable
    colour, its outline brighter."""
    import imageio.v3 as iio

    from .image import Image
    from .ngff import LABEL_COLORS, open_group, read_multiscale
    from .storage import check_writable, is_url

    png = Path(png)
    if png.suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        raise ConfigError(f"cannot write a preview as {png.name!r}; give a .png (or .jpg, .tif) file name")
    if png.is_dir():
        raise OutputExistsError(f"{png} is a folder; give the preview a file name, e.g. {png / 'preview.png'}")
    check_writable(png)  # before reading anything: a read-only folder or a path the OS refuses
    not_ours = InvalidImageError(f"{output} is not a tilefeet output (OME-Zarr 0.5 with probabilities); run `tilefeet segment` first")
    try:
        ms = read_multiscale(output, role="output")
    except (InputNotFoundError, RemoteStorageError):
        raise
    except TilefeetError:
        raise not_ours from None
    if ms.names != ("c", "y", "x") or ms.is_label:  # an input image, a label image, or someone else's store
        raise not_ours
    src = image or ms.metadata.get("input")
    if not src:
        raise InvalidImageError(f"{output} does not record its input image; give it with --image IMAGE.ome.zarr")
    if not is_url(src) and not Path(src).exists():
        hint = "check --image" if image else f"{output} records it, but it has moved or been deleted: give it with --image"
        raise InputNotFoundError(f"the input image {src} does not exist; {hint}")
    section = Image.open(src)
    root: Any = open_group(ms.path, role="output")
    level = next((k for k, ds in enumerate(ms.datasets) if max(ds.shape[1:]) <= max_size), len(ms.datasets) - 1)
    path = ms.datasets[level].path
    prob = np.asarray(root[path][class_index])
    prob = prob if prob.dtype == np.uint8 else np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)
    h, w = prob.shape
    label = ids = None
    classes = [n for n in ms.labels if not n.endswith(("-objects", "-cells"))]
    if objects:
        name = next((n for n in ms.labels if class_index < len(classes) and n in (f"{classes[class_index]}-objects", f"{classes[class_index]}-cells")), None)
        if name is None:
            raise InvalidImageError(f"{output} holds no objects layer for its class; run `tilefeet objects {output}` first, or leave out --objects")
        ids = np.asarray(root[f"labels/{name}/{path}"])
        ids = ids.reshape(ids.shape[-2:])
    elif class_index < len(classes):
        lab = np.asarray(root[f"labels/{classes[class_index]}/{path}"])
        label = lab.reshape(lab.shape[-2:]).astype(bool)  # (y, x); older outputs wrote (1, y, x)
    grey = _read_like(section, (h, w))
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if label is not None:
        color = np.array(LABEL_COLORS[class_index % len(LABEL_COLORS)], np.float32)
        rgb[label] = 0.45 * rgb[label] + 0.55 * color
    if ids is not None:
        from .objects.colors import id_colors, outlines

        inside, edge = ids != 0, outlines(ids)
        colors = id_colors(ids).astype(np.float32)
        rgb[inside] = 0.5 * rgb[inside] + 0.5 * colors[inside]
        rgb[edge] = colors[edge]
    right = np.repeat(prob[..., None], 3, axis=2).astype(np.float32)
    gap = np.full((h, 8, 3), 255, np.float32)
    data = iio.imwrite("<bytes>", np.concatenate([rgb, gap, right], axis=1).round().astype(np.uint8), extension=png.suffix.lower())
    _write_file(png, data)
    return png


def _write_file(path: Path, data: bytes) -> None:
    """``data`` written beside ``path`` and renamed onto it: never half a file; an OS error is one line."""
    import contextlib
    import os

    from .storage import os_error

    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise os_error(OSError(e.errno, e.strerror), path) from None  # the temporary name means nothing to the user


def _read_like(image, shape: tuple[int, int]) -> np.ndarray:
    """The input at the level nearest ``shape``, resized to it exactly, as 8-bit grey."""
    from skimage.transform import resize

    from .geometry import Box

    # the coarsest level still at least as large as the preview
    larger = [i for i, lv in enumerate(image.meta.levels) if lv.shape[0] >= shape[0] and lv.shape[1] >= shape[1]]
    k = larger[-1] if larger else 0
    lv = image.meta.levels[k]
    a = image.read(k, Box(0, 0, *lv.shape)).astype(np.float32)
    if a.shape != shape:
        a = resize(a, shape, preserve_range=True, anti_aliasing=True)
    lo, hi = np.percentile(a, (0.5, 99.5))
    return np.clip((a - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
