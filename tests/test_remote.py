"""Remote input and object-store output against real servers in their own processes (issue 12):
an S3-compatible server (moto's server mode) and a plain web server (``python -m http.server``).

- from HTTP and from S3 the output equals the local run's, bit for bit, and each chunk of the
  level read is fetched once per block whose hull touches it (counted in the servers' logs);
- writing to S3 equals writing locally, object for object; an unfinished output has no Zarr
  metadata a reader could open; "exists, pass --overwrite", "--resume", "already complete" and
  crashes in finalize behave as on a file system; a run killed with SIGKILL resumes to the same bits;
- a missing bucket or URL, refused or missing credentials, an unreachable server: one line that
  names the URL and the fix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zarr

import tilefeet
from tilefeet.convert import write_image
from tilefeet.geometry import Box
from tilefeet.pipeline import plan_segmentation, write_planned

from .conftest import DATA, isbi_montage
from .helpers import assert_one_line_error, cli_command, run_cli
from .servers import free_port, start_http_server, start_s3_server

KW = dict(chunk_size=128, block_size=128, threads=1)
CLI_KW = ["--chunk-size", "128", "--block-size", "128", "--threads", "1"]
BUCKET = "tilefeet-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# ------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Path:
    """The folder the web server serves; the test section lives in it."""
    root = tmp_path_factory.mktemp("served")
    write_image(isbi_montage(1, 2)[0][:256, :384], root / "section.ome.zarr", (4.0, 4.0), chunk=128)
    return root


@pytest.fixture(scope="session")
def http(served, tmp_path_factory):
    server = start_http_server(served, tmp_path_factory.mktemp("logs") / "http.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(served, tmp_path_factory):
    """moto's S3 server with a bucket holding the test section (``s3://tilefeet-test/section.ome.zarr``)."""
    server = start_s3_server(tmp_path_factory.mktemp("logs") / "s3.log")
    server.options = {"endpoint_url": server.url, "key": "testing", "secret": "testing"}
    fs = _fs(server)
    fs.mkdir(BUCKET)
    fs.put(str(served / "section.ome.zarr"), f"{BUCKET}/section.ome.zarr", recursive=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_strict(tmp_path_factory):
    """An S3 server that checks signatures against its (empty) IAM: every key is refused."""
    server = start_s3_server(tmp_path_factory.mktemp("logs") / "s3-strict.log", enforce_auth=True)
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """Credentials and endpoint from the environment, as a user on a cluster would have them."""
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3.url}.items():
        monkeypatch.setenv(k, v)
    return s3


def _fs(server):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=server.url, use_listings_cache=False)


def _prefix() -> str:
    return f"{BUCKET}/{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="session")
def reference(served, random_engine, tmp_path_factory) -> Path:
    """The local run on the local section: what every remote run must equal."""
    return tilefeet.segment_to_zarr(served / "section.ome.zarr", tmp_path_factory.mktemp("ref") / "ref.ome.zarr", random_engine, **KW)


