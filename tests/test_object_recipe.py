"""Objects right by default: an engine's object recipe (``engine.toml [objects.<class>]``: minimum
size, hole filling; cells' seed and merge thresholds) is what ``tilefeet objects`` and
``segment --objects`` use unless flags say otherwise, read from the output (segment records it) or
the engine by name, named in one line; ``tilefeet train`` records it from the training masks; and
lucchi-mito's recipe holds on the held-out Lucchi slices."""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from skimage.measure import label

from tilefeet.engine import load_engine, recipe_from_masks
from tilefeet.errors import ConfigError
from tilefeet.objects import label_objects, write_objects

from .conftest import DATA
from .helpers import assert_one_line_error, run_cli
from .test_objects import make_output, probs_for, reference

LUCCHI_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "em" / "lucchi" / "train" / "mitochondrion"


def with_provenance(store: Path, **meta) -> Path:
    """Add keys to a store's segment provenance (what ``tilefeet segment`` records: engine, objects)."""
    root = zarr.open_group(str(store), mode="r+")
    attrs = dict(root.attrs["ome"])
    attrs["multiscales"][0]["metadata"].update(meta)
    root.attrs["ome"] = attrs
    return store


def mito_mask(h: int = 96, w: int = 128) -> np.ndarray:
    """Rings (objects with holes), solid blobs and specks of 1-4 px."""
    m = np.zeros((h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    for cy, cx, r in ((20, 20, 12), (60, 40, 14), (30, 90, 10)):
        d = np.hypot(yy - cy, xx - cx)
        m |= (d < r) & (d > r / 2.5)  # a ring: its middle is a hole
    m[70:90, 80:110] = True
    rng = np.random.default_rng(3)
    for y, x in rng.integers(0, [h - 2, w - 2], (12, 2)):
        m[y : y + rng.integers(1, 3), x : x + rng.integers(1, 3)] = True
    return m


def test_the_recipe_an_output_records_is_used_and_flags_override_it(tmp_path, capsys):
    mask = mito_mask()
    store = with_provenance(make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=32), engine="demo",
                            objects={"mitochondrion": {"min_size_nm2": 20 * 25.0, "fill_holes": True, "why": "a test recipe"}})
    result = write_objects(store, block_size=32)
    want = reference(mask, fill=True, min_px=20)
    assert reference(mask).max() > want.max() and (ndi.binary_fill_holes(mask) != mask).any()  # specks and holes to act on
    np.testing.assert_array_equal(zarr.open_array(str(result.path / "0"), mode="r")[:], want)
    assert result.recipe == "recipe from the engine demo: min size 0.0005 µm² (a test recipe), holes filled"
    np.testing.assert_array_equal(label_objects(store, block_size=64).labels.compute(), want)  # the lazy call too
    # flags win, and the line says so
    result = write_objects(store, block_size=32, overwrite=True, min_size=0, fill_holes=False)
    np.testing.assert_array_equal(zarr.open_array(str(result.path / "0"), mode="r")[:], reference(mask))
    assert result.recipe == "flags: min size 0 (--min-size), holes kept (--no-fill-holes)"
    code, out, err = run_cli(capsys, "objects", store, "--overwrite", "-q", "--no-fill-holes")
    assert code == 0, err
    assert out.splitlines()[0] == "recipe from the engine demo: min size 0.0005 µm² (a test recipe), holes kept (--no-fill-holes)"
    np.testing.assert_array_equal(zarr.open_array(str(result.path / "0"), mode="r")[:], reference(mask, min_px=20))


def test_the_recipe_is_found_by_the_engine_name_else_none(tmp_path):
    mask = mito_mask(160, 160)
    mask[100:130, 100:130] = True  # 900 px: kept by lucchi-mito's 9404 nm² (377 px at 5 nm); the rings are not
    store = with_provenance(make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=32), engine="lucchi-mito")
    recipe = load_engine("lucchi-mito").raw["objects"]["mitochondrion"]
    result = write_objects(store, block_size=64)
    min_px = math.ceil(recipe["min_size_nm2"] / 25.0)
    np.testing.assert_array_equal(zarr.open_array(str(result.path / "0"), mode="r")[:], reference(mask, fill=True, min_px=min_px))
    assert result.recipe.startswith(f"recipe from the engine lucchi-mito: min size {recipe['min_size_nm2'] / 1e6:.4g} µm² (percentile 2")
    other = with_provenance(make_output(tmp_path / "other.ome.zarr", probs_for(mask), chunk=32), engine="no-such-engine")
    result = write_objects(other, block_size=64)
    np.testing.assert_array_equal(zarr.open_array(str(result.path / "0"), mode="r")[:], reference(mask))
    assert result.recipe == "the engine no-such-engine records no object recipe for this class: no min size, holes kept"


