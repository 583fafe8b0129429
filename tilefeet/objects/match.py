"""Object-level scores of predicted objects against true objects (``tilefeet evaluate --objects``).

Both sides are label images (0 = no object). Their overlaps are counted block by block (a
contingency table of id pairs, summed over blocks), so sections of any size are scored in the
memory of a few blocks plus O(objects):

- **matching**: a predicted and a true object match when their IoU is at least t, one to one
  (greedily by IoU; above 0.5 a match is unique anyway). At t = 0.5: precision = matches /
  predicted, recall = matches / true, F1, and the mean IoU of the matches. **AP** at t is
  TP / (TP + FP + FN) (the Data Science Bowl 2018 / cellpose / StarDist definition, which needs no
  confidence ranking); ``ap`` is its mean over t = 0.50, 0.55, ..., 0.95.
- **cells** (:func:`cell_scores`): adapted Rand error and variation of information of the partitions
  (:class:`tilefeet.metrics.InstanceMetrics`), where the truth has regions; predicted pixels
  with no cell (unassigned membrane) form one more segment, so missing cells count as merges.

Stacks (z, y, x) are scored in 3-D: objects are 3-D connected components (26-connected by
default, as ``tilefeet objects`` labels a stack; 6 or 18 when asked), labelled out of core by
:func:`tilefeet.objects.label_objects` on both sides, so an object cut by a block or spread over
many sections is one object. Cells in 3-D (the SNEMI3D measure) are the 6-connected regions
between membranes (a membrane drawn in one section separates that section's two sides); the
predicted ones are grown within each section into the predicted membrane as ``--cell-method grow``
grows a section's cells (:mod:`tilefeet.objects.cells`: 40 nm, the same rounds; the watershed
recipe is 2-D), block by block with a halo in y and x. A section's predicted cells are those of
``tilefeet objects --cells`` (the engine's recipe), named in the report.

A ratio with nothing to count is 1, as everywhere in :mod:`tilefeet.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..metrics import DEFAULT_CONNECTIVITY_3D, InstanceMetrics, ratio

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  #: IoU thresholds of AP 0.5:0.95


# ----------------------------------------------------------------------------------- overlaps


@dataclass(frozen=True)
class Overlaps:
    """Pixel counts of every (true id, predicted id) pair that shares a pixel, and of every object."""

    true_ids: np.ndarray  #: pair's true id (0 = no true object)
    pred_ids: np.ndarray  #: pair's predicted id (0 = no predicted object)
    count: np.ndarray  #: pixels the pair shares

    def areas(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, pixel counts) of the true or predicted objects (id 0 excluded)."""
        ids = self.true_ids if which == "true" else self.pred_ids
        u, inv = np.unique(ids, return_inverse=True)
        area = np.bincount(inv, weights=self.count).round().astype(np.int64)
        keep = u != 0
        return u[keep], area[keep]


