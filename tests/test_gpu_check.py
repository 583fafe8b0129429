"""benchmarks/gpu_check.py, the one command a GPU session runs on a lent H200: its quick CPU mode
end to end under an imitation of the H200's packages (what the image lacks does not import), the
JSON fields the README quotes, step budgets and the deadline, and the wheel checks of ``--prepare``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import h200_env  # noqa: E402


def _imitation(tmp_path: Path) -> tuple[dict[str, str], Path]:
    log = tmp_path / "blocked-imports.log"
    return {**os.environ, **h200_env.simulation_env(tmp_path / "h200-site", log)}, log


def test_the_imitation_blocks_what_the_h200_image_lacks(tmp_path):
    env, log = _imitation(tmp_path)
    blocked = json.loads(env["TILEFEET_H200_BLOCKED"])
    assert "imagecodecs" in blocked and "bioimageio" in blocked and "s3fs" in blocked
    assert not {"zarr", "dask", "torch", "numpy", "monai", "pydantic", "tilefeet"} & set(blocked)
    code = "import zarr, dask.array, ome_zarr_models, tilefeet.pipeline\ntry:\n import imagecodecs\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "not on the H200 image" in out
    tried = log.read_text().splitlines()
    assert "imagecodecs" in [line.split()[0] for line in tried]
    # Other attempts may come from libraries' optional imports (numcodecs tries backports.lzma where
    # another test's environment left one to find); none from tilefeet, the benchmarks or the tests.
    assert not [line for line in tried if any(f"{REPO}/{d}/" in line for d in ("tilefeet", "benchmarks", "tests"))], tried


@pytest.mark.slow
def test_quick_cpu_mode_writes_what_the_readme_quotes_and_imports_only_what_the_h200_has(tmp_path):
    """The whole check at tiny sizes on the CPU (about a minute on two idle cores), every process under
    the imitation: a module the H200 lacks imported anywhere on these paths fails the run."""
    env, log = _imitation(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu",
                           "--out", str(out), "--workdir", str(work)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # Libraries may try optional imports (tifffile tries imagecodecs); tilefeet's own code, the
    # benchmarks and the GPU tests must not even try one on these paths.
    tried = log.read_text().splitlines() if log.exists() else []
    ours = [line for line in tried if any(f"{REPO}/{d}/" in line for d in ("tilefeet", "benchmarks", "tests"))]
    assert not ours, f"imports of modules the H200 lacks: {ours}"

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)  # what the device tool returns
    (summary_name,) = [f for f in files if f.startswith("gpu-check-") and f.endswith(".json")]
    device = summary_name[len("gpu-check-") : -len(".json")]
    assert {f"segment-{device}-512.json", f"segment-{device}-256.json", f"segment-{device}-256-sweep.json",
            f"pytest-gpu-{device}.log", "gpu-check.log"} <= set(files)
    assert any(f.startswith("runners-cpu-") and f.endswith("-isbi-membrane.json") for f in files)

    s = json.loads((out / summary_name).read_text())
    assert s["quick"] is True and s["device"] and s["environment"]["missing"] == []
    assert [st["name"] for st in s["steps"]] == [st.name for st in gpu_check.STEPS]
    assert all(st["status"] == "ok" and st["seconds"] > 0 for st in s["steps"]), s["steps"]
    assert s["settings"]["precision"] == "fp32" and s["settings"]["blocks_in_flight"] == 2

    giga = s["gigapixel"]
    assert giga["size"] == 512 and giga["seconds"] > 0 and giga["mpx_per_s"] > 0 and giga["io_seconds"] > 0
    assert {"read", "network", "blend", "write", "pyramid"} <= set(giga["stages"])
    assert 0 < giga["device_busy_fraction"] <= 1.5  # on a CPU: the network stage's share of the wall time
    vs = s["versus_monai"]
    for key in ("tilefeet_seconds", "monai_seconds", "monai-runner_seconds", "io_seconds", "pipeline_seconds", "ratio",
                "ratio_to_monai_inference_alone", "ratio_to_monai_on_tilefeet_runner", "device_busy_fraction"):
        assert vs[key] > 0, key
    assert vs["ratio"] == pytest.approx(vs["monai_seconds"] / vs["tilefeet_seconds"])

    targets = s["targets"]
    assert targets["gigapixel_seconds"]["measured"] == giga["seconds"] and targets["gigapixel_seconds"]["target"] == 10
    assert set(targets) == {"gigapixel_seconds"}  # the mission's MONAI target is the CPU's: reported in versus_monai
    assert targets["gigapixel_seconds"]["met"] is None  # quick: not judged
    assert "labels and pyramids" in vs["baseline"]

    runners = s["runners"]
    assert {(r["label"], r["precision"]) for r in runners["rows"]} == {("torch eager", "fp32"), ("torch eager", "bf16")}
    assert all(r["mpx_per_s"] > 0 and r["relative_error_vs_torch_fp32"] < 0.1 for r in runners["rows"])

    sweep = s["sweep"]
    assert set(sweep["variants"]) == {"bf16", "fp32"} and all(v > 0 for v in sweep["variants"].values())
    agree = sweep["agreement"]["bf16 vs fp32"]
    assert 0 < agree["max_abs_diff_255"] <= 255 and 0 <= agree["label_disagreement"] < 0.05

    for name in ("pytest-fast", "pytest-compile"):
        counts = s["pytest"][name]
        assert counts["parsed"] and counts["failed"] == counts["errors"] == 0 and counts["passed"] == 0
        assert counts["skipped"] > 0 and all("CUDA" in r for r in counts["skip_reasons"])  # every GPU test, skipped here
    segment = json.loads((out / f"segment-{device}-512.json").read_text())
    assert segment["results"]["tilefeet"]["profile"]["stages"] and segment["settings_reasons"]


def test_a_step_over_its_budget_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = textwrap.dedent(f"""
        import subprocess, time
        p = subprocess.Popen(["sleep", "60"])
        open({str(pid_file)!r}, "w").write(str(p.pid))
        print("started", flush=True)
        time.sleep(60)
    """)
    log = gpu_check.Log(tmp_path / "log")
    t0 = time.perf_counter()
    status, seconds = gpu_check.run_command([sys.executable, "-c", code], 2.0, log)
    assert status == "timeout" and seconds < 20 and time.perf_counter() - t0 < 20
    assert "started" in (tmp_path / "log").read_text()
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild is gone (a zombie until its parent, also killed, is reaped)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} survived its step's timeout")
    assert gpu_check.run_command([sys.executable, "-c", "raise SystemExit(3)"], 30, log)[0] == "failed (exit 3)"
    log.close()


def test_steps_that_cannot_get_their_minimum_are_skipped_and_said(tmp_path):
    ctx = gpu_check.Context(tmp_path / "out", tmp_path / "work", gpu_check.Settings.for_run("cpu", quick=False))
    ctx.out.mkdir()
    ctx.workdir.mkdir()
    steps = (gpu_check.Step("gigapixel", 150, 45, "the gigapixel"),)
    assert gpu_check.Check(ctx, steps, deadline_s=450, t0=time.time() - 420).run() == 0
    summary = json.loads((ctx.out / "gpu-check-unknown-device.json").read_text())
    (step,) = summary["steps"]
    assert step["status"] == "skipped" and "needs 45 s" in step["reason"]
    assert summary["targets"]["gigapixel_seconds"]["measured"] is None and summary["targets"]["gigapixel_seconds"]["met"] is None


def test_targets_are_judged_on_a_full_run(tmp_path):
    ctx = gpu_check.Context(tmp_path, tmp_path, gpu_check.Settings.for_run("cuda", quick=False), {"device": "nvidia-h200"})

    def tilefeet(seconds):
        return {"seconds": seconds, "mpx_per_s": 1.0, "profile": {"device_busy_fraction": 0.8},
                "stages": {"wall_seconds": seconds * 1.2, "stages": {"network": {"seconds": 2.0, "calls": 9}}}}

    giga = {"size": 32768, "megapixels": 1073.7, "results": {"tilefeet": tilefeet(8.5), "io": {"seconds": 2.0}}}
    vs = {"size": 8192, "results": {"tilefeet": tilefeet(1.0), "monai": {"seconds": 4.0, "infer_seconds": 3.0}}}
    gpu_check.write_json(tmp_path / "segment-nvidia-h200-32768.json", giga)
    gpu_check.write_json(tmp_path / "segment-nvidia-h200-8192.json", vs)
    h = gpu_check.headline(ctx, {})
    assert h["targets"]["gigapixel_seconds"] | {"measured": 8.5, "met": True} == h["targets"]["gigapixel_seconds"]
    assert h["versus_monai"]["ratio"] == 4.0 and "monai_ratio" not in h["targets"]
    assert h["gigapixel"]["stages"] == {"network": 2.0} and h["gigapixel"]["device_busy_fraction"] == 0.8
    assert h["versus_monai"]["ratio_to_monai_inference_alone"] == 3.0 and h["gigapixel"]["complete"] is True

    # Stopped during the profiled second run: the first run's result still makes the headline.
    (tmp_path / "segment-nvidia-h200-32768.json").unlink()
    gpu_check.write_json(tmp_path / "first-run-32768.json", {"seconds": 12.0, "profile": {"device_busy_fraction": 0.5}})
    h = gpu_check.headline(ctx, {})
    assert h["gigapixel"]["complete"] is False and h["gigapixel"]["seconds"] == 12.0
    assert h["targets"]["gigapixel_seconds"]["met"] is False


def test_a_rerun_can_change_the_headline_settings():
    args = gpu_check.parse_args(["--precision", "bf16", "--blocks-in-flight", "12", "--backend-option", "cuda_graphs=true"])
    s = gpu_check.with_overrides(gpu_check.Settings.for_run("cuda", quick=False), args)
    assert (s.precision, s.blocks_in_flight, s.batch_size, s.backend_options) == ("bf16", 12, 16, (("cuda_graphs", True),))
    assert s.options()["backend_options"] == [["cuda_graphs", True]] and "overridden" in s.reasons[-1]
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        gpu_check.with_overrides(s, gpu_check.parse_args(["--backend-option", "cuda_graphs"]))


def test_pytest_counts_come_from_the_log_when_pytest_was_stopped(tmp_path):
    log = "tests/a.py::test_x[1] PASSED  [ 10%]\ntests/a.py::test_y FAILED  [ 20%]\ntests/b.py::test_z SKIPPED (no)\n"
    c = gpu_check.junit_counts(tmp_path / "absent.xml", log)
    assert (c["passed"], c["failed"], c["skipped"], c["parsed"]) == (1, 1, 1, False)
    assert c["failures"] == [{"test": "tests/a.py::test_y", "message": ""}]


def _wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_wheel_requirements_are_checked_against_the_image_and_each_other(tmp_path):
    _wheel(tmp_path, "ome-zarr-models", "1.8.1", ["pydantic<2.13,>=2.11.5", "zarr>=3.1.1", "numpy"])
    _wheel(tmp_path, "pydantic", "2.14.4", ["typing-extensions>=4.16.0"])
    _wheel(tmp_path, "zarr", "3.4.2", ["msgspec>=0.19", "numpy>=2", 'importlib_metadata; python_version < "3.12"',
                                       "s3fs; extra == 'remote'"])
    _wheel(tmp_path, "torchish", "1.0", ["numpy>=3"])
    _wheel(tmp_path, "binary", "1.0", [], tag="cp311-cp311-manylinux2014_x86_64")
    wheels = h200_env.read_wheels(tmp_path)
    problems = h200_env.unmet_requirements(wheels)
    assert len(problems) == 3, problems
    assert any("ome-zarr-models 1.8.1 needs pydantic<2.13" in p and "has pydantic 2.14.4" in p for p in problems)
    assert any("zarr 3.4.2 needs msgspec" in p and "neither on the H200 image" in p for p in problems)
    assert any("torchish 1.0 needs numpy>=3" in p and "the H200 image has numpy 2.5.2" in p for p in problems)
    assert {w.name: w.fits_python312() for w in wheels}["binary"] is False
    kept = h200_env.prune(wheels, {"zarr": "3.4.2", "pydantic": "2.12.5"})
    assert [w.name for w in kept] == ["zarr"] and sorted(p.name for p in tmp_path.iterdir()) == [kept[0].path.name]
