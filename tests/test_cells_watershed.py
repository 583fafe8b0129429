"""Cells by a seeded watershed and merging (``--cells``): ids equal to the same algorithm on the whole
image for any block size (hypothesis on small random probability maps; a real ISBI slice through
isbi-membrane, lazily and out of core), the flood and the merge equal to independent whole-image
implementations, and scores on real held-out data (Lucchi, another lab's, zero-shot; ISBI) bounded."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import zarr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.measure import label

from tilefeet.objects import label_objects, write_objects
from tilefeet.objects.match import cell_scores, overlaps

from .conftest import DATA
from .test_objects import assert_table_equal, make_output

BIG = 1 << 62  # exactly representable in float64: scipy's cval is a float
RING = np.ones((3, 3), bool)
RING[1, 1] = False


class Tie(Exception):
    """Two merges of equal mean boundary: the greedy order is then a convention, not the algorithm."""


def ref_flood(seeds: np.ndarray, alt: np.ndarray, steps: int) -> np.ndarray:
    """The flood on the whole image, every pixel every round (the package works on frontiers)."""
    seeds = seeds.astype(np.int64)
    n = int(seeds.max()) + 1
    key = np.where(seeds > 0, seeds, BIG)
    fixed = seeds > 0
    for _ in range(steps):
        best = ndi.minimum_filter(key, footprint=RING, mode="constant", cval=BIG)
        cost = np.maximum(best // n, alt)
        held = np.where(key < BIG, key // n, BIG)
        better = (best < BIG) & ~fixed & (cost < held)
        key = np.where(better, cost * n + best % n, key)
    return np.where(key < BIG, key % n, 0)


def ref_merge(basins: np.ndarray, lev: np.ndarray, scale: int, threshold: float, min_px: int) -> np.ndarray:
    """Greedy average linkage by mean boundary, then small cells into their lowest neighbour,
    written with plain dicts; numbered by smallest seed."""
    n = int(basins.max())
    group = {i: {i} for i in range(1, n + 1)}
    area = {i: int((basins == i).sum()) for i in range(1, n + 1)}
    edges: dict[tuple[int, int], list[int]] = {}
    for a, b, la, lb in ((basins[:, :-1], basins[:, 1:], lev[:, :-1], lev[:, 1:]), (basins[:-1], basins[1:], lev[:-1], lev[1:])):
        for x, y, s in zip(a.ravel(), b.ravel(), (la + lb).ravel()):
            if x > 0 and y > 0 and x != y:
                e = edges.setdefault((min(x, y), max(x, y)), [0, 0])
                e[0] += int(s)
                e[1] += 1

    def rep(i: int) -> int:
        return next(r for r, g in group.items() if i in g)

    def between() -> dict[tuple[int, int], list[int]]:
        out: dict[tuple[int, int], list[int]] = {}
        for (a, b), (s, c) in edges.items():
            ra, rb = rep(a), rep(b)
            if ra != rb:
                e = out.setdefault((min(ra, rb), max(ra, rb)), [0, 0])
                e[0] += s
                e[1] += c
        return out

    def join(src: int, dst: int) -> None:
        group[dst] |= group.pop(src)
        area[dst] += area.pop(src)

    while threshold > 0:
        means = sorted((s / (2 * c * scale), a, b) for (a, b), (s, c) in between().items())
        if not means or means[0][0] >= threshold:
            break
        if len(means) > 1 and means[1][0] == means[0][0]:
            raise Tie
        _, a, b = means[0]
        join(b, a)
    dropped = set()
    while True:
        small = sorted((area[r], min(group[r]), r) for r in group if area[r] < min_px and r not in dropped)
        if not small:
            break
        r = small[0][2]
        nbrs = [(s / (2 * c * scale), min(group[b if a == r else a]), b if a == r else a) for (a, b), (s, c) in between().items() if r in (a, b)]
        if not nbrs:
            dropped.add(r)
            continue
        join(r, min(nbrs)[2])
    lut = np.zeros(n + 1, np.int64)
    kept = sorted(min(g) for r, g in group.items() if r not in dropped)
    for r, g in group.items():
        if r not in dropped:
            lut[sorted(g)] = kept.index(min(g)) + 1
    return lut[basins]


def ref_cells(prob: np.ndarray, seed: float, merge: float, min_px: int, steps: int) -> np.ndarray:
    """The whole-image algorithm, independently: seeds, flood, merge (uint8 or float probabilities)."""
    lev = prob.astype(np.int64) if prob.dtype == np.uint8 else np.rint(np.clip(prob, 0, 1) * 65535).astype(np.int64)
    scale, top = (255, 255.0) if prob.dtype == np.uint8 else (65535, 1.0)
    seeds = label(prob < seed * top, connectivity=1)
    return ref_merge(ref_flood(seeds, lev, steps), lev, scale, merge, min_px)


def smooth_map(h: int, w: int, seed: int, dtype) -> np.ndarray:
    """Blobs of low probability between ridges: a membrane map in miniature."""
    rng = np.random.default_rng(seed)
    f = ndi.gaussian_filter(rng.random((h, w)), 1.5)
    f = (f - f.min()) / (np.ptp(f) or 1.0)
    f = np.clip(1.3 * np.abs(f - 0.5) * 2 + 0.1 * rng.random((h, w)), 0, 1)  # high far from the middle level
    return (1 - f).astype(np.float32) if dtype == np.float32 else np.round((1 - f) * 255).astype(np.uint8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(12, 48), w=st.integers(12, 48), seed=st.integers(0, 10_000), block=st.integers(6, 40),
       seed_threshold=st.sampled_from([0.2, 0.35, 0.5]), merge=st.sampled_from([0.0, 0.4, 0.7]),
       min_px=st.sampled_from([0, 6, 30]), steps=st.integers(0, 7), floating=st.booleans(), fill=st.booleans())
def test_cells_equal_the_whole_image_for_any_block(h, w, seed, block, seed_threshold, merge, min_px, steps, floating, fill):
    prob = smooth_map(h, w, seed, np.float32 if floating else np.uint8)
    kw = dict(pixel_size_nm=1.0, cells=True, seed_threshold=seed_threshold, merge_threshold=merge, min_size=f"{min_px}px",
              grow=f"{steps}nm", fill_holes=fill)
    whole = label_objects(prob, block_size=64, **kw)
    assert len(whole.plan.grid) == 1
    blocks = label_objects(prob, block_size=block, **kw)
    np.testing.assert_array_equal(blocks.labels.compute(), whole.labels.compute())
    assert blocks.n_objects == whole.n_objects == len(whole.table)
    if floating:  # float sums in another order: equal within rounding
        pd.testing.assert_frame_equal(blocks.table, whole.table, rtol=1e-9)
    else:
        assert_table_equal(blocks.table, whole.labels.compute(), prob, pixel=1.0, cls="cell")
    if not fill:  # the independent whole-image implementation (its merge has no rule for equal means)
        try:
            want = ref_cells(prob, seed_threshold, merge, min_px, steps)
        except Tie:
            assume(False)
        np.testing.assert_array_equal(whole.labels.compute(), want)


def test_flood_follows_low_probability_not_distance():
    """Two seeds; the pixel nearer seed 1 but behind a ridge goes to seed 2, whose path stays low."""
    prob = np.full((5, 9), 40, np.uint8)
    prob[:, 4] = 250  # a ridge between the seeds' sides ...
    prob[4, 4] = 60  # ... with a gap at the bottom
    prob[0, 0] = prob[0, 8] = 0  # the seeds (below 0.05)
    got = label_objects(prob, pixel_size_nm=1.0, cells=True, grow="12nm", merge_threshold=0.0).labels.compute()
    assert got[0, 0] == 1 and got[0, 8] == 2
    assert (got[:, :4] == 1).all() and (got[:, 5:] == 2).all()  # each side its own seed's, the ridge split by cost
    merged = label_objects(prob, pixel_size_nm=1.0, cells=True, grow="12nm", merge_threshold=0.99).labels.compute()
    assert (merged == 1).all()  # a mean boundary below 0.99: one cell


@pytest.fixture(scope="module")
def isbi_probs() -> np.ndarray:
    """isbi-membrane's uint8 probabilities of held-out ISBI slice 24 (as `segment` stores them)."""
    import tilefeet

    img = iio.imread(DATA / "isbi" / "image" / "24.png")
    p = tilefeet.segment(img, "isbi-membrane", pixel_size_nm="4nm", invert=False).values[0]  # (polarity: test_polarity.py)
    return np.round(np.clip(p, 0, 1) * 255).astype(np.uint8)


