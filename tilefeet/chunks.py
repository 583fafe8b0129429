"""Which chunks of a stored array exist, from one listing of the store, and what an absent one means.

Zarr reads a chunk that is not stored as the array's fill value. That is by design: writers may
leave out chunks that hold nothing but the fill value (zarr-python 3 and tensorstore do by default,
``write_empty_chunks=False``). But a chunk file lost in a copy, an interrupted upload or on a
damaged disk reads exactly the same way, and the section would get a hole with no segmentation,
with exit status 0. :func:`check_chunks` lists the array's files once and decides:

1. **The writer says it stores every chunk** (tilefeet's ``convert`` and ``segment`` record
   ``"every_chunk_written": true`` in their multiscales metadata), or the array is zarr v2 with no
   fill value: every absent chunk is missing data.
2. **Any other store**: an absent chunk can only be one left out on purpose if it holds nothing but
   the fill value, i.e. if it lies in an empty region (the padding around a montage, an unimaged
   corner). Such a region reaches into the stored chunks next to it. So a group of absent chunks
   (4-connected) counts as *empty* when every stored chunk that borders it has a run of at least
   :data:`FILL_RUN` fill-valued pixels along the shared edge, and as *missing* when image pixels run
   up to it without one, or when no stored chunk borders it at all (a level with nothing stored).
   An empty region that ends exactly on a chunk border is the one empty case this calls missing;
   the message names the option that accepts it (``--allow-missing-chunks``).

The unit of storage is the file: a chunk, or a shard (zarr v3 sharding) whose file holds many
chunks; a missing shard file is all of its chunks missing. Counts are given in chunks, keys as the
files' keys relative to the image (``0/c/3/5``). The listing is one walk of a folder, one paginated
listing of an S3 prefix, or one page per folder of a web server; a web server that lists no folders
cannot be checked, and the check says so rather than guess.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from .errors import MissingDataError
from .geometry import Box
from .storage import is_url, join, list_files

#: A stored chunk "meets" an absent neighbour with empty pixels when this many consecutive pixels
#: along their shared edge hold the fill value (an isolated dark pixel in tissue does not count).
FILL_RUN = 16
#: Edges read to judge one group of absent chunks (evenly spread over its border), and in all.
#: Groups beyond the budget count as missing: refusing is the safe side, and the option accepts them.
EDGES_PER_GROUP = 64
EDGE_BUDGET = 1024
#: Keys of missing files named in a message or the plan.
SHOWN = 5

Reason = Literal["writer", "no-fill", "pixels", ""]


@dataclass(frozen=True)
class ChunkCheck:
    """What one listing of an array's stored files found: a small, picklable report."""

    where: str  #: the image (path or URL), for messages
    path: str  #: the array's path in it ("0", "labels/membrane/0")
    what: str  #: the array in words ("level 0")
    chunks: int  #: chunks of the part checked (the y, x plane read)
    missing: int = 0  #: chunks counted as missing data (they read as the fill value)
    keys: tuple[str, ...] = ()  #: the first missing files, relative to the image ("0/c/3/5")
    files_missing: int = 0  #: files (chunks, or shards) missing
    empty: int = 0  #: chunks absent on purpose (empty: they read as the fill value they hold)
    fill: str = "0"  #: the fill value, as text
    listed: bool = True  #: False: the store gives no listing, and nothing could be checked
    reason: Reason = ""  #: why the absent chunks count as missing (see the module docstring)
    shards: bool = False  #: the files are shards

    def describe(self) -> str:
        """One line for the plan (``--dry-run``)."""
        if not self.listed:
            return (f"{self.what}: not checked for missing chunks ({self.where} gives no listing of its files); "
                    f"a missing chunk would read as {self.fill}")
        text = f"{self.what}: {self.chunks} chunks"
        if self.missing:
            text += f", {self.missing} MISSING read as {self.fill} (--allow-missing-chunks): {self._shown()}"
        if self.empty:
            text += f", {self.empty} absent as empty (next to empty pixels: read as the fill value {self.fill})"
        return text + ("" if self.missing or self.empty else ", all stored")

    def summary(self) -> dict[str, Any]:
        """For an output's provenance."""
        out: dict[str, Any] = {"array": self.path, "chunks": self.chunks, "missing": self.missing, "absent_as_empty": self.empty}
        if self.keys:
            out["missing_keys"] = list(self.keys)
        if not self.listed:
            out["checked"] = False
        return out

    def error(self, consequence: str, fix: str) -> MissingDataError:
        """The one-line refusal: what is missing, where, why it is not empty on purpose, and ``fix``."""
        why = {
            "writer": "its writer stores every chunk, so none is left out on purpose",
            "no-fill": "the array has no fill value, so none is left out on purpose",
            "pixels": "image pixels run up to them, so they are lost, not empty padding left out on purpose",
        }.get(self.reason, "")
        one = self.missing == 1
        return MissingDataError(
            f"{self.where}: {self.missing} of {self.chunks} chunks of {self.what} {'is' if one else 'are'} missing ({self._shown()}): "
            f"{why}; {'it' if one else 'they'} would read as {self.fill}, {consequence}; {fix}"
        )

    def _shown(self) -> str:
        more = f" and {self.files_missing - len(self.keys)} more" if self.files_missing > len(self.keys) else ""
        what = ("shard file " if self.files_missing == 1 else "shard files ") if self.shards else ""
        return what + ", ".join(self.keys) + more