def _pair_counts(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(3, k) int64 array: true id, predicted id, shared pixels, for one block."""
    t = np.asarray(true).astype(np.uint64, copy=False).ravel()
    p = np.asarray(pred).astype(np.uint64, copy=False).ravel()
    top = int(p.max(initial=0)) + 1
    if int(t.max(initial=0)) < np.iinfo(np.uint64).max // top:
        keys, counts = np.unique(t * np.uint64(top) + p, return_counts=True)
        pairs = np.stack([keys // np.uint64(top), keys % np.uint64(top)])
    else:  # ids too large to pack into one integer
        pairs, counts = np.unique(np.stack([t, p]), axis=1, return_counts=True)
    return np.concatenate([pairs.astype(np.int64), counts[None].astype(np.int64)])


def _merge(parts: list[np.ndarray]) -> Overlaps:
    allp = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    pairs, inv = np.unique(allp[:2], axis=1, return_inverse=True)
    count = np.bincount(inv.ravel(), weights=allp[2], minlength=pairs.shape[1]).round().astype(np.int64)
    return Overlaps(pairs[0], pairs[1], count)


def overlaps(true: Any, pred: Any) -> Overlaps:
    """The overlaps of two label images (numpy or dask, same shape), counted block by block."""
    import dask
    import dask.array as da

    if true.shape != pred.shape:
        raise ValueError(f"label images of shapes {tuple(true.shape)} and {tuple(pred.shape)} cannot be compared")
    if not isinstance(true, da.Array) and not isinstance(pred, da.Array):
        return _merge([_pair_counts(true, pred)])
    t = true if isinstance(true, da.Array) else da.from_array(np.asarray(true), chunks=2048)
    p = pred if isinstance(pred, da.Array) else da.from_array(np.asarray(pred), chunks=t.chunks)
    p = p.rechunk(t.chunks)
    tasks = [dask.delayed(_pair_counts)(a, b) for a, b in zip(t.to_delayed().ravel(), p.to_delayed().ravel())]
    return _merge(list(dask.compute(*tasks)))


# ----------------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class ObjectScores:
    """Matching of predicted to true objects by IoU, over the thresholds of AP 0.5:0.95."""

    true_objects: int
    predicted_objects: int
    thresholds: tuple[float, ...]
    matches: tuple[int, ...]  #: one-to-one matches at each threshold
    mean_matched_iou: float  #: mean IoU of the matches at IoU ≥ 0.5 (NaN without any)

    @property
    def tp(self) -> int:
        return self.matches[0]

    @property
    def precision(self) -> float:
        """Matched predicted objects at IoU ≥ 0.5 / predicted objects."""
        return ratio(self.tp, self.predicted_objects)

    @property
    def recall(self) -> float:
        """Matched true objects at IoU ≥ 0.5 / true objects."""
        return ratio(self.tp, self.true_objects)

    @property
    def f1(self) -> float:
        return ratio(2 * self.tp, self.predicted_objects + self.true_objects)

    def ap_at(self, threshold: float) -> float:
        """TP / (TP + FP + FN) at an IoU threshold of the list."""
        m = self.matches[self.thresholds.index(round(threshold, 2))]
        return ratio(m, self.predicted_objects + self.true_objects - m)

    @property
    def ap(self) -> float:
        """Mean of :meth:`ap_at` over IoU 0.5:0.95."""
        return float(np.mean([self.ap_at(t) for t in self.thresholds]))

    @classmethod
    def merged(cls, parts: list[ObjectScores]) -> ObjectScores:
        """The scores of several disjoint volumes (sub-stacks, sections) scored as one: objects and
        matches summed, the mean matched IoU weighted by matches (exact: no object spans two parts)."""
        if not parts or len({p.thresholds for p in parts}) != 1:
            raise ValueError("merge object scores of the same IoU thresholds, at least one")
        n = sum(p.tp for p in parts)
        iou = sum(p.mean_matched_iou * p.tp for p in parts if p.tp) / n if n else math.nan
        return cls(sum(p.true_objects for p in parts), sum(p.predicted_objects for p in parts), parts[0].thresholds,
                   tuple(sum(m) for m in zip(*(p.matches for p in parts))), iou)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_matched_iou"] = None if math.isnan(self.mean_matched_iou) else self.mean_matched_iou
        d.update(precision=self.precision, recall=self.recall, f1=self.f1, ap=self.ap,
                 ap50=self.ap_at(0.5), ap75=self.ap_at(0.75))
        return d


def match_objects(ov: Overlaps, thresholds: tuple[float, ...] = THRESHOLDS) -> ObjectScores:
    """Scores from the overlaps of two label images (see the module's definitions)."""
    t_ids, t_area = ov.areas("true")
    p_ids, p_area = ov.areas("pred")
    both = (ov.true_ids != 0) & (ov.pred_ids != 0)
    ti, pi, inter = ov.true_ids[both], ov.pred_ids[both], ov.count[both]
    ta = t_area[np.searchsorted(t_ids, ti)]
    pa = p_area[np.searchsorted(p_ids, pi)]
    iou = inter / (ta + pa - inter)
    lowest = min(thresholds)
    cand = iou >= lowest
    ti, pi, iou = ti[cand], pi[cand], iou[cand]
    order = np.argsort(-iou, kind="stable")
    matched_iou = []
    used_t: set[int] = set()
    used_p: set[int] = set()
    for k in order:  # greedy one-to-one by IoU (few pairs: IoU ≥ 0.5 is nearly one-to-one already)
        a, b = int(ti[k]), int(pi[k])
        if a not in used_t and b not in used_p:
            used_t.add(a)
            used_p.add(b)
            matched_iou.append(float(iou[k]))
    m = np.asarray(matched_iou)
    matches = tuple(int((m >= t).sum()) for t in thresholds)
    at_half = m[m >= 0.5]
    return ObjectScores(len(t_ids), len(p_ids), tuple(thresholds), matches, float(at_half.mean()) if len(at_half) else math.nan)


def cell_scores(ov: Overlaps) -> InstanceMetrics:
    """Adapted Rand error and VI of predicted cells against true regions (true id 0 ignored)."""
    from scipy import sparse
    from skimage.metrics import adapted_rand_error, variation_of_information

    from ..metrics import rand_precision_recall

    n_pred = len(np.unique(ov.pred_ids[ov.pred_ids != 0]))
    keep = ov.true_ids != 0
    t, p, c = ov.true_ids[keep], ov.pred_ids[keep], ov.count[keep]
    n_true = len(np.unique(t))
    if n_true == 0:
        nan = float("nan")
        return InstanceMetrics("cells", 0, n_pred, nan, nan, nan, nan, nan)
    _, ti = np.unique(t, return_inverse=True)
    _, pj = np.unique(p, return_inverse=True)
    table = sparse.csr_array((c.astype(np.float64), (ti.ravel(), pj.ravel())))
    are = float(adapted_rand_error(table=table)[0])
    precision, recall = rand_precision_recall(table)
    shape_check = np.zeros(1)  # scikit-image checks two images' shapes even when given the table
    split, merge = variation_of_information(shape_check, shape_check, table=table / table.sum())
    return InstanceMetrics("cells", n_true, n_pred, are, precision, recall, float(split), float(merge))


# ---------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class ScoredObjects:
    """What :func:`score_objects` found."""

    scores: ObjectScores
    cells: InstanceMetrics | None  #: the cells' ARE and VI (``cells``)
    source: str  #: what the predicted objects are (a stored layer, or how they were made)
    connectivity: int | None = None  #: a stack's 3-D connectivity (None for a section)
    #: ``cells``: the largest true cell's share of all true cell pixels (near 1: the truth's regions
    #: join into one, e.g. across sections too far apart for 3-D connectivity)
    largest_true_cell: float | None = None


def largest_share(ov: Overlaps) -> float | None:
    """The largest true object's share of the pixels of all true objects (None without any)."""
    _, area = ov.areas("true")
    return float(area.max() / area.sum()) if len(area) else None


def score_objects(
    prediction: Any, pred_mask: Any, truth_mask: Any, *, class_name: str | None, cells: bool, use_stored: bool,
    connectivity: int | None = None,
) -> ScoredObjects:
    """Object scores of a prediction against a truth, both given as boolean masks (dask, same shape).

    True objects are the 8-connected components of the truth mask (``cells``: the 4-connected
    regions of its complement, the truth's cells). Predicted objects are the prediction store's
    ``labels/<class>-objects`` (``-cells``) when it has one and ``use_stored``, else the same
    algorithms as ``tilefeet objects`` on the predicted mask; predicted cells of a segment output are
    made from its probabilities with the same recipe as ``tilefeet objects --cells`` (the engine's),
    unless a threshold or a cropped border asks for the mask. Stacks (z, y, x): see the module's
    docstring (``connectivity`` 6, 18 or 26).
    """
    import os
    from pathlib import Path

    import dask.array as da

    from ..errors import ConfigError
    from .lazy import label_objects
    from .store import layer_name, open_class

    store = Path(prediction) if isinstance(prediction, (str, os.PathLike)) else None
    if pred_mask.ndim == 3:
        return _score_stack(store, pred_mask, truth_mask, class_name=class_name, cells=cells, use_stored=use_stored,
                            connectivity=connectivity)
    pixel = None
    if store is not None and class_name is not None:
        try:
            pixel = open_class(store, class_name).pixel_size_nm
        except Exception:  # not a segment output: a mask file or a label image
            pixel = None
    pred: Any = None
    if store is not None and class_name is not None and use_stored:
        layer = store / "labels" / layer_name(class_name, cells)
        if (layer / "0" / "zarr.json").exists():
            recipe = _stored_recipe(layer)
            pred, what = da.from_zarr(str(layer / "0")), f"{layer} (as stored" + (f": {recipe})" if recipe else ")")
    if pred is None:
        if cells and pixel is None:
            raise ConfigError(
                "--cells needs the prediction's pixel size (cells grow a distance in nm): score a tilefeet segment "
                "output, or run `tilefeet objects OUT --cells` first and score its labels/<class>-cells"
            )
        if cells and use_stored:  # a segment output: its probabilities, as `tilefeet objects --cells` makes cells
            objs = label_objects(store, class_name=class_name, cells=True, measure=False)
            what = f"{objs.plan.recipe}; made from the predicted probabilities as `tilefeet objects --cells` makes them"
        elif pixel is not None and use_stored:  # a segment output: its objects as `tilefeet objects` makes them
            objs = label_objects(store, class_name=class_name, measure=False)
            what = f"8-connected components of the predicted mask, as `tilefeet objects` makes them ({objs.plan.recipe})"
        else:
            objs = label_objects(pred_mask, pixel_size_nm=pixel or (1.0, 1.0), cells=cells, measure=False)
            what = (f"{objs.plan.recipe}; made from the predicted mask (its probabilities 0 and 1: --threshold or "
                    f"--ignore-border given)" if cells else "8-connected components of the predicted mask")
        pred = objs.labels
    truth_cells: dict[str, Any] = {"cells": True, "grow": 0, "cell_method": "grow"} if cells else {}  # the truth's regions, as they are
    truth = label_objects(truth_mask, pixel_size_nm=(1.0, 1.0), measure=False, **truth_cells).labels
    if pred.shape != truth.shape:
        raise ConfigError(f"the predicted objects ({what}) are {pred.shape} px but the truth is {truth.shape} px; score them on one grid")
    ov = overlaps(truth, pred)
    return ScoredObjects(match_objects(ov), cell_scores(ov) if cells else None, what, None, largest_share(ov) if cells else None)


def _score_stack(
    store: Any, pred_mask: Any, truth_mask: Any, *, class_name: str | None, cells: bool, use_stored: bool, connectivity: int | None
) -> ScoredObjects:
    """:func:`score_objects` of a stack: 3-D objects (or cells) on both sides, labelled out of core."""
    import dask.array as da

    from ..errors import ConfigError
    from .cells import growth_steps
    from .lazy import label_objects
    from .options import DEFAULT_GROW_NM
    from .store import layer_name, open_class

    spacing: tuple[float, float, float] | None = None
    if store is not None and class_name is not None:
        try:
            src = open_class(store, class_name)
            spacing = (src.z_spacing_nm or 1.0, *src.pixel_size_nm)
        except Exception:  # not a segment output: a label image
            spacing = None
    pred: Any = None
    conn = connectivity or (6 if cells else DEFAULT_CONNECTIVITY_3D)
    if store is not None and class_name is not None and use_stored and not cells:
        layer = store / "labels" / layer_name(class_name, False)
        stored = _stored_connectivity(layer)
        if stored is not None and connectivity in (None, stored):
            conn = stored
            recipe = _stored_recipe(layer)
            pred, what = da.from_zarr(str(layer / "0")), f"{layer} (as stored, {stored}-connected" + (f"; {recipe})" if recipe else ")")
    if pred is None and not cells and spacing is not None and use_stored:  # a segment output: as `tilefeet objects` makes them
        objs = label_objects(store, class_name=class_name, connectivity=conn, measure=False)
        pred, what = objs.labels, f"{conn}-connected 3-D components of the predicted mask, as `tilefeet objects` makes them ({objs.plan.recipe})"
    if cells:
        if spacing is None:
            raise ConfigError(
                "--cells needs the prediction's pixel size (cells grow a distance in nm within each section): score a tilefeet "
                "segment output of the stack"
            )
        steps = growth_steps(DEFAULT_GROW_NM, spacing[1:])
        seeds = label_objects(~pred_mask, pixel_size_nm=spacing, connectivity=conn, measure=False).labels
        pred = grow_sections(seeds, steps)
        what = (f"{conn}-connected 3-D regions between the predicted membranes, grown {DEFAULT_GROW_NM:g} nm ({steps} px) "
                f"into them within each section")
        truth = label_objects(~truth_mask, pixel_size_nm=(1.0, 1.0, 1.0), connectivity=conn, measure=False).labels
    else:
        if pred is None:
            pred = label_objects(pred_mask, pixel_size_nm=spacing or (1.0, 1.0, 1.0), connectivity=conn, measure=False).labels
            what = f"{conn}-connected 3-D components of the predicted mask"
        truth = label_objects(truth_mask, pixel_size_nm=(1.0, 1.0, 1.0), connectivity=conn, measure=False).labels
    if pred.shape != truth.shape:
        raise ConfigError(f"the predicted objects ({what}) are {pred.shape} voxels but the truth is {truth.shape}; score them on one grid")
    ov = overlaps(truth, pred)
    return ScoredObjects(match_objects(ov), cell_scores(ov) if cells else None, what, conn, largest_share(ov) if cells else None)


def _stored_recipe(layer: Any) -> str:
    """The one line a stored objects layer records about its rules (its minimum size, holes, cells' recipe)."""
    import json

    try:
        return str(json.loads((layer / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]["metadata"].get("recipe", ""))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


def _stored_connectivity(layer: Any) -> int | None:
    """The connectivity of a stack's stored objects layer (``tilefeet objects`` records it); None
    when there is no such layer, or it is a section's."""
    import json

    try:
        doc = json.loads((layer / "zarr.json").read_text())
        meta = doc["attributes"]["ome"]["multiscales"][0]["metadata"]
        if not (layer / "0" / "zarr.json").exists() or meta.get("dimensions") != 3:
            return None
        return int(meta["connectivity"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def grow_sections(seeds: Any, steps: int) -> Any:
    """Cells of a stack's seeds (dask, (z, y, x) ids), each section's grown by ``steps`` rounds as
    :func:`tilefeet.objects.cells.grow` grows a section's, block by block with a halo of ``steps``
    in y and x (a pixel's cell depends only on the seeds within ``steps`` pixels: exact)."""
    import dask.array as da

    if steps <= 0:
        return seeds
    from .cells import OUTSIDE

    def one(block: np.ndarray) -> np.ndarray:
        from .cells import grow

        grown = np.stack([grow(s.astype(np.int64), steps) for s in block])
        return np.maximum(grown, 0).astype(seeds.dtype)

    # off the volume: OUTSIDE, never assigned and never spreading (as grow pads a whole section)
    return da.map_overlap(one, seeds.astype(np.int64), depth={0: 0, 1: steps, 2: steps},
                          boundary={0: "none", 1: OUTSIDE, 2: OUTSIDE}, dtype=seeds.dtype)
