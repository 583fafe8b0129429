"""``--precision int8`` (opt-in): the engine's ONNX export quantized for OpenVINO, calibrated on half
the engine's check slices; the other half is what it is judged on (benchmarks/bench_int8.py measures
its speed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

import tilefeet
from tilefeet.engine import load_engine
from tilefeet.runners import RunnerSpec
from tilefeet.runners.guard import CheckData, _stitch, _tiles, check_data
from tilefeet.runners.openvino_runner import OpenVinoRunner, precisions
from tilefeet.runners.quantize import int8_graph

from .conftest import bundled_engine_available
from .helpers import assert_one_line_error, f1, run_cli

pytestmark = [
    pytest.mark.skipif(not bundled_engine_available(), reason="engines/isbi-membrane is not in this checkout"),
    pytest.mark.skipif("int8" not in precisions(), reason="OpenVINO has no int8 on this CPU (no VNNI or AMX-INT8)"),
]


@pytest.fixture(scope="module")
def isbi():
    return load_engine("isbi-membrane")


def _probabilities(bundle, precision: str, data: CheckData) -> list[np.ndarray]:
    tiles, crops = _tiles(bundle, data, (bundle.tile, bundle.tile))
    runner = OpenVinoRunner(bundle, RunnerSpec(str(bundle.path), "openvino", "cpu", precision, 2, (bundle.tile, bundle.tile)))
    n = tiles.shape[0] + tiles.shape[0] % 2
    x = np.concatenate([tiles.numpy(), np.zeros((n - tiles.shape[0], *tiles.shape[1:]), np.float32)])
    import torch

    out = np.concatenate([runner(torch.from_numpy(x[i : i + 2])).numpy() for i in range(0, n, 2)])[: tiles.shape[0]]
    return _stitch(out, crops, data)


def test_int8_agrees_with_fp32_on_check_slices_its_calibration_never_saw(isbi):
    """Calibrated on ISBI slices 24–26; on 27–29 its labels score within the accuracy guard's 0.002
    of fp32's, and 99 % of its probabilities within 0.03 (bench_int8: 0.014; bf16's 0.004)."""
    graph = int8_graph(isbi)
    record = json.loads((graph.parent / "int8.json").read_text())
    assert record["calibrated_on"].endswith("the first 3 of 6")
    assert int8_graph(isbi) == graph  # built once
    data = check_data(isbi)
    unseen = CheckData(data.images[3:], data.masks[3:], data.class_name, data.description)
    full, int8 = _probabilities(isbi, "fp32", unseen), _probabilities(isbi, "int8", unseen)
    truth = np.concatenate([m.ravel() for m in unseen.masks])
    lab_full = np.concatenate([(a[0] >= 0.5).ravel() for a in full])
    lab_int8 = np.concatenate([(a[0] >= 0.5).ravel() for a in int8])
    assert abs(f1(lab_int8, truth) - f1(lab_full, truth)) <= 0.002
    dp = np.concatenate([np.abs(a - b).ravel() for a, b in zip(int8, full)])
    assert 0 < np.percentile(dp, 99) <= 0.03  # int8 did run: not fp32's bits


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
