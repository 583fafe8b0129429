"""Stacks measured in 3-D (``evaluate`` on (z, y, x)): voxel counts, each section's boundaries, 3-D
objects and cells with known answers (objects split across sections, connectivity, walls missing
in one section), one real stack segmented by ``isbi-membrane`` against its truth converted with
``convert --stack --labels``; and previews of stacks (``preview --z``)."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import zarr
from skimage.measure import label
from skimage.metrics import adapted_rand_error

import tilefeet
from tilefeet.errors import ConfigError, InvalidImageError
from tilefeet.evaluate import evaluate
from tilefeet.metrics import boundary_metrics, pixel_metrics
from tilefeet.ngff import multiscales
from tilefeet.objects.cells import grow

from .conftest import DATA, bundled_engine_available, isbi_slices
from .helpers import assert_one_line_error, run_cli
from .test_objects_match import brute_force

SPACING = (50.0, 4.0, 4.0)  # serial-section TEM: sections 50 nm apart, 4 nm pixels


def make_stack_output(path: Path, probs: np.ndarray, *, cls: str = "mitochondrion", chunk: int = 32, threshold: float = 0.5,
                      spacing=SPACING, objects: np.ndarray | None = None) -> Path:
    """A store laid out as ``tilefeet segment`` writes a stack: (c, z, y, x) uint8 probabilities, the
    run's threshold in the provenance, ``labels/<class>`` (z, y, x) = probabilities ≥ threshold; with
    ``objects``, a ``labels/<class>-objects`` layer of those ids (as ``tilefeet objects`` lists it)."""
    probs = np.asarray(probs, np.uint8)[None]
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("0", data=probs, chunks=(1, 1, chunk, chunk), dimension_names=["c", "z", "y", "x"])
    z_axis = {"name": "z", "type": "space", "unit": "nanometer"}
    meta = {"method": "tilefeet.segment", "settings": {"threshold": threshold, "output_dtype": "uint8", "z_range": None}}
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales("probabilities", spacing[1:], 1, lead_axes=[{"name": "c", "type": "channel"}, z_axis],
                                    lead_scale=[1.0, spacing[0]], metadata=meta)],
        "omero": {"channels": [{"label": cls, "color": "FFFFFF"}]},
    }
    layers = {cls: (probs[0] >= threshold * 255).astype(np.uint8)}
    if objects is not None:
        layers[f"{cls}-objects"] = objects.astype(np.uint32)
    g = root.create_group("labels")
    g.attrs["ome"] = {"version": "0.5", "labels": list(layers)}
    for name, data in layers.items():
        lab = g.create_group(name)
        lab.create_array("0", data=data, chunks=(1, chunk, chunk), dimension_names=["z", "y", "x"])
        lab_meta = {"method": "tilefeet.objects", "dimensions": 3, "connectivity": 26} if name.endswith("-objects") else None
        lab.attrs["ome"] = {"version": "0.5", "multiscales": [multiscales(name, spacing[1:], 1, lead_axes=[z_axis], lead_scale=[spacing[0]],
                                                                           metadata=lab_meta)],
                            "image-label": {"version": "0.5", "source": {"image": "../../"}}}
    return path


def probs_for(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 probabilities whose threshold at 0.5 is ``mask``, varied on both sides."""
    rng = np.random.default_rng(seed)
    return np.where(mask, rng.integers(128, 256, mask.shape), rng.integers(0, 128, mask.shape)).astype(np.uint8)


# ---------------------------------------------------------------------- known answers, synthetic


def two_objects() -> tuple[np.ndarray, np.ndarray]:
    """Truth: A and B, each through all four sections. Prediction: A exact; B missing from sections
    1 and 2, so it is two pieces (sections 0 and 3), each a quarter of B."""
    truth = np.zeros((4, 40, 60), bool)
    truth[:, 5:15, 5:15] = True  # A: 400 voxels
    truth[:, 20:35, 30:50] = True  # B: 1200 voxels
    pred = truth.copy()
    pred[1:3, 20:35, 30:50] = False
    return pred, truth