def check_chunks(
    array: Any,
    location: str,
    path: str,
    *,
    what: str,
    lead: tuple[int, ...] = (),
    read: Callable[[Box], np.ndarray] | None = None,
    every_chunk_written: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    stored: Collection[str] | None = None,
) -> ChunkCheck:
    """List the files of ``array`` (the zarr array at ``location``/``path``) once and report its
    absent chunks in the (y, x) plane at ``lead`` (the indices of the axes before y, x).

    ``read`` returns the stored pixels of a box of that plane: it judges absent chunks of a store
    that may leave empty ones out (the module docstring); without it, absent chunks count as missing
    only when the store says it writes every chunk (``every_chunk_written``), else as empty.
    ``stored``: the array's listing (:func:`list_array`), when it was made already (the sections of a stack).
    """
    meta = array.metadata
    fill = getattr(array, "fill_value", None)
    shards = getattr(array, "shards", None)
    unit = tuple(int(u) for u in (shards or array.chunks))
    inner = tuple(int(c) for c in array.chunks)
    h, w = (int(s) for s in array.shape[-2:])
    gh, gw = -(-h // unit[-2]), -(-w // unit[-1])
    head = tuple(i // u for i, u in zip(lead, unit[:-2]))
    keys = {(i, j): meta.encode_chunk_key((*head, i, j)) for i in range(gh) for j in range(gw)}
    v2 = getattr(meta, "zarr_format", 3) == 2
    fill_text = "NaN" if _is_nan(fill) else str(fill if fill is not None else 0)
    report = ChunkCheck(str(location), path, what, _inner_count(Box(0, 0, h, w), inner), fill=fill_text, shards=bool(shards))

    if stored is None:
        stored = list_array(location, path, storage_options)
    if (".zarray" if v2 else "zarr.json") not in stored:  # a listing that does not even show the array's own document
        return replace(report, listed=False)
    absent = {ij for ij, key in keys.items() if key not in stored}
    if not absent:
        return report
    reason: Reason
    if every_chunk_written or (v2 and fill is None):
        lost, reason = absent, "writer" if every_chunk_written else "no-fill"
    elif read is None:
        lost, reason = set(), ""
    else:
        lost, reason = _judge(absent, (gh, gw), unit[-2:], (h, w), read, fill), "pixels"

    def chunks_in(cells: set[tuple[int, int]]) -> int:
        return sum(_inner_count(_unit_box(ij, unit[-2:], (h, w)), inner) for ij in cells)

    shown = tuple(f"{path}/{keys[ij]}" for ij in sorted(lost)[:SHOWN])
    return replace(report, missing=chunks_in(lost), keys=shown, files_missing=len(lost), empty=chunks_in(absent - lost),
                    reason=reason if lost else "")


def list_array(location: str, path: str, storage_options: Mapping[str, Any] | None = None) -> frozenset[str]:
    """The files of the array at ``location``/``path`` (relative keys), from one listing; empty when
    the store gives none (S3 without s3:ListBucket, a web server that lists no folders: reading may
    still work, and the check then says it could not look)."""
    try:
        return frozenset(list_files(join(location, path), storage_options if is_url(location) else None))
    except Exception:
        return frozenset()


def chunk_key(array: Any, y: int, x: int, lead: tuple[int, ...] = ()) -> str:
    """The key of the file that holds pixel (y, x) of the plane at ``lead`` (a chunk, or its shard)."""
    unit = tuple(int(u) for u in (getattr(array, "shards", None) or array.chunks))
    return str(array.metadata.encode_chunk_key((*(i // u for i, u in zip(lead, unit[:-2])), y // unit[-2], x // unit[-1])))


# ------------------------------------------------------------------------------------ judging


def _judge(
    absent: set[tuple[int, int]], grid: tuple[int, int], unit: tuple[int, ...], shape: tuple[int, int],
    read: Callable[[Box], np.ndarray], fill: Any,
) -> set[tuple[int, int]]:
    """The absent files that are missing data: the groups of absent files not bordered by empty pixels on every side."""
    lost: set[tuple[int, int]] = set()
    budget = EDGE_BUDGET
    for group in sorted(_groups(absent), key=min):  # in raster order: the same groups are read on every run
        edges = [(a, b) for a in sorted(group) for b in _neighbours(a, grid) if b not in absent]
        if not edges or budget <= 0:
            lost |= group
            continue
        step = max(1, -(-len(edges) // EDGES_PER_GROUP))
        for a, b in edges[::step]:
            budget -= 1
            if not _meets_fill(read(_edge(a, b, unit, shape)), fill):
                lost |= group
                break
    return lost


def _groups(cells: set[tuple[int, int]]) -> list[set[tuple[int, int]]]:
    """4-connected groups of grid cells."""
    todo, out = set(cells), []
    while todo:
        stack = [todo.pop()]
        group = set(stack)
        while stack:
            i, j = stack.pop()
            for n in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if n in todo:
                    todo.remove(n)
                    group.add(n)
                    stack.append(n)
        out.append(group)
    return out


def _neighbours(a: tuple[int, int], grid: tuple[int, int]) -> list[tuple[int, int]]:
    i, j = a
    return [(y, x) for y, x in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)) if 0 <= y < grid[0] and 0 <= x < grid[1]]


def _unit_box(ij: tuple[int, int], unit: tuple[int, ...], shape: tuple[int, int]) -> Box:
    (i, j), (uh, uw), (h, w) = ij, unit, shape
    return Box(i * uh, j * uw, min((i + 1) * uh, h), min((j + 1) * uw, w))


def _edge(a: tuple[int, int], b: tuple[int, int], unit: tuple[int, ...], shape: tuple[int, int]) -> Box:
    """The one-pixel strip of stored file ``b`` along its border with absent file ``a``."""
    ab, bb = _unit_box(a, unit, shape), _unit_box(b, unit, shape)
    if b[0] > a[0]:
        return Box(bb.y0, ab.x0, bb.y0 + 1, ab.x1)
    if b[0] < a[0]:
        return Box(bb.y1 - 1, ab.x0, bb.y1, ab.x1)
    if b[1] > a[1]:
        return Box(ab.y0, bb.x0, ab.y1, bb.x0 + 1)
    return Box(ab.y0, bb.x1 - 1, ab.y1, bb.x1)


def _meets_fill(strip: np.ndarray, fill: Any) -> bool:
    """Does a run of at least :data:`FILL_RUN` fill-valued pixels (all of a shorter strip) lie along the strip?"""
    values = np.asarray(strip).ravel()
    if fill is None:
        fill = 0
    is_fill = np.isnan(values) if _is_nan(fill) else values == fill
    need = min(FILL_RUN, values.size)
    if need == 0:
        return False
    run = np.diff(np.flatnonzero(np.diff(np.concatenate(([0], is_fill.astype(np.int8), [0])))))[::2]
    return bool(run.size) and int(run.max()) >= need


def _inner_count(box: Box, inner: tuple[int, ...]) -> int:
    """Chunks of the y, x plane in ``box`` (which starts on a chunk border)."""
    return (-(-(box.y1 - box.y0) // inner[-2])) * (-(-(box.x1 - box.x0) // inner[-1]))


def _is_nan(value: Any) -> bool:
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):
        return False
