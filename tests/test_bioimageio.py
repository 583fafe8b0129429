"""bioimage.io in and out: a package exported by tilefeet validates with bioimageio.spec (offline),
importing it back gives the original engine's output, and what import cannot honour is refused."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from tests.foreign_nets import import_monai_onnx
from tilefeet.bioimageio import export_package, import_package
from tilefeet.errors import ConfigError, InvalidEngineError
from tilefeet.runners import RunnerSpec, get_runner


@pytest.fixture(scope="module")
def exported(runner_bundle, tmp_path_factory):
    return export_package(runner_bundle, tmp_path_factory.mktemp("zoo") / "rand.zip")


def outputs(bundle, backend: str, seed: int = 0) -> torch.Tensor:
    runner = get_runner(RunnerSpec(str(bundle.path), backend, "cpu", "fp32", 2, (64, 96)))
    return runner(torch.randn(2, bundle.in_channels, 64, 96, generator=torch.Generator().manual_seed(seed)))


def test_the_exported_package_validates_with_bioimageio_spec(exported, runner_bundle):
    from bioimageio.spec import load_model_description
    from bioimageio.spec.model import v0_5

    from tilefeet.bioimageio import _quiet_logs

    with _quiet_logs():  # bioimageio.spec leaves the zip open for the garbage collector: collected in there
        descr = load_model_description(exported, perform_io_checks=True)
        assert isinstance(descr, v0_5.ModelDescr), getattr(descr, "validation_summary", descr)
        y = descr.inputs[0].axes[2]
        assert (str(y.unit), y.scale) == ("nanometer", 4.0)
        assert descr.inputs[0].preprocessing[1].id == "fixed_zero_mean_unit_variance"
        assert [str(c) for c in descr.outputs[0].axes[1].channel_names] == list(runner_bundle.classes)
        assert descr.weights.onnx is not None and descr.weights.pytorch_state_dict is not None
        assert descr.outputs[0].axes[2].halo == runner_bundle.receptive_field // 2
        del descr


def test_importing_it_back_gives_the_original_engine_bit_for_bit(exported, runner_bundle, tmp_path):
    back = import_package(exported, tmp_path / "back")
    assert (back.network, back.pixel_size_nm, back.classes, back.normalization) == (
        "unet2d", runner_bundle.pixel_size_nm, runner_bundle.classes, runner_bundle.normalization)
    assert back.weights_digest == runner_bundle.weights_digest
    assert torch.equal(outputs(back, "torch"), outputs(runner_bundle, "torch"))


def test_a_foreign_onnx_bundle_round_trips_through_a_package(tmp_path):
    original = import_monai_onnx(tmp_path / "src")
    package = export_package(original, tmp_path / "monai.zip")
    back = import_package(package, tmp_path / "back")
    assert back.network == "onnx" and back.classes == original.classes and back.pixel_size_nm == (4.0, 4.0)
    assert back.normalization.mean == original.normalization.mean and back.activation == "none"  # inside the graph now
    assert (outputs(back, "onnxruntime") - outputs(original, "onnxruntime")).abs().max() <= 1e-6


def _edit_rdf(package: Path, tmp_path: Path, edit) -> Path:
    """The package unpacked into ``tmp_path``, its rdf.yaml changed by ``edit(doc)``."""
    import yaml

    folder = tmp_path / "pkg"
    with zipfile.ZipFile(package) as z:
        z.extractall(folder)
    rdf = folder / "rdf.yaml"
    doc = yaml.safe_load(rdf.read_text())
    edit(doc)
    rdf.write_text(yaml.safe_dump(doc))
    return rdf


def test_unknown_preprocessing_is_refused_in_one_line(exported, tmp_path):
    def binarize(doc):
        doc["inputs"][0]["preprocessing"][1] = {"id": "binarize", "kwargs": {"threshold": 100.0}}

    with pytest.raises(ConfigError, match="unknown preprocessing 'binarize'") as e:
        import_package(_edit_rdf(exported, tmp_path, binarize), tmp_path / "e")
    assert "\n" not in str(e.value)


def test_weights_that_do_not_match_their_sha256_are_refused(exported, tmp_path):
    folder = tmp_path / "pkg"
    with zipfile.ZipFile(exported) as z:
        z.extractall(folder)
    data = bytearray((folder / "weights.onnx").read_bytes())
    data[-10] ^= 0xFF
    (folder / "weights.onnx").write_bytes(bytes(data))
    with pytest.raises(InvalidEngineError, match="sha256") as e:
        import_package(folder / "rdf.yaml", tmp_path / "e")
    assert "\n" not in str(e.value)


def test_a_package_without_a_pixel_size_needs_one(exported, tmp_path):
    def no_units(doc):
        for tensor in (*doc["inputs"], *doc["outputs"]):
            for axis in tensor["axes"]:
                axis.pop("unit", None)
                axis.pop("scale", None)
        doc.pop("config")  # not tilefeet's own record either

    with pytest.raises(ConfigError, match=r"missing pixel size.*--pixel-size") as e:
        import_package(_edit_rdf(exported, tmp_path, no_units), tmp_path / "e")
    assert "\n" not in str(e.value)


def test_an_output_the_os_refuses_is_one_line_before_the_export(runner_bundle, tmp_path):
    from tilefeet.errors import OutputWriteError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputWriteError, match=r"cannot write .*package\.zip: .*nothing was written"):
        export_package(runner_bundle, tmp_path / "a-file" / "package.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
