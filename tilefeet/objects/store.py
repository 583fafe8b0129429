"""All of the objects package's OME-Zarr I/O: reading one class of a segment output, and adding an
objects layer to it without ever leaving it half-written.

Layout added to a segment output (``OUT``)::

    OUT/labels/<class>-objects/     NGFF label image (image-label, source "../../"): (y, x) uint32
        0/ 1/ ...                   (uint64 past 2³²−1 objects); level k keeps every 2^k-th pixel of
                                    level 0 (ids are never averaged)
        objects.parquet             the measurements table, one row per object (or objects.csv)
    OUT/labels/<class>-cells/       the same for cells between membranes (``--cells``)
    OUT/labels/zarr.json            lists a layer only once it is complete

A layer is built in a staging folder beside the store (``OUT.<layer>.partial``, with its
completion records in ``.tilefeet/``) and :func:`publish` moves it into ``labels/`` by renames,
listing it last. A reader of ``OUT`` never sees a half-written layer; a crash leaves the staging
folder for ``--resume``. The store itself may be a segment run's own staging folder
(``OUT.partial``) that is not yet in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputNotFoundError, InvalidImageError, OutputExistsError
from ..geometry import Box, Pair
from ..ngff import compressor, create_levels, label_metadata, label_name, multiscales
from .volume import VBox

STATE_DIR = ".tilefeet"
TABLE_NAMES = {"parquet": "objects.parquet", "csv": "objects.csv"}


def layer_name(class_name: str, cells: bool) -> str:
    """``labels/`` entry of a class's objects (``mitochondrion-objects``) or cells (``membrane-cells``)."""
    return f"{label_name(class_name)}-{'cells' if cells else 'objects'}"


# --------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ClassSource:
    """One class of a segment output: where its mask and probabilities are read (picklable:
    arrays are opened by path in each process)."""

    store: str  #: the segment output (or its staging folder)
    prob_path: str  #: level-0 probabilities array, (classes, y, x), or (classes, z, y, x) of a stack
    channel: int  #: the class's index along c
    class_name: str
    shape: tuple[int, ...]  #: (y, x), or (z, y, x) of a stack
    chunks: tuple[int, ...]  #: of the probabilities, (y, x) or (z, y, x)
    pixel_size_nm: tuple[float, float]
    origin_nm: tuple[float, float]
    prob_dtype: str
    threshold: float  #: probability at and above which a pixel is in the mask
    mask_path: str | None  #: the stored ``labels/<class>/0`` when it is exactly that mask, else None
    levels: int = 1  #: pyramid levels of the image (a label image must have as many)
    z_spacing_nm: float | None = None  #: a stack's section spacing (None: a section)
    z_origin_nm: float = 0.0  #: a stack's first section's z position
    engine: str | None = None  #: the engine that made the output (its provenance)
    recipe_json: str = ""  #: the engine's object recipe for the class, as JSON (what segment recorded, else the engine's own)

    @property
    def recipe(self) -> dict | None:
        """The engine's ``[objects.<class>]`` table (None: the engine records none, or was not found)."""
        import json

        return json.loads(self.recipe_json) if self.recipe_json else None

    @property
    def is_stack(self) -> bool:
        return len(self.shape) == 3

    @property
    def spacing_nm(self) -> tuple[float, float, float]:
        """A stack's voxel size (z, y, x) in nm."""
        assert self.z_spacing_nm is not None
        return (self.z_spacing_nm, *self.pixel_size_nm)

    @property
    def origin3_nm(self) -> tuple[float, float, float]:
        return (self.z_origin_nm, *self.origin_nm)

    def read_prob3(self, box: VBox) -> np.ndarray:
        """A stack's class probability (as stored) over ``box``, which lies inside the volume."""
        return np.asarray(_array(self.store, self.prob_path)[(self.channel, *box.slices)])

    def read_mask3(self, box: VBox) -> np.ndarray:
        """A stack's class mask over ``box`` (bool), False outside the volume."""
        inner = box.intersect(VBox((0, 0, 0), self.shape))  # type: ignore[arg-type]
        out = np.zeros(box.shape, dtype=bool)
        if inner.empty:
            return out
        if self.mask_path is not None:
            m = np.asarray(_array(self.store, self.mask_path)[inner.slices]) != 0
        else:
            m = self.read_prob3(inner) >= self.threshold * self.prob_scale
        out[inner.relative_to(box)] = m
        return out

    @property
    def prob_scale(self) -> float:
        """The stored value of probability 1."""
        return 255.0 if np.dtype(self.prob_dtype) == np.uint8 else 1.0

    def identity(self) -> dict:
        """What the output depends on (for the resume fingerprint)."""
        d = asdict(self)
        d["store"] = str(Path(self.store).resolve())
        d["provenance"] = _provenance(self.store)
        return d

    def read_prob(self, box: Box) -> np.ndarray:
        """The class probability (as stored) over ``box``, which lies inside the image."""
        return np.asarray(_array(self.store, self.prob_path)[self.channel, box.y0 : box.y1, box.x0 : box.x1])

    def read_prob_window(self, box: Box, fill: Any = 0) -> np.ndarray:
        """The class probability (as stored) over ``box``, ``fill`` outside the image."""
        inner = box.intersect(Box(0, 0, *self.shape))
        out = np.full(box.shape, fill, dtype=np.dtype(self.prob_dtype))
        if not inner.empty:
            out[inner.relative_to(box)] = self.read_prob(inner)
        return out

    def read_mask(self, box: Box) -> np.ndarray:
        """The class mask over ``box`` (bool), False outside the image."""
        inner = box.intersect(Box(0, 0, *self.shape))
        out = np.zeros(box.shape, dtype=bool)
        if inner.empty:
            return out
        if self.mask_path is not None:
            labels = _array(self.store, self.mask_path)
            lead = (0,) * (labels.ndim - 2)  # (y, x), or (1, y, x) as tilefeet wrote labels before
            m = np.asarray(labels[(*lead, slice(inner.y0, inner.y1), slice(inner.x0, inner.x1))]) != 0
        else:
            m = self.read_prob(inner) >= self.threshold * self.prob_scale
        out[inner.relative_to(box)] = m
        return out