def local_objects(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def s3_objects(server, prefix: str) -> dict[str, bytes]:
    fs = _fs(server)
    keys = fs.find(prefix)
    return {k[len(prefix) + 1 :]: bytes(v) for k, v in fs.cat(keys).items()} if keys else {}


def without_input(objects: dict[str, bytes]) -> dict[str, bytes]:
    """The root document without the recorded input (a URL run records its URL, not a path)."""
    out = dict(objects)
    doc = json.loads(out["zarr.json"])
    del doc["attributes"]["ome"]["multiscales"][0]["metadata"]["input"]
    out["zarr.json"] = json.dumps(doc, sort_keys=True).encode()
    return out


def expected_chunk_reads(run, prefix: str) -> Counter:
    """GETs of the read level's chunks that one run should make: the section statistics read the
    (small) level once, the polarity probe reads it once more (to choose textured tiles) and its
    tiles' hulls once each, then each block reads its hull (block + halo, reflected) once."""
    from tilefeet.probe import PROBE_TILES, SPREAD_LEVEL_PIXELS, probe_candidates, probe_tiles

    level = run.plan.level
    lv = run.image.meta.levels[level]
    ch, cw = lv.chunks
    reads: Counter = Counter()

    def add(box: Box) -> None:
        for cy in range(box.y0 // ch, (box.y1 - 1) // ch + 1):
            for cx in range(box.x0 // cw, (box.x1 - 1) // cw + 1):
                reads[f"{prefix}/{lv.path}/c/{cy}/{cx}"] += 1

    add(Box(0, 0, *lv.shape))
    assert lv.shape[0] * lv.shape[1] <= SPREAD_LEVEL_PIXELS
    if len(probe_candidates(run.plan)) > PROBE_TILES:
        add(Box(0, 0, *lv.shape))  # the level is small: the candidates' spreads are read from it whole
    for iy, ix in probe_tiles(run.plan, run.image):  # (reads again, after the caller has counted)
        add(run.image.hull(level, run.plan.tile_geometry(iy, ix).src_box))
    for index in run.plan.blocks:
        add(run.image.hull(level, run.plan.block(*index).src_box))
    return reads


def block_reads(run) -> Counter:
    """The chunk GETs of the blocks alone: each block reads its hull once."""
    lv = run.image.meta.levels[run.plan.level]
    reads: Counter = Counter()
    for index in run.plan.blocks:
        hull = run.image.hull(run.plan.level, run.plan.block(*index).src_box)
        for cy in range(hull.y0 // lv.chunks[0], (hull.y1 - 1) // lv.chunks[0] + 1):
            for cx in range(hull.x0 // lv.chunks[1], (hull.x1 - 1) // lv.chunks[1] + 1):
                reads[(cy, cx)] += 1
    return reads


def per_tile_reads(run) -> Counter:
    """The chunk GETs of a reader that fetched each tile's pixels (the network and source grids
    agree here) on its own: what reading one hull per block avoids."""
    assert not run.plan.resamples_input
    lv = run.image.meta.levels[run.plan.level]
    reads: Counter = Counter()
    for index in run.plan.blocks:
        ys, xs = run.plan.block(*index).tiles
        for ty in ys:
            for tx in xs:
                hull = run.image.hull(run.plan.level, run.plan.lattice.tile_box(ty, tx))
                for cy in range(hull.y0 // lv.chunks[0], (hull.y1 - 1) // lv.chunks[0] + 1):
                    for cx in range(hull.x0 // lv.chunks[1], (hull.x1 - 1) // lv.chunks[1] + 1):
                        reads[(cy, cx)] += 1
    return reads


def assert_one_line(code: int, err: str, *needles: str) -> str:
    """A user error: exit status 2 and nothing on stderr but the one error line, holding every needle."""
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return assert_one_line_error(code, err, *needles)


# ------------------------------------------------------------------------------ remote input


def test_http_input_equals_local_and_fetches_each_chunk_once_per_block(http, served, random_engine, reference, tmp_path):
    url = f"{http.url}/section.ome.zarr"
    http.mark()
    run = plan_segmentation(url, random_engine, **KW)
    out = write_planned(run, tmp_path / "o.ome.zarr")
    got = http.gets("/section.ome.zarr/0/c/")
    want = expected_chunk_reads(run, "/section.ome.zarr")
    assert got == want
    # Reading tile by tile would fetch each tile's chunks (here 60 GETs for 24 tiles against the
    # blocks' 28, besides the statistics' and the polarity probe's; more as blocks grow to their
    # default 4096²).
    assert sum(block_reads(run).values()) < sum(per_tile_reads(run).values())
    assert without_input(local_objects(out)) == without_input(local_objects(reference))
    assert tilefeet.ngff.read_multiscale(out).metadata["input"] == url
    # The same URL plans the same run (the resume fingerprint), whatever process asks.
    assert plan_segmentation(url, random_engine, **KW).plan.fingerprint() == run.plan.fingerprint()


def test_s3_input_equals_local_and_fetches_each_chunk_once_per_block(s3, random_engine, reference, tmp_path):
    url = f"s3://{BUCKET}/section.ome.zarr"
    s3.mark()
    run = plan_segmentation(url, random_engine, storage_options=s3.options, **KW)
    out = write_planned(run, tmp_path / "o.ome.zarr")
    assert s3.gets(f"/{BUCKET}/section.ome.zarr/0/c/") == expected_chunk_reads(run, f"/{BUCKET}/section.ome.zarr")
    assert without_input(local_objects(out)) == without_input(local_objects(reference))
    # Storage options (credentials included) stay out of the plan and of everything written.
    assert run.plan.image.source == url
    assert "testing" not in json.dumps(json.loads(local_objects(out)["zarr.json"]))


def test_info_convert_evaluate_preview_read_urls(http, s3_env, served, random_engine, reference, tmp_path, capsys):
    url = f"{http.url}/section.ome.zarr"
    code, out, _ = run_cli(capsys, "info", url)
    assert code == 0 and url in out and "256 × 384 px" in out
    # convert: a remote section into a fresh local pyramid (pixel size from its metadata) ...
    code, _, err = run_cli(capsys, "-q", "convert", url, tmp_path / "copy.ome.zarr", "--chunk", "64")
    assert code == 0, err
    copy, original = (zarr.open_group(str(p), mode="r") for p in (tmp_path / "copy.ome.zarr", served / "section.ome.zarr"))
    np.testing.assert_array_equal(copy["0"][:], original["0"][:])
    assert copy["0"].chunks == (64, 64)
    # ... and a PNG into S3: the same objects as converting it locally
    png = DATA / "isbi" / "image" / "24.png"
    s3_url = f"s3://{_prefix()}/c.ome.zarr"
    code, _, err = run_cli(capsys, "-q", "convert", png, s3_url, "--pixel-size", "4nm")
    assert code == 0, err
    local = write_image(_read_png(png), tmp_path / "24.ome.zarr", (4.0, 4.0), name="24")
    assert s3_objects(s3_env, s3_url[len("s3://") :]) == local_objects(local)
    # evaluate and preview of a run whose input and output are both remote
    seg = f"s3://{_prefix()}/seg.ome.zarr"
    code, _, err = run_cli(capsys, "-q", "segment", url, seg, "-e", random_engine.path, *CLI_KW)
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", seg, reference / "labels" / "membrane", "--json")
    assert code == 0, err
    assert json.loads(out)["pixel"]["f1"] == 1.0
    code, _, err = run_cli(capsys, "preview", seg, tmp_path / "p.png")  # finds the input by its recorded URL
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 1000, err


def _read_png(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path)


# ------------------------------------------------------------------------------ S3 output


class _Died(BaseException):
    """Stands for the process dying at that instant."""


def test_s3_output_equals_local_output_object_for_object(s3, served, random_engine, reference):
    prefix = _prefix()
    out = tilefeet.segment_to_zarr(served / "section.ome.zarr", f"s3://{prefix}/o.ome.zarr", random_engine, storage_options=s3.options, **KW)
    assert out == f"s3://{prefix}/o.ome.zarr"
    assert s3_objects(s3, f"{prefix}/o.ome.zarr") == local_objects(reference)  # data, metadata, no run state left


def test_an_unfinished_s3_output_cannot_be_opened_and_resumes_to_the_same_bits(s3, served, random_engine, reference, monkeypatch):
    """Interrupted after two blocks: no reader finds Zarr metadata; the rules of a file system hold
    (rerun refused without --resume, resume refused with other options); --resume redoes only the
    unfinished blocks and gives the same objects as an uninterrupted local run."""
    import tilefeet.schedule
    from tilefeet.writer import OutputStore

    url = f"s3://{_prefix()}/o.ome.zarr"
    original = OutputStore.write_block
    written: list = []

    def dies_after_two(store, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        original(store, *args, **kwargs)
        written.append(args)

    monkeypatch.setattr(OutputStore, "write_block", dies_after_two)
    opts = dict(storage_options=s3.options, blocks_in_flight=1, **KW)
    with pytest.raises(tilefeet.errors.Interrupted, match=f"kept in {url}; rerun the same command with --resume"):
        tilefeet.segment_to_zarr(served / "section.ome.zarr", url, random_engine, **opts)
    monkeypatch.setattr(OutputStore, "write_block", original)
    objects = s3_objects(s3, url[len("s3://") :])
    assert not [k for k in objects if k.endswith("zarr.json") and not k.startswith(".tilefeet/")]  # nothing to open
    assert sorted(k for k in objects if k.startswith(".tilefeet/done/")) == [".tilefeet/done/b0_0", ".tilefeet/done/b0_1"]
    with pytest.raises(tilefeet.errors.InputNotFoundError, match=r"is an unfinished tilefeet output .* --resume"):
        tilefeet.ngff.read_multiscale(url, storage_options=s3.options)
    with pytest.raises(tilefeet.errors.OutputExistsError, match=f"an interrupted run left {url}; pass --resume"):
        tilefeet.segment_to_zarr(served / "section.ome.zarr", url, random_engine, **opts)
    with pytest.raises(tilefeet.errors.OutputExistsError, match=r"--threshold 0.5 \(now 0.9\)"):
        tilefeet.segment_to_zarr(served / "section.ome.zarr", url, random_engine, resume=True, threshold=0.9, **opts)
    computed = []
    block = tilefeet.schedule._write_block
    monkeypatch.setattr(tilefeet.schedule, "_write_block", lambda run, store, index, *rest: computed.append(index) or block(run, store, index, *rest))
    tilefeet.segment_to_zarr(served / "section.ome.zarr", url, random_engine, resume=True, **opts)
    assert len(computed) == 6 - 2
    assert s3_objects(s3, url[len("s3://") :]) == local_objects(reference)


def test_exists_overwrite_and_resume_rules_on_s3(s3_env, served, random_engine, reference, capsys):
    url = f"s3://{_prefix()}/o.ome.zarr"
    section = served / "section.ome.zarr"
    args = ("-e", random_engine.path, *CLI_KW)
    assert run_cli(capsys, "-q", "segment", section, url, *args, "--threshold", "0.9")[0] == 0  # an old output, other labels
    for extra in ((), ("--dry-run",)):
        assert_one_line(*run_cli(capsys, "-q", "segment", section, url, *args, *extra)[::2], url, "already exists", "--overwrite",
                        "the old output is deleted when the new run starts")
    assert_one_line(*run_cli(capsys, "-q", "segment", section, url, *args, "--resume")[::2], url, "already complete")
    code, _, err = run_cli(capsys, "-q", "segment", section, url, *args, "--overwrite")
    assert code == 0, err
    assert s3_objects(s3_env, url[len("s3://") :]) == local_objects(reference)  # nothing of the old output left


@pytest.mark.parametrize("dies", ["before the root document", "after the root document"])
def test_a_crash_inside_finalize_on_s3_resumes_to_the_same_bits(s3, served, random_engine, reference, monkeypatch, dies):
    """Publishing writes the metadata documents, the root last, then drops the run state; dying
    before the root leaves an unfinished output that --resume publishes; dying after it leaves a
    complete output (readable at once) whose leftover state the next run removes."""
    from tilefeet.storage import ObjectStoreOutput

    url = f"s3://{_prefix()}/o.ome.zarr"
    key = url[len("s3://") :]
    call = ObjectStoreOutput._call

    def dying(self, f, *args, **kwargs):
        path, name = (str(args[0]) if args else ""), f.__name__.lstrip("_")  # fsspec's sync methods are named _pipe_file, ...
        if dies.startswith("before") and name == "pipe_file" and path == f"{key}/zarr.json":
            raise _Died
        if dies.startswith("after") and name == "rm" and path == f"{key}/.tilefeet":
            raise _Died
        return call(self, f, *args, **kwargs)

    monkeypatch.setattr(ObjectStoreOutput, "_call", dying)
    opts = dict(storage_options=s3.options, **KW)
    with pytest.raises(_Died):
        tilefeet.segment_to_zarr(served / "section.ome.zarr", url, random_engine, **opts)
    monkeypatch.setattr(ObjectStoreOutput, "_call", call)
    if dies.startswith("before"):
        with pytest.raises(tilefeet.errors.InputNotFoundError):
            tilefeet.ngff.read_multiscale(url, storage_options=s3.options)
        tilefeet.segment_to_zarr(served / "section.ome.zarr", url, random_engine, resume=True, **opts)
    else:
        assert tilefeet.ngff.read_multiscale(url, storage_options=s3.options).names == ("c", "y", "x")
        with pytest.raises(tilefeet.errors.OutputExistsError, match="already complete"):
            tilefeet.segment_to_zarr(served / "section.ome.zarr", url, random_engine, resume=True, **opts)
    assert s3_objects(s3, key) == local_objects(reference)


@pytest.mark.slow
def test_an_s3_run_killed_with_sigkill_resumes_to_the_same_bits(s3, tmp_path, random_engine):
    """A real process writing to S3, killed with SIGKILL while blocks are being written: the output
    cannot be opened, a plain rerun is refused, and --resume redoes only the unfinished blocks and
    ends with the objects of an uninterrupted local run."""
    src = write_image(isbi_montage(1, 2)[0][:384], tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=128)  # 384 × 1024: 24 blocks
    args = ["-e", random_engine.path, *CLI_KW, "--blocks-in-flight", "1", "-q"]
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": s3.url}
    ref = tilefeet.segment_to_zarr(src, tmp_path / "ref.ome.zarr", random_engine, **KW)  # one CPU thread here and there
    key = f"{_prefix()}/o.ome.zarr"
    fs = _fs(s3)
    proc = subprocess.Popen(cli_command("segment", src, f"s3://{key}", *args), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(fs.ls(f"{key}/.tilefeet/done") if fs.exists(f"{key}/.tilefeet/done") else []) < 4:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make the section bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{key}/.tilefeet/done")}
    assert 4 <= len(finished) < 24
    assert not fs.exists(f"{key}/zarr.json")
    r = subprocess.run(cli_command("segment", src, f"s3://{key}", *args), env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    s3.mark()
    r = subprocess.run(cli_command("segment", src, f"s3://{key}", *args, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    redone = [q for q in s3.requests() if q.method == "PUT" and "/.tilefeet/done/b" in q.path]
    assert len(redone) == 24 - len(finished)
    assert s3_objects(s3, key) == local_objects(ref)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")
def test_a_cluster_reads_http_and_writes_s3_like_a_local_run(http, s3, random_engine, reference):
    """Worker processes reopen the input by its URL (the image's source) and the output by its
    location: no array or connection travels in a task. Same bits as the local run."""
    distributed = pytest.importorskip("distributed")
    environ = dict(os.environ)
    url = f"s3://{_prefix()}/o.ome.zarr"
    try:
        with (
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
            distributed.Client(cluster) as client,
        ):
            graph = tilefeet.segment_to_zarr(f"{http.url}/section.ome.zarr", url, random_engine, compute=False,
                                             output_storage_options=s3.options, **KW)
            assert client.compute(graph).result() == url
    finally:  # starting a LocalCluster sets OMP_NUM_THREADS=1 here for good
        os.environ.clear()
        os.environ.update(environ)
    got, want = s3_objects(s3, url[len("s3://") :]), local_objects(reference)
    assert {k: v for k, v in got.items() if k != "zarr.json"} == {k: v for k, v in want.items() if k != "zarr.json"}


# ------------------------------------------------------------------------------------ errors


def test_remote_errors_are_one_line_naming_the_url_and_the_fix(http, s3_env, s3_strict, served, random_engine, monkeypatch, capsys):
    section = served / "section.ome.zarr"
    seg = ("-e", random_engine.path)
    good = f"s3://{BUCKET}/section.ome.zarr"
    strict = ("--storage-option", f"endpoint_url={s3_strict.url}")
    cases = [
        (("info", "s3://no-such-bucket/section.ome.zarr"), ("s3://no-such-bucket/section.ome.zarr", "bucket 'no-such-bucket' does not exist")),
        (("segment", section, "s3://no-such-bucket/o.ome.zarr", *seg), ("s3://no-such-bucket/o.ome.zarr", "does not exist", "create it")),
        (("segment", section, "s3://no-such-bucket/o.ome.zarr", *seg, "--dry-run"), ("s3://no-such-bucket/o.ome.zarr", "create it")),
        (("info", f"s3://{BUCKET}/nothing.ome.zarr"), (f"s3://{BUCKET}/nothing.ome.zarr", "does not exist", "check the url")),
        (("info", f"{http.url}/nothing.ome.zarr"), (f"{http.url}/nothing.ome.zarr", "does not exist", "check the url")),
        (("info", good, *strict), (good, "access denied", "AWS_ACCESS_KEY_ID", "anon=true")),
        (("segment", section, f"s3://{BUCKET}/o.ome.zarr", *seg, *strict), (f"s3://{BUCKET}/o.ome.zarr", "access denied", "may write")),
        (("info", f"http://127.0.0.1:{free_port()}/s.ome.zarr"), ("cannot reach", "s.ome.zarr", "server is up")),
        (("segment", section, f"{http.url}/o.ome.zarr", *seg), (f"{http.url}/o.ome.zarr", "read-only", "s3://")),
        (("info", good, "--storage-option", "endpoint=http://x"), ("unknown storage option 'endpoint'", "endpoint_url")),
        (("info", "gs://bucket/s.ome.zarr"), ("gs://bucket/s.ome.zarr", "http://, https:// and s3://")),
        (("-q", "segment", good, f"{good}/o.ome.zarr", *seg), (f"{good}/o.ome.zarr", "overlaps the input", "somewhere else")),
    ]
    for args, needles in cases:
        assert_one_line(*run_cli(capsys, *args)[::2], *needles)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # a user's setting too: do not retry for a minute
    down = f"http://127.0.0.1:{free_port()}"
    assert_one_line(*run_cli(capsys, "info", good, "--storage-option", f"endpoint_url={down}")[::2], good, f"cannot reach {down}", "endpoint_url")
    # No credentials anywhere (a fresh process: file systems are cached per process with what they found).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(served / "none"), AWS_CONFIG_FILE=str(served / "none"), AWS_EC2_METADATA_DISABLED="true",
               AWS_ENDPOINT_URL=s3_env.url)
    r = subprocess.run(cli_command("info", good), env=env, capture_output=True, text=True)
    assert_one_line(r.returncode, r.stderr, good, "no credentials", "AWS_ACCESS_KEY_ID", "anon=true")


def test_a_bucket_whose_name_says_bucket_is_not_taken_for_missing(s3, served, random_engine, reference):
    """s3fs's "not found" for a key holds the bucket's name; "my-bucket" made every missing key (a
    fresh output's run state, a mistyped input) read as a missing bucket, so nothing could be written
    there. The server is asked instead."""
    bucket = f"my-bucket-{uuid.uuid4().hex[:6]}"
    _fs(s3).mkdir(bucket)
    out = tilefeet.segment_to_zarr(served / "section.ome.zarr", f"s3://{bucket}/o.ome.zarr", random_engine, storage_options=s3.options, **KW)
    assert s3_objects(s3, f"{bucket}/o.ome.zarr") == local_objects(reference), out
    with pytest.raises(tilefeet.errors.InputNotFoundError, match="does not exist") as missing_key:
        tilefeet.segment_to_zarr(f"s3://{bucket}/typo.ome.zarr", "unused.ome.zarr", random_engine, storage_options=s3.options)
    assert "the bucket" not in str(missing_key.value)
    with pytest.raises(tilefeet.errors.InputNotFoundError, match="the bucket 'my-bucket-none' does not exist"):
        tilefeet.segment_to_zarr("s3://my-bucket-none/s.ome.zarr", "unused.ome.zarr", random_engine, storage_options=s3.options)


def test_a_stack_from_http_to_s3_equals_the_local_run(served, http, s3, random_engine, tmp_path):
    """Stacks read from a web server and written to S3: the same bits as the local run."""
    from .conftest import isbi_slices

    planes = np.stack([s[:192, :256] for s in isbi_slices()[0][:2]])
    write_image(planes, served / "stack.ome.zarr", (4.0, 4.0), chunk=128, z_spacing_nm=50.0)
    local = zarr.open_group(str(tilefeet.segment_to_zarr(served / "stack.ome.zarr", tmp_path / "l.ome.zarr", random_engine, **KW)), mode="r")
    url = f"s3://{_prefix()}/stack-out.ome.zarr"
    tilefeet.segment_to_zarr(f"{http.url}/stack.ome.zarr", url, random_engine, output_storage_options=s3.options, **KW)
    from tilefeet.ngff import open_group

    remote = open_group(url, storage_options=s3.options)
    assert remote["0"].shape == (1, 2, 192, 256)
    for name in ("0", "1", "labels/membrane/0"):
        np.testing.assert_array_equal(np.asarray(remote[name][...]), local[name][...], err_msg=name)
