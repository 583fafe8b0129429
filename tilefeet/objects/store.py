"""All of the objects package's OME-Zarr I/O: reading one class of a segment output, and adding an
objects layer to it without ever leaving it half-written.

Layout added to a segment output (``OUT``)::

    OUT/labels/<class>-objects/     NGFF label image (image-label, source "../../"): (y, x) uint32
        0/ 1/ ...                   (uint64 past 2³²−1 objects); level k keeps every 2^k-th pixel of
                                    level 0 (ids are never averaged)
        objects.parquet             the measurements table, one row per object (or objects.csv)
    OUT/labels/<class>-cells/       the same for cells between membranes (``--cells``)
    OUT/labels/zarr.json            lists a layer only once it is complete

A layer is an output of its own, written through the output-location protocol that ``segment``
and ``convert`` use (:mod:`tilefeet.storage`): :class:`LocalLayer` builds it in a staging folder
beside the store (``OUT.<layer>.partial``, its completion records, saved records and scratch
arrays in ``.tilefeet/``) and publishes it into ``labels/`` by renames; :class:`ObjectStoreLayer`
writes it in place under ``s3://.../OUT/labels/<layer>/`` with its metadata held back until it
is complete. Either way the layer joins the ``labels`` list once it is in place, and its state is
dropped only after that, so a crash at any point leaves a valid store and either a run to
``--resume`` or a publish that :meth:`recover <tilefeet.storage.OutputLocation.recover>` completes.
The store itself may be a segment run's own staging store (``OUT.partial``, or on S3 an output
whose metadata is not yet published): the layer is then published into it, and with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputNotFoundError, InvalidImageError, OutputExistsError
from ..geometry import Box, Pair
from ..ngff import compressor, create_levels, label_metadata, label_name, multiscales
from ..storage import (
    STATE_DIR,
    LocalOutput,
    ObjectStoreOutput,
    OutputLocation,
    Remote,
    Url,
    is_url,
    join,
    location_text,
    unpublished_store,
)
from .volume import VBox

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
    #: storage options of a URL ``store`` (credentials: kept in memory, never in the identity)
    options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    unpublished: bool = False  #: ``store`` is an unfinished object-store output (its metadata held back)
    zarr_format: int | None = None  #: the store's (None: found on each open; known: no requests for the other's documents)

    def array(self, path: str) -> Any:
        """A zarr array of the store, opened by each task (a metadata read): handles never outlive a store's rewrite."""
        import zarr

        store = zarr_store(self.store, self.options, unpublished=self.unpublished)
        return zarr.open_array(store, path=path, mode="r", zarr_format=self.zarr_format)  # type: ignore[arg-type]

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
        return np.asarray(self.array(self.prob_path)[(self.channel, *box.slices)])

    def read_mask3(self, box: VBox) -> np.ndarray:
        """A stack's class mask over ``box`` (bool), False outside the volume."""
        inner = box.intersect(VBox((0, 0, 0), self.shape))  # type: ignore[arg-type]
        out = np.zeros(box.shape, dtype=bool)
        if inner.empty:
            return out
        if self.mask_path is not None:
            m = np.asarray(self.array(self.mask_path)[inner.slices]) != 0
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
        del d["options"]
        d["store"] = location_text(self.store)
        d["provenance"] = _provenance(self.store, self.options, self.unpublished)
        return d

    def read_prob(self, box: Box) -> np.ndarray:
        """The class probability (as stored) over ``box``, which lies inside the image."""
        return np.asarray(self.array(self.prob_path)[self.channel, box.y0 : box.y1, box.x0 : box.x1])

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
            labels = self.array(self.mask_path)
            lead = (0,) * (labels.ndim - 2)  # (y, x), or (1, y, x) as tilefeet wrote labels before
            m = np.asarray(labels[(*lead, slice(inner.y0, inner.y1), slice(inner.x0, inner.x1))]) != 0
        else:
            m = self.read_prob(inner) >= self.threshold * self.prob_scale
        out[inner.relative_to(box)] = m
        return out


def zarr_store(store: str | os.PathLike, options: Any = (), *, unpublished: bool = False, writable: bool = False) -> Any:
    """zarr's store for a folder or an ``s3://`` URL (``options``: its storage options);
    ``unpublished``: its metadata documents are held back (:class:`~tilefeet.storage.ObjectStoreOutput`)."""
    if not is_url(store):
        return str(store)
    remote = Remote(str(store), tuple(options))
    zs = remote.zarr_store(read_only=not writable)
    return unpublished_store(zs, remote) if unpublished else zs


