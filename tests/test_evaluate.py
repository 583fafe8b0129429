"""tilefeet.evaluate and ``tilefeet evaluate``: metric values on hand-made masks with known answers,
blockwise (out-of-core) counts against in-memory ones, the CLI on real OME-Zarr stores, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from tilefeet.convert import write_image, write_labels
from tilefeet.errors import ConfigError, InputNotFoundError, InvalidImageError
from tilefeet.evaluate import boundary_metrics_blockwise, evaluate, pixel_metrics_blockwise, tolerant_metrics_blockwise
from tilefeet.metrics import (
    BoundaryMetrics,
    PixelMetrics,
    boundary_metrics,
    instance_metrics,
    mask_boundary,
    near,
    pixel_metrics,
    tolerant_metrics,
)

from . import helpers

ISBI_LABEL = Path(__file__).parent / "data" / "isbi" / "label" / "24.png"  # 255 interior, 0 membrane


def rectangle(shape=(40, 60), box=(10, 10, 30, 40)) -> np.ndarray:
    m = np.zeros(shape, bool)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = True
    return m


def walls(shape=(30, 60), cols=()) -> np.ndarray:
    """A membrane mask: vertical walls 2 px thick at ``cols``, cutting the image into regions."""
    m = np.zeros(shape, bool)
    for c in cols:
        m[:, c : c + 2] = True
    return m


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    return helpers.run_cli(capsys, *args)


# ------------------------------------------------------------------------------ pixel metrics


def test_perfect_prediction_scores_one():
    t = rectangle()
    px, bd = pixel_metrics(t, t), boundary_metrics(t, t)
    assert (px.precision, px.recall, px.f1, px.iou) == (1.0, 1.0, 1.0, 1.0)
    assert (bd.precision, bd.recall, bd.f1) == (1.0, 1.0, 1.0)
    assert bd.true == 2 * 30 + 2 * 18  # the outline ring of a 20 × 30 rectangle


def test_known_overlap_gives_exact_f1_and_iou():
    t = rectangle(box=(0, 0, 10, 10))
    p = rectangle(box=(0, 5, 10, 15))  # half of it on the truth
    m = pixel_metrics(p, t)
    assert (m.tp, m.fp, m.fn) == (50, 50, 50)
    assert m.f1 == pytest.approx(0.5) and m.iou == pytest.approx(1 / 3)
    assert m.iou == pytest.approx(m.f1 / (2 - m.f1))


def test_empty_prediction():
    t = rectangle()
    m = pixel_metrics(np.zeros_like(t), t)
    assert m.tp == 0 and m.fn == t.sum()
    assert (m.recall, m.f1, m.iou) == (0.0, 0.0, 0.0)
    assert m.precision == 1.0  # no predicted pixel, so none is wrong (the module's 0/0 convention)
    b = boundary_metrics(np.zeros_like(t), t)
    assert (b.predicted, b.recall, b.f1) == (0, 0.0, 0.0)


def test_both_empty_is_perfect_agreement():
    e = np.zeros((8, 8), bool)
    assert pixel_metrics(e, e).f1 == 1.0 and pixel_metrics(e, e).iou == 1.0
    assert boundary_metrics(e, e).f1 == 1.0


# --------------------------------------------------------------------------- boundary metrics


def test_boundary_is_the_mask_pixels_touching_the_outside_but_not_the_image_edge():
    m = np.zeros((7, 7), bool)
    m[2:5, 2:5] = True
    assert mask_boundary(m).sum() == 8  # the ring around the centre pixel
    assert not mask_boundary(np.ones((5, 5), bool)).any()


@pytest.mark.parametrize("tolerance", [0, 1, 1.5, 2, 4.5, 7])
def test_near_is_euclidean_distance_within_the_tolerance(tolerance):
    points = np.zeros((40, 50), bool)
    points[[3, 20, 20, 39], [4, 25, 26, 49]] = True
    yy, xx = np.mgrid[:40, :50]
    distance = np.min([np.hypot(yy - y, xx - x) for y, x in zip(*np.nonzero(points))], axis=0)
    assert np.array_equal(near(points, tolerance), distance <= tolerance)


def test_boundary_shift_inside_and_outside_the_tolerance():
    t = rectangle()
    p = np.roll(t, 2, axis=1)  # every vertical edge 2 px off
    assert pixel_metrics(p, t).f1 < 1
    assert boundary_metrics(p, t, tolerance_px=2).f1 == 1.0
    assert boundary_metrics(p, t, tolerance_px=3).f1 == 1.0
    near = boundary_metrics(p, t, tolerance_px=1)
    # Within 1 px: 29 pixels of the top and of the bottom edge each, and the two end pixels of the
    # side towards the shift; the rest of the two 18-pixel sides are 2 px away.
    assert (near.true_matched, near.true) == (60, 96)
    assert near.recall == near.precision == pytest.approx(60 / 96)


def test_tolerant_pixel_scores_forgive_a_membrane_drawn_one_pixel_off():
    """A membrane (2 px wall) drawn 1 px to the side: exact pixel F1 0.5, within 1 px all right;
    2 px to the side is wrong within 1 px too (its pixels lie 2 px from the nearest true one)."""
    t = walls(cols=(20,))
    one, two = np.roll(t, 1, axis=1), np.roll(t, 2, axis=1)
    assert pixel_metrics(one, t).f1 == pytest.approx(0.5)
    assert tolerant_metrics(one, t, 1.0).f1 == 1.0 and tolerant_metrics(one, t, 0).f1 == pytest.approx(0.5)
    off = tolerant_metrics(two, t, 1.0)
    assert off.precision == off.recall == pytest.approx(0.5)  # half of each wall is 1 px from the other's, half 2 px
    assert tolerant_metrics(two, t, 2.0).f1 == 1.0
    assert tolerant_metrics(t, t, 1.0).f1 == 1.0 and tolerant_metrics(np.zeros_like(t), t, 1.0).f1 == 0.0


# --------------------------------------------------------------------------- instance metrics


@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_perfect_instances(mode):
    t = walls(cols=(20, 40)) if mode == "background" else rectangle() | rectangle(box=(32, 45, 38, 55))
    m = instance_metrics(t, t, mode)
    assert m.adapted_rand_error == 0.0 and m.vi == 0.0
    assert (m.rand_precision, m.rand_recall) == (1.0, 1.0)
    assert m.true_objects == m.predicted_objects == (3 if mode == "background" else 2)


def test_split_raises_the_split_term_and_lowers_rand_recall():
    truth = walls(cols=(20,))  # two regions
    pred = walls(cols=(20, 40))  # an extra wall splits the right region in two
    m = instance_metrics(pred, truth, "background")
    assert m.vi_split > 0 and m.vi_merge == 0.0
    assert m.rand_precision == 1.0 and m.rand_recall < 1.0
    assert m.adapted_rand_error > 0
    assert (m.true_objects, m.predicted_objects) == (2, 3)


def test_merge_raises_the_merge_term_and_lowers_rand_precision():
    truth = walls(cols=(20, 40))
    pred = walls(cols=(20,))  # the wall at 40 is missing: two true regions merge
    m = instance_metrics(pred, truth, "background")
    assert m.vi_merge > 0 and m.vi_split == 0.0
    assert m.rand_recall == 1.0 and m.rand_precision < 1.0


def test_thick_predicted_membranes_are_no_instance_error():
    truth = walls(cols=(20, 40))
    pred = truth.copy()
    pred[:, 18:24] = True  # the same walls, thicker
    m = instance_metrics(pred, truth, "background")
    assert m.adapted_rand_error == pytest.approx(0.0, abs=1e-12) and m.vi == pytest.approx(0.0, abs=1e-12)
    assert pixel_metrics(pred, truth).precision < 1


def test_empty_prediction_merges_every_true_object():
    truth = rectangle() | rectangle(box=(32, 45, 38, 55))
    m = instance_metrics(np.zeros_like(truth), truth, "foreground")
    assert m.predicted_objects == 0 and m.vi_merge > 0 and m.adapted_rand_error > 0


def test_instances_without_true_objects_are_undefined():
    m = instance_metrics(rectangle(), np.zeros((40, 60), bool), "foreground")
    assert np.isnan(m.adapted_rand_error) and m.to_dict()["adapted_rand_error"] is None


# --------------------------------------------------------------------- blockwise = in memory


@pytest.mark.parametrize("chunks", [(2, 157), (23, 23), (64, 50), (160, 157)])
def test_blockwise_counts_equal_in_memory(chunks):
    """Whatever the blocks (even thinner than the boundary halo), blockwise counts are exact."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    pred = ndi.binary_opening(rng.random((160, 157)) > 0.6)
    truth = ndi.binary_closing(rng.random((160, 157)) > 0.5)
    p, t = da.from_array(pred, chunks=chunks), da.from_array(truth, chunks=(31, 40))
    assert pixel_metrics_blockwise(p, t) == pixel_metrics(pred, truth)
    for tol in (0, 1, 2.5):
        assert boundary_metrics_blockwise(p, t, tol) == boundary_metrics(pred, truth, tol)
        assert tolerant_metrics_blockwise(p, t, tol) == tolerant_metrics(pred, truth, tol)


