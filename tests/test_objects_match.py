"""Object-level scores (``evaluate --objects`` / ``--cells``): matching by IoU against a brute-force
reference, ARE/VI of cells against scikit-image on whole images, and the command on real data."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from skimage.measure import label
from skimage.metrics import adapted_rand_error, variation_of_information

from tilefeet.evaluate import evaluate
from tilefeet.objects import label_objects, write_objects
from tilefeet.objects.match import THRESHOLDS, cell_scores, match_objects, overlaps

from .conftest import DATA
from .helpers import run_cli
from .test_objects import make_output, membranes, probs_for, whole_image_cells


def brute_force(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Every IoU of every pair, then greedy one-to-one matching by IoU, per threshold."""
    t_ids, p_ids = np.unique(truth[truth > 0]), np.unique(pred[pred > 0])
    iou = np.zeros((len(t_ids), len(p_ids)))
    for i, a in enumerate(t_ids):
        for j, b in enumerate(p_ids):
            inter = np.sum((truth == a) & (pred == b))
            iou[i, j] = inter / np.sum((truth == a) | (pred == b))
    pairs = sorted(((iou[i, j], i, j) for i in range(len(t_ids)) for j in range(len(p_ids)) if iou[i, j] >= 0.5), reverse=True)
    used_t, used_p, matched = set(), set(), []
    for v, i, j in pairs:
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            matched.append(v)
    m = np.array(matched)
    return {"n_true": len(t_ids), "n_pred": len(p_ids), "matches": [int((m >= t).sum()) for t in THRESHOLDS],
            "mean_iou": float(m.mean()) if len(m) else float("nan")}


def blobs(shape, seed: int, density: float = 0.03) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return label(ndi.binary_dilation(rng.random(shape) < density / 10, iterations=3), connectivity=2)


def test_matching_equals_brute_force():
    for seed in range(4):
        truth = blobs((70, 90), seed)
        shift = np.roll(truth, (seed % 2, 1), axis=(0, 1))  # displaced objects: IoUs spread over (0, 1)
        pred = label(ndi.binary_dilation(shift > 0) if seed % 2 else shift > 0, connectivity=2)
        got = match_objects(overlaps(truth, pred))
        want = brute_force(truth, pred)
        assert (got.true_objects, got.predicted_objects) == (want["n_true"], want["n_pred"])
        assert list(got.matches) == want["matches"]
        assert want["matches"][0] > 0 and got.mean_matched_iou == pytest.approx(want["mean_iou"], rel=1e-12)
        tp = want["matches"][0]
        assert got.precision == pytest.approx(tp / want["n_pred"]) and got.recall == pytest.approx(tp / want["n_true"])
        ap = [m / (want["n_true"] + want["n_pred"] - m) for m in want["matches"]]
        assert got.ap == pytest.approx(np.mean(ap)) and got.ap_at(0.75) == pytest.approx(ap[5])


def test_matching_edge_cases():
    truth = blobs((50, 50), 1)
    same = match_objects(overlaps(truth, truth * 3))  # other ids, same objects
    assert same.f1 == same.ap == same.precision == same.recall == 1.0 and same.mean_matched_iou == 1.0
    none = match_objects(overlaps(truth, np.zeros_like(truth)))
    assert none.predicted_objects == 0 and none.recall == 0 and none.f1 == 0 and none.ap == 0 and none.precision == 1.0
    empty = match_objects(overlaps(np.zeros((5, 5), int), np.zeros((5, 5), int)))
    assert empty.f1 == 1.0 and empty.ap == 1.0
    # one true object split into halves: neither half reaches IoU 0.5 with it if they are equal halves minus a line
    t = np.zeros((20, 41), int)
    t[5:15, :] = 1
    p = np.zeros_like(t)
    p[5:15, :20], p[5:15, 21:] = 1, 2
    split = match_objects(overlaps(t, p))
    assert split.matches[0] == 0 and split.recall == 0
    # the dask path (block by block) equals the numpy one
    import dask.array as da

    a, b = blobs((90, 70), 3), blobs((90, 70), 4)
    assert match_objects(overlaps(da.from_array(a, chunks=32), da.from_array(b, chunks=40))) == match_objects(overlaps(a, b))


def test_cell_scores_equal_scikit_image_on_whole_images():
    mem = membranes(80, 100, 2)
    truth = label(~mem, connectivity=1)
    pred = whole_image_cells(membranes(80, 100, 3), 2)  # other cells, with unassigned membrane pixels (0)
    got = cell_scores(overlaps(truth, pred))
    are, _precision, _recall = adapted_rand_error(truth, pred, ignore_labels=(0,))
    split, merge = variation_of_information(truth, pred, ignore_labels=(0,))
    assert got.adapted_rand_error == pytest.approx(are, rel=1e-9)
    assert got.vi_split == pytest.approx(split, rel=1e-9) and got.vi_merge == pytest.approx(merge, rel=1e-9)
    assert got.true_objects == truth.max() and got.predicted_objects == len(np.unique(pred[pred > 0]))


