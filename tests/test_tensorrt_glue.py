"""TensorRT glue that runs without TensorRT: profile shapes, precision per TensorRT version, plan
cache keys, cross-process build locking, I/O binding; and the builder/runtime call sequence
against ``tests/fake_tensorrt.py``, a RECORDING FAKE of the tensorrt module. The fake shows that
tilefeet calls the documented API in the intended order with the intended values; it is no
evidence that real TensorRT builds or runs these plans (TensorRT was never run for this suite).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.fake_tensorrt import FakeTensorRT, fake_plan_doc
from tilefeet.artifacts import build_once
from tilefeet.cli import main
from tilefeet.errors import BackendUnavailableError, ConfigError, InvalidEngineError
from tilefeet.runners import RunnerSpec, runner_class
from tilefeet.runners._trt_glue import (
    DeviceInfo,
    IOBinding,
    IOTensor,
    PlanKey,
    Profile,
    enqueue,
    make_profile,
    parse_shape,
    parse_size,
    precision_mode,
    resolve_io,
)
from tilefeet.runners.onnx_export import export_onnx
from tilefeet.runners.tensorrt_runner import BuildRequest, ensure_plan, load_plan

H200 = DeviceInfo("NVIDIA H200", (9, 0))


@pytest.fixture(scope="module")
def bundle(runner_bundle):
    return runner_bundle


# ----------------------------------------------------------------------------------- profiles


def test_simple_form_is_one_fixed_shape():
    p = make_profile(channels=1, divisor=16, batch=8, tile=(1024, 1024))
    assert p.min == p.opt == p.max == (8, 1, 1024, 1024)
    assert p.describe() == "8x1x1024x1024"


def test_explicit_shapes_fill_in_from_the_simple_form():
    p = make_profile(channels=1, divisor=16, batch=8, tile=(1024, 1024), min="1x256", max="16x2048x1536")
    assert p == Profile((1, 1, 256, 256), (8, 1, 1024, 1024), (16, 1, 2048, 1536))
    assert p.covers((4, 1, 512, 768)) and not p.covers((32, 1, 512, 512)) and not p.covers((4, 1, 2048, 2048))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min": "1x250"}, "multiple of the network's divisor 16"),
        ({"min": "16x1024"}, "grow from min to opt to max"),
        ({"max": "8x512"}, "grow from min to opt to max"),
        ({"opt": "eight"}, "BATCHxHEIGHTxWIDTH"),
    ],
)
def test_bad_profiles_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_profile(channels=1, divisor=16, batch=8, tile=(1024, 1024), **kwargs)


def test_shape_and_size_parsing():
    assert parse_shape("4x512", 3) == (4, 3, 512, 512)
    assert parse_shape(" 2×256×128 ", 1) == (2, 1, 256, 128)
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("2g") == 2 << 30
    assert parse_size("1000") == 1000 and parse_size(7) == 7
    with pytest.raises(ConfigError):
        parse_size("lots")


# ---------------------------------------------------------------------------------- precision


def flags_of(major: int):
    return lambda name: hasattr(FakeTensorRT(major).BuilderFlag, name)


def test_tensorrt_10_uses_builder_flags_on_the_fp32_graph():
    m = precision_mode("fp16", trt_version="10.13.0", has_flag=flags_of(10))
    assert (m.strongly_typed, m.onnx_precision, m.set_flags, m.clear_flags) == (False, "fp32", ("FP16",), ())
    assert "BuilderFlag.FP16" in m.describe()
    assert precision_mode("bf16", trt_version="10.13.0", has_flag=flags_of(10)).set_flags == ("BF16",)


def test_tensorrt_11_is_strongly_typed_with_precision_in_the_graph():
    m = precision_mode("fp16", trt_version="11.0.0", has_flag=flags_of(11))
    assert (m.strongly_typed, m.onnx_precision, m.set_flags) == (True, "fp16", ())
    assert "strongly typed" in m.describe()
    with pytest.raises(ConfigError, match="strongly typed only"):
        precision_mode("bf16", trt_version="11.0.0", has_flag=flags_of(11), typing="weak")


def test_strong_typing_can_be_chosen_on_tensorrt_10():
    m = precision_mode("bf16", trt_version="10.13.0", has_flag=flags_of(10), typing="strong")
    assert (m.strongly_typed, m.onnx_precision, m.set_flags) == (True, "bf16", ())


def test_fp32_means_fp32_unless_tf32_is_asked_for():
    assert precision_mode("fp32", trt_version="10.13.0", has_flag=flags_of(10)).clear_flags == ("TF32",)
    assert precision_mode("fp32", trt_version="11.0.0", has_flag=flags_of(11)).clear_flags == ("TF32",)
    assert precision_mode("fp32", trt_version="10.13.0", has_flag=flags_of(10), tf32=True).clear_flags == ()


# ---------------------------------------------------------------------------------- cache keys


def test_plan_key_changes_with_everything_a_plan_depends_on():
    profile = make_profile(channels=1, divisor=16, batch=8, tile=(1024, 1024))
    base = PlanKey(H200, "10.13.0", "ab" * 32, profile, "fp16", False)
    variants = [
        PlanKey(DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0)), "10.13.0", "ab" * 32, profile, "fp16", False),
        PlanKey(DeviceInfo("NVIDIA H200", (10, 0)), "10.13.0", "ab" * 32, profile, "fp16", False),
        PlanKey(H200, "11.0.0", "ab" * 32, profile, "fp16", False),
        PlanKey(H200, "10.13.0", "cd" * 32, profile, "fp16", False),
        PlanKey(
            H200, "10.13.0", "ab" * 32, make_profile(channels=1, divisor=16, batch=4, tile=(1024, 1024)), "fp16", False
        ),
        PlanKey(H200, "10.13.0", "ab" * 32, profile, "bf16", False),
        PlanKey(H200, "10.13.0", "ab" * 32, profile, "fp16", True),
    ]
    digests = {k.digest() for k in [base, *variants]}
    assert len(digests) == len(variants) + 1
    assert base.digest() == PlanKey(H200, "10.13.0", "ab" * 32, profile, "fp16", False).digest()
    name = base.filename("isbi membrane")
    assert name.startswith("isbi-membrane-nvidia-h200-sm90-trt10.13.0-fp16-") and name.endswith(".plan")
    assert PlanKey.from_json(base.to_json()) == base


# ------------------------------------------------------------------------ locking across processes

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from tilefeet.artifacts import build_once

    target, log, started, hold = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])

    def build(tmp):
        started.write_text(str(os.getpid()))
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(hold)
        tmp.write_text(f"built by {os.getpid()}")

    print(build_once(target, build).read_text())
    """
)