def test_to_dict_round_trips_through_json():
    d = json.loads(json.dumps(PixelMetrics(3, 1, 2, 4).to_dict()))
    assert d["f1"] == pytest.approx(6 / 9) and d["tp"] == 3
    b = BoundaryMetrics(2.0, 10, 5, 20, 10).to_dict()
    assert (b["precision"], b["recall"]) == (0.5, 0.5)


# ------------------------------------------------------------------------ evaluate() on arrays


def test_evaluate_arrays_with_threshold_and_ignored_border():
    truth = rectangle()
    probs = np.where(truth, 200, 20).astype(np.uint8)  # uint8 probabilities, 0..255
    probs[0, :] = 255  # a false positive along the top edge
    ev = evaluate(probs, truth, threshold=0.5, instances="foreground")
    assert ev.pixel.fp == 60 and ev.pixel.recall == 1.0
    inner = evaluate(probs, truth, threshold=0.5, instances="foreground", ignore_border_px=1)
    assert inner.region.shape == (38, 58)
    assert inner.pixel.f1 == 1.0 and inner.instances is not None and inner.instances.vi == 0.0


def test_threshold_reads_integers_as_fractions_of_their_maximum():
    probs = np.array([[127, 128], [0, 255]], np.uint8)
    ev = evaluate(probs, np.array([[0, 1], [0, 1]]), threshold=0.5, tolerance_px=0)
    assert ev.pixel.f1 == 1.0