def _array(store: str, path: str) -> Any:
    """A zarr array, opened by each task (a metadata read): handles never outlive a store's rewrite."""
    import zarr

    return zarr.open_array(str(Path(store) / path), mode="r")


def ome_attrs(attrs: Any) -> dict:
    """The NGFF metadata of a group's attributes (under "ome" in 0.5, at the top level in 0.4)."""
    attrs = dict(attrs)
    return dict(attrs.get("ome", attrs))


def _provenance(store: str) -> Any:
    try:
        import zarr

        return ome_attrs(zarr.open_group(store, mode="r").attrs)["multiscales"][0].get("metadata", {})
    except Exception:
        return {}


def open_class(store: str | os.PathLike, class_name: str | None = None, threshold: float | None = None) -> ClassSource:
    """The class ``class_name`` (or the store's only class) of a segment output, read (and
    validated) through :func:`tilefeet.ngff.read_multiscale`.

    The mask is ``labels/<class>`` exactly when no threshold is given or the given one is the
    run's (so objects agree with the stored labels pixel for pixel); another threshold is applied
    to the stored probabilities (uint8 values compare with ``threshold × 255``).
    """
    from ..ngff import read_multiscale

    if "://" in str(store):
        raise ConfigError(
            f"{store}: objects are written next to the probabilities, on a local file system only; "
            f"run `tilefeet objects` on a local copy of the segment output"
        )
    path = Path(store)
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"--threshold must be a probability between 0 and 1, got {threshold}")
    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist; give a tilefeet segment output (run `tilefeet segment IN OUT` first)")
    not_ours = (
        f"{path} has no probabilities (it is not a tilefeet segment output: a (c, y, x) probability image with "
        f"named classes); give the output of `tilefeet segment IN OUT` (the OUT folder itself)"
    )
    try:
        ms = read_multiscale(path, role="segment output")
    except InvalidImageError as e:
        if "multiscales" in str(e) and "no OME-Zarr" in str(e):
            raise InvalidImageError(not_ours) from None
        raise
    if ms.is_label:
        raise InvalidImageError(f"{path} is a label image, not a segment output; give the segment output it belongs to (two folders up)")
    level0 = ms.datasets[0]
    if ms.names not in (("c", "y", "x"), ("c", "z", "y", "x")) or len(ms.channels) != level0.shape[0] or not all(ms.channels):
        raise InvalidImageError(not_ours)
    stack = len(ms.names) == 4
    channels = list(ms.channels)
    if class_name is None:
        if len(channels) > 1:
            raise ConfigError(f"{path} holds several classes ({', '.join(channels)}); choose one with --class")
        channel = 0
    else:
        found = [i for i, c in enumerate(channels) if c == class_name or label_name(c) == label_name(class_name)]
        if not found:
            raise ConfigError(f"{path} has no class {class_name!r}; it has: {', '.join(channels)}")
        channel = found[0]
    cls = channels[channel]
    pixel = ms.pixel_size_nm(0)
    if pixel is None:
        raise InvalidImageError(f"{path} gives no unit on its y/x axes, so its pixel size is unknown; areas and lengths need it")
    stored = float(ms.metadata.get("settings", {}).get("threshold", 0.5))
    recipe = _recipe(ms.metadata, cls)
    name = label_name(cls)
    use_labels = (threshold is None or math.isclose(threshold, stored, abs_tol=1e-12)) and name in ms.labels
    if ms.metadata.get("every_chunk_written") is True:
        _check_chunks(path, [(level0.path, (channel,), f"the {cls} probabilities")]
                      + ([(f"labels/{name}/0", None, f"labels/{name}")] if use_labels else []))
    if stack:
        return ClassSource(
            store=str(path), prob_path=level0.path, channel=channel, class_name=cls, shape=tuple(level0.shape[1:]),
            chunks=tuple(level0.chunks[1:]), pixel_size_nm=pixel, origin_nm=ms.origin_nm(0), prob_dtype=level0.dtype,
            threshold=stored if threshold is None else float(threshold), mask_path=f"labels/{name}/0" if use_labels else None,
            levels=len(ms.datasets), **_z_axis(ms, path), **recipe,
        )
    return ClassSource(
        store=str(path), prob_path=level0.path, channel=channel, class_name=cls,
        shape=(level0.shape[1], level0.shape[2]), chunks=(level0.chunks[1], level0.chunks[2]),
        pixel_size_nm=pixel, origin_nm=ms.origin_nm(0), prob_dtype=level0.dtype,
        threshold=stored if threshold is None else float(threshold), mask_path=f"labels/{name}/0" if use_labels else None,
        levels=len(ms.datasets), **recipe,
    )


