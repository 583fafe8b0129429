"""ONNX export: a valid graph with dynamic batch and tile sizes, precision inside the graph, float32
I/O, weights beside it, numerically equal to torch, exported once and cached."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from tests.conftest import make_random_engine
from tilefeet.engine import load_engine
from tilefeet.errors import InvalidEngineError
from tilefeet.runners.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    TOLERANCE,
    check_export,
    copy_export,
    export_key,
    export_onnx,
    relative_error,
)


@pytest.fixture(scope="module")
def bundle(runner_bundle):
    return runner_bundle


def run_ort(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    return torch.from_numpy(y)


def reference(bundle, x):
    with torch.inference_mode():
        return bundle.build_model()(x)


def io_types(model: onnx.ModelProto) -> list[str]:
    return [
        onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)
    ]


def initializer_types(model: onnx.ModelProto) -> set[str]:
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer if len(t.dims) > 1}


def test_fp32_export_is_valid_and_dynamic(bundle):
    export = export_onnx(bundle, "fp32")
    onnx.checker.check_model(str(export.path), full_check=True)
    model = onnx.load(str(export.path), load_external_data=False)
    assert [i.name for i in model.graph.input] == [INPUT_NAME] and [o.name for o in model.graph.output] == [OUTPUT_NAME]
    assert io_types(model) == ["FLOAT", "FLOAT"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == bundle.in_channels
    assert all(d.dim_param and not d.dim_value for d in (dims[0], dims[2], dims[3])), (
        "batch, height and width must be symbolic"
    )
    assert "onnxruntime" in export.checked and export.opset == 20


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 64, 96), (2, 128, 48)])
def test_fp32_export_agrees_with_torch_at_any_multiple_of_the_divisor(bundle, shape):
    b, h, w = shape
    x = torch.randn(b, bundle.in_channels, h, w, generator=torch.Generator().manual_seed(h + w))
    assert relative_error(run_ort(export_onnx(bundle, "fp32").path, x), reference(bundle, x)) <= TOLERANCE["fp32"]


def test_fp16_export_computes_in_fp16_with_float32_io(bundle):
    export = export_onnx(bundle, "fp16")
    model = onnx.load(str(export.path))
    assert io_types(model) == ["FLOAT", "FLOAT"]
    assert initializer_types(model) == {"FLOAT16"}, "the convolution weights must be fp16 inside the graph"
    x = torch.randn(2, bundle.in_channels, 64, 96, generator=torch.Generator().manual_seed(1))
    err = relative_error(run_ort(export.path, x), reference(bundle, x))
    assert 0 < err <= TOLERANCE["fp16"]  # > 0: it really computed in reduced precision


def test_bf16_export_uses_opset_22_and_bf16_weights(bundle):
    export = export_onnx(bundle, "bf16")
    model = onnx.load(str(export.path))
    onnx.checker.check_model(model, full_check=True)
    assert export.opset == 22 and {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {22}
    assert io_types(model) == ["FLOAT", "FLOAT"]
    assert initializer_types(model) == {"BFLOAT16"}
    assert "no numerical check" in export.checked  # said plainly: ONNX Runtime's CPU has no bf16 convolutions


def test_weights_live_beside_the_graph_and_travel_with_it(bundle, tmp_path):
    export = export_onnx(bundle, "fp32")
    model = onnx.load(str(export.path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < 1024 for t in inline), (
        "weights belong in model.onnx.data, not in the graph"
    )
    assert [f.name for f in export.files] == ["model.onnx", "model.onnx.data"]
    copied = copy_export(export, tmp_path / "elsewhere")
    x = torch.randn(1, bundle.in_channels, 32, 32)
    assert torch.equal(run_ort(copied, x), run_ort(export.path, x))


def test_exported_once_then_cached(bundle, monkeypatch):
    first = export_onnx(bundle, "fp32")
    mtime = first.path.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the export is cached")

    monkeypatch.setattr("tilefeet.runners.onnx_export._export", no_export)
    again = export_onnx(bundle, "fp32")
    assert again == first and again.path.stat().st_mtime_ns == mtime


def test_cache_key_follows_weights_and_precision(bundle, tmp_path):
    other = make_random_engine(tmp_path / "other", seed=1, sharpen=20.0)
    keys = {export_key(bundle, "fp32"), export_key(bundle, "fp16"), export_key(other, "fp32")}
    assert len(keys) == 3
    assert export_key(bundle, "fp32") == export_key(load_engine(bundle.path), "fp32")


def test_check_catches_a_graph_that_disagrees_with_torch(bundle, tmp_path):
    """The check has teeth: a graph exported from other weights fails against this bundle."""
    other = make_random_engine(tmp_path / "other", seed=2, sharpen=20.0)
    foreign = export_onnx(other, "fp32", cache=tmp_path / "cache")
    with pytest.raises(InvalidEngineError, match="disagrees with torch"):
        check_export(foreign.path, bundle, "fp32")


def test_relative_error_is_max_abs_difference_over_max_reference():
    expected = torch.tensor([[0.5, 0.25], [1.0, 0.0]])
    assert relative_error(expected, expected) == 0
    assert relative_error(expected + torch.tensor([[0.0, 0.01], [0.0, 0.0]]), expected) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(expected, expected[0])