def spawn(tmp_path: Path, hold: float) -> subprocess.Popen:
    args = [tmp_path / "artefact", tmp_path / "builds.log", tmp_path / "started", hold]
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE, text=True)


def test_concurrent_builders_build_once_and_all_load_the_result(tmp_path):
    children = [spawn(tmp_path, hold=1.0) for _ in range(3)]
    outputs = [c.communicate(timeout=120)[0].strip() for c in children]
    assert all(c.returncode == 0 for c in children)
    builders = (tmp_path / "builds.log").read_text().split()
    assert len(builders) == 1, f"built {len(builders)} times"
    assert outputs == [f"built by {builders[0]}"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefact", "artefact.lock", "builds.log", "started"]


def test_a_builder_that_dies_does_not_block_the_next(tmp_path):
    doomed = spawn(tmp_path, hold=600.0)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():  # wait until it holds the lock and is building
        assert time.monotonic() < deadline and doomed.poll() is None
        time.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    doomed.communicate(timeout=60)
    survivor = spawn(tmp_path, hold=0.0)
    out = survivor.communicate(timeout=120)[0].strip()
    assert survivor.returncode == 0 and out == f"built by {survivor.pid}"


def test_build_once_publishes_nothing_when_the_build_fails(tmp_path):
    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "plan", broken)
    assert not (tmp_path / "plan").exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert build_once(tmp_path / "plan", lambda tmp: tmp.write_text("ok")).read_text() == "ok"


# --------------------------------------------------------------------------------- I/O binding