def test_two_objects_split_across_sections_are_scored_as_3d_objects():
    pred, truth = two_objects()
    ev = evaluate(pred, truth, objects=True)
    o = ev.objects
    # 3-D: 2 true objects (8 in the sections, one per section each), 3 predicted (A, B's two pieces)
    assert (o.true_objects, o.predicted_objects) == (2, 3) and ev.sections == 4 and ev.connectivity == 26
    assert o.matches == (1,) * 10  # only A: each piece of B has IoU 0.25
    assert (o.precision, o.recall, o.f1) == pytest.approx((1 / 3, 1 / 2, 0.4))
    assert o.ap == pytest.approx(0.25) and o.mean_matched_iou == 1.0  # TP / (TP + FP + FN) = 1 / 4 at every threshold
    assert (ev.pixel.tp, ev.pixel.fp, ev.pixel.fn) == (400 + 600, 0, 600)
    assert ev.pixel.iou == pytest.approx(1000 / 1600)
    assert "3-D components" in ev.objects_source


def test_a_stack_of_objects_scores_as_brute_force_on_the_whole_volume():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    truth = ndi.binary_dilation(rng.random((6, 48, 64)) < 0.004, iterations=2)
    pred = np.roll(ndi.binary_dilation(truth), 1, axis=2)  # grown and shifted: IoUs spread over (0, 1)
    for conn, sk in ((6, 1), (18, 2), (26, 3)):
        ev = evaluate(pred, truth, objects=True, connectivity=conn)
        want = brute_force(label(truth, connectivity=sk), label(pred, connectivity=sk))
        o = ev.objects
        assert (o.true_objects, o.predicted_objects, list(o.matches)) == (want["n_true"], want["n_pred"], want["matches"]), conn
        assert want["matches"][0] > 0 and o.mean_matched_iou == pytest.approx(want["mean_iou"])
        assert ev.connectivity == conn


def test_connectivity_decides_which_voxels_touch():
    """Two pieces in neighbouring sections that touch only at a corner are one object at 26, two at 18 and 6;
    pieces touching along an edge are one at 18 and 26, two at 6."""
    corner = np.zeros((2, 12, 12), bool)
    corner[0, 2:5, 2:5] = True
    corner[1, 5:8, 5:8] = True  # (0, 4, 4) and (1, 5, 5): a corner
    edge = np.zeros((2, 12, 12), bool)
    edge[0, 2:5, 2:5] = True
    edge[1, 5:8, 2:5] = True  # (0, 4, x) and (1, 5, x): an edge
    for volume, counts in ((corner, {6: 2, 18: 2, 26: 1}), (edge, {6: 2, 18: 1, 26: 1})):
        for conn, n in counts.items():
            ev = evaluate(volume, volume, objects=True, connectivity=conn)
            assert (ev.objects.true_objects, ev.objects.predicted_objects, ev.objects.f1) == (n, n, 1.0), (conn, n)


def walls() -> tuple[np.ndarray, np.ndarray]:
    """Membranes of a stack (3 sections): a wall at x = 20 through every section splits the volume into
    two cells; the predicted wall has a gap in section 1, so in 3-D both sides are one predicted cell."""
    truth = np.zeros((3, 30, 40), bool)
    truth[:, :, 20] = True
    pred = truth.copy()
    pred[1, 10:16, 20] = False
    return pred, truth


