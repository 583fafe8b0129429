"""Networks tilefeet did not build (issue 13): a MONAI BasicUNet exported to ONNX and imported, the
same module through ``bundle_from_module`` (a ``torch.export`` program), and what import refuses.

Through ``segment``: bit-identical output across block sizes, and crop mode equal to the network
applied to the whole image within ONNX Runtime's tolerance."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tilefeet
from tests.foreign_nets import export_onnx_file, import_monai_onnx, monai_net, monai_pt2_bundle
from tilefeet.cli import main
from tilefeet.convert import write_image
from tilefeet.engine import Declared, import_network, load_engine
from tilefeet.errors import ConfigError, InvalidEngineError, TilefeetError
from tilefeet.models.foreign import onnx_run_fn, onnx_session
from tilefeet.runners import MAX_RUNNERS, RunnerSpec, clear_runners, get_runner, resolve_spec
from tilefeet.runners.onnx_export import export_onnx


@pytest.fixture(scope="module")
def monai_onnx(tmp_path_factory):
    return import_monai_onnx(tmp_path_factory.mktemp("foreign"))


@pytest.fixture(scope="module")
def monai_pt2(tmp_path_factory):
    return monai_pt2_bundle(tmp_path_factory.mktemp("modules"))


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("tilefeet: error: "), err
    return err


# ------------------------------------------------------------------------------- what import reads


def test_onnx_import_reads_and_measures_the_graph(monai_onnx):
    b = monai_onnx
    assert b.network == "onnx" and b.backends == ("onnxruntime", "openvino", "tensorrt")
    assert (b.in_channels, b.classes, b.activation) == (1, ("membrane",), "sigmoid")
    # BasicUNet pads odd sizes itself, so the size alone would say 1: the divisor is its total stride.
    assert b.divisor == 16
    # 4 levels of two 3×3 convolutions: ~190 px; far more than the 2×17 px of the first level alone.
    assert 150 < b.receptive_field < 260 and b.receptive_field % 2 == 1
    assert b.tile % b.divisor == 0 and b.overlap % b.divisor == 0 and b.overlap * 2 >= b.receptive_field // 2
    assert b.flops_per_pixel() > 1000  # counted from the graph's Conv/ConvTranspose nodes
    assert b.normalization.mean == 125 and b.normalization.std == 43


def test_the_measured_receptive_field_is_where_changes_stop(monai_onnx):
    """One changed pixel changes outputs up to rf // 2 away and none farther (the measurement's claim)."""
    run = onnx_run_fn(onnx_session(monai_onnx.weights_path, "test"))
    x = np.random.default_rng(0).standard_normal((1, 1, 512, 512)).astype(np.float32)
    x2 = x.copy()
    x2[0, 0, 256, 256] += 4
    d = np.abs(run(x2) - run(x))[0, 0]
    ys, xs = np.nonzero(d)
    reach = max(np.abs(ys - 256).max(), np.abs(xs - 256).max())
    assert reach <= monai_onnx.receptive_field // 2 and reach >= monai_onnx.receptive_field // 2 - 16


def test_pt2_bundle_from_a_module_is_cached_and_equals_the_module(monai_pt2, tmp_path):
    b = monai_pt2
    assert b.network == "torch_export" and b.divisor == 16 and "torch" in b.backends
    again = monai_pt2_bundle(b.path.parent.parent)  # same module and declarations: same folder, no export
    assert again.path == b.path
    runner = get_runner(RunnerSpec(str(b.path), "torch", "cpu", "fp32", 2, (64, 96)))
    x = torch.randn(2, 1, 64, 96)
    with torch.inference_mode():
        expected = torch.sigmoid(monai_net()(x))
    assert torch.allclose(runner(x), expected, atol=1e-6)


# ------------------------------------------------------------------------------------ through segment


@pytest.fixture(scope="module")
def small_section(tmp_path_factory, montage_2x3):
    return write_image(montage_2x3[0][:400, :560], tmp_path_factory.mktemp("sec") / "s.ome.zarr", (4.0, 4.0), chunk=64)