def test_an_array_takes_the_recipe_of_the_engine_it_names(tmp_path):
    """A library user's in-memory map (tilefeet.segment's, say): engine= applies that
    engine's recipe as `tilefeet objects` would; a segment output refuses it (it records its own)."""
    mask = mito_mask(160, 160)
    mask[100:130, 100:130] = True
    recipe = load_engine("lucchi-mito").raw["objects"]["mitochondrion"]
    min_px = math.ceil(recipe["min_size_nm2"] / 25.0)
    objects = label_objects(probs_for(mask), engine="lucchi-mito", class_name="mitochondrion", pixel_size_nm="5nm", block_size=64)
    np.testing.assert_array_equal(objects.labels.compute(), reference(mask, fill=True, min_px=min_px))
    plain = label_objects(probs_for(mask), class_name="mitochondrion", pixel_size_nm="5nm", block_size=64)
    np.testing.assert_array_equal(plain.labels.compute(), reference(mask))
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=32)
    with pytest.raises(ConfigError, match="records its own engine"):
        label_objects(store, engine="lucchi-mito")


def test_a_stack_takes_the_recipe_per_section(tmp_path):
    from .test_objects3d import SPACING, blobs, make_stack_output
    from .test_objects3d import probs_for as probs3

    mask = blobs((4, 48, 48), 2)
    store = with_provenance(make_stack_output(tmp_path / "stack.ome.zarr", probs3(mask)), engine="demo",
                            objects={"mitochondrion": {"min_size_nm2": 30 * SPACING[1] * SPACING[2], "fill_holes": False}})
    result = write_objects(store, block_size=(2, 32, 32))
    ids = zarr.open_array(str(result.path / "0"), mode="r")[:]
    lab = label(mask, connectivity=3)
    keep = np.bincount(lab.ravel()) >= 30  # 30 px × one section thickness, in voxels
    keep[0] = False
    np.testing.assert_array_equal(ids > 0, keep[lab])
    assert "min size" in result.recipe and "per section" in result.recipe and "µm³" in result.recipe


@pytest.mark.skipif(not LUCCHI_TRAIN.is_dir(), reason="needs the shared Lucchi training masks")
def test_lucchi_mito_recipe_is_the_rule_on_its_training_masks():
    masks = [iio.imread(f) for f in sorted(LUCCHI_TRAIN.glob("*.png"))]
    got = recipe_from_masks([(m if m.ndim == 2 else m[..., 0]) > 127 for m in masks], (5.0, 5.0))
    recipe = load_engine("lucchi-mito").raw["objects"]["mitochondrion"]
    assert len(masks) == 27 and got == recipe
    assert got["fill_holes"] is True and 0.005e6 < got["min_size_nm2"] < 0.02e6


def test_train_records_the_recipe_and_a_fine_tune_keeps_its_parents_cells(tmp_path):
    from tilefeet.convert import write_image
    from tilefeet.train import train_from_zarr

    img = iio.imread(DATA / "isbi" / "image" / "24.png")[:128, :160]
    membrane = iio.imread(DATA / "isbi" / "label" / "24.png")[:128, :160] == 0
    write_image(img, tmp_path / "one.ome.zarr", (4.0, 4.0))
    write_image(membrane.astype(np.uint8), tmp_path / "mask.ome.zarr", (4.0, 4.0))
    result = train_from_zarr(tmp_path / "one.ome.zarr", [tmp_path / "mask.ome.zarr"], tmp_path / "eng", classes=["membrane"],
                             parent="isbi-membrane", checkpoint_dir=None, progress=False, steps=1, crop=64, batch_size=1, val_every=1)
    table = result.bundle.raw["objects"]["membrane"]
    assert set(table) == {"min_size_nm2", "fill_holes", "why", "cells"} and "training masks" in table["why"]
    assert table["min_size_nm2"] >= 0 and isinstance(table["fill_holes"], bool)
    parent = load_engine("isbi-membrane").raw["objects"]["membrane"]["cells"]
    assert {k: v for k, v in table["cells"].items() if k != "why"} == {k: v for k, v in parent.items() if k != "why"}
    assert "the parent isbi-membrane's" in table["cells"]["why"]