def test_evaluate_objects_uses_the_stored_layer_else_components(tmp_path, capsys):
    truth = blobs((96, 120), 5) > 0
    pred_mask = ndi.binary_dilation(truth, iterations=1)
    pred_mask[40:42, :] = False  # a cut: some objects split
    speck = np.zeros_like(truth)
    speck[::17, ::23] = True  # single-pixel false positives
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(pred_mask | speck), chunk=32)
    iio.imwrite(tmp_path / "truth.png", (truth * 255).astype(np.uint8))
    before = evaluate(store, tmp_path / "truth.png", objects=True)
    want = match_objects(overlaps(label(truth, connectivity=2), label(pred_mask | speck, connectivity=2)))
    assert before.objects == want and "components" in before.objects_source
    write_objects(store, min_size="5px", block_size=64)  # the stored layer drops the specks
    after = evaluate(store, tmp_path / "truth.png", objects=True)
    assert "mitochondrion-objects" in after.objects_source
    assert after.objects.predicted_objects < before.objects.predicted_objects
    assert after.objects.precision > before.objects.precision and after.pixel == before.pixel  # class labels still scored
    code, out, err = run_cli(capsys, "evaluate", store, tmp_path / "truth.png", "--objects")
    assert code == 0, err
    assert "matched at IoU ≥ 0.5" in out and "AP 0.5:0.95" in out
    code, out, _ = run_cli(capsys, "evaluate", store, tmp_path / "truth.png", "--objects", "--json")
    d = json.loads(out)["objects"]
    assert d["f1"] == pytest.approx(after.objects.f1) and d["predicted"] == after.objects_source


def test_evaluate_cells(tmp_path):
    mem = membranes(90, 110, 6)
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(mem), classes=("membrane",), chunk=32)
    truth_mem = membranes(90, 110, 6)
    truth_mem[::9, :] |= True  # the truth has more walls: predicted cells merge true ones
    iio.imwrite(tmp_path / "truth.png", (truth_mem * 255).astype(np.uint8))
    ev = evaluate(store, tmp_path / "truth.png", cells=True)
    assert ev.cells is not None and ev.objects is not None
    assert "cells: seeds below p" in ev.objects_source and "probabilities" in ev.objects_source  # the recipe, named
    pred = label_objects(store, cells=True).labels.compute()  # what `tilefeet objects --cells` would write
    truth = label(~truth_mem, connectivity=1)
    are, _, _ = adapted_rand_error(truth, pred, ignore_labels=(0,))
    assert ev.cells.adapted_rand_error == pytest.approx(are, rel=1e-9) and ev.cells.vi_merge > 0
    write_objects(store, cells=True, grow="10nm", block_size=64, cell_method="grow")
    stored = evaluate(store, tmp_path / "truth.png", cells=True)
    assert "membrane-cells" in stored.objects_source
    np.testing.assert_array_equal(zarr.open_array(str(store / "labels/membrane-cells/0"), mode="r")[:], whole_image_cells(mem, 2))


def test_lucchi_mito_objects_on_a_real_held_out_slice(tmp_path, capsys):
    """The shipped engine on a real held-out Lucchi slice: segment, objects, scored against the truth's objects."""
    from tilefeet.engine import list_engines

    if "lucchi-mito" not in list_engines():
        pytest.skip("the lucchi-mito engine is not installed")
    img = iio.imread(DATA / "lucchi" / "image" / "testing0000.png")[:512, :640]
    mask = iio.imread(DATA / "lucchi" / "mitochondrion" / "testing0000.png")[:512, :640] > 127
    iio.imwrite(tmp_path / "img.png", img)
    iio.imwrite(tmp_path / "truth.png", (mask * 255).astype(np.uint8))
    src, seg = tmp_path / "s.ome.zarr", tmp_path / "seg.ome.zarr"
    assert run_cli(capsys, "-q", "convert", tmp_path / "img.png", src, "--pixel-size", "5nm")[0] == 0
    code, _, err = run_cli(capsys, "-q", "segment", src, seg, "-e", "lucchi-mito", "--intensity", "bundle")
    assert code == 0, err
    code, out, err = run_cli(capsys, "objects", seg, "-q")
    assert code == 0 and "objects of mitochondrion" in out, err
    ev = evaluate(seg, tmp_path / "truth.png", objects=True)
    assert ev.objects.true_objects == label(mask, connectivity=2).max()
    assert ev.objects.f1 > 0.75 and ev.objects.mean_matched_iou > 0.8, ev.objects
