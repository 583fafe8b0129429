"""``tilefeet train`` as a user meets it: an annotated OME-Zarr stack in, a working engine bundle out;
a resumed run continues its checkpoint; bad inputs are one line and exit 2. Tiny networks, few steps."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import zarr

from tilefeet.cli import main
from tilefeet.convert import write_image
from tilefeet.engine import load_engine
from tilefeet.training_data import ValidationSplit, parse_slices, split_region, split_stack

from .conftest import DATA

SLICES = (24, 25, 26, 27)  #: ISBI slices of tests/data, cropped to CROP to keep the runs short
CROP = (160, 192)
TINY = ("--crop", "64", "--batch-size", "2", "--base-channels", "4", "--tile", "64", "--overlap", "16", "--val-every", "2")


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["-q", *(str(a) for a in args)])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tilefeet: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    """Four ISBI slices as a (z, y, x) OME-Zarr at 4 nm with labels/membrane, made by `tilefeet convert`."""
    tmp = tmp_path_factory.mktemp("stack")
    for kind in ("image", "label"):
        (tmp / kind).mkdir()
        for i in SLICES:
            iio.imwrite(tmp / kind / f"{i}.png", iio.imread(DATA / "isbi" / kind / f"{i}.png")[: CROP[0], : CROP[1]])
    out = tmp / "train.ome.zarr"
    assert main(["-q", "convert", str(tmp / "image"), str(out), "--stack", "--pixel-size", "4nm", "--chunk", "128"]) == 0
    assert main(["-q", "convert", str(tmp / "label"), str(out), "--stack", "--labels", "membrane", "--foreground", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory) -> Path:
    """A 6-step engine trained through the CLI, validating on the last slice."""
    out = tmp_path_factory.mktemp("engines") / "tiny-membrane"
    ckpt = out.parent / "ckpt"
    args = [stack, "--labels", stack / "labels" / "membrane", "--out", out, "--val-slices", "3", "--steps", "6", *TINY]
    assert main(["-q", "train", *map(str, args), "--checkpoint-dir", str(ckpt)]) == 0
    return out


def test_bundle_records_what_inference_needs(trained):
    b = load_engine(trained)
    assert b.name == "tiny-membrane" and b.classes == ("membrane",)
    assert b.pixel_size_nm == (4.0, 4.0)
    n = b.normalization
    assert n.method == "meanstd" and 50 < n.mean < 220 and n.std > 10
    assert len(n.histogram) == 256 and n.histogram_range == (0.0, 256.0)
    assert np.isclose(np.sum(n.histogram), 1.0)  # a density over unit-wide bins
    assert dict(b.architecture) == {"name": "unet2d", "base_channels": 4, "depth": 4}
    training = b.raw["training"]
    assert training["validation_slices"] == [3] and training["steps"] == 6
    assert training["training_pixels"] == 3 * CROP[0] * CROP[1]
    assert 0.0 <= b.metrics["validation_f1"][0] <= 1.0


def test_trained_bundle_segments_and_records_its_scores(trained, tmp_path):
    import shutil

    import tilefeet
    from tilefeet.convert import write_labels
    from tilefeet.evaluate import evaluate
    from tilefeet.train import evaluation_metrics, record_metrics

    img = iio.imread(DATA / "isbi" / "image" / "28.png")[:96, :128]
    section = write_image(img, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=64)
    out = tilefeet.segment_to_zarr(section, tmp_path / "o.ome.zarr", engine=trained, chunk_size=64, block_size=128)
    probs = zarr.open_group(str(out), mode="r")["0"][:]
    assert probs.shape[-2:] == (96, 128) and probs.dtype == np.uint8
    assert probs.max() > probs.min()  # the network responds to the image, not a constant

    write_labels(iio.imread(DATA / "isbi" / "label" / "28.png")[:96, :128], section, "membrane", foreground=[0])
    ev = evaluate(out, section / "labels" / "membrane")
    bundle = record_metrics(shutil.copytree(trained, tmp_path / "b"), {"held_out": evaluation_metrics(ev.to_dict(), "slice 28")})
    assert bundle.metrics["held_out"]["pixel_f1"] == round(ev.pixel.f1, 4) and bundle.metrics["held_out"]["pixels"] == 96 * 128
    assert bundle.metrics["validation_f1"] == load_engine(trained).metrics["validation_f1"]  # merged, not replaced


def test_resume_continues_the_checkpoint(stack, tmp_path, capsys):
    out, ckpt = tmp_path / "eng", tmp_path / "ckpt"
    base = [stack, "--labels", stack / "labels" / "membrane", "--out", out, "--val-slices", "3", "--checkpoint-dir", ckpt, *TINY]
    code, err = run_cli(capsys, "train", *base, "--steps", "4")
    assert code == 0, err
    first = json.loads((out / "training_history.json").read_text())
    assert [h["step"] for h in first] == [2, 4]

    code, err = run_cli(capsys, "train", *base, "--steps", "6")
    assert_one_line_error(code, err, "--resume")
    code, err = run_cli(capsys, "train", *base, "--steps", "6", "--resume", "--lr", "0.01")
    assert_one_line_error(code, err, "other settings", "lr was 0.002, now 0.01")

    code, err = run_cli(capsys, "train", *base, "--steps", "6", "--resume")
    assert code == 0, err
    history = json.loads((out / "training_history.json").read_text())
    assert history[:2] == first  # steps 1-4 were not redone: their records came from the checkpoint
    assert [h["step"] for h in history] == [2, 4, 6]
    assert tomllib.loads((out / "engine.toml").read_text())["training"]["steps"] == 6


def test_label_shape_mismatch_is_one_line(stack, tmp_path, capsys):
    other = write_image(np.zeros((3, *CROP), np.uint8), tmp_path / "l.ome.zarr", (4.0, 4.0))
    code, err = run_cli(capsys, "train", stack, "--labels", other, "--out", tmp_path / "e", *TINY)
    assert_one_line_error(code, err, "(3, 160, 192)", "(4, 160, 192)", str(other), str(stack))


def test_missing_pixel_size_needs_the_flag(stack, tmp_path, capsys):
    img = zarr.open_group(str(stack), mode="r")["0"][:]
    bare = write_image(img, tmp_path / "bare.ome.zarr", (4.0, 4.0))
    root = zarr.open_group(str(bare), mode="r+")
    ome = dict(root.attrs["ome"])
    for axis in ome["multiscales"][0]["axes"]:
        axis.pop("unit")
    root.attrs["ome"] = ome
    code, err = run_cli(capsys, "train", bare, "--labels", stack / "labels" / "membrane", "--out", tmp_path / "e", *TINY)
    assert_one_line_error(code, err, "no physical pixel size", "--pixel-size")


def test_bad_options_are_one_line(stack, tmp_path, capsys):
    labels = stack / "labels" / "membrane"
    code, err = run_cli(capsys, "train", stack, "--labels", labels, "--out", tmp_path / "e", "--crop", "100")
    assert_one_line_error(code, err, "--crop 100", "multiple of 16")
    code, err = run_cli(capsys, "train", stack, "--labels", labels, "--out", tmp_path / "e", "--val-slices", "9")
    assert_one_line_error(code, err, "--val-slices [9]", "0..3")
    code, err = run_cli(capsys, "train", stack, "--labels", labels, "--labels", labels, "--out", tmp_path / "e")
    assert_one_line_error(code, err, "class names must differ")


def test_single_image_holds_out_a_band(stack, tmp_path):
    from tilefeet.train import train_from_zarr

    img = write_image(zarr.open_group(str(stack), mode="r")["0"][0], tmp_path / "one.ome.zarr", (4.0, 4.0))
    mask = zarr.open_group(str(stack), mode="r")["labels/membrane/0"][0]
    write_image(mask, tmp_path / "mask.ome.zarr", (4.0, 4.0))
    result = train_from_zarr(
        img, [tmp_path / "mask.ome.zarr"], tmp_path / "eng", classes=["membrane"], split=ValidationSplit(fraction=0.25),
        checkpoint_dir=None, progress=False, steps=2, crop=64, batch_size=2, base_channels=4, val_every=2,
    )
    training = result.bundle.raw["training"]
    assert training["validation_region"] == [0, 128, 160, 192]  # the last 64 px (minimum band) of the longer x axis
    assert training["training_pixels"] == 160 * 128 and training["validation_pixels"] == 160 * 64
    assert 0.0 <= result.best_val_f1[0] <= 1.0


def test_splits():
    assert split_stack(30, ValidationSplit(slices=(21, 22, 23))) == ([*range(21), *range(24, 30)], [21, 22, 23])
    assert split_stack(27, ValidationSplit(fraction=0.1)) == (list(range(24)), [24, 25, 26])
    assert split_stack(5, ValidationSplit(fraction=0.0)) == ([0, 1, 2, 3, 4], [])
    assert parse_slices("24-26,3") == (3, 24, 25, 26)
    train, val = split_region((512, 1024), 0.2)
    assert (train.shape, val.shape, val.x0) == ((512, 819), (512, 205), 819)
    train, val = split_region((300, 100), 0.1)
    assert (train.shape, val.y0) == ((236, 100), 236)  # the minimum band of 64 px along the longer y axis
