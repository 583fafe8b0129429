"""int8: the engine's ONNX export quantized for OpenVINO, calibrated on half the engine's check
slices; the other half is what the accuracy guard judges it on (benchmarks/bench_int8.py measures its
speed; tests/test_backend_select.py when ``--precision auto`` chooses it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import tilefeet
from tilefeet.engine import load_engine
from tilefeet.runners.guard import check_precision
from tilefeet.runners.openvino_runner import precisions
from tilefeet.runners.quantize import int8_graph

from .conftest import bundled_engine_available
from .helpers import assert_one_line_error, run_cli

pytestmark = [
    pytest.mark.skipif(not bundled_engine_available(), reason="engines/isbi-membrane is not in this checkout"),
    pytest.mark.skipif("int8" not in precisions(), reason="OpenVINO has no int8 on this CPU (no VNNI or AMX-INT8)"),
]


@pytest.fixture(scope="module")
def isbi():
    return load_engine("isbi-membrane")


def test_the_guard_judges_int8_on_check_slices_its_calibration_never_saw(isbi, tmp_path):
    """Calibrated on ISBI slices 24–26, judged on 27–29: labels within the guard's 0.002 of fp32's
    F1, cells (isbi-membrane's recipe) within its ARE (bench_int8: F1 0.8059 vs 0.8063, p99 |Δp| 0.014)."""
    graph = int8_graph(isbi)
    record = json.loads((graph.parent / "int8.json").read_text())
    assert record["calibrated_on"].endswith("the first 3 of 6")
    assert int8_graph(isbi) == graph  # built once
    guard = check_precision(isbi, "openvino", "int8", batch_size=2, cache=tmp_path)
    assert guard is not None and guard.pixels == 3 * 512 * 512 and "the last 3 (int8 was calibrated on the first 3)" in guard.data
    assert guard.passed and abs(guard.f1_change) <= 0.002 and guard.agreement_f1 >= 0.99, guard.describe()
    assert guard.objects.startswith("cells (watershed from seeds below p 0.05") and 0 < guard.objects_are <= 0.01  # int8 did run
    assert 0 < guard.p99_abs_diff <= 0.03


def test_the_int8_runner_keeps_the_runner_contract(isbi):
    """What tests/test_runner_conformance.py asks of every runner (its random networks carry no check
    slices to calibrate on): float32 probabilities of the right shape, the same bits on a repeat and
    whatever the batch's other tiles, inputs untouched, outputs not reused."""
    import torch

    from tilefeet.runners import RunnerSpec, runner_class

    tile = (isbi.tile, isbi.tile)
    runner = runner_class("openvino")(isbi, RunnerSpec(str(isbi.path), "openvino", "cpu", "int8", 2, tile))
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(2, 1, *tile, generator=g) * 4 - 2, torch.rand(2, 1, *tile, generator=g) * 4 - 2
    before = x1.clone()
    y1 = runner(x1)
    kept = y1.clone()
    y2 = runner(x2)
    assert y1.shape == (2, isbi.out_channels, *tile) and y1.dtype == torch.float32 and y1.min() >= 0 and y1.max() <= 1
    assert torch.equal(x1, before) and torch.equal(y1, kept) and not torch.equal(y1, y2)
    assert torch.equal(runner(x1), y1)  # repeats bit for bit
    mixed = torch.cat([x1[:1], x2[1:]])
    assert torch.equal(runner(mixed)[0], y1[0])  # a tile's result does not depend on its batch neighbours
    runner.close()


def _sample(tmp_path):
    from tilefeet.convert import write_image
    from tilefeet.sample import PIXEL_SIZE_NM, montage

    return write_image(montage(2, 2, mirror=False)[0], tmp_path / "sample.ome.zarr", PIXEL_SIZE_NM, chunk=512)


def test_segment_int8_is_bit_identical_across_block_sizes_and_says_what_ran(tmp_path, isbi):
    src = _sample(tmp_path)
    outs = [tilefeet.segment_to_zarr(src, tmp_path / f"b{b}.ome.zarr", "isbi-membrane", backend="openvino", precision="int8",
                                     block_size=b, chunk_size=512)
            for b in (512, 1024)]
    a, b = (zarr.open_group(str(o), mode="r") for o in outs)
    np.testing.assert_array_equal(a["0"][:], b["0"][:])
    provenance = json.dumps(dict(a.attrs))
    assert "int8" in provenance and "openvino" in provenance


def test_int8_refusals_are_one_line(tmp_path, capsys, random_engine):
    src = _sample(tmp_path)
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--precision", "int8",
                          "--backend", "openvino")
    assert_one_line_error(code, err, "int8", "check slices", "[check]", "--precision fp32")
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "--precision", "int8", "--backend", "torch")
    assert_one_line_error(code, err, "int8", "--backend openvino")
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "--precision", "int8", "--backend", "onnxruntime")
    assert_one_line_error(code, err, "int8 on openvino", "--backend openvino")
    assert not (tmp_path / "o.ome.zarr").exists()


def test_a_graph_the_quantizer_refuses_is_one_line(tmp_path, capsys, monkeypatch):
    from tilefeet.runners import quantize

    def refuse(*a, **k):
        raise ValueError("Unsupported operator\nFancyOp")

    monkeypatch.setattr(quantize, "quantize_graph", refuse)
    monkeypatch.setattr(quantize, "FORMAT_VERSION", -1)  # a key of its own: not a graph another test built
    src = _sample(tmp_path)
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "--precision", "int8", "--backend", "openvino")
    assert_one_line_error(code, err, "could not be quantized to int8", "Unsupported operator FancyOp", "--precision bf16 or fp32")
    assert not (tmp_path / "o.ome.zarr").exists()