def test_cells_in_3d_merge_through_a_gap_in_one_section(tmp_path):
    pred, truth = walls()
    out = make_stack_output(tmp_path / "seg.ome.zarr", probs_for(pred), cls="membrane")
    ev = evaluate(out, truth, cells=True, instances="background")
    truth_cells = label(~truth, connectivity=1)  # two 3-D cells; membrane voxels are 0 (ignored)
    assert truth_cells.max() == 2 and ev.objects.true_objects == 2 and ev.objects.predicted_objects == 1
    merged = np.ones_like(truth_cells)  # the gap joins the sides; the wall's voxels grow into that one cell
    want = adapted_rand_error(truth_cells, merged, ignore_labels=(0,))[0]
    for scores in (ev.cells, ev.instances):  # out of core (--cells) and in memory (--instances background)
        assert scores.adapted_rand_error == pytest.approx(want, abs=1e-12) and want > 0.3
        assert scores.rand_recall == 1.0 and scores.rand_precision < 0.6 and scores.vi_split == 0.0 and scores.vi_merge > 0.9
    assert ev.connectivity == 6 and "within each section" in ev.objects_source
    assert ev.largest_true_cell == pytest.approx(1800 / 3510) and not ev.truth_cells_join  # two cells, no caution
    # scored section by section instead, only section 1 would be merged: 3-D is what makes this a merge everywhere
    per_section = [adapted_rand_error(label(~t, connectivity=1), label(~p, connectivity=1), ignore_labels=(0,))[0] for p, t in zip(pred, truth)]
    assert per_section[0] == per_section[2] == 0.0


def test_predicted_cells_grow_within_their_own_section(tmp_path):
    """A cell grows into the membrane of its own section only, as far as the grow distance (40 nm = 10 px at 4 nm)."""
    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    field = ndi.gaussian_filter(rng.random((3, 60, 70)), (0, 2, 2))
    mem = np.abs(field - field.mean()) < 0.3 * field.std()
    out = make_stack_output(tmp_path / "seg.ome.zarr", probs_for(mem, 1), cls="membrane", chunk=16)
    from tilefeet.objects.match import grow_sections

    seeds = label(~mem, connectivity=1)
    want = np.stack([np.maximum(grow(s.astype(np.int64), 10), 0) for s in seeds])
    import dask.array as da

    got = grow_sections(da.from_array(seeds.astype(np.uint32), chunks=(2, 16, 16)), 10).compute()
    np.testing.assert_array_equal(got, want)
    ev = evaluate(out, mem, cells=True)
    from tilefeet.objects.match import cell_scores, overlaps

    ref = cell_scores(overlaps(label(~mem, connectivity=1), want))
    assert ev.cells.adapted_rand_error == pytest.approx(ref.adapted_rand_error) and ev.cells.vi == pytest.approx(ref.vi)


def test_a_stored_objects_layer_is_scored_as_it_is(tmp_path):
    pred, truth = two_objects()
    ids = label(pred, connectivity=3).astype(np.uint32)
    ids[ids == 2] = 7  # stored ids need not be consecutive
    out = make_stack_output(tmp_path / "seg.ome.zarr", probs_for(pred), objects=ids)
    ev = evaluate(out, truth, objects=True)
    assert "as stored, 26-connected" in ev.objects_source and ev.connectivity == 26
    assert (ev.objects.true_objects, ev.objects.predicted_objects, ev.objects.matches[0]) == (2, 3, 1)
    # another connectivity than the stored layer's labels the mask again, both sides alike
    ev6 = evaluate(out, truth, objects=True, connectivity=6)
    assert "as stored" not in ev6.objects_source and ev6.connectivity == 6


