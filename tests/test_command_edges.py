"""Every command behaves like ``segment`` at its edges (issue 17, part 3): ``train``, ``preview`` and
``import-engine`` refuse an output they cannot write in one line (exit 2, no temporary names) before
any work; Ctrl-C during training says where the checkpoint is and resuming from it gives the same
engine; the training bar shows the validation F1; ``segment --objects`` says what it found;
``import-engine`` does not guess an activation.

Read-only and full file systems are real tmpfs mounts (skipped where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import imageio.v3 as iio
import pytest

from tilefeet.cli import main
from tilefeet.convert import write_image

from .conftest import DATA, isbi_montage
from .helpers import assert_one_line_error, cli_command, run_cli

TINY = ("--crop", "64", "--batch-size", "2", "--base-channels", "4", "--tile", "64", "--overlap", "16")


@contextlib.contextmanager
def _tmpfs(tmp_path: Path, options: str):
    """A small tmpfs mounted for the test (a real read-only or full file system)."""
    where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the read-only and full-disk cases need one")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _no_temporary_names(line: str) -> None:
    assert not re.search(r"\.(tmp|partial)\b|tilefeet-probe|/\.[^/ ]+\.", line), line


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    """Four ISBI slices (160 × 192) as a (z, y, x) OME-Zarr at 4 nm with labels/membrane."""
    tmp = tmp_path_factory.mktemp("stack")
    for kind in ("image", "label"):
        (tmp / kind).mkdir()
        for i in (24, 25, 26, 27):
            iio.imwrite(tmp / kind / f"{i}.png", iio.imread(DATA / "isbi" / kind / f"{i}.png")[:160, :192])
    out = tmp / "train.ome.zarr"
    assert main(["-q", "convert", str(tmp / "image"), str(out), "--stack", "--pixel-size", "4nm", "--chunk", "128"]) == 0
    assert main(["-q", "convert", str(tmp / "label"), str(out), "--stack", "--labels", "membrane", "--foreground", "0"]) == 0
    return out


def _train_args(stack: Path, out: Path, ckpt: Path, *more: str) -> list:
    return ["train", stack, "--labels", stack / "labels" / "membrane", "--out", out, "--checkpoint-dir", ckpt,
            "--val-slices", "3", *TINY, *more]


# ------------------------------------------------------------------------------------------ train


def test_train_refuses_an_output_it_cannot_write_before_step_one(stack, tmp_path, capsys):
    """A read-only folder, a path the OS refuses, a file, a folder of other files, an unwritable or
    misplaced checkpoint folder: one line each, exit 2, before any training (no checkpoint is made)."""
    ckpt = tmp_path / "ckpt"
    with _tmpfs(tmp_path, "ro,size=1m") as ro:
        t0 = time.perf_counter()
        code, _, err = run_cli(capsys, *_train_args(stack, ro / "engine", ckpt, "--steps", "300"))
        line = assert_one_line_error(code, err, str(ro / "engine"), "read-only")
        assert code == 2 and time.perf_counter() - t0 < 10  # not 300 steps, then the error
        _no_temporary_names(line)
        assert not (ckpt / "checkpoint.pt").exists()
        code, _, err = run_cli(capsys, *_train_args(stack, tmp_path / "e", ro / "ckpt"))
        assert code == 2
        assert_one_line_error(code, err, "read-only", "--checkpoint-dir")
    code, _, err = run_cli(capsys, *_train_args(stack, Path("/sys/fs/tilefeet-engine"), ckpt))
    assert code == 2
    assert_one_line_error(code, err, "/sys/fs/tilefeet-engine", "nothing was written")
    (tmp_path / "a-file").write_text("not a folder")
    code, _, err = run_cli(capsys, *_train_args(stack, tmp_path / "a-file", ckpt))
    assert code == 2
    assert_one_line_error(code, err, "a-file", "not a folder")
    theirs = tmp_path / "my-notes"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, *_train_args(stack, theirs, ckpt))
    assert code == 2
    assert_one_line_error(code, err, "my-notes", "not an engine bundle", "another --out")
    assert (theirs / "notes.txt").read_text() == "keep me"
    code, _, err = run_cli(capsys, *_train_args(stack, tmp_path / "e", tmp_path / "e" / "ckpt"))
    assert code == 2
    assert_one_line_error(code, err, "--checkpoint-dir", "inside --out")
    assert not (ckpt / "checkpoint.pt").exists() and not (tmp_path / "e").exists()


def test_a_full_disk_when_the_bundle_is_written_leaves_no_half_bundle_and_resume_finishes(stack, tmp_path, capsys):
    """The OS refuses the bundle after training (a full disk): one line that names the output and where
    the trained network is kept; no bundle or staging folder is left; --resume then writes it
    elsewhere-in-time (once there is room) without training again."""
    ckpt = tmp_path / "ckpt"
    with _tmpfs(tmp_path, "size=8k") as tiny:
        code, _, err = run_cli(capsys, "-q", *_train_args(stack, tiny / "engine", ckpt, "--steps", "2", "--val-every", "2"))
        line = assert_one_line_error(code, err, str(tiny / "engine"), "disk is full", str(ckpt / "checkpoint.pt"), "--resume")
        assert code == 2
        _no_temporary_names(line)
        assert list(tiny.iterdir()) == []
    # The same run, with room: the checkpoint is at its last step, so nothing is trained again.
    out = tmp_path / "engine"
    code, _, err = run_cli(capsys, "-q", *_train_args(stack, out, ckpt, "--steps", "2", "--val-every", "2", "--resume"))
    assert code == 0, err
    assert (out / "engine.toml").is_file() and [h["step"] for h in json.loads((out / "training_history.json").read_text())] == [2]


def test_ctrl_c_says_where_the_checkpoint_is_and_resume_gives_the_same_engine(stack, tmp_path, capsys):
    """SIGINT to a real ``tilefeet train``: it stops after the current step, saves a checkpoint there,
    says so in one line (exit 130) and leaves no bundle; ``--resume`` finishes it, with the same
    weights and history as a run never interrupted (one thread on both sides)."""
    import torch

    steps = ("--steps", "30", "--val-every", "3")
    ckpt, out = tmp_path / "ckpt", tmp_path / "engine"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli_command("-q", *_train_args(stack, out, ckpt, *steps)), env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "checkpoint.pt").exists():  # the first validation's checkpoint: the loop is running
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    line = assert_one_line_error(proc.returncode, err, "interrupted at step", str(ckpt / "checkpoint.pt"), "--resume")
    stopped = int(re.search(r"at step (\d+) of 30", line).group(1))
    assert 3 <= stopped < 30
    assert torch.load(ckpt / "checkpoint.pt", weights_only=False)["step"] == stopped  # saved where it stopped, not at step 3
    assert not out.exists() and not Path(f"{out}.partial").exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_cli(capsys, "-q", *_train_args(stack, out, ckpt, *steps, "--resume"))
        assert code == 0, err
        code, _, err = run_cli(capsys, "-q", *_train_args(stack, tmp_path / "reference", tmp_path / "ckpt-ref", *steps))
        assert code == 0, err
    finally:
        torch.set_num_threads(threads)
    assert (out / "weights.safetensors").read_bytes() == (tmp_path / "reference" / "weights.safetensors").read_bytes()

    def history(folder: Path) -> list:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((folder / "training_history.json").read_text())]

    assert history(out) == history(tmp_path / "reference") and [h["step"] for h in history(out)] == list(range(3, 31, 3))


def test_the_training_bar_shows_the_latest_validation_f1(stack, tmp_path, capsys):
    code, _, err = run_cli(capsys, *_train_args(stack, tmp_path / "e", tmp_path / "c", "--steps", "4", "--val-every", "2"))
    assert code == 0, err
    history = json.loads((tmp_path / "e" / "training_history.json").read_text())
    first, last = (f"val F1 {h['val_f1'][0]:.3f} (step {h['step']})" for h in history)
    assert re.search(rf"train: .*loss \d\.\d{{3}}, {re.escape(first)}", err)  # on the bar, beside the loss
    assert re.search(rf"train: 100%.*{re.escape(last)}", err)


# ---------------------------------------------------------------------------------------- preview


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, random_engine) -> Path:
    d = tmp_path_factory.mktemp("segmented")
    src = write_image(isbi_montage(1, 2)[0][:256, :384], d / "small.ome.zarr", (4.0, 4.0), chunk=128)
    out = d / "out.ome.zarr"
    assert main(["-q", "segment", str(src), str(out), "-e", str(random_engine.path)]) == 0
    return out


def test_preview_os_errors_are_one_line(segmented, tmp_path, capsys):
    """A read-only folder, a folder where the PNG should be, a full disk: one line naming the PNG,
    exit 2, no temporary names, and nothing left behind."""
    with _tmpfs(tmp_path, "ro,size=1m") as ro:
        code, _, err = run_cli(capsys, "preview", segmented, ro / "p.png")
        _no_temporary_names(assert_one_line_error(code, err, str(ro / "p.png"), "read-only"))
        assert code == 2
    (tmp_path / "p.png").mkdir()
    code, _, err = run_cli(capsys, "preview", segmented, tmp_path / "p.png")
    assert code == 2
    assert_one_line_error(code, err, str(tmp_path / "p.png"), "is a folder")
    with _tmpfs(tmp_path, "size=8k") as tiny:
        code, _, err = run_cli(capsys, "preview", segmented, tiny / "p.png")
        _no_temporary_names(assert_one_line_error(code, err, str(tiny / "p.png"), "disk is full"))
        assert code == 2 and list(tiny.iterdir()) == []
    code, _, err = run_cli(capsys, "preview", segmented, tmp_path / "ok.png")
    assert code == 0 and iio.imread(tmp_path / "ok.png").shape[0] == 256 and not list(tmp_path.glob(".*partial"))


# ---------------------------------------------------------------------------------- segment --objects


def test_segment_objects_prints_a_one_line_summary(tmp_path, capsys, random_engine):
    import pandas as pd

    src = write_image(isbi_montage(1, 2)[0][:256, :384], tmp_path / "small.ome.zarr", (4.0, 4.0), chunk=128)
    out = tmp_path / "out.ome.zarr"
    code, _, err = run_cli(capsys, "segment", src, out, "-e", random_engine.path, "--objects")
    assert code == 0, err
    table = out / "labels" / "membrane-objects" / "objects.parquet"
    n = len(pd.read_parquet(table))
    lines = [ln for ln in err.splitlines() if ln.startswith("objects:")]
    assert lines == [f"objects: {n} membrane objects in {table}"] and n > 1
    code, _, err = run_cli(capsys, "-q", "segment", src, tmp_path / "q.ome.zarr", "-e", random_engine.path, "--objects")
    assert code == 0 and "objects:" not in err


# ---------------------------------------------------------------------------------- import-engine


@pytest.fixture(scope="module")
def onnx_net(tmp_path_factory) -> Path:
    """A real ONNX network, small enough to import in a blink: 3 × 3, 1 × 1 and 3 × 3 convolutions
    (any batch, height and width) with 64 channels between them, about 20 kB of weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.2, shape).astype(np.float32), name)
               for name, shape in (("w1", (64, 1, 3, 3)), ("w2", (64, 64, 1, 1)), ("w3", (1, 64, 3, 3)))]
    nodes = [helper.make_node("Conv", ["image", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"]), helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Conv", ["d", "w3"], ["logits"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "three-convs", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 1, "h", "w"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1, "h", "w"])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "three-convs.onnx"
    onnx.save(model, str(path))
    return path


DECLARED = ("--pixel-size", "4nm", "--classes", "membrane", "--normalize", "meanstd:125,43")


def test_import_engine_needs_the_activation_declared(onnx_net, tmp_path, capsys):
    code, _, err = run_cli(capsys, "import-engine", onnx_net, "-o", tmp_path / "e", *DECLARED)
    assert code == 2
    assert_one_line_error(code, err, "missing activation", "--activation", "sigmoid", "softmax", "none")
    assert not (tmp_path / "e").exists()


def test_import_engine_os_errors_are_one_line(onnx_net, tmp_path, capsys):
    """A read-only folder and a file in the way are refused before the network is measured; a full
    disk while the bundle is written is one line naming the output, with nothing left behind."""
    args = (*DECLARED, "--activation", "sigmoid")
    with _tmpfs(tmp_path, "ro,size=1m") as ro:
        t0 = time.perf_counter()
        code, _, err = run_cli(capsys, "import-engine", onnx_net, "-o", ro / "e", *args)
        _no_temporary_names(assert_one_line_error(code, err, str(ro / "e"), "read-only"))
        assert code == 2 and time.perf_counter() - t0 < 5
    (tmp_path / "f").write_text("a file")
    code, _, err = run_cli(capsys, "import-engine", onnx_net, "-o", tmp_path / "f", *args, "--overwrite")
    assert code == 2
    assert_one_line_error(code, err, str(tmp_path / "f"), "not a folder")
    with _tmpfs(tmp_path, "size=8k") as tiny:
        code, _, err = run_cli(capsys, "import-engine", onnx_net, "-o", tiny / "e", *args)
        _no_temporary_names(assert_one_line_error(code, err, str(tiny / "e"), "disk is full"))
        assert code == 2 and list(tiny.iterdir()) == []
