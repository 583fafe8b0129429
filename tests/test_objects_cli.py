"""``tilefeet objects`` as a user meets it, and its out-of-core guarantees with real processes: every
bad input as one line, SIGKILL at random moments then ``--resume`` gives the same bits, the same
bits on a ``dask.distributed`` cluster, and peak memory flat in the section's size."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from tilefeet.cli import main
from tilefeet.objects import label_objects, write_objects
from tilefeet.objects.store import read_table

from .conftest import DATA
from .helpers import assert_one_line_error, cli_command, peak_rss_mb, run_cli
from .test_cli import snapshot
from .test_objects import PIXEL, make_output, probs_for, reference


def mito_probs(size: int) -> np.ndarray:
    """Mitochondrion-like uint8 probabilities: the real Lucchi truth masks, mirror-tiled to ``size``²,
    softened so that values vary inside and outside the objects."""
    masks = [iio.imread(p) > 0 for p in sorted((DATA / "lucchi" / "mitochondrion").glob("*.png"))]
    tile = np.block([[masks[0], masks[1][:, ::-1]], [masks[1][::-1], masks[0][::-1, ::-1]]])
    reps = (-(-size // tile.shape[0]), -(-size // tile.shape[1]))
    m = np.tile(tile, reps)[:size, :size]
    soft = ndi.uniform_filter(m.astype(np.float32), 5)
    return np.clip(np.round(soft * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def mito_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("objects-cli") / "seg.ome.zarr"
    return make_output(path, mito_probs(384), chunk=64)


def _layer_arrays(layer: Path) -> dict[str, np.ndarray]:
    """Every pyramid level of a label image (by its multiscales: listing the group would also meet the table file)."""
    g = zarr.open_group(str(layer), mode="r")
    return {d["path"]: np.asarray(g[d["path"]][:]) for d in g.attrs["ome"]["multiscales"][0]["datasets"]}


# ----------------------------------------------------------------------------------- the CLI


def test_objects_prints_count_sizes_and_density(tmp_path, capsys, mito_store):
    store = tmp_path / "seg.ome.zarr"
    import shutil

    shutil.copytree(mito_store, store)
    code, out, err = run_cli(capsys, "objects", store, "--block-size", "128", "--min-size", "0.005um2")
    assert code == 0, err
    df = read_table(store / "labels" / "mitochondrion-objects")
    area_um2 = 384 * 384 * PIXEL * PIXEL / 1e6
    assert f"{len(df)} objects of mitochondrion in {area_um2:.4g} µm²: {len(df) / area_um2:.4g} per µm²" in out
    assert "median" in out and "area (µm²)" in out and "diameter (nm)" in out
    assert df["area_nm2"].min() >= 5000 and "wrote" in err
    mask = np.asarray(zarr.open_array(str(store / "labels/mitochondrion/0"), mode="r")[:]) != 0
    np.testing.assert_array_equal(zarr.open_array(str(store / "labels/mitochondrion-objects/0"), mode="r")[:],
                                  reference(mask, min_px=200))
    # cells of the same map, as CSV, quietly: the summary still prints
    code, out, err = run_cli(capsys, "objects", store, "--cells", "--csv", "-q", "--block-size", "128")
    assert code == 0 and "cells in" in out and err == "", err
    assert (store / "labels" / "mitochondrion-cells" / "objects.csv").exists()


def test_bad_inputs_get_one_line(tmp_path, capsys, mito_store, section):
    store = tmp_path / "seg.ome.zarr"
    import shutil

    shutil.copytree(mito_store, store)
    two = make_output(tmp_path / "two.ome.zarr", np.stack([probs_for(np.eye(40, dtype=bool))] * 2), classes=("a", "b"), chunk=16)
    cases = [
        (("objects", tmp_path / "nope.ome.zarr"), ("does not exist",)),
        (("objects", "http://127.0.0.1:9/seg.ome.zarr"), ("read-only", "s3://")),  # objects are written where they are read
        (("objects", store, "--class", "axon"), ("no class 'axon'", "mitochondrion")),
        (("objects", two), ("several classes", "--class")),
        (("objects", section), ("no probabilities", "segment")),  # an input image, not a segment output
        (("objects", store / "labels" / "mitochondrion"), ("label image",)),
        (("objects", store, "--threshold", "1.5"), ("--threshold", "between 0 and 1")),
        (("objects", store, "--threshold", "-0.1"), ("--threshold",)),
        (("objects", store, "--min-size", "3kg"), ("unknown area unit",)),
        (("objects", store, "--min-size", "-5nm2"), ("--min-size",)),
        (("objects", store, "--cells", "--grow", "-3nm"), ("--grow",)),
        (("objects", store, "--block-size", "big"), ("block-size", "integer")),
        (("objects", store, "--blocks-in-flight", "0"), ("--blocks-in-flight",)),
    ]
    for args, needles in cases:
        before = snapshot(store)
        code, _, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert_one_line_error(code, err, *needles)
        assert snapshot(store) == before, args  # nothing written
        assert not list(tmp_path.glob("*.partial")), args
    code, _, err = run_cli(capsys, "objects", store, "-q")
    assert code == 0, err
    before = snapshot(store)
    code, _, err = run_cli(capsys, "objects", store)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert snapshot(store) == before
    code, _, err = run_cli(capsys, "objects", store, "--resume")
    assert_one_line_error(code, err, "already complete")
    code, _, err = run_cli(capsys, "objects", store, "--overwrite", "-q", "--min-size", "20px")
    assert code == 0, err


# --------------------------------------------------------------------------- crashes and resume


def test_sigkill_at_random_moments_then_resume_gives_identical_bits(tmp_path):
    src = make_output(tmp_path / "src.ome.zarr", mito_probs(768), chunk=64, levels=3)
    import shutil

    shutil.copytree(src, tmp_path / "ref.ome.zarr")
    opts = ["--block-size", "64", "--blocks-in-flight", "1", "--fill-holes", "--min-size", "30px", "-q"]
    done = tmp_path / "src.ome.zarr.mitochondrion-objects.partial" / ".tilefeet" / "done"
    n_blocks = (768 // 64) ** 2
    rng = np.random.default_rng(2026)
    # kill once in each of the passes: holes, fill, pieces, relabel (each has n_blocks records)
    kill_at = sorted(int(k) for k in rng.integers(5, n_blocks - 5, 4) + np.arange(4) * (n_blocks + 1))
    for killed, target in enumerate(kill_at):
        args = [*opts, "--resume"] if killed else opts
        proc = subprocess.Popen(cli_command("objects", src, *args), stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if done.exists() and len(os.listdir(done)) >= target:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before record {target}; make the section larger"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (src / "labels" / "mitochondrion-objects").exists()  # nothing published
        assert zarr.open_group(str(src / "labels"), mode="r").attrs["ome"]["labels"] == ["mitochondrion"]
    finished_before = len(os.listdir(done))
    assert finished_before >= kill_at[-1]
    r = subprocess.run(cli_command("objects", src, *opts), capture_output=True, text=True)  # without --resume: refused
    assert r.returncode == 2 and "--resume" in r.stderr
    computed = []
    import tilefeet.objects.run as run

    original = run._relabel

    def counting(job, index, *after):
        computed.append(index)
        return original(job, index, *after)

    run._relabel = counting
    try:
        write_objects(src, block_size=64, blocks_in_flight=1, fill_holes=True, min_size="30px", resume=True)
    finally:
        run._relabel = original
    assert len(computed) < n_blocks  # finished blocks were not redone
    write_objects(tmp_path / "ref.ome.zarr", block_size=64, fill_holes=True, min_size="30px")
    got = _layer_arrays(src / "labels" / "mitochondrion-objects")
    want = _layer_arrays(tmp_path / "ref.ome.zarr" / "labels" / "mitochondrion-objects")
    assert got.keys() == want.keys() and len(got) == 3
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert read_table(src / "labels" / "mitochondrion-objects").equals(read_table(tmp_path / "ref.ome.zarr" / "labels" / "mitochondrion-objects"))
    assert not (tmp_path / "src.ome.zarr.mitochondrion-objects.partial").exists()


def test_resume_refuses_other_options(tmp_path, capsys):
    src = make_output(tmp_path / "s.ome.zarr", mito_probs(256), chunk=64)
    staging = tmp_path / "s.ome.zarr.mitochondrion-objects.partial"
    from tilefeet.objects.options import ObjectSettings
    from tilefeet.objects.run import prepare_job

    prepare_job(src, ObjectSettings.create(block_size=64))  # as if killed right after starting
    assert staging.exists()
    code, _, err = run_cli(capsys, "objects", src, "--block-size", "128", "--resume")
    assert_one_line_error(code, err, "other options", "--overwrite")
    code, _, err = run_cli(capsys, "objects", src, "--block-size", "64")
    assert_one_line_error(code, err, "interrupted", "--resume")
    code, _, err = run_cli(capsys, "objects", src, "--block-size", "64", "--resume", "-q")
    assert code == 0, err


# ------------------------------------------------------------------------------ a real cluster


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    environ = dict(os.environ)
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")
def test_a_cluster_with_worker_processes_gives_the_same_bits(tmp_path, client):
    import shutil

    src = make_output(tmp_path / "a.ome.zarr", mito_probs(512), chunk=64, levels=2)
    shutil.copytree(src, tmp_path / "b.ome.zarr")
    for cells in (False, True):
        kw = dict(block_size=128, fill_holes=True, min_size="20px", cells=cells)
        graph = write_objects(src, compute=False, **kw)
        path = Path(client.compute(graph).result())
        local = write_objects(tmp_path / "b.ome.zarr", **kw)
        got, want = _layer_arrays(path), _layer_arrays(local.path)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
        assert read_table(path).equals(read_table(local.path))
    lazy = label_objects(src, block_size=192)  # the lazy call runs its passes on the active client
    np.testing.assert_array_equal(client.compute(lazy.labels).result(),
                                  zarr.open_array(str(src / "labels/mitochondrion-objects/0"), mode="r")[:])


# ---------------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_peak_memory_is_flat_in_section_size(tmp_path):
    """A section 4× larger in area, same blocks: peak memory within 20 % (bounded by blocks in flight)."""
    rss = {}
    for n in (2048, 4096):
        src = make_output(tmp_path / f"s{n}.ome.zarr", mito_probs(n), chunk=256, levels=1)
        rss[n] = peak_rss_mb(cli_command("objects", src, "-q", "--block-size", "1024", "--fill-holes"))
    assert rss[4096] <= 1.2 * rss[2048], rss


def test_summary_numbers_match_the_table(tmp_path, capsys):
    src = make_output(tmp_path / "s.ome.zarr", mito_probs(200), chunk=50)
    code, out, err = run_cli(capsys, "objects", src, "-q")
    assert code == 0, err
    df = read_table(src / "labels" / "mitochondrion-objects")
    m = re.search(r"(\d+) objects of mitochondrion in ([\d.]+) µm²: ([\d.]+) per µm²", out)
    assert m and int(m.group(1)) == len(df) == int(label_objects(src).table.shape[0])
    assert float(m.group(2)) == pytest.approx(200 * 200 * 25 / 1e6, rel=1e-3)
    assert main(["objects", str(src), "--overwrite", "-q"]) == 0