def test_onnx_bundle_is_bit_identical_across_block_sizes(monai_onnx, small_section):
    kw = dict(backend="onnxruntime", tile=128, overlap=32, chunk_size=64, output_dtype="float32", batch_size=3)
    ref = tilefeet.segment(small_section, monai_onnx, block_size=512, **kw).values
    assert ref.std() > 0.02 and ref.min() >= 0 and ref.max() <= 1  # not a constant
    for block in (64, 192):
        np.testing.assert_array_equal(tilefeet.segment(small_section, monai_onnx, block_size=block, **kw).values, ref)


def test_onnx_bundle_in_crop_mode_equals_the_network_on_the_whole_image(monai_onnx, montage_2x3, tmp_path):
    rf = monai_onnx.receptive_field
    overlap = -(-(rf - 1) // 16) * 16  # covers the receptive field, a multiple of the divisor
    tile = overlap + 64
    img = montage_2x3[0][:300, :260]
    src = write_image(img, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)
    got = tilefeet.segment(src, monai_onnx, backend="onnxruntime", tile=tile, overlap=overlap, blend="crop",
                           block_size=128, chunk_size=128, output_dtype="float32", batch_size=2).values
    m = overlap // 2
    h, w = img.shape
    ph, pw = m + (-(h + 2 * m) % 16), m + (-(w + 2 * m) % 16)
    padded = np.pad(img.astype(np.float64), ((m, ph), (m, pw)), mode="symmetric")
    x = monai_onnx.normalization.to_network(padded).astype(np.float32)[None, None]
    ref = 1 / (1 + np.exp(-onnx_run_fn(onnx_session(monai_onnx.weights_path, "test"))(x)))[0, :, m : m + h, m : m + w]
    assert np.abs(got - ref).max() <= 1e-4


# ---------------------------------------------------------------------------------- one-line refusals


def test_a_graph_with_a_fixed_small_size_is_refused(tmp_path, capsys):
    path = export_onnx_file(monai_net(), tmp_path / "fixed.onnx", dynamic=False, size=(32, 32))
    err = one_line_error(capsys, ["import-engine", str(path), "-o", str(tmp_path / "e"), "--pixel-size", "4nm",
                                  "--classes", "membrane", "--activation", "sigmoid", "--normalize", "zscore"])
    assert "takes only 32×32 px inputs" in err and "dynamic height and width" in err


def test_a_graph_whose_output_size_differs_is_refused(tmp_path, capsys):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.Conv2d(1, 1, 3)).eval()  # no padding: -4 px
    from torch.export import Dim

    from tilefeet.runners.onnx_export import _exporter_noise_silenced

    path = tmp_path / "valid.onnx"
    with _exporter_noise_silenced():
        program = torch.onnx.export(net, (torch.zeros(2, 1, 64, 80),), dynamo=True, verbose=False,
                                    dynamic_shapes={"input": {0: Dim("b", min=1), 2: Dim("h", min=8), 3: Dim("w", min=8)}})
    program.save(str(path))
    err = one_line_error(capsys, ["import-engine", str(path), "-o", str(tmp_path / "e"), "--pixel-size", "4nm",
                                  "--classes", "membrane", "--activation", "sigmoid", "--normalize", "zscore"])
    assert "output" in err and "an output of the input's size" in err


def test_a_missing_pixel_size_is_refused(tmp_path, capsys):
    (tmp_path / "x.onnx").write_bytes(b"declarations are checked before the graph is read")
    err = one_line_error(capsys, ["import-engine", str(tmp_path / "x.onnx"), "-o", str(tmp_path / "e"), "--classes", "m"])
    assert "missing pixel size" in err and "--pixel-size 4nm" in err


def test_unknown_preprocessing_is_refused(tmp_path, capsys):
    (tmp_path / "x.onnx").write_bytes(b"declarations are checked before the graph is read")
    err = one_line_error(capsys, ["import-engine", str(tmp_path / "x.onnx"), "-o", str(tmp_path / "e"), "--pixel-size",
                                  "4nm", "--classes", "m", "--activation", "sigmoid", "--normalize", "histeq:3"])
    assert "unknown preprocessing 'histeq:3'" in err and "meanstd:MEAN,STD" in err