def test_evaluate_refuses_instances_above_the_memory_limit():
    t = rectangle()
    with pytest.raises(ConfigError, match="--max-pixels"):
        evaluate(t, t, instances="background", max_instance_pixels=100)
    assert evaluate(t, t, max_instance_pixels=100).pixel.f1 == 1.0  # pixel scores need no limit


# ------------------------------------------------------------- real data, stores and the CLI


@pytest.fixture(scope="module")
def isbi(tmp_path_factory):
    """ISBI slice 24's labels as a PNG and as an OME-Zarr image with labels/membrane, and a
    prediction whose membranes are 1 px thicker (labels/membrane of another image)."""
    import imageio.v3 as iio
    from scipy import ndimage as ndi

    folder = tmp_path_factory.mktemp("isbi")
    label = iio.imread(ISBI_LABEL)
    membrane = label == 0
    png = folder / "label.png"
    iio.imwrite(png, label)
    truth = write_image(label, folder / "truth.ome.zarr", (4.0, 4.0), chunk=128)
    write_labels(label, truth, "membrane", foreground=[0])
    pred = write_image(label, folder / "pred.ome.zarr", (4.0, 4.0), chunk=128)
    write_labels(ndi.binary_dilation(membrane), pred, "membrane")
    return folder, png, membrane


