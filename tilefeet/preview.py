"""A PNG to look at: the input with the labels overlaid, beside the probability map.

Reads one pyramid level of the output (the finest that fits ``max_size``), so previews of whole
sections are cheap. The input is the image the output records (by absolute path) unless
``image`` names another; when it cannot be found that is an error, not a grey panel. A preview
that cannot be written (a read-only folder, a folder in its place, a full disk) is refused in one
line before anything is read, or said in one line when the OS refuses it later; the file is
written beside its name and renamed into place, so there is never half a PNG.

A stack's output (c, z, y, x) is drawn one section at a time: ``z`` picks the section (of the
output, 0 its first; default the middle one), or several, drawn side by side (overlays in the
top row, probabilities below). Each is laid over its own section of the input (the output's
section k is the input's section ``--z START`` + k of the run that wrote it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputNotFoundError, InvalidImageError, OutputExistsError, RemoteStorageError, TilefeetError


def render_preview(
    output: str | Path,
    png: Path,
    *,
    image: str | Path | None = None,
    max_size: int = 2048,
    class_index: int = 0,
    objects: bool = False,
    z: str | int | Sequence[int] | None = None,
) -> Path:
    """The preview of ``output`` (a path or URL; URLs are reached with the command's storage options).
    With ``objects``, the class's objects (``labels/<class>-objects`` or ``-cells``, from ``tilefeet
    objects`` or ``segment --objects``) are drawn instead of its mask: each object in its own stable
    colour, its outline brighter. A stack's sections: ``z`` (``3``, ``"0,5,10"``, or a list; the
    module's docstring)."""
    import imageio.v3 as iio

    from .image import Image
    from .ngff import open_group, read_multiscale
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
    if ms.names not in (("c", "y", "x"), ("c", "z", "y", "x")) or ms.is_label:  # an input image, a label image, or someone else's store
        raise not_ours
    stack = ms.names == ("c", "z", "y", "x")
    depth = int(ms.datasets[0].shape[1]) if stack else 1
    sections = choose_sections(z, depth, str(output), stack)
    src = image or ms.metadata.get("input")
    if not src:
        raise InvalidImageError(f"{output} does not record its input image; give it with --image IMAGE.ome.zarr")
    if not is_url(src) and not Path(src).exists():
        hint = "check --image" if image else f"{output} records it, but it has moved or been deleted: give it with --image"
        raise InputNotFoundError(f"the input image {src} does not exist; {hint}")
    source = Image.open(src, stacks=True)
    first = _first_input_section(ms.metadata, image) if stack else 0
    root: Any = open_group(ms.path, role="output")
    level = next((k for k, ds in enumerate(ms.datasets) if max(ds.shape[-2:]) <= max_size), len(ms.datasets) - 1)
    path = ms.datasets[level].path
    classes = [n for n in ms.labels if not n.endswith(("-objects", "-cells"))]
    layer = None
    if objects:
        layer = next((n for n in ms.labels if class_index < len(classes) and n in (f"{classes[class_index]}-objects", f"{classes[class_index]}-cells")), None)
        if layer is None:
            raise InvalidImageError(f"{output} holds no objects layer for its class; run `tilefeet objects {output}` first, or leave out --objects")
    elif class_index < len(classes):
        layer = classes[class_index]
    panels = []
    for k in sections:
        at: tuple[Any, ...] = (k,) if stack else ()
        if stack and first + k >= source.meta.depth:
            raise InvalidImageError(
                f"section {k} of {output} is section {first + k} of its input {src}, which has {source.meta.depth}; "
                f"give the input stack it was segmented from with --image"
            )
        panels.append(_panel(root, path, layer, objects, class_index, at, source.section(first + k) if stack else source))
    data = iio.imwrite("<bytes>", _layout(panels), extension=png.suffix.lower())
    _write_file(png, data)
    return png


def choose_sections(z: str | int | Sequence[int] | None, depth: int, where: str, stack: bool) -> list[int]:
    """The sections ``--z`` names (``3``, ``"0,5,10"``), each checked to be in the stack; default
    the middle one. One section's output has only section 0, and ``--z`` is refused for it."""
    from .errors import ConfigError

    if z is None:
        return [depth // 2]
    if not stack:
        raise ConfigError(f"--z picks sections of a stack, but {where} is one section; leave out --z")
    items: list[Any] = [p for p in z.split(",") if p.strip()] if isinstance(z, str) else [z] if isinstance(z, int) else list(z)
    try:
        chosen = [int(str(v).strip()) for v in items]
    except ValueError:
        raise ConfigError(f"--z takes section numbers separated by commas, e.g. --z {depth // 2} or --z 0,{depth - 1}; got {z!r}") from None
    if not chosen:
        raise ConfigError(f"--z needs a section number, e.g. --z {depth // 2}")
    outside = [v for v in chosen if not 0 <= v < depth]
    if outside:
        raise ConfigError(
            f"--z {outside[0]} is outside the stack: {where} has sections 0 to {depth - 1}; e.g. --z {depth // 2} (the middle one)"
        )
    return chosen


def _first_input_section(metadata: dict, image: Any) -> int:
    """The input section that the output's section 0 was segmented from (``--z START``); 0 with
    ``--image`` (an image the user gives is taken to hold the output's sections)."""
    if image:
        return 0
    z_range = (metadata.get("settings") or {}).get("z_range")
    return int(z_range[0] or 0) if z_range else 0


def _panel(root: Any, path: str, layer: str | None, objects: bool, class_index: int, at: tuple[Any, ...], section: Any) -> tuple[np.ndarray, np.ndarray]:
    """(overlay, probabilities) of one section, as float32 RGB of the level's (y, x) size."""
    from .ngff import LABEL_COLORS

    prob = np.asarray(root[path][(class_index, *at)])
    prob = prob if prob.dtype == np.uint8 else np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)
    h, w = prob.shape
    label = ids = None
    if layer is not None:
        stored = np.asarray(root[f"labels/{layer}/{path}"][at])
        stored = stored.reshape(stored.shape[-2:])  # (y, x); older outputs wrote (1, y, x)
        if objects:
            ids = stored
        else:
            label = stored.astype(bool)
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
    return rgb, np.repeat(prob[..., None], 3, axis=2).astype(np.float32)


def _layout(panels: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One section: overlay | probabilities. Several: the overlays side by side, their
    probabilities below, 8 px white gaps."""
    h = panels[0][0].shape[0]
    if len(panels) == 1:
        rgb, right = panels[0]
        out = np.concatenate([rgb, np.full((h, 8, 3), 255, np.float32), right], axis=1)
    else:
        def row(images: list[np.ndarray]) -> np.ndarray:
            parts: list[np.ndarray] = []
            for a in images:
                parts += [np.full((h, 8, 3), 255, np.float32), a] if parts else [a]
            return np.concatenate(parts, axis=1)

        top, bottom = row([p[0] for p in panels]), row([p[1] for p in panels])
        out = np.concatenate([top, np.full((8, top.shape[1], 3), 255, np.float32), bottom], axis=0)
    return out.round().astype(np.uint8)


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