def _recipe(provenance: Any, class_name: str) -> dict:
    """The engine and its recipe for a class: as ``segment`` recorded it in the output (``objects``),
    else from the engine bundle of that name, when it is found here."""
    import json

    from .options import engine_recipe

    engine = provenance.get("engine") if isinstance(provenance.get("engine"), str) else None
    recorded = provenance.get("objects")
    if isinstance(recorded, dict):
        table = recorded.get(class_name)
    else:
        table = engine_recipe(engine, class_name)
    return {"engine": engine, "recipe_json": json.dumps(table, sort_keys=True) if isinstance(table, dict) else ""}


def _z_axis(ms: Any, path: Path) -> dict:
    """A stack's section spacing and first section's position in nm, from its z axis."""
    from ..units import nm_per_unit

    axis = ms.axes[1]
    if axis.unit is None:
        raise InvalidImageError(
            f"{path} is a stack whose z axis has no unit, so its section spacing is unknown and volumes cannot be measured; "
            f"segment it again with the spacing (tilefeet segment IN OUT --pixel-size Z,Y,X, e.g. 50,5,5nm)"
        )
    f = nm_per_unit(axis.unit, where=f"{path} axis 'z'")
    ds = ms.datasets[0]
    return {"z_spacing_nm": float(ds.scale[1]) * f, "z_origin_nm": float(ds.translation[1]) * f}


def _check_chunks(path: Path, arrays: list[tuple[str, tuple[int, ...] | None, str]]) -> None:
    """Refuse an output that lost chunk files of an array objects read (``(path, leading index, in words)``):
    its writer stored every chunk, and a lost one would read as 0, no objects there (:mod:`tilefeet.chunks`)."""
    import zarr

    from ..chunks import check_chunks

    for array_path, lead, what in arrays:
        arr = zarr.open_array(str(path / array_path), mode="r")
        head = lead if lead is not None else ()
        if arr.ndim - len(head) == 3:  # a stack: the (y, x) plane of every section's chunk row
            lead = _first_incomplete_section(arr, path / array_path, head)
            if lead is None:
                continue
        found = check_chunks(arr, str(path), array_path, what=what, lead=lead if lead is not None else (0,) * (arr.ndim - 2),
                             every_chunk_written=True)
        if found.missing:
            raise found.error("no objects there", "segment the section again (tilefeet segment IN OUT --overwrite) to restore the output")