def test_cli_perfect_on_real_labels_png_vs_ome_zarr(isbi, capsys):
    folder, png, membrane = isbi
    code, out, err = run_cli(
        ["evaluate", str(folder / "truth.ome.zarr/labels/membrane"), str(png), "--truth-foreground", "0",
         "--instances", "background", "--json"],
        capsys,
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["shape"] == [512, 512] and d["pixel"]["tp"] == membrane.sum()
    assert d["pixel"]["f1"] == 1.0 and d["pixel"]["iou"] == 1.0 and d["boundary"]["f1"] == 1.0
    assert d["instances"]["adapted_rand_error"] == 0.0 and d["instances"]["vi"] == pytest.approx(0.0, abs=1e-12)
    assert d["instances"]["true_objects"] == d["instances"]["predicted_objects"] > 50


def test_cli_thicker_membranes_lose_pixel_precision_not_boundaries_or_objects(isbi, capsys):
    folder, _, _ = isbi
    code, out, err = run_cli(
        ["evaluate", str(folder / "pred.ome.zarr"), str(folder / "truth.ome.zarr"), "--class", "membrane",
         "--instances", "background", "--json"],
        capsys,
    )
    assert code == 0, err
    d = json.loads(out)
    assert d["prediction"].endswith("labels/membrane") and d["truth"].endswith("labels/membrane")
    assert d["pixel"]["recall"] == 1.0 and d["pixel"]["precision"] < 0.9
    assert d["boundary"]["f1"] > 0.95  # outlines moved by 1 px, within the 2 px tolerance
    assert d["instances"]["adapted_rand_error"] < 0.05 and d["instances"]["vi_split"] < 0.05


def test_cli_prints_a_table(isbi, capsys):
    folder, png, _ = isbi
    args = ["evaluate", str(folder / "pred.ome.zarr/labels/membrane"), str(png), "--truth-foreground", "0"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    assert "pixel (F1 = Dice)" in out and "boundary (≤ 2 px)" in out and "not scored" in out


@pytest.fixture(scope="module")
def output_store(tmp_path_factory, random_engine):
    """A real tilefeet output of a random-weight engine (class "membrane"), and the section it was
    made from, with two label images: labels/membrane (a copy of the output's) and labels/other."""
    import zarr

    from tilefeet.pipeline import segment_to_zarr

    folder = tmp_path_factory.mktemp("store")
    image = np.asarray(np.random.default_rng(1).integers(0, 256, (96, 80)), np.uint8)
    section = write_image(image, folder / "section.ome.zarr", (4.0, 4.0), chunk=32)
    out = segment_to_zarr(section, folder / "out.ome.zarr", random_engine.path, block_size=64, chunk_size=32)
    membrane = np.asarray(zarr.open_array(str(out / "labels/membrane/0"), mode="r")[...])
    write_labels(membrane, section, "membrane")
    write_labels(~membrane.astype(bool), section, "other")
    return out, section, membrane


def test_cli_output_store_labels_and_thresholded_probabilities(output_store, capsys):
    out, section, membrane = output_store
    assert 0 < membrane.mean() < 1  # a discriminating test: both classes of pixel occur
    truth = str(section / "labels" / "membrane")
    for extra in ([], ["--class", "membrane"], ["--threshold", "0.5"]):
        code, stdout, err = run_cli(["evaluate", str(out), truth, "--instances", "foreground", "--json", *extra], capsys)
        assert code == 0, err
        d = json.loads(stdout)
        assert d["pixel"]["f1"] == 1.0 and d["instances"]["adapted_rand_error"] == 0.0
    assert "probabilities[membrane] >= 0.5" in d["prediction"]


def test_truth_takes_the_class_found_in_the_prediction(output_store):
    out, section, _ = output_store
    ev = evaluate(out, section)  # the section holds labels/membrane and labels/other
    assert ev.truth.endswith("labels/membrane") and ev.pixel.f1 == 1.0
    other = evaluate(section / "labels" / "other", out)
    assert other.pixel.f1 == 0.0 and other.pixel.tp + other.pixel.tn == 0  # the complement disagrees everywhere


def test_cli_bad_inputs_give_one_line_and_exit_2(output_store, isbi, tmp_path, capsys):
    out, section, _ = output_store
    _, png, _ = isbi
    cases = {
        "does not exist": ["evaluate", str(tmp_path / "missing.ome.zarr"), str(png)],
        "has no class 'nucleus'": ["evaluate", str(out), str(section), "--class", "nucleus"],
        "choose one with --class": ["evaluate", str(section), str(out)],
        "96 × 80 px but the truth": ["evaluate", str(out), str(png), "--class", "membrane"],
        "--max-pixels": ["evaluate", str(png), str(png), "--instances", "background", "--max-pixels", "1000"],
        "--instances must be one of": ["evaluate", str(png), str(png), "--instances", "cells"],
        "is a label image": ["evaluate", str(section / "labels/membrane"), str(section), "--threshold", "0.5"],
    }
    for expected, args in cases.items():
        code, _, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert err.startswith("tilefeet: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert expected in err, err


def test_library_errors_are_tilefeet_errors_and_builtins(isbi, tmp_path):
    folder, png, _ = isbi
    with pytest.raises(InputNotFoundError):
        evaluate(tmp_path / "nothing.png", png)
    with pytest.raises(FileNotFoundError):
        evaluate(tmp_path / "nothing.png", png)
    small = write_image(np.zeros((100, 512), np.uint8), tmp_path / "small.ome.zarr", (4.0, 4.0))
    with pytest.raises(InvalidImageError, match=r"100 × 512 px.*512 × 512 px"):
        evaluate(small, folder / "truth.ome.zarr/labels/membrane")
