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
        assert descr.outputs[0].axes[2].halo == runner_bundle.receptive_field // 2
        assert descr.covers and descr.inputs[0].sample_tensor is not None and descr.outputs[0].sample_tensor is not None
        del descr


def test_its_weights_are_torchscript_and_onnx_without_tilefeet_code_in_the_newest_cores_format(exported, runner_bundle):
    """No weights entry names tilefeet's architecture (bioimageio.core runs every entry); TorchScript
    is the original, ONNX converted from it; the description is in the format bioimageio.core reads
    as its own; the trained weights ride along as an attachment, for the exact import back."""
    import yaml

    from tilefeet.bioimageio import FORMAT_VERSION

    with zipfile.ZipFile(exported) as z:
        doc = yaml.safe_load(z.read("rdf.yaml"))
        names = set(z.namelist())
    assert str(doc["format_version"]) == FORMAT_VERSION == "0.5.12"
    assert set(doc["weights"]) == {"torchscript", "onnx"}
    assert "parent" not in doc["weights"]["torchscript"] and doc["weights"]["onnx"]["parent"] == "torchscript"
    fields = {k for entry in doc["weights"].values() for k in entry}
    assert fields == {"source", "sha256", "parent", "comment", "opset_version", "pytorch_version"}  # no architecture to import
    assert doc["outputs"][0]["data"]["range"] == [0.0, 1.0] and not doc["outputs"][0].get("postprocessing")
    assert [a["source"] for a in doc["attachments"]] == ["weights.safetensors"]
    assert doc["config"]["tilefeet"]["weights"]["sha256"] == runner_bundle.weights_digest
    assert {"weights.torchscript", "weights.onnx", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= names


def test_the_test_output_is_what_each_weight_format_computes(exported, tmp_path):
    """The package's own weights, run as a user without tilefeet would (torch.jit.load, ONNX Runtime),
    give its test output from its test input after its preprocessing."""
    import numpy as np
    import onnxruntime as ort
    import yaml

    with zipfile.ZipFile(exported) as z:
        z.extractall(tmp_path)
    doc = yaml.safe_load((tmp_path / "rdf.yaml").read_text())
    kw = doc["inputs"][0]["preprocessing"][1]["kwargs"]
    x = ((np.load(tmp_path / "test_input.npy") - kw["mean"]) / kw["std"]).astype(np.float32)
    expected = np.load(tmp_path / "test_output.npy")
    session = ort.InferenceSession(str(tmp_path / "weights.onnx"), providers=["CPUExecutionProvider"])
    by_onnx = session.run(None, {session.get_inputs()[0].name: x})[0]
    with pytest.warns(DeprecationWarning, match="torch.jit.load"):  # torch ≥ 2.10 deprecates TorchScript for new code
        module = torch.jit.load(str(tmp_path / "weights.torchscript"))
    with torch.inference_mode():
        by_torchscript = module(torch.from_numpy(x)).numpy()
    assert expected.shape == x.shape and 0.02 < expected.mean() < 0.98
    assert np.abs(by_torchscript - expected).max() <= 1e-5 and np.abs(by_onnx - expected).max() <= 1e-5


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


def test_a_torchscript_bundle_exports_its_torchscript_and_imports_back(tmp_path):
    """TorchScript cannot become ONNX, so its package has TorchScript weights alone (it used to be refused)."""
    import yaml

    from tilefeet.engine import Declared, import_network

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 3, padding=1)).eval()
    with pytest.warns(DeprecationWarning, match="torch.jit"):  # torch ≥ 2.10 deprecates TorchScript for new code
        torch.jit.save(torch.jit.script(net), str(tmp_path / "net.torchscript"))
        original = import_network(tmp_path / "net.torchscript", tmp_path / "src", Declared.create(
            pixel_size_nm="4nm", classes="membrane", activation="sigmoid", normalization="meanstd:125,43", in_channels=1))
        package = export_package(original, tmp_path / "ts.zip")
        back = import_package(package, tmp_path / "back")
        with zipfile.ZipFile(package) as z:
            weights = yaml.safe_load(z.read("rdf.yaml"))["weights"]
        assert set(weights) == {"torchscript"} and "parent" not in weights["torchscript"]
        assert back.network == "torchscript" and back.activation == "none"  # the activation is inside the traced graph
        assert (outputs(back, "torch") - outputs(original, "torch")).abs().max() <= 1e-6


def test_a_package_of_an_earlier_tilefeet_still_imports_bit_for_bit(exported, runner_bundle, tmp_path):
    """Before TorchScript, packages held tilefeet's U-Net as pytorch_state_dict weights of
    tilefeet.models.unet.UNet2dProbabilities (its state dict under ``net.``): still the exact bundle."""
    import hashlib

    from safetensors.torch import load_file

    def earlier(doc):
        doc["weights"] = {
            "pytorch_state_dict": {
                "source": "weights.pt", "sha256": hashlib.sha256((tmp_path / "pkg" / "weights.pt").read_bytes()).hexdigest(),
                "architecture": {"callable": "UNet2dProbabilities", "import_from": "tilefeet.models.unet", "kwargs": {
                    "in_channels": 1, "out_channels": 1, "base_channels": 8, "depth": 4, "activation": "sigmoid"}},
                "pytorch_version": "2.13.0",
            },
            "onnx": {**doc["weights"]["onnx"], "parent": "pytorch_state_dict"},
        }
        doc.pop("attachments")

    state = {f"net.{k}": v for k, v in load_file(str(runner_bundle.weights_path)).items()}
    (tmp_path / "pkg").mkdir()
    torch.save(state, tmp_path / "pkg" / "weights.pt")
    back = import_package(_edit_rdf(exported, tmp_path, earlier), tmp_path / "back")
    assert back.network == "unet2d" and torch.equal(outputs(back, "torch"), outputs(runner_bundle, "torch"))


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