def _first_incomplete_section(arr: Any, folder: Path, head: tuple[int, ...]) -> tuple[int, ...] | None:
    """The leading index (``head`` + a section) of the first section of a stack whose chunk files
    are not all there, from one listing of the array's folder; None when all are."""
    import itertools

    from ..storage import list_files

    try:
        stored = list_files(folder)
    except Exception:
        return None
    unit = tuple(int(u) for u in (getattr(arr, "shards", None) or arr.chunks))
    grid = [-(-int(n) // u) for n, u in zip(arr.shape, unit)]
    fixed = tuple(i // u for i, u in zip(head, unit))
    for index in itertools.product(*(range(g) for g in grid[len(head):])):
        if arr.metadata.encode_chunk_key((*fixed, *index)) not in stored:
            return (*head, index[0] * unit[len(head)])
    return None


def level_shapes(shape: Pair, levels: int) -> list[Pair]:
    """Shapes of a pyramid of ``levels`` levels, each half the one before (rounded up), like the image's."""
    shapes = [shape]
    while len(shapes) < levels:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def is_objects_layer(labels_group: Any, name: str) -> bool:
    """Whether ``labels/<name>`` is an objects (or cells) layer written by tilefeet objects."""
    try:
        return ome_attrs(labels_group[name].attrs)["multiscales"][0]["metadata"]["method"] == "tilefeet.objects"
    except Exception:
        return False


def read_window(array: Any, box: Box, shape: Pair, fill: Any, dtype: Any) -> np.ndarray:
    """``array[box]`` of a 2-D array (or (1, y, x)), with ``fill`` outside the image."""
    inner = box.intersect(Box(0, 0, *shape))
    out = np.full(box.shape, fill, dtype=dtype)
    if not inner.empty:
        lead = (0,) * (array.ndim - 2)
        out[inner.relative_to(box)] = array[(*lead, slice(inner.y0, inner.y1), slice(inner.x0, inner.x1))]
    return out


# -------------------------------------------------------------------------------- writing


def staging_path(store: str | os.PathLike, name: str) -> Path:
    """Where a layer is built: beside the store, so that publishing it is a rename."""
    p = Path(store)
    return p.with_name(f"{p.name}.{name}.partial")


def old_path(store: str | os.PathLike, name: str) -> Path:
    p = Path(store)
    return p.with_name(f"{p.name}.{name}.old")


def layer_path(store: str | os.PathLike, name: str) -> Path:
    return Path(store) / "labels" / name


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Staging:
    """The staging folder of one layer and its completion records."""

    path: Path

    @property
    def state(self) -> Path:
        return self.path / STATE_DIR

    def done(self) -> set[str]:
        d = self.state / "done"
        return {p.name for p in d.iterdir()} if d.exists() else set()

    def mark(self, record: str) -> None:
        (self.state / "done" / record).touch()

    def record(self, name: str) -> Path:
        return self.state / "records" / f"{name}.npz"


def prepare(store: Path, name: str, identity: dict, *, overwrite: bool, resume: bool) -> tuple[Staging, set[str]]:
    """Create (or, with ``resume``, reopen) the staging folder of layer ``name`` of ``store``.

    Refuses to replace an existing layer without ``overwrite``, and to resume a run started with
    other options. Returns the staging folder and the records already done.
    """
    recover(store, name)
    staging = Staging(staging_path(store, name))
    target = layer_path(store, name)
    fp = fingerprint(identity)
    if target.exists() and not (overwrite or resume):
        raise OutputExistsError(
            f"{target} already exists; pass --overwrite to replace it (the old layer stays until the new one is complete)"
        )
    if staging.path.exists():
        if resume:
            try:
                state = json.loads((staging.state / "plan.json").read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("fingerprint") != fp:
                raise OutputExistsError(
                    f"{staging.path} was started with other options or another input; rerun with the same options "
                    f"to resume it, or pass --overwrite to start over"
                )
            return staging, staging.done()
        if not overwrite:
            raise OutputExistsError(
                f"an interrupted objects run left {staging.path}; pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(staging.path)
    if target.exists() and resume and not overwrite:
        raise OutputExistsError(f"{target} is already complete; nothing to resume (pass --overwrite to redo it)")
    for sub in ("done", "records"):
        (staging.state / sub).mkdir(parents=True, exist_ok=True)
    (staging.state / "plan.json").write_text(json.dumps({"fingerprint": fp, "identity": identity}, default=str))
    return staging, set()


def create_label_image(
    staging: Staging,
    name: str,
    *,
    shapes: list[Pair],
    chunks: Pair,
    dtype: Any,
    pixel_size_nm: tuple[float, float],
    origin_nm: tuple[float, float],
    metadata: dict,
) -> None:
    """The label image's group and (empty) pyramid arrays in the staging folder."""
    import zarr

    root = zarr.open_group(str(staging.path), mode="a", zarr_format=3)
    for k in range(len(shapes)):
        if str(k) in root:
            del root[str(k)]
    create_levels(root, shapes, chunks=chunks, dtype=dtype, dimension_names=["y", "x"])
    ms = multiscales(name, pixel_size_nm, len(shapes), origin_nm=origin_nm, method="subsample (ids are never averaged)", metadata=metadata)
    root.attrs.update(label_metadata(ms))


def create_label_volume(
    staging: Staging,
    name: str,
    *,
    shapes: list[tuple[int, int, int]],
    chunks: tuple[int, int, int],
    dtype: Any,
    spacing_nm: tuple[float, float, float],
    origin_nm: tuple[float, float, float],
    metadata: dict,
) -> None:
    """A stack's label image (z, y, x; a pyramid in y and x only) and its empty arrays in the staging folder."""
    import zarr

    root = zarr.open_group(str(staging.path), mode="a", zarr_format=3)
    for k in range(len(shapes)):
        if str(k) in root:
            del root[str(k)]
    create_levels(root, shapes, chunks=chunks, dtype=dtype, dimension_names=["z", "y", "x"])
    ms = multiscales(name, spacing_nm[1:], len(shapes), origin_nm=origin_nm[1:], method="subsample in y and x (ids are never averaged)",
                     metadata=metadata, lead_axes=[{"name": "z", "type": "space", "unit": "nanometer"}], lead_scale=[spacing_nm[0]],
                     lead_origin=[origin_nm[0]])
    root.attrs.update(label_metadata(ms))


def volume_level_shapes(shape: tuple[int, ...], levels: int) -> list[tuple[int, int, int]]:
    """A stack's pyramid: every level has all sections, y and x halved (rounded up) per level."""
    return [(shape[0], h, w) for h, w in level_shapes((shape[1], shape[2]), levels)]


def create_scratch(staging: Staging, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any) -> None:
    """A level-0-sized array for intermediate results (removed with the staging state)."""
    import zarr

    zarr.create_array(
        str(staging.state / name), shape=shape, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)), dtype=dtype,
        compressors=compressor(), fill_value=0, overwrite=True, zarr_format=3,
    )


def publish(staging: Staging, store: Path, name: str) -> Path:
    """Move a finished layer into ``store/labels/<name>`` and list it there, crash-safely.

    Order: unlist and set aside an old layer, rename the new one in, list it, delete the old one.
    A crash in between leaves a valid store (the layer unlisted or absent) and the old layer in
    ``<store>.<name>.old``, which :func:`recover` puts back if the new one never arrived.
    """
    shutil.rmtree(staging.state, ignore_errors=True)
    target = layer_path(store, name)
    old = old_path(store, name)
    _ensure_labels_group(store)
    if target.exists():
        _set_listed(store, name, False)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging.path, target)
    _set_listed(store, name, True)
    shutil.rmtree(old, ignore_errors=True)
    return target


def recover(store: Path, name: str) -> None:
    """Undo a crash inside :func:`publish`: an old layer set aside with no new one in place returns."""
    old, target = old_path(store, name), layer_path(store, name)
    if not old.exists():
        return
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        _set_listed(store, name, True)
    else:
        os.replace(old, target)
        _set_listed(store, name, True)


def _ensure_labels_group(store: Path) -> None:
    import zarr

    root = zarr.open_group(str(store), mode="r+")
    if "labels" not in root:
        g = root.create_group("labels")
        g.attrs["ome"] = {"version": "0.5", "labels": []}


def _set_listed(store: Path, name: str, listed: bool) -> None:
    """Add or remove ``name`` in ``labels/zarr.json``'s NGFF list, by an atomic rewrite of the file."""
    meta = Path(store) / "labels" / "zarr.json"
    doc = json.loads(meta.read_text())
    ome = doc.setdefault("attributes", {}).setdefault("ome", {"version": "0.5"})
    names = [n for n in ome.get("labels", []) if n != name]
    if listed:
        names.append(name)
    ome["labels"] = names
    tmp = meta.with_name(f".zarr.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, meta)


def write_table(df: Any, staging: Staging, fmt: str) -> Path:
    """The measurements table as Parquet (or CSV) inside the staging layer."""
    path = staging.path / TABLE_NAMES[fmt]
    for other in TABLE_NAMES.values():
        (staging.path / other).unlink(missing_ok=True)
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def read_table(layer: Path) -> Any:
    """The measurements table of a finished layer."""
    import pandas as pd

    if (layer / TABLE_NAMES["parquet"]).exists():
        return pd.read_parquet(layer / TABLE_NAMES["parquet"])
    if (layer / TABLE_NAMES["csv"]).exists():
        return pd.read_csv(layer / TABLE_NAMES["csv"])
    raise InputNotFoundError(f"{layer} has no measurements table ({' or '.join(TABLE_NAMES.values())}); rerun `tilefeet objects`")
