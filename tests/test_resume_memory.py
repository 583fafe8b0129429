"""Out-of-core guarantees with real processes: a killed run resumes to the same bits; memory is flat."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import zarr

import tilefeet
import tilefeet.schedule
from tilefeet.convert import write_image

from .conftest import isbi_montage
from .helpers import cli_command, peak_rss_mb


def _arrays(path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for name in ("0", "1", "2", "labels/membrane/0", "labels/membrane/1"):
        out[name] = root[name][:]
    return out


def test_killed_run_resumes_to_identical_output(tmp_path, random_engine, monkeypatch):
    img, _ = isbi_montage(2, 4)  # 1024 × 2048: 32 blocks
    src = write_image(img, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=256)
    # The killed process and this one must use the same CPU thread count to round alike.
    threads = torch.get_num_threads()
    opts = ["-e", random_engine.path, "--chunk-size", "256", "--block-size", "256", "--blocks-in-flight", "1", "--threads", str(threads)]
    out = tmp_path / "out.ome.zarr"
    proc = subprocess.Popen(cli_command("-q", "segment", src, out, *opts), stderr=subprocess.DEVNULL)
    done_dir = tmp_path / "out.ome.zarr.partial" / ".tilefeet" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.exists() and len(list(done_dir.iterdir())) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the test section bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing at the output path after a crash
    finished_before = {p.name for p in done_dir.iterdir()}
    assert 6 <= len(finished_before) < 32

    # Without --resume the leftover is reported, not silently clobbered.
    code = subprocess.run(cli_command("segment", src, out, *opts), capture_output=True, text=True)
    assert code.returncode == 2 and "--resume" in code.stderr

    computed = []
    original = tilefeet.schedule._write_block
    monkeypatch.setattr(
        tilefeet.schedule, "_write_block", lambda run, store, index, *rest: computed.append(index) or original(run, store, index, *rest)
    )
    tilefeet.segment_to_zarr(src, out, random_engine.path, resume=True, chunk_size=256, block_size=256, blocks_in_flight=1, threads=threads)
    assert len(computed) == 32 - len(finished_before)  # finished blocks were not redone

    ref = tilefeet.segment_to_zarr(src, tmp_path / "ref.ome.zarr", random_engine.path, chunk_size=256, block_size=256, threads=threads)
    got, want = _arrays(out), _arrays(ref)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_peak_memory_is_flat_in_section_size(tmp_path, random_engine):
    """A section 4× larger in area, same blocks: peak memory within 20 % (it is bounded by blocks in flight)."""
    rss = {}
    for n in (4, 8):  # 2048² and 4096²
        img, _ = isbi_montage(n, n)
        src = write_image(img, tmp_path / f"s{n}.ome.zarr", (4.0, 4.0), chunk=512)
        rss[n] = peak_rss_mb(cli_command("-q", "segment", src, tmp_path / f"o{n}.ome.zarr", "-e", random_engine.path,
                               "--chunk-size", "512", "--block-size", "1024", "--tile", "256", "--overlap", "32"),
                              {"OMP_NUM_THREADS": "2"})
    assert rss[8] <= 1.2 * rss[4], rss