def test_segment_objects_uses_lucchi_mitos_recipe_and_says_so(tmp_path, capsys):
    """The shipped engine on a held-out Lucchi slice, defaults only: the plan names the recipe, the
    objects follow it, and evaluate names it too; object F1 rises over no recipe (measured on
    testing0000: 0.927 against 0.864; over all 5 test slices 0.908 against 0.774)."""
    src, out = tmp_path / "s.ome.zarr", tmp_path / "p.ome.zarr"
    assert run_cli(capsys, "-q", "convert", DATA / "lucchi" / "image" / "testing0000.png", src, "--pixel-size", "5nm")[0] == 0
    assert run_cli(capsys, "-q", "convert", DATA / "lucchi" / "mitochondrion" / "testing0000.png", src, "--labels", "mitochondrion")[0] == 0
    code, _, err = run_cli(capsys, "segment", src, out, "-e", "lucchi-mito", "--intensity", "bundle", "--objects")
    assert code == 0, err
    recipe = load_engine("lucchi-mito").raw["objects"]["mitochondrion"]
    assert f"objects mitochondrion: recipe from the engine lucchi-mito: min size {recipe['min_size_nm2'] / 1e6:.4g} µm²" in err
    assert "holes filled" in err
    import pandas as pd

    table = pd.read_parquet(out / "labels" / "mitochondrion-objects" / "objects.parquet")
    assert table["area_nm2"].min() >= recipe["min_size_nm2"]
    code, text, err = run_cli(capsys, "evaluate", out, src / "labels" / "mitochondrion", "--objects", "--json")
    assert code == 0, err
    scored = json.loads(text)["objects"]
    assert "recipe from the engine lucchi-mito" in scored["predicted"]
    assert scored["f1"] > 0.9
    assert run_cli(capsys, "-q", "objects", out, "--overwrite", "--min-size", "0", "--no-fill-holes")[0] == 0
    bare = json.loads(run_cli(capsys, "evaluate", out, src / "labels" / "mitochondrion", "--objects", "--json")[1])["objects"]
    assert bare["f1"] < scored["f1"] - 0.03


def test_cell_options_are_checked_in_one_line(tmp_path, capsys):
    mem = mito_mask()
    store = make_output(tmp_path / "seg.ome.zarr", probs_for(mem), classes=("membrane",), chunk=32)
    for args, needles in (
        (("--cells", "--seed-threshold", "1.5"), ("--seed-threshold", "between 0 and 1")),
        (("--cells", "--merge-threshold", "-0.2"), ("--merge-threshold",)),
        (("--seed-threshold", "0.2"), ("add --cells",)),
        (("--cells", "--cell-method", "grow", "--merge-threshold", "0.3"), ("--cell-method grow", "never merges")),
        (("--cells", "--cell-method", "flood"), ("--cell-method", "watershed or grow")),
        (("--cells", "--threshold", "0.6"), ("--threshold 0.6", "--seed-threshold")),
    ):
        code, _, err = run_cli(capsys, "objects", store, *args)
        assert_one_line_error(code, err, *needles)
        assert not (store / "labels" / "membrane-cells").exists() and not list(tmp_path.glob("*.partial"))
    code, out, err = run_cli(capsys, "objects", store, "--cells", "--merge-threshold", "0", "-q")
    assert code == 0, err
    assert out.splitlines()[0].startswith("cells: seeds below p 0.05, a watershed reaching 160 nm, neighbours never merged, no min size")
