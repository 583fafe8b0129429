"""The runner conformance suite: every backend and precision passes the same tests, on every kind
of bundle: tilefeet's U-Net, a foreign network imported from ONNX (a MONAI BasicUNet exported in
the test) and the same network as a ``torch.export`` program (``bundle_from_module``).

A case is a runner recipe (backend, device, precision, options). Each case runs at several batch
sizes on non-square tiles and must: honour the output contract (shape, float32, device, values in
[0, 1]), agree with the torch fp32 network on the CPU (relative error ≤ 1e-4 for fp32, ≤ 1e-2 for
fp16/bf16), repeat bit for bit, compute each tile independently of the others in its batch, and
hand back outputs no later call overwrites. A case that cannot run here is skipped with the reason
(missing library, no GPU), never passed silently.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from tests.foreign_nets import import_monai_onnx, monai_pt2_bundle
from tilefeet.errors import BackendUnavailableError, ConfigError
from tilefeet.runners import RunnerSpec, runner_class
from tilefeet.runners.onnx_export import TOLERANCE, reference_output, relative_error
from tilefeet.runners.openvino_runner import precisions as openvino_precisions
from tilefeet.runners.select import unavailable_reason

TILE = (64, 96)  # non-square: a height/width mix-up cannot pass
BATCHES = (1, 3)


@dataclass(frozen=True)
class Case:
    backend: str
    precision: str = "fp32"
    device: str = "cpu"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        opts = "-".join(f"{k}={v}" for k, v in self.options)
        return "-".join(p for p in (self.backend, self.device, self.precision, opts) if p)

    def skip_reason(self) -> str | None:
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA GPU (torch.cuda.is_available() is False)"
        reason = unavailable_reason(self.backend, device)
        if reason:
            return reason
        if self.backend == "openvino" and self.precision not in openvino_precisions():
            return f"this CPU has no native {self.precision} for OpenVINO (it runs {', '.join(openvino_precisions())})"
        if dict(self.options).get("compile"):
            if device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
                return "torch.compile on the CPU needs a C++ compiler (apt-get install g++)"
            if device.type == "cuda" and importlib.util.find_spec("triton") is None:
                return "torch.compile on CUDA needs Triton (pip install triton)"
        return None


CPU_CASES = [
    Case("torch"),  # the default: eager, channels-last
    Case("torch", options=(("channels_last", False),)),
    Case("torch", "bf16"),
    Case("torch", options=(("compile", True),)),
    Case("onnxruntime"),
    Case("onnxruntime", "fp16"),
    Case("openvino"),  # OpenVINO told f32 (it would pick bf16 by itself on a CPU with native bf16)
    Case("openvino", "bf16"),
]
GPU_CASES = [
    Case("torch", "fp32", "cuda"),
    Case("torch", "fp16", "cuda"),
    Case("torch", "bf16", "cuda"),
    Case("torch", "fp32", "cuda", (("channels_last", False),)),
    Case("torch", "fp32", "cuda", (("compile", True),)),
    Case("torch", "bf16", "cuda", (("compile", True),)),
    Case("torch", "fp32", "cuda", (("cuda_graphs", True),)),
    Case("torch", "fp16", "cuda", (("compile", True), ("cuda_graphs", True))),
    Case("onnxruntime", "fp32", "cuda"),
    Case("onnxruntime", "fp16", "cuda"),
    Case("onnxruntime", "fp16", "cuda", (("ort_tensorrt", True),)),
    Case("tensorrt", "fp32", "cuda"),
    Case("tensorrt", "fp16", "cuda"),
    Case("tensorrt", "bf16", "cuda"),
    Case("tensorrt", "fp16", "cuda", (("typing", "strong"),)),
]
#: Bundle kinds and the backends their network runs on (``EngineBundle.backends``).
KINDS = {
    "unet": ("torch", "onnxruntime", "openvino", "tensorrt"),
    "monai-onnx": ("onnxruntime", "openvino", "tensorrt"),
    "monai-pt2": ("torch", "onnxruntime", "openvino", "tensorrt"),
}
#: The foreign bundles run the cases that differ in kind (not every option again): eager and
#: compiled torch, ONNX Runtime and TensorRT at each precision the network's graph allows.
FOREIGN_CASES = {
    Case("torch"), Case("torch", "bf16"), Case("torch", options=(("compile", True),)), Case("onnxruntime"),
    Case("onnxruntime", "fp16"), Case("openvino"), Case("torch", "fp32", "cuda"), Case("torch", "bf16", "cuda", (("compile", True),)),
    Case("onnxruntime", "fp32", "cuda"), Case("onnxruntime", "fp16", "cuda"), Case("tensorrt", "fp32", "cuda"),
    Case("tensorrt", "fp16", "cuda"),
}


def _params(cases: list[Case], gpu: bool) -> list[Any]:
    marks = [pytest.mark.gpu] if gpu else []
    out = []
    for kind, backends in KINDS.items():
        for c in cases:
            if c.backend in backends and (kind == "unet" or c in FOREIGN_CASES):
                out.append(pytest.param(kind, c, id=c.id if kind == "unet" else f"{kind}-{c.id}", marks=marks))
    return out


CASES = _params(CPU_CASES, False) + _params(GPU_CASES, True)


@pytest.fixture(scope="module")
def bundles(runner_bundle, tmp_path_factory):
    """Bundles by kind, made on first use (exporting the MONAI network takes seconds)."""
    made: dict[str, Any] = {"unet": runner_bundle}

    def get(kind: str):
        if kind not in made:
            folder = tmp_path_factory.mktemp(kind)
            made[kind] = import_monai_onnx(folder) if kind == "monai-onnx" else monai_pt2_bundle(folder)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def bundle(runner_bundle):
    return runner_bundle


@pytest.fixture(scope="module")
def runners(bundles):
    """Runners built once per (kind, case, batch) for the whole module: compiling is the slow part."""
    built: dict[tuple[str, Case, int], Any] = {}

    def get(kind: str, case: Case, batch: int):
        reason = case.skip_reason()
        if reason:
            pytest.skip(reason)
        if kind != "unet" and batch != max(BATCHES):
            pytest.skip("foreign bundles run at one batch size (building their runners is the suite's cost)")
        if (kind, case, batch) not in built:
            b = bundles(kind)
            spec = RunnerSpec(str(b.path), case.backend, case.device, case.precision, batch, TILE, case.options)
            built[kind, case, batch] = runner_class(case.backend)(b, spec)
        return built[kind, case, batch]

    yield get
    for r in built.values():
        r.close()


def tiles(batch: int, seed: int, bundle) -> torch.Tensor:
    """Normalized input tiles (zero mean, unit variance, like the block function feeds)."""
    return torch.randn(batch, bundle.in_channels, *TILE, generator=torch.Generator().manual_seed(seed))


def reference(bundle, x: torch.Tensor) -> torch.Tensor:
    """The bundle's network in fp32 on the CPU (ONNX Runtime on its own graph for an ONNX bundle)."""
    return reference_output(bundle, x)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind, case", CASES)