def test_real_slice_cells_equal_across_block_sizes_lazily_and_out_of_core(isbi_probs, tmp_path):
    whole = label_objects(isbi_probs, pixel_size_nm=4.0, cells=True, block_size=512)
    want = whole.labels.compute()
    assert whole.plan.steps == 40 and 50 < whole.n_objects < 400  # 160 nm at 4 nm; cells of a 2 µm field
    for block in (96, 200):
        got = label_objects(isbi_probs, pixel_size_nm=4.0, cells=True, block_size=block)
        np.testing.assert_array_equal(got.labels.compute(), want)
    store = make_output(tmp_path / "seg.ome.zarr", isbi_probs, classes=("membrane",), chunk=64, pixel=4.0)
    result = write_objects(store, cells=True, block_size=128)
    np.testing.assert_array_equal(zarr.open_array(str(result.path / "0"), mode="r")[:], want)
    assert result.n_objects == whole.n_objects and "cells: seeds below p 0.05" in result.recipe
    assert_table_equal(result.table(), want, isbi_probs, pixel=4.0, cls="cell")


def test_isbi_held_out_slice_scores(isbi_probs):
    """Held-out ISBI slice 24: the watershed's cells score no worse than the earlier growth's
    (measured: ARE 0.014 against 0.020, VOI 0.14 against 0.19)."""
    truth = label(iio.imread(DATA / "isbi" / "label" / "24.png") == 255, connectivity=1)
    new = cell_scores(overlaps(truth, label_objects(isbi_probs, pixel_size_nm=4.0, cells=True).labels.compute()))
    old = cell_scores(overlaps(truth, label_objects(isbi_probs, pixel_size_nm=4.0, cells=True, cell_method="grow").labels.compute()))
    assert new.adapted_rand_error <= old.adapted_rand_error and new.vi <= old.vi
    assert new.adapted_rand_error < 0.05 and new.vi < 0.3