def ome_attrs(attrs: Any) -> dict:
    """The NGFF metadata of a group's attributes (under "ome" in 0.5, at the top level in 0.4)."""
    attrs = dict(attrs)
    return dict(attrs.get("ome", attrs))


def _provenance(store: str, options: Any = (), unpublished: bool = False) -> Any:
    try:
        import zarr

        group = zarr.open_group(zarr_store(store, options, unpublished=unpublished), mode="r")
        return ome_attrs(group.attrs)["multiscales"][0].get("metadata", {})
    except Exception:
        return {}


def _source(store: str | os.PathLike | OutputLocation, storage_options: Mapping[str, Any] | None) -> tuple[Path | Url, tuple, bool]:
    """Where a segment output is read: (path or URL, storage options, metadata held back). An output
    location is a segment run's, read where it is being written (its staging store)."""
    if isinstance(store, ObjectStoreOutput):
        return Url(store.remote.url), store.remote.options, True
    if isinstance(store, OutputLocation):
        return Path(store.staging), (), False
    if is_url(store):
        remote = Remote.create(str(store), storage_options, role="segment output")
        if remote.scheme != "s3":
            raise ConfigError(
                f"cannot write objects to {remote.url}: web servers are read-only here; "
                f"give the segment output on a local file system or on s3://"
            )
        return Url(remote.url), remote.options, False
    return Path(store), (), False


