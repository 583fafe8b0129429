"""Networks tilefeet did not build, for the tests: a small MONAI ``BasicUNet`` (random weights,
batch norm in eval mode, its head sharpened so probabilities spread over (0, 1)), exported to ONNX
and imported as a bundle, and the same module as a ``torch.export`` bundle."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from tilefeet.artifacts import build_once, cache_dir

PIXEL_SIZE = "4nm"
NORMALIZE = "meanstd:125,43"


def monai_net(seed: int = 0, sharpen: float = 20.0) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4), norm="batch").eval()
    with torch.no_grad():
        net.final_conv.weight.mul_(sharpen)
    return net


def export_onnx_file(net: torch.nn.Module, path: Path, *, dynamic: bool = True, size: tuple[int, int] = (64, 96)) -> Path:
    """``net`` as an ONNX file (torch's dynamo exporter), with dynamic batch, height and width in
    multiples of 16, or all fixed at ``size`` (batch 1).

    torch's exporter takes about 7 s a call on this machine, and the suite asks for the same network
    several times: each export is made once per test session (keyed by the network's class, weights
    and these options, under the session's ``TILEFEET_CACHE``, which every xdist worker shares) and
    copied to ``path``. The tests' subject is what tilefeet does with the file, not torch's exporter."""
    digest = hashlib.sha256(f"{type(net).__qualname__} {dynamic} {size}".encode())
    for name, tensor in net.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    cached = build_once(cache_dir() / "test-onnx" / f"{digest.hexdigest()[:24]}.onnx",
                        lambda tmp: _export_onnx(net, tmp, dynamic=dynamic, size=size))
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, path)
    return path


def _export_onnx(net: torch.nn.Module, path: Path, *, dynamic: bool, size: tuple[int, int]) -> Path:
    from torch.export import Dim

    from tilefeet.runners.onnx_export import _exporter_noise_silenced

    x = torch.zeros(2 if dynamic else 1, 1, *size)
    shapes = {"x": {0: Dim("b", min=1), 2: 16 * Dim("h", min=1), 3: 16 * Dim("w", min=1)}} if dynamic else None
    with _exporter_noise_silenced():
        program = torch.onnx.export(net, (x,), dynamo=True, verbose=False, dynamic_shapes=shapes,
                                    input_names=["image"], output_names=["logits"])
    assert program is not None
    program.save(str(path))
    return path


def import_monai_onnx(folder: Path, **declared) -> object:
    from tilefeet.engine import Declared, import_network

    path = export_onnx_file(monai_net(), folder / "monai.onnx")
    kw = {"pixel_size_nm": PIXEL_SIZE, "classes": "membrane", "activation": "sigmoid", "normalization": NORMALIZE, **declared}
    return import_network(path, folder / "monai-onnx", Declared.create(**kw))


def monai_pt2_bundle(cache: Path) -> object:
    from tilefeet.engine import bundle_from_module

    return bundle_from_module(monai_net(), pixel_size_nm=PIXEL_SIZE, classes=["membrane"], activation="sigmoid",
                              normalization=NORMALIZE, name="monai-basicunet", cache=cache)