def test_resolve_io_accepts_one_float_input_and_output_only():
    assert resolve_io([IOTensor("tiles", True, "FLOAT"), IOTensor("probabilities", False, "FLOAT")]) == IOBinding(
        "tiles", "probabilities"
    )
    with pytest.raises(InvalidEngineError, match="one input and one output"):
        resolve_io([IOTensor("a", True, "FLOAT"), IOTensor("b", True, "FLOAT"), IOTensor("c", False, "FLOAT")])
    with pytest.raises(InvalidEngineError, match="HALF"):
        resolve_io([IOTensor("tiles", True, "HALF"), IOTensor("probabilities", False, "FLOAT")])


def test_enqueue_binds_the_tensors_own_memory_and_the_given_stream():
    trt = FakeTensorRT(10)
    context = trt.Runtime(None).deserialize_cuda_engine(b'FAKE-PLAN{"input": "tiles"}').create_execution_context()
    x, out = torch.zeros(2, 1, 32, 32), torch.empty(2, 1, 32, 32)
    enqueue(context, IOBinding("tiles", "probabilities"), x, out, stream_handle=1234)
    assert trt.calls[-3:] == [
        ("set_tensor_address", "tiles", x.data_ptr()),
        ("set_tensor_address", "probabilities", out.data_ptr()),
        ("execute_async_v3", 1234),
    ]


# ------------------------------------------------------------- builder sequence, on the recording fake


def build(trt, bundle, tmp_path, precision="fp16", profile=None, **kw):
    """ensure_plan into a fresh cache per test, seeded with this session's ONNX exports (exporting
    is the slow part, and not what these tests are about)."""
    if not (tmp_path / "onnx").exists():
        for p in ("fp32", "fp16"):
            export_onnx(bundle, p)
        shutil.copytree(Path(os.environ["TILEFEET_CACHE"]) / "onnx", tmp_path / "onnx")
    profile = profile or make_profile(channels=1, divisor=bundle.divisor, batch=2, tile=(64, 96))
    return ensure_plan(
        trt, bundle, BuildRequest(precision=precision, workspace_bytes=1 << 30, **kw), profile, H200, cache=tmp_path
    )


def test_fake_tensorrt_10_fp16_build_sequence(bundle, tmp_path):
    trt = FakeTensorRT(10)
    plan = build(trt, bundle, tmp_path, "fp16")
    assert trt.names() == [
        "Builder", "create_network", "OnnxParser", "parse_from_file", "create_builder_config", "set_memory_pool_limit",
        "set_flag", "create_optimization_profile", "set_shape", "add_optimization_profile", "create_timing_cache",
        "set_timing_cache", "build_serialized_network", "get_timing_cache",
    ]  # fmt: skip
    calls = {c[0]: c[1:] for c in trt.calls}
    assert calls["create_network"] == (0,) and calls["set_flag"] == ("FP16",)
    assert calls["set_memory_pool_limit"] == ("WORKSPACE", 1 << 30)
    assert calls["set_shape"] == ("tiles", (2, 1, 64, 96), (2, 1, 64, 96), (2, 1, 64, 96))
    assert "-fp32-" in calls["parse_from_file"][0]  # weak typing parses the fp32 graph
    doc = fake_plan_doc(plan.path)
    assert doc["initializer_types"] == ["FLOAT"] and "FP16" in doc["set_flags"]
    assert plan.path.is_file() and json.loads(plan.path.with_suffix(".json").read_text())["precision"] == "fp16"
    assert "weakly typed" in plan.describe() and "NVIDIA H200" in plan.describe()


def test_fake_tensorrt_11_fp16_is_strongly_typed_on_the_fp16_graph(bundle, tmp_path):
    trt = FakeTensorRT(11)
    plan = build(trt, bundle, tmp_path, "fp16")
    calls = {c[0]: c[1:] for c in trt.calls}
    assert calls["create_network"] == (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED),)
    assert "set_flag" not in calls  # BuilderFlag.FP16 does not exist on TensorRT 11
    doc = fake_plan_doc(plan.path)
    assert "FLOAT16" in doc["initializer_types"] and "-fp16-" in calls["parse_from_file"][0]
    assert "strongly typed" in plan.describe()


