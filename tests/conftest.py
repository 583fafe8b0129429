"""Shared fixtures: real EM test slices, random-weight engines, OME-Zarr sections on disk."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hypothesis
import numpy as np
import pytest

# Tests pin the backend and the precision (tests of `--backend auto` and `--precision auto` ask for
# them) and keep compiled artefacts and backend timings out of the user's cache.
os.environ.setdefault("TILEFEET_BACKEND", "torch")
os.environ.setdefault("TILEFEET_PRECISION", "fp32")
if "TILEFEET_CACHE" not in os.environ:
    os.environ["TILEFEET_CACHE"] = tempfile.mkdtemp(prefix="tilefeet-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TILEFEET_CACHE"], True)

# Under pytest-xdist (CI: three workers on two cores: many tests wait on a subprocess, a server or
# a cluster's workers, and a third worker fills those waits; measured 6:29 against 7:52 with two),
# one CPU thread per worker, also in the
# subprocesses tests start (they inherit these): workers do not fight over the cores, and a CLI run
# in a subprocess rounds like the in-process run it is compared with (oneDNN's rounding depends on
# the thread count).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"


def _keep_freed_memory() -> None:
    """glibc hands freed blocks of more than 128 KiB-32 MiB back to the OS, and per-thread arenas
    shrink, so the next allocation page-faults them in again: a forward pass of the bundled U-Net
    touched 28k fresh pages, and a run spent a third of its CPU time in the kernel (3.6 s of 9.9 s
    for the held-out montage; 0.5 s of 6.7 s with this). The test processes keep freed memory
    instead; the arithmetic is the same. Subprocesses, which the memory tests measure, and users
    get glibc's defaults."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_arena_max, 1)


_keep_freed_memory()

#: The same for the subprocesses tests start (CLI runs killed and resumed, cluster workers, the GPU
#: check's steps): glibc reads these at a process's start. A CLI run of the torch backend on the
#: held-out montage took 7.9 s (2.5 s of it in the kernel) with glibc's defaults and 5.7 s (0.6 s)
#: with these. The tests that measure a subprocess's peak memory drop them (``helpers.peak_rss_mb``):
#: users' processes run with glibc's defaults. ``GLIBC_TUNABLES=`` (empty) runs the suite with them.
SUBPROCESS_MALLOC = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824:glibc.malloc.arena_max=1"
os.environ.setdefault("GLIBC_TUNABLES", SUBPROCESS_MALLOC)

#: Bytecode caches are written, as Python does by default, even where the environment says not to
#: (PYTHONDONTWRITEBYTECODE, set on the build machines): the suite starts about a hundred Python
#: subprocesses (CLI runs, cluster workers, the GPU check's steps), and each compiled tilefeet's
#: 23k lines from source again (0.15-0.2 s of CPU each: 1.55 s against 1.40 s to import the CLI's
#: modules), and every test process rewrote and compiled every test module. The caches go where
#: Python puts them (``__pycache__``, ignored by git).
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    sys.dont_write_bytecode = False

DATA = Path(__file__).parent / "data"

# Property tests draw the same examples on every run (derandomize: a seed per test, from its name),
# so CI cannot fail by chance, and never time examples (a shared, loaded CPU is no measure). To
# explore with fresh random examples: HYPOTHESIS_PROFILE=explore python -m pytest tests/test_geometry.py
hypothesis.settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile("explore", deadline=None, max_examples=1000, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter, config):
    """The seed of the random order (pytest-randomly), at the end where a failure is read: ``-q``
    hides the plugin's header line, and the seed is what reproduces the order."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.getoption("randomly_reorganize", True):
        terminalreporter.write_line(f"tests ran in a random order (pytest-randomly); the same order in one process: "
                                    f"python -m pytest -p no:xdist --randomly-seed={seed}")


def pytest_collection_modifyitems(config, items):
    # Modules holding a test marked slow run first (a stable sort: pytest-randomly's shuffled order
    # stays within each group). With `--dist loadfile --no-loadscope-reorder` the workers take the
    # long modules while the short ones are left to fill in behind them, instead of a long module
    # drawn last running alone at the end (xdist's own reorder counts tests, not seconds).
    slow = {item.module for item in items if item.get_closest_marker("slow") and getattr(item, "module", None)}
    items.sort(key=lambda item: getattr(item, "module", None) not in slow)

    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_runner_cache():
    """Runners are cached per process by spec; tests that rewrite a bundle in place must not see stale ones."""
    yield
    from tilefeet.runners import clear_runners

    clear_runners()


def isbi_slices() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The six held-out ISBI slices (uint8, 512²) and their membrane masks (1 = membrane): the
    sample tilefeet ships (``tilefeet sample``), read from tests/data/isbi."""
    from tilefeet.sample import isbi_sample

    return isbi_sample()