def test_weights_that_do_not_match_the_graph_are_refused(tmp_path, capsys):
    import onnx

    path = export_onnx_file(monai_net(), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data")
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a truncated weights file
    err = one_line_error(capsys, ["import-engine", str(tmp_path / "ext.onnx"), "-o", str(tmp_path / "e"),
                                  "--pixel-size", "4nm", "--classes", "membrane", "--activation", "sigmoid", "--normalize", "zscore"])
    assert "weights" in err and str(tmp_path / "ext.onnx") in err


def test_wrong_channel_count_and_non_probabilities_are_refused(tmp_path, monai_onnx):
    path = tmp_path.parent / "foreign0" / "monai.onnx"
    path = path if path.exists() else export_onnx_file(monai_net(), tmp_path / "m.onnx")
    with pytest.raises(InvalidEngineError, match=r"outputs 1 channel.*2 class"):
        import_network(path, tmp_path / "a", Declared.create(pixel_size_nm="4nm", classes="a,b", activation="sigmoid", normalization="zscore"))
    with pytest.raises(InvalidEngineError, match=r"not probabilities.*--activation sigmoid"):
        import_network(path, tmp_path / "b", Declared.create(pixel_size_nm="4nm", classes="a", activation="none", normalization="zscore"))


def test_a_batch_norm_in_training_mode_is_refused(tmp_path):
    from tilefeet.engine import bundle_from_module

    class Trainy(torch.nn.Module):  # keeps training-mode batch norm even in eval(): mixes the batch
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.batch_norm(self.conv(x), None, None, training=True)

    with pytest.raises(InvalidEngineError, match="batch norm in training mode"):
        bundle_from_module(Trainy(), pixel_size_nm="4nm", classes=["m"], normalization="zscore", cache=tmp_path)


def test_a_pt2_archive_with_pickled_payloads_is_refused(tmp_path):
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data/weights/model_weights_config.json", json.dumps({"config": {"w": {"use_pickle": True}}}))
    with pytest.raises(InvalidEngineError, match="pickled tensors"):
        import_network(path, tmp_path / "e", Declared.create(pixel_size_nm="4nm", classes="m", activation="sigmoid", normalization="zscore"))


def test_an_onnx_bundle_refuses_the_torch_backend_in_one_line(monai_onnx):
    with pytest.raises(ConfigError, match="runs on onnxruntime or openvino or tensorrt, not torch"):
        get_runner(RunnerSpec(str(monai_onnx.path), "torch", "cpu", "fp32", 2, (64, 96)))


# ----------------------------------------------------------------------------------- auto, resolved here


def test_auto_is_resolved_where_the_runner_is_built(monai_onnx):
    spec = RunnerSpec(str(monai_onnx.path), "auto", "cpu", "fp32", 2, (64, 96), (("threads", 1),))
    concrete, reason = resolve_spec(spec)
    assert concrete.backend in ("onnxruntime", "openvino") and ("threads", 1) in concrete.options  # the measured faster
    assert "onnxruntime" in reason and "openvino" in reason and "torch: the engine's onnx network does not run on it" in reason
    runner = get_runner(spec)
    assert runner.spec == concrete and runner.reason == reason and get_runner(spec) is runner


def test_the_runner_cache_is_bounded(runner_bundle):
    clear_runners()
    specs = [RunnerSpec(str(runner_bundle.path), "torch", "cpu", "fp32", b, (32, 32)) for b in range(1, MAX_RUNNERS + 3)]
    runners = [get_runner(s) for s in specs]
    from tilefeet.runners import _cache

    assert len(_cache) == MAX_RUNNERS and list(_cache) == specs[-MAX_RUNNERS:]
    assert runners[0](torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)  # evicted, still usable by its holder


def test_onnx_bundle_takes_the_same_onnx_to_plan_path_on_fake_tensorrt(monai_onnx, tmp_path):
    from tests.fake_tensorrt import FakeTensorRT, fake_plan_doc
    from tilefeet.runners._trt_glue import DeviceInfo, make_profile
    from tilefeet.runners.tensorrt_runner import BuildRequest, ensure_plan

    trt = FakeTensorRT(11)
    profile = make_profile(channels=1, divisor=monai_onnx.divisor, batch=2, tile=(64, 96))
    plan = ensure_plan(trt, monai_onnx, BuildRequest(precision="fp16"), profile, DeviceInfo("NVIDIA H200", (9, 0)), cache=tmp_path)
    parsed = Path({c[0]: c[1:] for c in trt.calls}["parse_from_file"][0])
    assert parsed == export_onnx(monai_onnx, "fp16", cache=tmp_path).path and "-fp16-" in str(parsed)
    assert "FLOAT16" in fake_plan_doc(plan.path)["initializer_types"]  # converted to fp16 inside the graph
    with pytest.raises(ConfigError, match="not to bf16"):
        export_onnx(monai_onnx, "bf16", cache=tmp_path)


@pytest.mark.slow
def test_import_and_export_commands(tmp_path, capsys):
    """The CLI a user meets: import-engine prints the bundle folder (what it measured on stderr),
    export-engine --bioimageio prints the package, and the package imports back to the same outputs."""
    path = export_onnx_file(monai_net(), tmp_path / "m.onnx")
    code = main(["import-engine", str(path), "-o", str(tmp_path / "mine"), "--pixel-size", "5nm", "--classes", "membrane",
                 "--activation", "sigmoid", "--normalize", "percentile:1,99.5"])
    out, err = capsys.readouterr()
    assert code == 0 and Path(out.strip()) == tmp_path / "mine", err
    assert "divisor 16" in err and "receptive field" in err and "onnxruntime, openvino, tensorrt" in err
    bundle = load_engine(tmp_path / "mine")
    assert bundle.pixel_size_nm == (5.0, 5.0) and bundle.normalization.adaptive == "percentile"
    assert main(["export-engine", str(bundle.path), "--bioimageio", "-o", str(tmp_path / "mine.zip")]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()
    assert main(["import-engine", str(tmp_path / "mine.zip"), "-o", str(tmp_path / "back")]) == 0
    capsys.readouterr()
    back = load_engine(tmp_path / "back")
    assert back.normalization.adaptive == "percentile" and back.normalization.percentiles == (1.0, 99.5)
    x = torch.randn(2, 1, 64, 96)
    a = get_runner(RunnerSpec(str(bundle.path), "onnxruntime", "cpu", "fp32", 2, (64, 96)))(x)
    b = get_runner(RunnerSpec(str(back.path), "onnxruntime", "cpu", "fp32", 2, (64, 96)))(x)
    assert (a - b).abs().max() <= 1e-6
    err = one_line_error(capsys, ["import-engine", str(path), "-o", str(tmp_path / "mine"), "--pixel-size", "5nm",
                                  "--classes", "membrane", "--activation", "sigmoid", "--normalize", "zscore"])
    assert "exists" in err and "--overwrite" in err
    err = one_line_error(capsys, ["import-engine", str(path), "-o", str(tmp_path / "x"), "--pixel-size", "5nm", "--classes", "m"])
    assert "missing normalization" in err and "--normalize" in err


def test_an_interrupted_run_on_an_onnx_bundle_resumes_to_the_same_bits(monai_onnx, small_section, tmp_path, monkeypatch):
    import zarr

    import tilefeet.schedule

    kw = dict(backend="onnxruntime", tile=128, overlap=32, chunk_size=64, block_size=128, blocks_in_flight=1, batch_size=2)
    ref = tilefeet.segment_to_zarr(small_section, tmp_path / "ref.ome.zarr", monai_onnx, **kw)
    original, written = tilefeet.schedule._write_block, []

    def failing(*args, **kwargs):
        if len(written) == 5:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-run
        written.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tilefeet.schedule, "_write_block", failing)
    out = tmp_path / "out.ome.zarr"
    with pytest.raises((KeyboardInterrupt, TilefeetError)):  # the run says what is kept and how to resume
        tilefeet.segment_to_zarr(small_section, out, monai_onnx, **kw)
    assert written and (tmp_path / "out.ome.zarr.partial").is_dir()
    monkeypatch.setattr(tilefeet.schedule, "_write_block", original)
    tilefeet.segment_to_zarr(small_section, out, monai_onnx, resume=True, **kw)
    got, want = zarr.open_group(str(out), mode="r"), zarr.open_group(str(ref), mode="r")
    for name in ("0", "1", "labels/membrane/0"):
        np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=name)


def test_a_file_that_is_no_network_is_named_before_any_declaration(tmp_path, capsys):
    (tmp_path / "section.tif").write_bytes(b"II*\x00")
    err = one_line_error(capsys, ["import-engine", str(tmp_path / "section.tif"), "-o", str(tmp_path / "e")])
    assert "cannot import" in err and ".onnx" in err and "rdf.yaml" in err
    err = one_line_error(capsys, ["import-engine", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "e")])
    assert "no network file" in err