def open_class(store: str | os.PathLike | OutputLocation, class_name: str | None = None, threshold: float | None = None,
               storage_options: Mapping[str, Any] | None = None) -> ClassSource:
    """The class ``class_name`` (or the store's only class) of a segment output (a folder, an
    ``s3://`` URL reached with ``storage_options``, or a segment run's output location), read (and
    validated) through :func:`tilefeet.ngff.read_multiscale`.

    The mask is ``labels/<class>`` exactly when no threshold is given or the given one is the
    run's (so objects agree with the stored labels pixel for pixel); another threshold is applied
    to the stored probabilities (uint8 values compare with ``threshold × 255``).
    """
    from ..ngff import read_multiscale

    path, options, unpublished = _source(store, storage_options)
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"--threshold must be a probability between 0 and 1, got {threshold}")
    if isinstance(path, Path) and not path.exists():
        raise InputNotFoundError(f"{path} does not exist; give a tilefeet segment output (run `tilefeet segment IN OUT` first)")
    not_ours = (
        f"{path} has no probabilities (it is not a tilefeet segment output: a (c, y, x) probability image with "
        f"named classes); give the output of `tilefeet segment IN OUT` (the OUT folder itself)"
    )
    try:
        if unpublished:
            import zarr

            group = zarr.open_group(zarr_store(path, options, unpublished=True), mode="r")
            ms = read_multiscale(path, role="segment output", group=group)
        else:
            ms = read_multiscale(path, role="segment output", storage_options=dict(options))
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
                      + ([(f"labels/{name}/0", None, f"labels/{name}")] if use_labels else []), options)
    where: dict[str, Any] = {"options": options, "unpublished": unpublished, "zarr_format": 3 if ms.version.startswith("0.5") else None}
    if stack:
        return ClassSource(
            store=str(path), prob_path=level0.path, channel=channel, class_name=cls, shape=tuple(level0.shape[1:]),
            chunks=tuple(level0.chunks[1:]), pixel_size_nm=pixel, origin_nm=ms.origin_nm(0), prob_dtype=level0.dtype,
            threshold=stored if threshold is None else float(threshold), mask_path=f"labels/{name}/0" if use_labels else None,
            levels=len(ms.datasets), **_z_axis(ms, path), **recipe, **where,
        )
    return ClassSource(
        store=str(path), prob_path=level0.path, channel=channel, class_name=cls,
        shape=(level0.shape[1], level0.shape[2]), chunks=(level0.chunks[1], level0.chunks[2]),
        pixel_size_nm=pixel, origin_nm=ms.origin_nm(0), prob_dtype=level0.dtype,
        threshold=stored if threshold is None else float(threshold), mask_path=f"labels/{name}/0" if use_labels else None,
        levels=len(ms.datasets), **recipe, **where,
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


def _z_axis(ms: Any, path: Path | Url) -> dict:
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


def _check_chunks(path: Path | Url, arrays: list[tuple[str, tuple[int, ...] | None, str]], options: tuple = ()) -> None:
    """Refuse an output that lost chunk files of an array objects read (``(path, leading index, in words)``):
    its writer stored every chunk, and a lost one would read as 0, no objects there (:mod:`tilefeet.chunks`)."""
    import zarr

    from ..chunks import check_chunks

    for array_path, lead, what in arrays:
        arr = zarr.open_array(zarr_store(path, options), path=array_path, mode="r")
        head = lead if lead is not None else ()
        if arr.ndim - len(head) == 3:  # a stack: the (y, x) plane of every section's chunk row
            lead = _first_incomplete_section(arr, join(path, array_path), head, options)
            if lead is None:
                continue
        found = check_chunks(arr, str(path), array_path, what=what, lead=lead if lead is not None else (0,) * (arr.ndim - 2),
                             every_chunk_written=True, storage_options=dict(options))
        if found.missing:
            raise found.error("no objects there", "segment the section again (tilefeet segment IN OUT --overwrite) to restore the output")


def _first_incomplete_section(arr: Any, folder: Path | Url, head: tuple[int, ...], options: tuple = ()) -> tuple[int, ...] | None:
    """The leading index (``head`` + a section) of the first section of a stack whose chunk files
    are not all there, from one listing of the array's folder; None when all are."""
    import itertools

    from ..storage import list_files

    try:
        stored = list_files(folder, dict(options) if is_url(folder) else None)
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
    """Where a layer of a store on a file system is built: beside the store, so that publishing it is a rename."""
    p = Path(store)
    return p.with_name(f"{p.name}.{name}.partial")


def old_path(store: str | os.PathLike, name: str) -> Path:
    """Where an old layer is set aside while a new one replaces it (beside the store, like the staging folder)."""
    p = Path(store)
    return p.with_name(f"{p.name}.{name}.old")


def layer_path(store: str | os.PathLike, name: str) -> Path:
    return Path(store) / "labels" / name


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _listing(doc: bytes | None, name: str, listed: bool) -> bytes:
    """``labels/zarr.json`` with ``name`` added to (or removed from) its NGFF list; a new labels group when ``doc`` is None."""
    meta: dict[str, Any] = json.loads(doc) if doc else {"zarr_format": 3, "node_type": "group", "attributes": {}}
    ome = meta.setdefault("attributes", {}).setdefault("ome", {"version": "0.5"})
    names = [n for n in ome.get("labels", []) if n != name]
    if listed:
        names.append(name)
    ome["labels"] = names
    return json.dumps(meta, indent=2).encode()


class _Layer:
    """What an objects run does in a layer's staging store, the same on either kind of location:
    saved records (``.tilefeet/records/<name>.npz``), scratch arrays (``.tilefeet/<name>``), the
    label image's arrays and the measurements table. A subclass moves the bytes."""

    staging: Any
    name: str

    def _put(self, rel: str, data: bytes) -> None:
        raise NotImplementedError

    def _get(self, rel: str) -> bytes:
        raise NotImplementedError

    def _remove(self, rel: str) -> None:
        raise NotImplementedError

    def zarr_store(self, *, state: bool = False) -> Any:
        """zarr's store of the staging store (``state``: for scratch arrays, whose metadata is never published)."""
        raise NotImplementedError

    def save_record(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        self._put(f"{STATE_DIR}/records/{name}.npz", buffer.getvalue())

    def open_record(self, name: str) -> Any:
        """A saved record (an ``NpzFile``: arrays are read when asked for)."""
        return np.load(io.BytesIO(self._get(f"{STATE_DIR}/records/{name}.npz")))

    def create_scratch(self, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any) -> None:
        """A level-0-sized array for intermediate results (dropped with the run state)."""
        import zarr

        zarr.create_array(
            self.zarr_store(state=True), name=f"{STATE_DIR}/{name}", shape=shape, chunks=tuple(min(c, s) for c, s in zip(chunks, shape)),
            dtype=dtype, compressors=compressor(), fill_value=0, overwrite=True, zarr_format=3,
        )

    def scratch(self, name: str) -> Any:
        import zarr

        return zarr.open_array(self.zarr_store(state=True), path=f"{STATE_DIR}/{name}", mode="r+", zarr_format=3)

    def label_array(self, level: int) -> Any:
        import zarr

        return zarr.open_array(self.zarr_store(), path=str(level), mode="r+", zarr_format=3)

    def group(self) -> Any:
        import zarr

        return zarr.open_group(self.zarr_store(), mode="a", zarr_format=3)

    def write_table(self, df: Any, fmt: str) -> None:
        """The measurements table as Parquet (or CSV), in the layer."""
        for other in TABLE_NAMES.values():
            if other != TABLE_NAMES[fmt]:
                self._remove(other)
        if fmt == "csv":
            data = df.to_csv(index=False).encode()
        else:
            buffer = io.BytesIO()
            df.to_parquet(buffer, index=False)
            data = buffer.getvalue()
        self._put(TABLE_NAMES[fmt], data)


class LocalLayer(_Layer, LocalOutput):
    """A layer of a store on a file system: built in ``OUT.<layer>.partial`` beside the store and
    renamed into ``labels/`` (an old layer set aside in ``OUT.<layer>.old`` meanwhile)."""

    def __init__(self, store: str | os.PathLike, name: str):
        super().__init__(layer_path(store, name), staging=staging_path(store, name), old=old_path(store, name))
        self.store, self.name = Path(store), name

    def _put(self, rel: str, data: bytes) -> None:
        path = self.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _get(self, rel: str) -> bytes:
        return (self.staging / rel).read_bytes()

    def _remove(self, rel: str) -> None:
        (self.staging / rel).unlink(missing_ok=True)

    def zarr_store(self, *, state: bool = False) -> Any:
        return str(self.staging)

    def _set_listed(self, listed: bool) -> None:
        meta = self.store / "labels" / "zarr.json"
        doc = _listing(meta.read_bytes() if meta.exists() else None, self.name, listed)
        meta.parent.mkdir(exist_ok=True)
        tmp = meta.with_name(f".zarr.json.{os.getpid()}.tmp")
        tmp.write_bytes(doc)
        os.replace(tmp, meta)

    def _withdraw(self) -> None:
        self._set_listed(False)

    def _placed(self) -> None:
        self._set_listed(True)


class ObjectStoreLayer(_Layer, ObjectStoreOutput):
    """A layer of a store on S3: written in place under ``labels/<layer>/``, its metadata held back
    until it is complete. In an output that is itself unfinished (``segment --objects``), the layer's
    documents and the ``labels`` list are published into that output's held-back metadata, to
    appear with it."""

    def __init__(self, store: Remote, name: str, *, unpublished: bool = False):
        documents = store.child(STATE_DIR, "meta") if unpublished else store
        super().__init__(store.child("labels", name), documents=documents.child("labels", name))
        self.listing = documents.child("labels", "zarr.json")
        self.name = name

    def _put(self, rel: str, data: bytes) -> None:
        self._call(self._fs().pipe_file, self._path(rel), data)

    def _get(self, rel: str) -> bytes:
        return bytes(self._call(self._fs().cat_file, self._path(rel)))

    def _remove(self, rel: str) -> None:
        if self._exists(rel):
            self._call(self._fs().rm_file, self._path(rel))

    def zarr_store(self, *, state: bool = False) -> Any:
        store = self.remote.zarr_store(read_only=False)
        return store if state else unpublished_store(store, self.remote)

    def _set_listed(self, listed: bool) -> None:
        fs, path = self._fs(), self.listing.fs_path()
        try:
            doc = bytes(self._call(fs.cat_file, path))
        except FileNotFoundError:
            doc = None
        self._call(fs.pipe_file, path, _listing(doc, self.name, listed))

    def _withdraw(self) -> None:
        self._set_listed(False)

    def _placed(self) -> None:
        self._set_listed(True)


#: A layer's location, on either kind of storage.
Layer = LocalLayer | ObjectStoreLayer


def layer_location(store: str | os.PathLike | OutputLocation, name: str, storage_options: Mapping[str, Any] | None = None) -> Layer:
    """Where layer ``name`` of ``store`` is written: a folder, an ``s3://`` URL (reached with
    ``storage_options``), or a segment run's output location (the layer goes into its staging store)."""
    path, options, unpublished = _source(store, storage_options)
    if isinstance(path, Url):
        return ObjectStoreLayer(Remote(str(path), options), name, unpublished=unpublished)
    return LocalLayer(path, name)


def prepare(layer: Layer, identity: dict, *, overwrite: bool, resume: bool) -> set[str]:
    """Create (or, with ``resume``, reopen) the staging store of ``layer``, by the rules every output
    follows (:func:`tilefeet.writer.check_output`): an existing layer needs ``overwrite``, an
    interrupted run ``resume`` (with the same options) or ``overwrite``. Returns the records already done."""
    from ..writer import check_output

    layer.recover()
    check_output(layer, overwrite=overwrite, resume=resume)
    fp = fingerprint(identity)
    if layer.has_staging():
        if resume:
            if layer.read_state().get("fingerprint") != fp:
                raise OutputExistsError(
                    f"{layer.staging} was started with other options or another input; rerun with the same options "
                    f"to resume it, or pass --overwrite to start over"
                )
            return layer.record_names()
        layer.discard_staging()
    if resume and not overwrite and layer.exists():
        raise OutputExistsError(f"{layer.final} is already complete; nothing to resume (pass --overwrite to redo it)")
    layer.check_kind()
    try:
        layer.open_group("w")
        layer.write_state({"fingerprint": fp, "identity": identity})
    except Exception as e:
        from ..storage import is_remote_error

        if not (isinstance(e, OSError) or is_remote_error(e)):
            raise
        raise layer.write_error(e, kept=None) from None
    return set()


def create_label_image(
    layer: _Layer,
    name: str,
    *,
    shapes: list[Pair],
    chunks: Pair,
    dtype: Any,
    pixel_size_nm: tuple[float, float],
    origin_nm: tuple[float, float],
    metadata: dict,
) -> None:
    """The label image's group and (empty) pyramid arrays in the staging store."""
    root = layer.group()
    create_levels(root, shapes, chunks=chunks, dtype=dtype, dimension_names=["y", "x"], overwrite=True)
    ms = multiscales(name, pixel_size_nm, len(shapes), origin_nm=origin_nm, method="subsample (ids are never averaged)", metadata=metadata)
    root.attrs.update(label_metadata(ms))


def create_label_volume(
    layer: _Layer,
    name: str,
    *,
    shapes: list[tuple[int, int, int]],
    chunks: tuple[int, int, int],
    dtype: Any,
    spacing_nm: tuple[float, float, float],
    origin_nm: tuple[float, float, float],
    metadata: dict,
) -> None:
    """A stack's label image (z, y, x; a pyramid in y and x only) and its empty arrays in the staging store."""
    root = layer.group()
    create_levels(root, shapes, chunks=chunks, dtype=dtype, dimension_names=["z", "y", "x"], overwrite=True)
    ms = multiscales(name, spacing_nm[1:], len(shapes), origin_nm=origin_nm[1:], method="subsample in y and x (ids are never averaged)",
                     metadata=metadata, lead_axes=[{"name": "z", "type": "space", "unit": "nanometer"}], lead_scale=[spacing_nm[0]],
                     lead_origin=[origin_nm[0]])
    root.attrs.update(label_metadata(ms))


def volume_level_shapes(shape: tuple[int, ...], levels: int) -> list[tuple[int, int, int]]:
    """A stack's pyramid: every level has all sections, y and x halved (rounded up) per level."""
    return [(shape[0], h, w) for h, w in level_shapes((shape[1], shape[2]), levels)]


def read_table(layer: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The measurements table of a finished layer (a folder, or an ``s3://`` URL reached with ``storage_options``)."""
    import pandas as pd

    if is_url(layer):
        remote = Remote.create(str(layer), storage_options)
        fs = remote.filesystem()
        for fmt, name in TABLE_NAMES.items():
            if fs.exists(remote.fs_path(name)):
                data = io.BytesIO(fs.cat_file(remote.fs_path(name)))
                return pd.read_parquet(data) if fmt == "parquet" else pd.read_csv(data)
    else:
        path = Path(layer)
        if (path / TABLE_NAMES["parquet"]).exists():
            return pd.read_parquet(path / TABLE_NAMES["parquet"])
        if (path / TABLE_NAMES["csv"]).exists():
            return pd.read_csv(path / TABLE_NAMES["csv"])
    raise InputNotFoundError(f"{layer} has no measurements table ({' or '.join(TABLE_NAMES.values())}); rerun `tilefeet objects`")
