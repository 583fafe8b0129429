"""No silent wrong answers (issue 8): each case once gave a wrong answer with exit status 0, or a
traceback; each test here would have caught it. Through the CLI where a user meets it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tilefeet
from tilefeet.cli import main
from tilefeet.convert import write_image

from .conftest import bundled_engine_available, isbi_montage
from .helpers import assert_one_line_error, cli_command, f1, run_cli

KW = dict(chunk_size=128, block_size=256, output_dtype="float32", batch_size=2, backend="torch")


# ------------------------------------------------------------------------------ dask keys


def _arrays(n: int, shape=(160, 200)) -> list[np.ndarray]:
    img = isbi_montage(1, 2)[0]
    return [np.ascontiguousarray(np.roll(img, 37 * i, axis=1)[: shape[0], : shape[1]]) for i in range(n)]


def test_lazy_results_of_different_arrays_do_not_collide(random_engine):
    """Two in-memory arrays of one shape: each result in one dask.compute equals its own alone."""
    a, b = _arrays(2)
    pa, pb = (tilefeet.segment(x, random_engine, pixel_size_nm="4nm", **KW) for x in (a, b))
    assert set(dict(pa.data.__dask_graph__())).isdisjoint(k for k in dict(pb.data.__dask_graph__()) if "tilefeet" in str(k))
    together = dask.compute(pa.data, pb.data, scheduler="threads")
    alone = [pa.data.compute(scheduler="threads"), pb.data.compute(scheduler="threads")]
    for t, s in zip(together, alone):
        np.testing.assert_array_equal(t, s)
    assert not np.array_equal(together[0], together[1])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["gaussian", "cosine"]), st.sampled_from([0.5, 0.3])), min_size=2, max_size=4))
def test_any_jobs_compose_into_one_graph(random_engine, jobs):
    """A property: any set of lazy jobs (arrays, blending, threshold) computed together equals each
    computed alone (duplicates included: the same job twice is the same result twice)."""
    arrays = _arrays(3, (128, 160))
    lazy = [tilefeet.segment(arrays[i], random_engine, pixel_size_nm="4nm", blend=b, threshold=t, **KW).data for i, b, t in jobs]
    together = dask.compute(*lazy, scheduler="threads")
    for got, job in zip(together, lazy):
        np.testing.assert_array_equal(got, job.compute(scheduler="threads"))


def test_one_input_written_to_two_outputs_in_one_graph(tmp_path, section, random_engine):
    kw = dict(chunk_size=256, block_size=512)
    g1 = tilefeet.segment_to_zarr(section, tmp_path / "a.ome.zarr", random_engine, compute=False, **kw)
    g2 = tilefeet.segment_to_zarr(section, tmp_path / "b.ome.zarr", random_engine, compute=False, **kw)
    g3 = tilefeet.segment_to_zarr(section, tmp_path / "c.ome.zarr", random_engine, compute=False, threshold=0.3, **kw)
    paths = dask.compute(g1, g2, g3, scheduler="threads")
    assert [Path(p).name for p in paths] == ["a.ome.zarr", "b.ome.zarr", "c.ome.zarr"]
    a, b, c = (zarr.open_group(str(p), mode="r") for p in paths)
    np.testing.assert_array_equal(a["0"][:], b["0"][:])
    assert not np.array_equal(a["labels/membrane/0"][:], c["labels/membrane/0"][:])  # other threshold, its own labels


def test_dask_input_is_part_of_the_graph_not_computed_inside_a_task(random_engine):
    """The input's own chunks are inputs of the block tasks: the scheduler sees one graph (no
    compute-within-task on distributed), and a numpy input is not pickled whole into every task."""
    import dask.array as da
    from dask.callbacks import Callback

    img = _arrays(1, (512, 640))[0]
    x = da.from_array(img, chunks=128).map_blocks(np.copy, name="tf-input")
    lazy = tilefeet.segment(x, random_engine, pixel_size_nm="4nm", **KW).data
    ran: list[str] = []
    with Callback(posttask=lambda key, *_: ran.append(str(key))):
        got = lazy.compute(scheduler="threads")
    assert any("tf-input" in k for k in ran)  # the input's chunk tasks ran in the same graph, by its scheduler
    np.testing.assert_array_equal(got, tilefeet.segment(img, random_engine, pixel_size_nm="4nm", **KW).values)
    numpy_graph = dict(tilefeet.segment(img, random_engine, pixel_size_nm="4nm", **KW).data.__dask_graph__())
    biggest = max((v.nbytes for v in numpy_graph.values() if isinstance(v, np.ndarray)), default=0)
    assert biggest < img.nbytes  # a numpy input travels in chunks, never whole


# ----------------------------------------------------------------- 16-bit, float, inverted


@pytest.mark.slow
@pytest.mark.skipif(not bundled_engine_available(), reason="engines/isbi-membrane is not in this checkout")
def test_16bit_float_and_inverted_sections_segment_right_by_default(tmp_path):
    """Two held-out ISBI slices (1024 px across: four probe tiles, as in a section) as 8-bit, 16-bit
    (with an offset: a detector's range), float in [0, 1] and with inverted contrast: default
    options give the 8-bit run's F1 within 0.02, and the plan says why."""
    img, mem = isbi_montage(1, 2)
    truth = mem.astype(bool)
    scores, described = {}, {}
    variants = {
        "uint8": img,
        "uint16": img.astype(np.uint16) * 100 + 3000,
        "float": img.astype(np.float32) / 255,
        "inverted": 255 - img,
    }
    for name, data in variants.items():
        src = write_image(data, tmp_path / f"{name}.ome.zarr", (4.0, 4.0), chunk=512)
        run = tilefeet.plan_segmentation(src, "isbi-membrane", block_size=1024, chunk_size=512)
        described[name] = run.describe()
        out = tilefeet.write_planned(run, tmp_path / f"{name}-seg.ome.zarr")
        scores[name] = f1(zarr.open_group(str(out), mode="r")["labels/membrane/0"][:].astype(bool), truth)
    assert scores["uint8"] > 0.78, scores
    for name, value in scores.items():
        assert value == pytest.approx(scores["uint8"], abs=0.02), (name, scores)
    assert "percentile" in described["uint16"] and "contrast    inverted: network" in described["inverted"]
    assert "contrast    as it is: network" in described["uint8"] and "(inverted contrast)" not in described["uint8"]


def test_inverted_contrast_is_flipped_in_every_intensity_mode(tmp_path):
    """The polarity decision (tilefeet.polarity; the full matrix is tests/test_polarity.py) holds
    whatever intensity mode is asked for, and --no-invert keeps the contrast as it is."""
    img = isbi_montage(1, 2)[0]
    src = write_image(255 - img, tmp_path / "inv.ome.zarr", (4.0, 4.0), chunk=256)
    for mode in ("auto", "bundle", "percentile"):
        run = tilefeet.plan_segmentation(src, "isbi-membrane", intensity=mode)
        assert run.plan.intensity.invert_max == 255 and "contrast    inverted: network" in run.describe(), mode
    run = tilefeet.plan_segmentation(src, "isbi-membrane", invert=False)
    assert run.plan.intensity.invert_max is None and "as it is (--no-invert)" in run.describe()


def test_real_sections_are_not_taken_for_inverted():
    """The histogram evidence (shown beside the network's, never decisive: tilefeet.polarity) against
    the project's real data, one slice at a time: no native slice looks inverted; inverted ISBI
    slices do, for the ISBI engine; for the Lucchi engine (a nearly symmetric training histogram)
    it says nothing at all."""
    import imageio.v3 as iio

    from tilefeet.engine import load_engine
    from tilefeet.intensity import looks_inverted, polarity

    if not bundled_engine_available():
        pytest.skip("engines/isbi-membrane is not in this checkout")
    data = Path(__file__).parent / "data"
    isbi = [iio.imread(p) for p in sorted((data / "isbi" / "image").glob("*.png"))]
    lucchi = [iio.imread(p) for p in sorted((data / "lucchi" / "image").glob("*.png"))]
    lucchi += [iio.imread(p) for p in sorted((data / "lucchi").rglob("train*/**/*.png")) if "image" in str(p)]
    isbi_norm, lucchi_norm = load_engine("isbi-membrane").normalization, load_engine("lucchi-mito").normalization
    for s in isbi + lucchi:
        assert not looks_inverted(isbi_norm, s) and not looks_inverted(lucchi_norm, s)
    for s in isbi:
        assert looks_inverted(isbi_norm, 255 - s)
    assert polarity(lucchi_norm, lucchi[0]) is None


# ------------------------------------------------------------------------------ unit slips


def test_a_unit_slip_is_refused_in_one_line_before_any_work(tmp_path, capsys, random_engine):
    """--pixel-size 5um on a 4 nm engine planned millions of tiles and ran out of memory; now one
    line, at once, naming the factor and the slip, with nothing written."""
    import time

    src = write_image(isbi_montage(1, 2)[0], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    t0 = time.perf_counter()
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--pixel-size", "5um")
    assert time.perf_counter() - t0 < 10
    assert_one_line_error(code, err, "1250×", "unit slip", "5um")
    assert not list(tmp_path.glob("o.ome.zarr*"))
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--pixel-size", "5", "--dry-run")
    assert code == 0 and "--pixel-size 5 has no unit: read as 5 nm" in err


def test_a_block_too_large_for_the_scale_is_refused(tmp_path, capsys, random_engine):
    src = write_image(isbi_montage(1, 2)[0], tmp_path / "s.ome.zarr", (64.0, 64.0), chunk=256)
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--block-size", "4096",
                           "--chunk-size", "1024", "--dry-run")
    assert_one_line_error(code, err, "--block-size", "network pixels")
    code, out, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--dry-run")
    assert code == 0 and "blocks      " in out  # the default block shrinks to fit instead


# ------------------------------------------------------------------------------- OS errors


@contextlib.contextmanager
def _tmpfs(tmp_path: Path, options: str):
    """A small tmpfs mounted for the test (a real read-only or full file system); skips where
    mounting is not permitted."""
    where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the read-only and full-disk cases need one")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _read_only_parent(tmp_path: Path):
    return _tmpfs(tmp_path, "ro,size=1m")


def test_read_only_output_folder_is_one_line(tmp_path, capsys, small_section, random_engine):
    with _read_only_parent(tmp_path) as ro:
        for args in (
            ("segment", small_section, ro / "o.ome.zarr", "-e", random_engine.path),
            ("segment", small_section, ro / "o.ome.zarr", "-e", random_engine.path, "--dry-run"),
            ("convert", Path(__file__).parent / "data" / "isbi" / "image" / "24.png", ro / "c.ome.zarr", "--pixel-size", "4nm"),
        ):
            code, _, err = run_cli(capsys, *args)
            assert_one_line_error(code, err, str(ro), "read-only")
        out = tmp_path / "o.ome.zarr"
        assert run_cli(capsys, "-q", "segment", small_section, out, "-e", random_engine.path)[0] == 0
        code, _, err = run_cli(capsys, "preview", out, ro / "p.png")
        assert code != 0 and err.count("\n") == 1 and "Traceback" not in err and "read-only" in err.lower()
    code, _, err = run_cli(capsys, "segment", small_section, "/sys/fs/tilefeet-out.ome.zarr", "-e", random_engine.path)
    assert_one_line_error(code, err, "/sys/fs/tilefeet-out.ome.zarr", "permission denied", "nothing was written")


def test_full_disk_is_one_line_and_says_what_is_kept(tmp_path, capsys, small_section, random_engine):
    """A disk that fills mid-run: one line naming the path; the staging folder is kept for --resume
    when blocks were finished (and the run then resumes elsewhere... on the same path once there is
    room), removed when none was."""
    args = ("-e", random_engine.path, "--dtype", "float32", "--chunk-size", "128", "--block-size", "128", "--blocks-in-flight", "1")
    with _tmpfs(tmp_path, "size=8k") as tiny:
        code, _, err = run_cli(capsys, "segment", small_section, tiny / "o.ome.zarr", *args)
        assert_one_line_error(code, err, str(tiny / "o.ome.zarr"), "disk is full", "nothing was")
        assert not list(tiny.iterdir())
    full = tmp_path / "full.ome.zarr"
    assert run_cli(capsys, "-q", "segment", small_section, full, *args)[0] == 0
    size = sum(f.stat().st_size for f in full.rglob("*") if f.is_file())
    with _tmpfs(tmp_path, f"size={int(size * 0.6) // 4096 * 4 + 8}k") as small_disk:  # room for some blocks, not all
        code, _, err = run_cli(capsys, "segment", small_section, small_disk / "o.ome.zarr", *args)
        assert_one_line_error(code, err, "disk is full", "--resume")
        assert (small_disk / "o.ome.zarr.partial" / ".tilefeet" / "done").exists()
        code, _, err = run_cli(capsys, "convert", Path(__file__).parent / "data" / "isbi" / "image" / "24.png",
                               small_disk / "c.ome.zarr", "--pixel-size", "4nm")
        assert_one_line_error(code, err, "disk is full")
        assert not (small_disk / "c.ome.zarr").exists() and not (small_disk / "c.ome.zarr.partial").exists()


@pytest.fixture
def small_section(tmp_path):
    return write_image(isbi_montage(1, 2)[0][:256, :384], tmp_path / "small.ome.zarr", (4.0, 4.0), chunk=128)


# ------------------------------------------------------------------------- crash windows


def _digest(path: Path) -> dict[str, bytes]:
    root = zarr.open_group(str(path), mode="r")
    return {name: root[name][:].tobytes() for name in ("0", "1", "labels/membrane/0")}


class _Died(BaseException):
    """Stands for the process dying at that instant (nothing after it runs, no cleanup handler cares)."""


@pytest.mark.parametrize("survives", [0, 1])
def test_a_crash_inside_finalize_resumes_to_the_same_bits(tmp_path, small_section, random_engine, monkeypatch, survives):
    """Finalize is two renames and a deletion; dying after any of them leaves a state that
    --resume (or the next run) completes to the bits of an uninterrupted run, including when it
    replaces an earlier output (--overwrite)."""
    import tilefeet.storage as storage

    kw = dict(chunk_size=128, block_size=128, threads=1)
    ref = _digest(tilefeet.segment_to_zarr(small_section, tmp_path / "ref.ome.zarr", random_engine, **kw))
    out = tmp_path / "o.ome.zarr"
    tilefeet.segment_to_zarr(small_section, out, random_engine, threshold=0.9, **kw)  # an old output to replace
    real_os = storage.os
    calls = []

    class DyingOs:  # os, whose replace dies after `survives` calls (only storage's renames, not zarr's)
        def __getattr__(self, name):
            return getattr(real_os, name)

        def replace(self, a, b):
            calls.append((a, b))
            if len(calls) > survives:
                raise _Died
            return real_os.replace(a, b)

    monkeypatch.setattr(storage, "os", DyingOs())
    with pytest.raises(_Died):
        tilefeet.segment_to_zarr(small_section, out, random_engine, overwrite=True, **kw)
    monkeypatch.setattr(storage, "os", real_os)
    tilefeet.segment_to_zarr(small_section, out, random_engine, resume=True, **kw)
    assert _digest(out) == ref
    assert not list(tmp_path.glob("o.ome.zarr.*"))


def test_a_crash_after_the_final_rename_leaves_a_complete_output(tmp_path, small_section, random_engine, monkeypatch):
    import shutil

    import tilefeet.storage as storage

    kw = dict(chunk_size=128, block_size=128, threads=1)
    real = shutil.rmtree
    monkeypatch.setattr(storage.shutil, "rmtree", lambda p, **k: (_ for _ in ()).throw(_Died()) if str(p).endswith(".tilefeet") else real(p, **k))
    with pytest.raises(_Died):
        tilefeet.segment_to_zarr(small_section, tmp_path / "o.ome.zarr", random_engine, **kw)
    monkeypatch.setattr(storage.shutil, "rmtree", real)
    with pytest.raises(tilefeet.errors.OutputExistsError, match="already complete"):
        tilefeet.segment_to_zarr(small_section, tmp_path / "o.ome.zarr", random_engine, resume=True, **kw)
    assert not (tmp_path / "o.ome.zarr" / ".tilefeet").exists()


def test_sigkill_at_random_moments_resumes_to_the_same_bits(tmp_path, random_engine):
    """A real process killed with SIGKILL at moments spread over the whole run (blocks, pyramid,
    finalize), then resumed (repeatedly, if killed again): the same bits as an uninterrupted run."""
    import signal
    import time

    src = write_image(isbi_montage(2, 2)[0], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    opts = ["-e", random_engine.path, "--chunk-size", "128", "--block-size", "256", "--threads", "1", "-q"]
    t0 = time.perf_counter()
    ref = tmp_path / "ref.ome.zarr"
    assert subprocess.run(cli_command("segment", src, ref, *opts)).returncode == 0
    total = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    for i, fraction in enumerate(rng.uniform([0.25, 0.5, 0.75], [0.5, 0.75, 1.0])):  # one moment in each quarter after the start
        out = tmp_path / f"o{i}.ome.zarr"
        proc = subprocess.Popen(cli_command("segment", src, out, *opts), stderr=subprocess.DEVNULL)
        time.sleep(total * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for _ in range(3):
            r = subprocess.run(cli_command("segment", src, out, *opts, "--resume"), capture_output=True, text=True)
            if r.returncode == 0 or "already complete" in r.stderr:
                break
            assert "nothing to resume" not in r.stderr
            r = subprocess.run(cli_command("segment", src, out, *opts), capture_output=True, text=True)  # killed before any block
        assert _digest(out) == _digest(ref), (i, fraction)


# -------------------------------------------------------------------------------- smaller


def test_damaged_chunks_and_os_errors_are_told_apart(tmp_path, capsys, random_engine):
    """Bytes that do not decode are a damaged chunk; an OS refusal (here a chunk that is a symbolic
    link to itself) is reported as what the OS said, not as damage."""
    src = write_image(isbi_montage(1, 1)[0], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    chunk = next(p for p in (src / "0" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path)
    assert_one_line_error(code, err, "damaged")
    chunk.unlink()
    chunk.symlink_to(chunk.name)
    code, _, err = run_cli(capsys, "-q", "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path)
    assert code != 0 and "is damaged" not in err and "Traceback" not in err and err.count("\n") == 1
    assert "symbolic links" in err and str(chunk) in err


def test_crop_mode_below_the_receptive_field_warns(tmp_path, capsys, random_engine):
    src = write_image(isbi_montage(1, 1)[0], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--blend", "crop",
                           "--tile", "256", "--overlap", "32", "--dry-run")
    assert code == 0 and "receptive field (200 px)" in err and "--overlap 208" in err
    code, _, err = run_cli(capsys, "segment", src, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--blend", "crop",
                           "--tile", "256", "--overlap", "208", "--dry-run")
    assert code == 0 and "receptive field" not in err


def test_interrupt_says_what_is_kept_and_resume_names_what_differs(tmp_path, capsys, small_section, random_engine, monkeypatch):
    import tilefeet.schedule

    original = tilefeet.schedule._write_block
    count = []

    def interrupted(*args):
        count.append(1)
        if len(count) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(tilefeet.schedule, "_write_block", interrupted)
    args = ("segment", small_section, tmp_path / "o.ome.zarr", "-e", random_engine.path, "--chunk-size", "128", "--block-size", "128",
            "--blocks-in-flight", "1")
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and err.strip().splitlines()[-1].startswith("tilefeet: error: interrupted")
    assert "o.ome.zarr.partial" in err and "--resume" in err
    monkeypatch.setattr(tilefeet.schedule, "_write_block", original)
    code, _, err = run_cli(capsys, *args, "--resume", "--tile", "256", "--threshold", "0.7")
    assert_one_line_error(code, err, "--tile 128 (now 256)", "--threshold 0.5 (now 0.7)")
    assert run_cli(capsys, *args, "--resume", "-q")[0] == 0


def test_evaluate_refuses_a_grey_image_as_truth(tmp_path, capsys, small_section, random_engine):
    out = tmp_path / "o.ome.zarr"
    assert run_cli(capsys, "-q", "segment", small_section, out, "-e", random_engine.path)[0] == 0
    code, _, err = run_cli(capsys, "evaluate", out, small_section)
    assert_one_line_error(code, err, "distinct values", "grey image", "--truth-foreground")
    png = Path(__file__).parent / "data" / "isbi" / "image" / "24.png"
    code, _, err = run_cli(capsys, "evaluate", png, png)
    assert_one_line_error(code, err, "grey image")
    code, _, err = run_cli(capsys, "convert", png, small_section, "--labels", "m", "--foreground", "zero")
    assert_one_line_error(code, err, "--foreground")


def test_version_and_public_names(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"tilefeet {tilefeet.__version__}"
    assert {"segment", "segment_to_zarr", "plan_segmentation", "Settings", "clear_caches"} <= set(dir(tilefeet))


def test_convert_shows_no_dask_progress_bars(tmp_path):
    png = Path(__file__).parent / "data" / "isbi" / "image" / "24.png"
    cmd = [sys.executable, "-c", "import sys; from tilefeet.cli import main; sys.exit(main())"]
    r = subprocess.run([*cmd, "convert", str(png), str(tmp_path / "c.ome.zarr"), "--pixel-size", "4nm"], capture_output=True, text=True)
    assert r.returncode == 0 and "[####" not in r.stdout + r.stderr and "Completed" not in r.stdout + r.stderr


def test_cluster_graphs_choose_their_backend_where_they_run(tmp_path, section, random_engine):
    """compute=False keeps backend auto in the tasks' runner spec; the process that computes a block
    chooses, and the output's provenance says what ran."""
    graph = tilefeet.segment_to_zarr(section, tmp_path / "c.ome.zarr", random_engine, compute=False, backend="auto",
                                     chunk_size=256, block_size=512)
    out = dask.compute(graph, scheduler="threads")[0]
    meta = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["metadata"]
    assert meta["runner"]["backend"] == "auto"
    assert set(meta["backends"]) <= {"torch", "onnxruntime", "openvino"} and sum(meta["backends"].values()) == 6