def test_bad_stack_inputs_are_one_line(tmp_path, capsys):
    pred, truth = two_objects()
    out = make_stack_output(tmp_path / "seg.ome.zarr", probs_for(pred))
    section = tmp_path / "section.png"
    iio.imwrite(section, (truth[0] * 255).astype(np.uint8))
    code, _, err = run_cli(capsys, "evaluate", out, section)
    assert_one_line_error(code, err, "stack of 4 sections", "one section", "same sections")
    code, _, err = run_cli(capsys, "evaluate", out, out, "--connectivity", "8")
    assert_one_line_error(code, err, "--connectivity", "6, 18 or 26")
    code, _, err = run_cli(capsys, "evaluate", out, out, "--instances", "foreground", "--max-pixels", "1000")
    assert_one_line_error(code, err, "4 × 40 × 60 voxel stack", "--max-pixels", "out of core")
    with pytest.raises(ConfigError, match="is for stacks"):
        evaluate(pred[0], truth[0], objects=True, connectivity=6)
    with pytest.raises(InvalidImageError, match=r"expected a 2-D .* or a .*stack"):
        evaluate(pred[None, None].repeat(2, 0), truth[None, None].repeat(2, 0))


# --------------------------------------------------------------------- a real stack, real weights


needs_engine = pytest.mark.skipif(not bundled_engine_available(), reason="the bundled isbi-membrane engine is not installed")


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory):
    """Three consecutive held-out ISBI sections (50 nm apart, 4 nm), cut to 192 × 256, converted as a
    user would (``convert --stack``, then its truth with ``--labels``), and segmented by isbi-membrane."""
    from tilefeet.cli import main

    tmp = tmp_path_factory.mktemp("real-stack")
    (tmp / "images").mkdir()
    (tmp / "labels").mkdir()
    for k, name in enumerate(("24", "25", "26")):
        iio.imwrite(tmp / "images" / f"{k}.png", iio.imread(DATA / "isbi" / "image" / f"{name}.png")[:192, :256])
        iio.imwrite(tmp / "labels" / f"{k}.png", iio.imread(DATA / "isbi" / "label" / f"{name}.png")[:192, :256])
    stack = tmp / "stack.ome.zarr"
    assert main(["convert", str(tmp / "images"), str(stack), "--stack", "--pixel-size", "50,4,4nm", "--chunk", "128"]) == 0
    assert main(["convert", str(tmp / "labels"), str(stack), "--stack", "--labels", "membrane", "--foreground", "0"]) == 0
    out = tilefeet.segment_to_zarr(stack, tmp / "seg.ome.zarr", "isbi-membrane", chunk_size=128, progress=False, invert=False)
    return stack, Path(out)


@needs_engine
def test_a_real_stack_scores_as_the_sum_of_its_sections(real_stack, capsys):
    stack, out = real_stack
    code, text, _ = run_cli(capsys, "evaluate", out, f"{stack}/labels/membrane", "--json", "--cells")
    assert code == 0
    got = json.loads(text)
    assert got["sections"] == 3 and got["dimensions"] == 3 and got["shape"] == [192, 256] and got["connectivity"] == 6
    pred = zarr.open_group(str(out), mode="r")["labels/membrane/0"][:] != 0
    truth = np.stack([iio.imread(DATA / "isbi" / "label" / f"{n}.png")[:192, :256] == 0 for n in ("24", "25", "26")])
    parts = [pixel_metrics(p, t) for p, t in zip(pred, truth)]
    assert [got["pixel"][k] for k in ("tp", "fp", "fn", "tn")] == [sum(getattr(m, k) for m in parts) for k in ("tp", "fp", "fn", "tn")]
    bparts = [boundary_metrics(p, t, 2.0) for p, t in zip(pred, truth)]
    for k in ("predicted", "predicted_matched", "true", "true_matched"):
        assert got["boundary"][k] == sum(getattr(b, k) for b in bparts), k
    assert 0.7 < got["pixel"]["f1"] < 0.9  # isbi-membrane on held-out slices: about 0.80
    # the truth's 3-D cells are the 6-connected regions between its membranes
    assert got["objects"]["true_objects"] == int(label(~truth, connectivity=1).max())
    assert 0 <= got["cells"]["adapted_rand_error"] < 1
    # 50 nm apart, one neuron's profile overlaps others' in the next section: the truth's 3-D regions are one
    assert got["cells"]["largest_true_cell"] > 0.8 and got["objects"]["true_objects"] < 10
    code, text, _ = run_cli(capsys, "evaluate", out, f"{stack}/labels/membrane", "--cells")
    assert code == 0 and "caution     the truth's largest cell holds" in text and "join across sections" in text
    # --threshold 0.5 on the stored probabilities gives the run's own labels (threshold 0.5)
    assert evaluate(out, f"{stack}/labels/membrane", threshold=0.5).pixel == evaluate(out, f"{stack}/labels/membrane").pixel
    code, text, _ = run_cli(capsys, "evaluate", out, f"{stack}/labels/membrane")
    assert code == 0 and "3 sections × 192 × 256 px, scored in 3-D" in text and "voxel (F1 = Dice)" in text