class TestConformance:
    def test_output_contract(self, kind, case, batch, runners, bundles):
        bundle = bundles(kind)
        runner = runners(kind, case, batch)
        y = runner(tiles(batch, 0, bundle).to(runner.device))
        assert isinstance(y, torch.Tensor)
        assert y.shape == (batch, bundle.out_channels, *TILE)
        assert y.dtype == torch.float32
        assert y.device == runner.device
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1

    def test_agrees_with_torch_fp32(self, kind, case, batch, runners, bundles):
        bundle = bundles(kind)
        runner = runners(kind, case, batch)
        x = tiles(batch, 1, bundle)
        err = relative_error(runner(x.to(runner.device)), reference(bundle, x))
        assert err <= TOLERANCE[case.precision], f"{case.id}: relative error {err:.2e}"

    def test_repeats_bit_for_bit(self, kind, case, batch, runners, bundles):
        bundle = bundles(kind)
        runner = runners(kind, case, batch)
        x = tiles(batch, 2, bundle).to(runner.device)
        assert torch.equal(runner(x), runner(x))

    def test_outputs_are_not_reused_and_inputs_not_touched(self, kind, case, batch, runners, bundles):
        bundle = bundles(kind)
        runner = runners(kind, case, batch)
        x1, x2 = tiles(batch, 3, bundle).to(runner.device), tiles(batch, 4, bundle).to(runner.device)
        x1_before = x1.clone()
        y1 = runner(x1)
        y1_before = y1.clone()
        y2 = runner(x2)
        assert torch.equal(x1, x1_before), "the runner wrote into its input"
        assert torch.equal(y1, y1_before), "a later call overwrote an earlier output"
        assert not torch.equal(y1, y2)


@pytest.mark.parametrize("kind, case", CASES)
def test_tiles_do_not_depend_on_their_batch(kind, case, runners, bundles):
    """Blocks batch a tile with different neighbours depending on the block size: its result must
    not change, or the output would depend on how the section was split into blocks."""
    bundle = bundles(kind)
    batch = max(BATCHES)
    runner = runners(kind, case, batch)
    x = tiles(batch, 5, bundle)
    other = x.clone()
    other[1:] = tiles(batch - 1, 6, bundle)
    assert torch.equal(runner(x.to(runner.device))[0], runner(other.to(runner.device))[0])


# ------------------------------------------------------------------ failures are loud and useful


def test_tensorrt_without_tensorrt_is_a_one_line_error_saying_what_to_install(bundle):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    spec = RunnerSpec(str(bundle.path), "tensorrt", "auto", "fp16", 2, TILE)
    with pytest.raises(BackendUnavailableError) as e:
        runner_class("tensorrt")(bundle, spec)
    assert "pip install tensorrt" in str(e.value) and "\n" not in str(e.value)


def test_onnxruntime_on_cuda_without_a_gpu_says_so(bundle):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    spec = RunnerSpec(str(bundle.path), "onnxruntime", "cuda", "fp32", 2, TILE)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        runner_class("onnxruntime")(bundle, spec)


@pytest.mark.parametrize(
    "backend, precision, options, message",
    [
        ("torch", "fp16", (), "fp16 is not supported by torch on the CPU"),
        ("torch", "fp32", (("cuda_graphs", True),), "CUDA graphs need a CUDA device"),
        ("torch", "fp32", (("complie", True),), "unknown torch runner option"),
        ("onnxruntime", "bf16", (), "no bf16 convolutions"),
    ],
)
def test_impossible_requests_are_config_errors(bundle, backend, precision, options, message):
    spec = RunnerSpec(str(bundle.path), backend, "cpu", precision, 2, TILE, options)
    with pytest.raises(ConfigError, match=message):
        runner_class(backend)(bundle, spec)


def test_default_torch_runner_is_unchanged_eager_fp32(bundle):
    """The default spec still means eager fp32, channels-last, exactly the network's output."""
    spec = RunnerSpec(str(bundle.path), "torch", "cpu", "fp32", 2, TILE)
    runner = runner_class("torch")(bundle, spec)
    x = tiles(2, 7, bundle)
    model = bundle.build_model().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x.to(memory_format=torch.channels_last))
    assert runner.options.compile is None and not runner.options.cuda_graphs and runner.channels_last
    assert torch.equal(runner(x), expected)