def test_fake_fp32_build_clears_tf32(bundle, tmp_path):
    trt = FakeTensorRT(10)
    plan = build(trt, bundle, tmp_path, "fp32")
    assert ("clear_flag", "TF32") in trt.calls and "TF32" not in fake_plan_doc(plan.path)["set_flags"]


def test_plans_are_cached_and_the_timing_cache_is_carried_over(bundle, tmp_path):
    trt = FakeTensorRT(10)
    first = build(trt, bundle, tmp_path, "fp16")
    assert build(trt, bundle, tmp_path, "fp16") == first and trt.builds == 1
    wider = make_profile(channels=1, divisor=16, batch=4, tile=(64, 96))
    build(trt, bundle, tmp_path, "fp16", profile=wider)
    assert trt.builds == 2
    timing_blobs = [c[1] for c in trt.calls if c[0] == "create_timing_cache"]
    assert timing_blobs == [b"", b"+"], "the second build must start from the first one's timing cache"


def test_a_wide_prebuilt_profile_serves_smaller_runs(bundle, tmp_path):
    trt = FakeTensorRT(10)
    wide = make_profile(channels=1, divisor=16, batch=2, tile=(64, 96), min="1x32", max="8x256")
    built = build(trt, bundle, tmp_path, "fp16", profile=wide)
    fixed = make_profile(channels=1, divisor=16, batch=3, tile=(128, 64))
    assert build(trt, bundle, tmp_path, "fp16", profile=fixed).path == built.path and trt.builds == 1
    too_big = make_profile(channels=1, divisor=16, batch=16, tile=(64, 64))
    assert build(trt, bundle, tmp_path, "fp16", profile=too_big).path != built.path and trt.builds == 2


def test_load_plan_fixes_the_input_shape(bundle, tmp_path):
    trt = FakeTensorRT(10)
    plan = build(trt, bundle, tmp_path, "fp16")
    loaded = load_plan(trt, plan.path.read_bytes(), (2, 1, 64, 96))
    assert loaded.io == IOBinding("tiles", "probabilities")
    assert trt.calls[-2:] == [("create_execution_context",), ("set_input_shape", "tiles", (2, 1, 64, 96))]
    with pytest.raises(InvalidEngineError, match="delete it to rebuild"):
        load_plan(trt, b"garbage", (2, 1, 64, 96))


def test_tensorrt_runner_refuses_the_cpu_even_with_tensorrt_importable(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(10))
    spec = RunnerSpec(str(bundle.path), "tensorrt", "cpu", "fp16", 2, (64, 96))
    with pytest.raises(BackendUnavailableError, match="NVIDIA GPUs only"):
        runner_class("tensorrt")(bundle, spec)


# ------------------------------------------------------------------------------ build-engine CLI


def test_build_engine_tensorrt_without_tensorrt_says_what_to_install(bundle, capsys):
    if "tensorrt" in sys.modules or __import__("importlib").util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is importable here")
    code = main(
        [
            "build-engine",
            "--engine",
            str(bundle.path),
            "--backend",
            "tensorrt",
            "--precision",
            "fp16",
            "--tile",
            "128",
            "--batch",
            "8",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("tilefeet: error: backend 'tensorrt' needs the tensorrt package: pip install tensorrt")


def test_build_engine_onnxruntime_exports_and_prints_the_path(bundle, capsys, tmp_path):
    code = main(
        ["build-engine", "--engine", str(bundle.path), "--backend", "onnxruntime", "--out", str(tmp_path / "out")]
    )
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert code == 0 and path == tmp_path / "out" / "model.onnx" and path.is_file()
    assert (tmp_path / "out" / "model.onnx.data").is_file() and "checked" in err
    code = main(["build-engine", "--engine", str(bundle.path), "--backend", "onnxruntime", "--precision", "fp16"])
    out, _ = capsys.readouterr()
    assert (
        code == 0 and Path(out.strip()).is_file() and Path(out.strip()).parent.name.startswith(f"{bundle.name}-fp16-")
    )
    assert Path(os.environ["TILEFEET_CACHE"]) in Path(out.strip()).parents