# ---------------------------------------------------------------------------------- previews


def _halves(png: Path, h: int, w: int, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(overlays, probabilities) of a preview of ``n`` sections of h × w."""
    img = iio.imread(png)
    if n == 1:
        assert img.shape == (h, 2 * w + 8, 3)
        return img[:, :w], img[:, w + 8 :]
    assert img.shape == (2 * h + 8, n * w + (n - 1) * 8, 3)
    return img[:h], img[h + 8 :]


@needs_engine
def test_preview_of_a_stack_draws_the_chosen_section(real_stack, tmp_path, capsys):
    _, out = real_stack
    pngs = {}
    for z in (None, "0", "1", "2"):
        png = tmp_path / f"z{z}.png"
        code, _, err = run_cli(capsys, "preview", out, png, *(["--z", z] if z else []))
        assert code == 0, err
        pngs[z] = _halves(png, 192, 256)
    assert all(np.array_equal(a, b) for a, b in zip(pngs[None], pngs["1"]))  # default: the middle section
    for a, b in (("0", "1"), ("1", "2"), ("0", "2")):
        assert np.abs(pngs[a][0].astype(int) - pngs[b][0]).mean() > 5, (a, b)  # another section's overlay
    # the overlay is that section's: its labels coloured over its own input section
    labels = zarr.open_group(str(out), mode="r")["labels/membrane/0"][2] != 0
    overlay = pngs["2"][0].astype(int)
    tint = overlay[..., 0] - overlay[..., 2]  # the class colour is red-orange; grey has r == b
    assert tint[labels].mean() > 60 and np.abs(tint[~labels]).max() == 0
    several = tmp_path / "several.png"
    assert run_cli(capsys, "preview", out, several, "--z", "0,2")[0] == 0
    top, bottom = _halves(several, 192, 256, n=2)
    np.testing.assert_array_equal(top[:, :256], pngs["0"][0])
    np.testing.assert_array_equal(top[:, 264:], pngs["2"][0])
    np.testing.assert_array_equal(bottom[:, 264:], pngs["2"][1])


@needs_engine
def test_preview_z_outside_the_stack_is_one_line(real_stack, tmp_path, capsys):
    _, out = real_stack
    for bad in ("3", "0,5", "-1", "one"):
        png = tmp_path / "bad.png"
        code, _, err = run_cli(capsys, "preview", out, png, "--z", bad)
        assert_one_line_error(code, err, "--z")
        assert not png.exists()
    assert "sections 0 to 2" in run_cli(capsys, "preview", out, tmp_path / "x.png", "--z", "3")[2]


@pytest.fixture(scope="module")
def partial_runs(tmp_path_factory, random_engine):
    """A 3-section stack (128 × 160) with its truth, segmented whole and with --z 1:3 and --z 2:3."""
    from tilefeet.convert import write_image, write_labels

    tmp = tmp_path_factory.mktemp("partial")
    images, masks = isbi_slices()
    stack = write_image(np.stack([s[:128, :160] for s in images[:3]]), tmp / "stack.ome.zarr", (4.0, 4.0), chunk=128, z_spacing_nm=50.0)
    write_labels(np.stack([m[:128, :160] for m in masks[:3]]), stack, "membrane")
    kw = dict(tile=128, overlap=32, chunk_size=64, progress=False)
    runs = {z: tilefeet.segment_to_zarr(stack, tmp / f"seg{z.replace(':', '-')}.ome.zarr", random_engine, z_range=z, **kw)
            for z in ("0:3", "1:3", "2:3")}
    return stack, runs


def test_a_z_range_output_is_scored_against_those_sections_of_the_whole_truth(partial_runs):
    stack, runs = partial_runs
    truth = zarr.open_group(str(stack), mode="r")["labels/membrane/0"][:] != 0
    for z, (start, stop) in (("1:3", (1, 3)), ("2:3", (2, 3))):
        ev = evaluate(runs[z], f"{stack}/labels/membrane")
        pred = zarr.open_group(str(runs[z]), mode="r")["labels/membrane/0"][:] != 0
        want = [pixel_metrics(p, t) for p, t in zip(pred, truth[start:stop])]
        assert (ev.pixel.tp, ev.pixel.fp, ev.pixel.fn) == tuple(sum(getattr(m, k) for m in want) for k in ("tp", "fp", "fn"))
        assert ev.sections == stop - start and f"sections {start}:{stop}, as the prediction's --z {start}:{stop}" in ev.truth
    whole = evaluate(runs["0:3"], f"{stack}/labels/membrane")
    assert whole.sections == 3 and "as the prediction's" not in whole.truth


def test_preview_of_a_stack_with_z_start_lays_each_section_on_its_own_input_section(partial_runs, tmp_path, capsys):
    _, runs = partial_runs
    a, b = tmp_path / "full.png", tmp_path / "part.png"
    assert run_cli(capsys, "preview", runs["0:3"], a, "--z", "2")[0] == 0
    assert run_cli(capsys, "preview", runs["1:3"], b, "--z", "1")[0] == 0  # the part's section 1 is the stack's section 2
    np.testing.assert_array_equal(iio.imread(a), iio.imread(b))
    code, _, err = run_cli(capsys, "preview", runs["1:3"], tmp_path / "c.png", "--z", "2")
    assert_one_line_error(code, err, "--z 2 is outside the stack", "sections 0 to 1")


def test_preview_of_a_stack_draws_that_sections_objects(tmp_path, capsys):
    from tilefeet.convert import write_image

    pred, _ = two_objects()
    ids = label(pred, connectivity=3).astype(np.uint32)
    grey = np.random.default_rng(0).integers(0, 255, pred.shape).astype(np.uint8)
    image = write_image(grey, tmp_path / "in.ome.zarr", (4.0, 4.0), chunk=32, z_spacing_nm=50.0)
    out = make_stack_output(tmp_path / "seg.ome.zarr", probs_for(pred), objects=ids)
    pngs = []
    for z in ("0", "1"):
        png = tmp_path / f"o{z}.png"
        code, _, err = run_cli(capsys, "preview", out, png, "--objects", "--z", z, "--image", image)
        assert code == 0, err
        pngs.append(_halves(png, 40, 60)[0].astype(int))
    # B (rows 20:35, x 30:50) is drawn in section 0 and absent from section 1; A is in both
    assert np.abs(pngs[0][20:35, 30:50] - pngs[1][20:35, 30:50]).mean() > 20
    code, _, err = run_cli(capsys, "preview", out, tmp_path / "n.png", "--z", "1", "--image", tmp_path / "missing.ome.zarr")
    assert_one_line_error(code, err, "does not exist")


def test_z_on_a_section_preview_is_one_line(tmp_path, capsys):
    from .test_objects import make_output

    out = make_output(tmp_path / "seg.ome.zarr", probs_for(np.eye(32, dtype=bool)), levels=1)
    code, _, err = run_cli(capsys, "preview", out, tmp_path / "s.png", "--z", "0")
    assert_one_line_error(code, err, "--z", "one section")