def isbi_montage(rows: int = 2, cols: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A rows × cols montage of the held-out slices (repeating them when more tiles than slices)."""
    from tilefeet.sample import montage

    return montage(rows, cols, mirror=False)


def make_random_engine(folder: Path, *, base: int = 8, depth: int = 4, classes=("membrane",), seed: int = 0, sharpen: float = 200.0,
                       pixel_size_nm=(4.0, 4.0), tile: int = 128, overlap: int = 32):
    """A randomly initialized U-Net bundle. ``sharpen`` scales the head so probabilities spread over
    (0, 1) instead of all sitting near 0.5, which makes equality tests discriminating."""
    import torch

    from tilefeet.engine import write_bundle
    from tilefeet.intensity import training_normalization
    from tilefeet.models.unet import UNet2d

    torch.manual_seed(seed)
    net = UNet2d(1, len(classes), base, depth)
    with torch.no_grad():
        net.head.weight.mul_(sharpen)
    return write_bundle(
        folder,
        name=folder.name,
        state_dict=net.state_dict(),
        architecture={"name": "unet2d", "base_channels": base, "depth": depth},
        pixel_size_nm=pixel_size_nm,
        classes=tuple(classes),
        normalization=training_normalization(isbi_slices()[0][:3]),
        tile=tile,
        overlap=overlap,
    )


@pytest.fixture(scope="session")
def random_engine(tmp_path_factory):
    """The random U-Net most tests run: 4 base channels (a quarter of 8's network work; 1 Mpx segmented
    in 0.36 s of CPU instead of 0.56; the 30 modules that use it took 395 s of CPU instead of 447),
    depth 4 (a receptive field of 200 px, as the shipped engines'). Seed 3: its
    probabilities spread over (0.09, 0.62) between the 10th and 90th percentiles on an ISBI slice,
    a third of it labelled (seeds 0-2 label 0-96 %: too few or too many objects to test)."""
    return make_random_engine(tmp_path_factory.mktemp("engines") / "random-unet", base=4, seed=3)


@pytest.fixture(scope="session")
def runner_bundle(tmp_path_factory):
    """The random U-Net the runner tests share (8 base channels): its probabilities spread over about
    (0.4, 0.7), so a runner returning a constant is off by > 0.2 while bf16 rounding stays below 1e-2."""
    return make_random_engine(tmp_path_factory.mktemp("runner-engines") / "rand-s20", sharpen=20.0, tile=128)


@pytest.fixture(scope="session")
def montage_2x3():
    return isbi_montage(2, 3)


def shared_dir(tmp_path_factory) -> Path:
    """A folder every process of this test session sees: the session's temporary root, which
    pytest-xdist's workers share (each has its own folder inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def heldout_run(tmp_path_factory):
    """The bundled isbi-membrane engine with its default settings on the 2 × 3 held-out montage (the
    recipe behind its README's F1: chunks of 256, blocks of 768), run once per test session, by
    whichever xdist worker asks first (the others wait on a file lock and read it): several tests
    score or compare it. Its bits do not depend on block size or input chunking (tested), so a test
    that would have run it with other such settings gets the same output.

    Returns ``(source store, output store, membrane labels as bool, truth as bool)``."""
    import filelock
    import zarr

    import tilefeet
    from tilefeet.convert import write_image

    d = shared_dir(tmp_path_factory) / "heldout-isbi-membrane"
    d.mkdir(exist_ok=True)
    img, mem = isbi_montage(2, 3)
    src, out, done = d / "heldout.ome.zarr", d / "seg.ome.zarr", d / "done"
    with filelock.FileLock(str(d / "lock")):
        if not done.exists():
            for stale in (src, out):
                shutil.rmtree(stale, ignore_errors=True)
            write_image(img, src, (4.0, 4.0), chunk=256)
            tilefeet.segment_to_zarr(src, out, "isbi-membrane", chunk_size=256, block_size=768)
            done.touch()
    pred = zarr.open_group(str(out), mode="r")["labels/membrane/0"][:].astype(bool)
    return src, out, pred, mem.astype(bool)


@pytest.fixture
def section(tmp_path, montage_2x3):
    """The 2 × 3 held-out montage (1024 × 1536, 4 nm) as OME-Zarr 0.5 with 256² chunks."""
    from tilefeet.convert import write_image

    return write_image(montage_2x3[0], tmp_path / "section.ome.zarr", (4.0, 4.0), chunk=256)


def bundled_engine_available() -> bool:
    from tilefeet.engine import list_engines

    return "isbi-membrane" in list_engines()