def test_lucchi_zero_shot_cells_merge_less(tmp_path):
    """Another lab's data (Lucchi FIB-SEM, 5 nm) segmented zero-shot by isbi-membrane: the earlier
    growth merged neighbouring cells through gaps in the predicted membrane; the watershed's seeds
    and merging keep them apart (measured on testing0000: VI merge 0.140 against 0.350), within the
    issue's target (ARE ≤ 0.35, VOI ≤ 1.8)."""
    import tilefeet

    img = iio.imread(DATA / "lucchi" / "image" / "testing0000.png")
    p = tilefeet.segment(img, "isbi-membrane", pixel_size_nm="5nm", invert=False).values[0]  # (polarity: test_polarity.py)
    prob = np.round(np.clip(p, 0, 1) * 255).astype(np.uint8)
    truth = label(iio.imread(DATA / "lucchi" / "membranes" / "testing0000.png") == 0, connectivity=1)
    new = cell_scores(overlaps(truth, label_objects(prob, pixel_size_nm=5.0, cells=True, block_size=384).labels.compute()))
    old = cell_scores(overlaps(truth, label_objects(prob, pixel_size_nm=5.0, cells=True, cell_method="grow").labels.compute()))
    assert new.vi_merge < old.vi_merge - 0.15
    assert new.adapted_rand_error <= 0.35 and new.vi <= 1.8
