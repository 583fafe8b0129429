"""OpenVINO, ``--precision auto`` and the accuracy guard (the conformance suite covers the runner's
contract: tests/test_runner_conformance.py).

The runner: fp32 means f32 (OpenVINO would pick bf16 by itself on a CPU with native bf16), the
thread count is OpenVINO's, the compiled model is cached per engine, precision and CPU, and a
segmentation is bit-identical across block sizes. ``--precision auto``: bf16 only where the CPU runs
it natively, it is faster, and the guard passed on the engine's check slices; the plan and the
provenance say what ran and why, with the guard's figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import zarr

import tilefeet
from tests.conftest import isbi_montage, make_random_engine
from tilefeet.errors import BackendUnavailableError, ConfigError
from tilefeet.runners import RunnerSpec, runner_class
from tilefeet.runners.guard import MAX_F1_CHANGE, MAX_OBJECTS_ARE, MIN_AGREEMENT, check_data, check_precision, failures, verdict
from tilefeet.runners.openvino_runner import precisions, unavailable_reason
from tilefeet.runners.select import choose, native_bf16

TILE = (64, 96)

needs_openvino = pytest.mark.skipif(
    unavailable_reason(torch.device("cpu")) is not None, reason=str(unavailable_reason(torch.device("cpu")))
)
needs_bf16 = pytest.mark.skipif(
    native_bf16() is None or "bf16" not in precisions(), reason="this CPU has no native bf16 (AMX or AVX512_BF16) for OpenVINO"
)


@pytest.fixture(scope="module")
def bundle(runner_bundle):
    return runner_bundle


def ov_runner(bundle, precision="fp32", batch=2, tile=TILE, **options):
    spec = RunnerSpec(str(bundle.path), "openvino", "cpu", precision, batch, tile, tuple(sorted(options.items())))
    return runner_class("openvino")(bundle, spec)


# ------------------------------------------------------------------------------------ the runner


@needs_openvino
def test_fp32_means_f32_even_where_openvino_would_pick_bf16(bundle):
    runner = ov_runner(bundle, "fp32")
    assert str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
    x = torch.randn(2, 1, *TILE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = bundle.build_model()(x)
    assert float((runner(x) - expected).abs().max()) < 1e-5


@needs_openvino
@needs_bf16
def test_bf16_computes_in_bf16(bundle):
    runner = ov_runner(bundle, "bf16")
    assert "bf16" in str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")).lower() or "bfloat16" in str(
        runner.compiled.get_property("INFERENCE_PRECISION_HINT")
    )
    x = torch.randn(2, 1, *TILE, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(runner(x), ov_runner(bundle, "fp32")(x))  # it really computed in reduced precision


@needs_openvino
def test_the_thread_count_is_openvinos(bundle):
    assert ov_runner(bundle, threads=1).compiled.get_property("INFERENCE_NUM_THREADS") == 1


@needs_openvino
def test_the_compiled_model_is_cached_per_engine_precision_and_shape(bundle):
    first = ov_runner(bundle, "fp32")
    assert first.cache.is_dir() and any(first.cache.iterdir()), "OpenVINO wrote no compiled blob"
    blobs = sorted(p.name for p in first.cache.iterdir())
    again = ov_runner(bundle, "fp32")
    assert again.cache == first.cache and sorted(p.name for p in again.cache.iterdir()) == blobs  # loaded, not compiled anew
    other_shape = ov_runner(bundle, "fp32", batch=3)
    assert other_shape.cache != first.cache
    if "bf16" in precisions():
        assert ov_runner(bundle, "bf16").cache != first.cache
    assert first.cache.parent.name == "openvino" and first.cache.name.startswith(f"{bundle.name}-fp32-")


@needs_openvino
def test_segmentation_is_bit_identical_across_block_sizes(tmp_path, random_engine):
    from tilefeet.convert import write_image

    img = isbi_montage(1, 2)[0][:400, :700]
    src = write_image(img, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)
    outs = []
    for block in (128, 384):
        out = tmp_path / f"out-{block}.ome.zarr"
        tilefeet.segment_to_zarr(src, out, random_engine, backend="openvino", precision="fp32", block_size=block, chunk_size=128)
        outs.append(np.asarray(zarr.open_group(str(out), mode="r")["0"][...]))
    assert np.array_equal(outs[0], outs[1])


def test_a_cuda_device_is_refused_in_one_line(bundle):
    with pytest.raises((BackendUnavailableError, ConfigError)) as e:
        ov_runner_on(bundle, "cuda")
    assert "\n" not in str(e.value) and ("CPU" in str(e.value) or "CUDA" in str(e.value))


def ov_runner_on(bundle, device):
    spec = RunnerSpec(str(bundle.path), "openvino", device, "fp32", 2, TILE)
    return runner_class("openvino")(bundle, spec)


def test_without_openvino_auto_still_runs_and_says_why_in_one_line(bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as on a machine where it cannot load
    choice = choose(bundle, device="cpu", precision="fp32", batch_size=2, tile=TILE, cache=tmp_path)
    assert choice.backend in ("onnxruntime", "torch") and "openvino: backend 'openvino' needs the openvino package: pip install openvino" in choice.reason
    with pytest.raises(BackendUnavailableError) as e:
        ov_runner(bundle)
    assert "\n" not in str(e.value) and "pip install openvino" in str(e.value)


# -------------------------------------------------------------------------------- the guard


def test_the_verdict_allows_at_most_0_002_of_f1():
    assert MAX_F1_CHANGE == 0.002
    assert verdict(0.8000, 0.8020) and verdict(0.8020, 0.8000) and verdict(0.8, 0.8)
    assert not verdict(0.8000, 0.8021) and not verdict(0.8121, 0.81)


def test_the_guard_also_bounds_changed_labels_and_objects():
    """F1 against the truth can stay while labels and cells move (errors that cancel; seeds at p < 0.05
    that a label threshold of 0.5 does not see): each rule fails on its own, and says which."""
    assert (MIN_AGREEMENT, MAX_OBJECTS_ARE) == (0.99, 0.01)
    assert failures(0.8059, 0.8063, 0.9971, 0.0055) == []  # isbi-membrane int8 on this project's CPU
    assert failures(0.8, 0.8, 0.99, 0.01) == [] and failures(0.8, 0.8, 0.99, float("nan")) == []  # no objects: no rule
    assert failures(0.8, 0.8, 0.9899, 0.0) == ["labels agree 0.9899 < 0.99"]
    assert failures(0.8, 0.8, 1.0, 0.0101) == ["objects ARE 0.0101 > 0.01"]
    assert failures(0.79, 0.8, 0.9, 0.5) == ["F1 moved by -0.0100", "labels agree 0.9000 < 0.99", "objects ARE 0.5000 > 0.01"]
    from tilefeet.objects.cells import CellRecipe
    from tilefeet.runners.guard import DEFAULT_SEED_THRESHOLD

    assert CellRecipe().seed_threshold == DEFAULT_SEED_THRESHOLD  # the guard's copy of the objects' default (the layers)


def test_the_bundled_engines_carry_check_slices():
    from tilefeet.engine import load_engine

    isbi = check_data(load_engine("isbi-membrane"))
    assert isbi is not None and len(isbi.images) == 6 and isbi.class_name == "membrane"
    assert all(m.shape == i.shape == (512, 512) for i, m in zip(isbi.images, isbi.masks))
    lucchi = check_data(load_engine("lucchi-mito"))
    assert lucchi is not None and lucchi.class_name == "mitochondrion" and len(lucchi.images) == 2


def with_check(folder, *, sharpen: float, seed: int = 0):
    """A random engine that carries two check slices (real ISBI texture, its membrane masks) in a
    ``[check]`` table, as any engine may."""
    engine = make_random_engine(folder, seed=seed, sharpen=sharpen, tile=128)
    (engine.path / "check").mkdir()
    imgs, mems = isbi_montage(1, 2)
    for i in range(2):
        iio.imwrite(engine.path / "check" / f"{i}.png", imgs[:192, 256 * i : 256 * i + 192])
        iio.imwrite(engine.path / "check" / f"{i}-label.png", mems[:192, 256 * i : 256 * i + 192].astype(np.uint8) * 255)
    toml = engine.path / "engine.toml"
    toml.write_text(
        toml.read_text()
        + '\n[check]\nimages = ["check/0.png", "check/1.png"]\nlabels = ["check/0-label.png", "check/1-label.png"]\n'
        + 'class = "membrane"\ndata = "two ISBI crops"\n'
    )
    from tilefeet.engine import load_engine

    return load_engine(engine.path)


@needs_openvino
@needs_bf16
def test_the_guard_records_its_figures_once_per_engine_backend_precision_and_cpu(tmp_path):
    engine = with_check(tmp_path / "engine", sharpen=200.0)
    guard = check_precision(engine, "openvino", "bf16", batch_size=2, cache=tmp_path / "cache")
    assert guard is not None and guard.data == "two ISBI crops" and guard.pixels == 2 * 192 * 192
    assert 0 < guard.p99_abs_diff <= guard.max_abs_diff < 0.1 and 0 <= guard.f1 <= 1 and 0 <= guard.f1_fp32 <= 1
    assert guard.objects == "objects" and 0 <= guard.objects_are <= 1  # a random engine records no cell recipe
    assert guard.passed == (not guard.failures()) and guard.failures() == failures(guard.f1, guard.f1_fp32, guard.agreement_f1, guard.objects_are)
    stored = json.loads(Path(guard.path).read_text())
    again = check_precision(engine, "openvino", "bf16", batch_size=2, cache=tmp_path / "cache")
    assert again == guard and json.loads(Path(guard.path).read_text())["measured"] == stored["measured"]  # read, not measured again
    assert check_precision(engine, "torch", "bf16", batch_size=2, cache=tmp_path / "cache").path != guard.path


def test_an_engine_without_check_data_is_not_guarded(bundle, tmp_path):
    assert check_data(bundle) is None and check_precision(bundle, "torch", "bf16", cache=tmp_path) is None


@needs_bf16
def test_auto_keeps_fp32_for_an_engine_without_check_data_and_says_why(bundle, tmp_path):
    choice = choose(bundle, device="cpu", precision="auto", batch_size=2, tile=TILE, cache=tmp_path)
    assert choice.precision == "fp32" and "int8 not considered" in choice.reason and "carries 0" in choice.reason
    rates = json.loads(next((tmp_path / "select").glob("*.json")).read_text())["mpx_per_s"]
    faster_bf16 = [k for k, v in rates.items() if k.endswith("bf16") and v > max(r for n, r in rates.items() if n.endswith("fp32"))]
    if faster_bf16:
        assert "carries no check data" in choice.reason


@needs_openvino
@needs_bf16
def test_precision_auto_runs_bf16_only_after_the_guard_and_says_so_in_plan_and_provenance(tmp_path):
    engine = with_check(tmp_path / "engine", sharpen=200.0)
    from tilefeet.convert import write_image

    src = write_image(isbi_montage(1, 1)[0][:256, :256], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)
    run = tilefeet.plan_segmentation(src, engine, backend="auto", precision="auto", batch_size=2)
    line = next(ln for ln in run.describe().splitlines() if ln.startswith("backend"))
    assert run.runner.precision in ("fp32", "bf16", "int8") and f", {run.runner.precision} (" in line
    assert "Mpx/s" in line and "measured on 2×128×128 tiles" in line
    if run.runner.precision != "fp32":
        assert f"{run.runner.precision} passes the accuracy guard on two ISBI crops" in line and "|Δp| p99" in line
    out = tmp_path / "out.ome.zarr"
    tilefeet.segment_to_zarr(src, out, engine, backend="auto", precision="auto", batch_size=2)
    runner = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["metadata"]["runner"]
    assert runner["backend"] == run.runner.backend and runner["precision"] == run.runner.precision
    assert runner["reason"] == run.backend_reason  # the same choice, read from the cache


def test_explicit_precisions_are_kept_and_gpus_default_to_fp32(bundle, tmp_path):
    choice = choose(bundle, device="cpu", precision="fp32", batch_size=2, tile=TILE, prefer="torch", cache=tmp_path)
    assert (choice.backend, choice.precision) == ("torch", "fp32") and choice.reason == "--backend torch was requested"


class _Step(torch.nn.Module):
    """1000 · (x − c): a label is x ≥ c, so the labels change wherever rounding moves x across c."""

    def __init__(self, c: float):
        super().__init__()
        self.register_buffer("c", torch.tensor(c, dtype=torch.float32))

    def forward(self, x):
        return (x - self.c) * 1000.0


def test_the_guard_fails_a_precision_that_moves_f1(tmp_path):
    """A network whose labels flip for every pixel of one grey level when its input is rounded to bf16
    (c between that level's fp32 value and its bf16 rounding), checked against its own fp32 labels:
    fp32 scores F1 1, bf16 loses that level's pixels, and the guard fails it with the figures."""
    from tilefeet.engine import bundle_from_module, load_engine, parse_normalization

    norm = parse_normalization("meanstd:125,43")
    img = isbi_montage(1, 1)[0][:256, :256]
    levels, counts = np.unique(img, return_counts=True)
    for k in levels[np.argsort(-counts)]:  # the most frequent level whose bf16 rounding goes up
        v = np.float32(norm.to_network(np.array([k], np.float32))[0])
        up = float(torch.tensor(float(v)).to(torch.bfloat16).float())
        if up > v:
            break
    c = float(np.float32((float(v) + up) / 2))
    assert v < c < up
    bundle = bundle_from_module(_Step(c), pixel_size_nm="4nm", classes=["membrane"], normalization=norm, cache=tmp_path / "modules")
    (bundle.path / "check").mkdir()
    iio.imwrite(bundle.path / "check" / "0.png", img)
    truth = norm.to_network(img.astype(np.float32)) >= np.float32(c)
    iio.imwrite(bundle.path / "check" / "0-label.png", truth.astype(np.uint8) * 255)
    toml = bundle.path / "engine.toml"
    toml.write_text(toml.read_text() + '\n[check]\nimages = ["check/0.png"]\nlabels = ["check/0-label.png"]\ndata = "a step at one grey level"\n')
    guard = check_precision(load_engine(bundle.path), "torch", "bf16", batch_size=2, cache=tmp_path / "cache")
    assert guard is not None and guard.f1_fp32 == 1.0
    assert not guard.passed and guard.f1_fp32 - guard.f1 > MAX_F1_CHANGE
    assert "fails the accuracy guard on a step at one grey level" in guard.describe() and f"{guard.f1:.4f}" in guard.describe()
