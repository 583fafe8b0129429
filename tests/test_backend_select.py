"""``--backend auto`` and explicit backends: the order on a GPU, the measured CPU choice (once, then
cached), and one-line errors that say what to install."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import make_random_engine
from tilefeet.errors import BackendUnavailableError, ConfigError
from tilefeet.runners import RunnerSpec, runner_class, select
from tilefeet.runners.guard import Guard
from tilefeet.runners.select import choose, gpu_choice, gpu_precision_choice, resolve_backend, timing_key

TILE = (64, 96)


@pytest.fixture(scope="module")
def bundle(runner_bundle):
    return runner_bundle


def auto(bundle, cache, **kw):
    kw = {"device": "cpu", "precision": "fp32", "batch_size": 2, "tile": TILE, **kw}
    return resolve_backend(bundle, cache=cache, **kw)


def fake_rates(monkeypatch, rates: dict[str, float]) -> list[str]:
    measured: list[str] = []

    def measure(backend, bundle, precision, batch_size, tile, **kw):
        measured.append(backend)
        return rates.get(f"{backend} {precision}", rates.get(backend, 0.5))

    monkeypatch.setattr(select, "measure_mpx_per_s", measure)
    return measured


def no_measuring(monkeypatch) -> None:
    def measure(*args, **kwargs):
        raise AssertionError("measured although it should not have")

    monkeypatch.setattr(select, "measure_mpx_per_s", measure)


# ------------------------------------------------------------------------------------------ GPU


def test_gpu_order_is_tensorrt_then_eager_torch():
    trt = gpu_choice("NVIDIA H200", "fp16", trt_version="10.13.0", trt_reason=None)
    assert (
        (trt.backend, trt.options) == ("tensorrt", ())
        and "TensorRT 10.13.0" in trt.reason
        and "NVIDIA H200" in trt.reason
    )
    why = "backend 'tensorrt' needs the tensorrt package: pip install tensorrt"
    eager = gpu_choice("NVIDIA H200", "fp16", trt_version=None, trt_reason=why)
    # torch.compile is opt-in on a GPU: measured on the H200, its 15 s build per process outweighed
    # what a faster network saves on a section the pipeline around the network bounds.
    assert (eager.backend, eager.options) == ("torch", ())
    assert "pip install tensorrt" in eager.reason and "--backend-option compile=true" in eager.reason


@pytest.mark.gpu
def test_auto_on_a_gpu_picks_a_gpu_backend(bundle, tmp_path):
    backend, _, reason = auto(bundle, tmp_path, device="cuda", precision="fp16")
    assert backend in ("tensorrt", "torch") and torch.cuda.get_device_name() in reason


def guard_of(f1: float, f1_fp32: float = 0.8103) -> Guard:
    return Guard(backend="torch", precision="fp16", passed=abs(f1 - f1_fp32) <= 0.002, max_abs_diff=0.004, f1=f1, f1_fp32=f1_fp32,
                 agreement_f1=0.999, class_name="membrane", data="ISBI 2012 held-out slices 24–29", pixels=6 * 512 * 512)


def test_precision_auto_on_a_gpu_is_fp16_only_on_tensor_cores_and_a_passed_guard():
    """Found on the H200: fp32 by default ran a gigapixel section 1.5x slower than fp16, whose
    outputs differ by 2e-3. fp16 is chosen only where it is checked, and the reason says so."""
    precision, why = gpu_precision_choice("NVIDIA H200", (9, 0), guard_of(0.8101))
    assert precision == "fp16" and "passes the accuracy guard" in why and "F1 0.8101 vs fp32 0.8103" in why
    precision, why = gpu_precision_choice("NVIDIA H200", (9, 0), guard_of(0.7950))
    assert precision == "fp32" and "fails the accuracy guard" in why and "--precision fp16 runs it anyway" in why
    precision, why = gpu_precision_choice("NVIDIA H200", (9, 0), None)
    assert precision == "fp32" and "no check slices" in why
    precision, why = gpu_precision_choice("Tesla P100", (6, 0), guard_of(0.8103))
    assert precision == "fp32" and "compute capability 6.0" in why and "no fp16 tensor cores" in why


@pytest.mark.gpu
def test_precision_auto_on_a_gpu_runs_the_guard_on_that_gpu(tmp_path):
    from tilefeet.engine import load_engine

    choice = choose(load_engine("isbi-membrane"), device="cuda", precision="auto", batch_size=4, cache=tmp_path)
    assert choice.precision == "fp16" and "accuracy guard" in choice.reason and torch.cuda.get_device_name() in choice.reason
    assert len(list((tmp_path / "guard").glob("*.json"))) == 1  # checked once, on the GPU, and cached
    again = choose(load_engine("isbi-membrane"), device="cuda", precision="auto", batch_size=4, cache=tmp_path)
    assert again == choice


# ------------------------------------------------------------------------------------------ CPU


def int8_guard(precision: str, passed: bool):
    figures = (0.8059, 0.8063, 0.9971, 0.0029) if passed else (0.8059, 0.8063, 0.9971, 0.05)
    return Guard(backend="openvino", precision=precision, passed=passed, max_abs_diff=0.1, f1=figures[0], f1_fp32=figures[1],
                 agreement_f1=figures[2], class_name="membrane", data="ISBI", pixels=1, p99_abs_diff=0.01, objects="cells",
                 objects_are=figures[3])


@pytest.mark.parametrize("int8_passes, bf16_passes, expected", [(True, True, "int8"), (False, True, "bf16"), (False, False, "fp32")])
def test_auto_runs_the_fastest_precision_that_passes_the_guard(tmp_path, monkeypatch, int8_passes, bf16_passes, expected):
    """int8 measured fastest (as here: 15.5 Mpx/s against bf16's 8.7) is chosen only when its guard
    passes; else the next faster precision that passes, else fp32; the reason says which failed."""
    from tilefeet.engine import load_engine

    isbi = load_engine("isbi-membrane")
    rates = {"openvino int8": 15.0, "openvino bf16": 9.0, "torch bf16": 4.5, "openvino fp32": 4.4, "onnxruntime fp32": 3.8,
             "torch fp32": 2.2}
    monkeypatch.setattr(select, "measure_mpx_per_s", lambda backend, bundle, precision, *a, **k: rates[f"{backend} {precision}"])
    monkeypatch.setattr(select, "native_bf16", lambda: "AVX512-BF16")
    monkeypatch.setattr(select, "runnable_on_cpu", lambda bundle, precisions, *a: ([tuple(k.split()) for k in rates
                                                                                    if k.split()[1] in precisions], []))
    passes = {"int8": int8_passes, "bf16": bf16_passes}
    monkeypatch.setattr(select, "_guard", lambda bundle, combo, *a, **k: int8_guard(combo[1], passes[combo[1]]))
    choice = select.choose(isbi, device="cpu", precision="auto", batch_size=4, tile=(512, 512), cache=tmp_path)
    assert choice.precision == expected
    assert ("openvino int8 passes" if int8_passes else "openvino int8 fails the accuracy guard on ISBI (objects ARE 0.0500 > 0.01)") in choice.reason
    if expected == "bf16":
        assert choice.reason.startswith("openvino bf16 is the fastest that passes the accuracy guard on the CPU")
    if expected == "fp32":
        assert choice.reason.startswith("openvino fp32 is the fastest at full precision") and "bf16 fails" in choice.reason
    assert "int8 as asked" not in choice.reason  # that note is for --precision int8



def test_auto_on_cpu_measures_every_backend_and_runs_the_fastest(bundle, tmp_path):
    backend, options, reason = auto(bundle, tmp_path)
    files = list((tmp_path / "select").glob("*.json"))
    assert len(files) == 1
    rates = json.loads(files[0].read_text())["mpx_per_s"]
    assert set(rates) == {"onnxruntime fp32", "openvino fp32", "torch fp32"} and all(r > 0 for r in rates.values())
    assert f"{backend} fp32" == max(rates, key=rates.get) and options == ()
    assert "Mpx/s" in reason and all(b in reason for b in ("onnxruntime", "openvino", "torch")) and str(files[0]) in reason
    # what it chose runs
    runner = runner_class(backend)(bundle, RunnerSpec(str(bundle.path), backend, "cpu", "fp32", 2, TILE, options))
    assert runner(torch.zeros(2, 1, *TILE)).shape == (2, 1, *TILE)


def test_a_candidate_that_fails_here_is_left_out_and_said(monkeypatch, tmp_path):
    """An int8 graph the quantizer refuses (an imported network with an operator it cannot handle),
    or a guard that cannot run, must not fail the default run: the next candidate runs, and the
    plan says what was left out and why."""
    from tilefeet.engine import load_engine

    isbi = load_engine("isbi-membrane")
    rates = {"openvino int8": 15.0, "openvino bf16": 9.0, "openvino fp32": 4.4, "onnxruntime fp32": 3.8}

    def measure(backend, bundle, precision, *a, **k):
        if precision == "int8":
            raise RuntimeError("Unsupported operator\n  FancyOp in the graph")
        return rates[f"{backend} {precision}"]

    monkeypatch.setattr(select, "measure_mpx_per_s", measure)
    monkeypatch.setattr(select, "native_bf16", lambda: "AVX512-BF16")
    monkeypatch.setattr(select, "runnable_on_cpu", lambda bundle, precisions, *a: ([tuple(k.split()) for k in rates
                                                                                    if k.split()[1] in precisions], []))

    def guard(bundle, combo, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(select, "_guard", guard)
    choice = choose(isbi, device="cpu", precision="auto", batch_size=4, tile=(512, 512), cache=tmp_path)
    assert (choice.backend, choice.precision) == ("openvino", "fp32")
    assert "openvino int8 left out: it failed here (RuntimeError: Unsupported operator FancyOp in the graph)" in choice.reason
    assert "openvino bf16 not chosen: its accuracy guard failed here (disk full)" in choice.reason
    again = choose(isbi, device="cpu", precision="auto", batch_size=4, tile=(512, 512), cache=tmp_path)
    assert again.reason == choice.reason  # the failure is part of the cached measurement


def test_the_measurement_is_cached(bundle, tmp_path, monkeypatch):
    measured = fake_rates(monkeypatch, {"onnxruntime": 3.0, "openvino": 2.0, "torch": 1.0})
    first = auto(bundle, tmp_path)
    assert sorted(measured) == ["onnxruntime", "openvino", "torch"]
    no_measuring(monkeypatch)
    assert auto(bundle, tmp_path) == first


@pytest.mark.parametrize(
    "rates, expected",
    [
        ({"onnxruntime": 3.0, "openvino": 2.0, "torch": 1.0}, "onnxruntime"),
        ({"onnxruntime": 1.0, "openvino": 2.0, "torch": 3.0}, "torch"),
        ({"onnxruntime": 1.0, "openvino": 3.0, "torch": 2.0}, "openvino"),
    ],
)
def test_the_choice_follows_the_measurement(bundle, tmp_path, monkeypatch, rates, expected):
    fake_rates(monkeypatch, rates)
    backend, _, reason = auto(bundle, tmp_path)
    assert backend == expected and reason.startswith(f"{expected} fp32 is the fastest")
    assert f"{expected} fp32 3.00 Mpx/s vs" in reason


def test_timing_key_covers_shape_precision_and_weights(bundle, tmp_path):
    other = make_random_engine(tmp_path / "other", seed=3)
    both = [("onnxruntime", "fp32"), ("torch", "fp32")]
    keys = {
        timing_key(bundle, both, "fp32", 2, TILE),
        timing_key(bundle, both, "fp32", 4, TILE),
        timing_key(bundle, both, "fp32", 2, (96, 64)),
        timing_key(bundle, both, "bf16", 2, TILE),
        timing_key(other, both, "fp32", 2, TILE),
    }
    assert len(keys) == 5


def test_one_capable_cpu_backend_is_chosen_without_measuring(bundle, tmp_path, monkeypatch):
    no_measuring(monkeypatch)
    backend, _, reason = auto(bundle, tmp_path, precision="fp16")
    assert backend == "onnxruntime" and "only CPU backend with fp16 kernels" in reason


def test_without_onnxruntime_and_openvino_auto_falls_back_to_torch_and_says_why(bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    monkeypatch.setitem(sys.modules, "openvino", None)
    no_measuring(monkeypatch)
    backend, _, reason = auto(bundle, tmp_path)
    assert backend == "torch" and "pip install 'tilefeet[onnx]'" in reason and "pip install openvino" in reason


# ------------------------------------------------------------------------------------- explicit


def assert_one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_explicit_backend_is_kept_when_it_can_run(bundle, tmp_path):
    assert auto(bundle, tmp_path, prefer="onnxruntime") == ("onnxruntime", (), "--backend onnxruntime was requested")


def test_explicit_tensorrt_without_tensorrt_says_what_to_install(bundle, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(BackendUnavailableError) as e:
        auto(bundle, tmp_path, prefer="tensorrt", device="auto")
    assert_one_line(e, "pip install tensorrt")


def test_explicit_onnxruntime_without_onnxruntime_says_what_to_install(bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError) as e:
        auto(bundle, tmp_path, prefer="onnxruntime")
    assert_one_line(e, "pip install 'tilefeet[onnx]'")


def test_explicit_gpu_without_a_gpu_says_so(bundle, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailableError) as e:
        auto(bundle, tmp_path, prefer="torch", device="cuda")
    assert_one_line(e, "no CUDA GPU", "CUDA build of torch")


@pytest.mark.parametrize(
    "prefer, precision, message",
    [
        ("torch", "fp16", "use --precision fp32 or bf16, or --backend onnxruntime"),
        ("onnxruntime", "bf16", "or --backend openvino"),
        ("tensorflow", "fp32", "unknown backend"),
    ],
)
def test_explicit_impossible_combinations_are_config_errors(bundle, tmp_path, prefer, precision, message):
    with pytest.raises(ConfigError) as e:
        auto(bundle, tmp_path, prefer=prefer, precision=precision)
    assert_one_line(e, message)


def test_importing_tilefeet_and_its_runners_loads_no_backend_library():
    """``import tilefeet`` (and the runner modules, and the CLI) stay light: onnx, onnxruntime,
    openvino and tensorrt load only when a run asks for them."""
    code = (
        "import sys, tilefeet, tilefeet.runners, tilefeet.runners.select, tilefeet.runners.onnx_export, "
        "tilefeet.runners.onnxruntime_runner, tilefeet.runners.openvino_runner, tilefeet.runners.guard, "
        "tilefeet.runners.tensorrt_runner, tilefeet.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'onnxscript', 'openvino', 'tensorrt')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
