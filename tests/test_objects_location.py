"""An objects layer is an output like any other (issue 18): it is staged, resumed and published
through the output-location protocol of :mod:`tilefeet.storage`, on a file system and on S3 (a real
S3-compatible server, moto's, in its own process on the loopback).

- ``tilefeet objects s3://...`` writes the same label arrays and table as a local run, for a
  section and a stack; ``segment ... s3://... --objects`` too;
- a run interrupted on S3 resumes with the same options only, and to the same bits;
- the run state is dropped only after the layer is in place: a publish that fails leaves the
  staging store and its records for ``--resume``, or a complete layer that recovery finishes;
- bad input (an unreachable server, a missing output, an existing layer, an interrupted run) is
  one line and exit status 2.
"""

from __future__ import annotations

import errno
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

import tilefeet
import tilefeet.objects.run as run
from tilefeet import storage
from tilefeet.convert import write_image
from tilefeet.errors import OutputExistsError
from tilefeet.objects import write_objects
from tilefeet.objects.store import ObjectStoreLayer, read_table, staging_path

from .conftest import isbi_montage
from .helpers import assert_one_line_error, run_cli
from .servers import free_port, start_s3_server
from .test_objects import adversarial, make_output, probs_for
from .test_objects3d import blobs, make_stack_output
from .test_objects3d import probs_for as stack_probs_for

BUCKET = "tilefeet-objects"
LAYER = "mitochondrion-objects"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server with an empty bucket."""
    server = start_s3_server(tmp_path_factory.mktemp("logs") / "s3.log")
    server.options = {"endpoint_url": server.url, "key": "testing", "secret": "testing"}
    _fs(server).mkdir(BUCKET)
    yield server
    server.stop()


def _fs(server):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=server.url, use_listings_cache=False)


def _cli_options(server) -> list[str]:
    return [a for k, v in server.options.items() for a in ("--storage-option", f"{k}={v}")]


def _upload(server, local: Path) -> tuple[str, str]:
    """``local`` copied to a fresh prefix: (URL, s3fs path)."""
    key = f"{BUCKET}/{uuid.uuid4().hex[:8]}/{local.name}"
    _fs(server).put(str(local), key, recursive=True)
    return f"s3://{key}", key


def _section(tmp_path: Path) -> Path:
    mask = adversarial(64, 96, corner=16)
    return make_output(tmp_path / "seg.ome.zarr", probs_for(mask), chunk=16)


def _local_arrays(layer: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(zarr.open_array(str(layer / k), mode="r")[:]) for k in sorted(p.name for p in layer.iterdir() if p.name.isdigit())}


def _s3_arrays(server, url: str) -> dict[str, np.ndarray]:
    from zarr.storage import FsspecStore

    store = FsspecStore.from_url(url, storage_options={"endpoint_url": server.url, "key": "testing", "secret": "testing"}, read_only=True)
    group = zarr.open_group(store, mode="r")  # a plain reader: the layer's metadata is published
    levels = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    return {k: np.asarray(group[k][:]) for k in levels}


def _listed(server, key: str) -> list[str]:
    return json.loads(_fs(server).cat_file(f"{key}/labels/zarr.json"))["attributes"]["ome"]["labels"]


def _assert_same_layer(server, url: str, key: str, local_layer: Path) -> None:
    got, want = _s3_arrays(server, f"{url}/labels/{LAYER}"), _local_arrays(local_layer)
    assert got.keys() == want.keys() and len(want) >= 2
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert read_table(f"{url}/labels/{LAYER}", server.options).equals(read_table(local_layer))
    assert LAYER in _listed(server, key)
    assert not _fs(server).exists(f"{key}/labels/{LAYER}/.tilefeet")  # the run state went after the publish


# ------------------------------------------------------------------------------ same bits as local


def test_objects_on_s3_equal_the_local_run(s3, tmp_path, capsys):
    local = _section(tmp_path)
    url, key = _upload(s3, local)
    code, out, err = run_cli(capsys, "objects", url, "--block-size", "32", "--fill-holes", "-q", *_cli_options(s3))
    assert code == 0, err
    assert f"{url}/labels/{LAYER}" in out  # the summary names the layer where it is
    write_objects(local, block_size=32, fill_holes=True)
    _assert_same_layer(s3, url, key, local / "labels" / LAYER)
    assert _listed(s3, key) == ["mitochondrion", LAYER]
    code, _, err = run_cli(capsys, "objects", url, "--block-size", "32", "-q", *_cli_options(s3))
    assert code == 2
    assert_one_line_error(code, err, "already exists", "--overwrite")


def test_objects_of_a_stack_on_s3_equal_the_local_run(s3, tmp_path):
    probs = stack_probs_for(blobs((4, 32, 48), seed=3))
    local = make_stack_output(tmp_path / "stack.ome.zarr", probs, chunk=16, levels=2)
    url, key = _upload(s3, local)
    result = write_objects(url, block_size=(2, 16, 32), storage_options=s3.options)
    assert result.volume_um3 is not None and str(result.path) == f"{url}/labels/{LAYER}"
    write_objects(local, block_size=(2, 16, 32))
    _assert_same_layer(s3, url, key, local / "labels" / LAYER)


def test_segment_objects_to_s3_equal_the_local_run(s3, tmp_path, random_engine):
    section = tmp_path / "section.ome.zarr"
    write_image(isbi_montage(1, 1)[0][:256, :256], section, (4.0, 4.0), chunk=128)
    kw = dict(chunk_size=128, block_size=128, threads=1, objects={"min_size": "0px"})
    local = tilefeet.segment_to_zarr(section, tmp_path / "out.ome.zarr", random_engine, **kw)
    key = f"{BUCKET}/{uuid.uuid4().hex[:8]}/out.ome.zarr"
    tilefeet.segment_to_zarr(section, f"s3://{key}", random_engine, storage_options=s3.options, **kw)
    layer = "membrane-objects"
    got, want = _s3_arrays(s3, f"s3://{key}/labels/{layer}"), _local_arrays(Path(local) / "labels" / layer)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert read_table(f"s3://{key}/labels/{layer}", s3.options).equals(read_table(Path(local) / "labels" / layer))
    assert layer in _listed(s3, key)
    assert not _fs(s3).exists(f"{key}/.tilefeet") and not _fs(s3).exists(f"{key}/labels/{layer}/.tilefeet")


def test_segment_objects_to_s3_prints_what_it_found(s3, tmp_path, random_engine, capsys):
    """The CLI's one-line summary reads the tables where they are (here S3), as for a local output."""
    section = tmp_path / "section.ome.zarr"
    write_image(isbi_montage(1, 1)[0][:256, :256], section, (4.0, 4.0), chunk=128)
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/out.ome.zarr"
    opts = ["-e", str(random_engine.path), "--chunk-size", "128", "--block-size", "128", "--threads", "1", "--no-invert"]
    code, _, err = run_cli(capsys, "segment", section, url, *opts, "--objects", "--min-size", "0px", *_cli_options(s3))
    assert code == 0, err
    n = len(read_table(f"{url}/labels/membrane-objects", s3.options))
    assert f"objects: {n} membrane object{'s' if n != 1 else ''} in {url}/labels/membrane-objects/objects.parquet" in err


# ------------------------------------------------------------------------------ resume and ordering


def _failing_relabel(after: int):
    original, calls = run._relabel, []

    def relabel(job, index, *rest):
        calls.append(index)
        if len(calls) > after:
            raise RuntimeError("killed")
        return original(job, index, *rest)

    return relabel, calls


def test_an_interrupted_layer_on_s3_resumes_with_the_same_options_to_the_same_bits(s3, tmp_path, monkeypatch, capsys):
    local = _section(tmp_path)
    url, key = _upload(s3, local)
    relabel, _ = _failing_relabel(after=2)
    monkeypatch.setattr(run, "_relabel", relabel)
    with pytest.raises(RuntimeError, match="killed"):
        write_objects(url, block_size=32, blocks_in_flight=1, storage_options=s3.options)
    monkeypatch.undo()
    fs = _fs(s3)
    assert fs.exists(f"{key}/labels/{LAYER}/.tilefeet/plan.json") and not fs.exists(f"{key}/labels/{LAYER}/zarr.json")
    assert _listed(s3, key) == ["mitochondrion"]  # nothing published
    code, _, err = run_cli(capsys, "objects", url, "--block-size", "32", "-q", *_cli_options(s3))
    assert_one_line_error(code, err, "interrupted", "--resume")
    assert code == 2
    code, _, err = run_cli(capsys, "objects", url, "--block-size", "32", "--fill-holes", "--resume", "-q", *_cli_options(s3))
    assert_one_line_error(code, err, "other options", "--overwrite")
    assert code == 2
    computed = []
    original = run._relabel
    monkeypatch.setattr(run, "_relabel", lambda job, index, *rest: computed.append(index) or original(job, index, *rest))
    write_objects(url, block_size=32, blocks_in_flight=1, resume=True, storage_options=s3.options)
    assert 0 < len(computed) < 6  # the two finished blocks of 6 were not redone
    monkeypatch.undo()
    write_objects(local, block_size=32)
    _assert_same_layer(s3, url, key, local / "labels" / LAYER)


def test_the_state_is_dropped_only_after_a_local_layer_is_in_place(tmp_path, monkeypatch):
    store = _section(tmp_path)
    staging = staging_path(store, LAYER)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "replace_dir", full)
    with pytest.raises(OSError):
        write_objects(store, block_size=32)
    monkeypatch.undo()
    assert not (store / "labels" / LAYER).exists()
    assert (staging / ".tilefeet" / "plan.json").exists() and len(list((staging / ".tilefeet" / "done").iterdir())) > 6
    result = write_objects(store, block_size=32, resume=True)  # nothing but the publish is left to do
    assert not staging.exists() and not (result.path / ".tilefeet").exists()
    ref = make_output(tmp_path / "ref.ome.zarr", probs_for(adversarial(64, 96, corner=16)), chunk=16)
    write_objects(ref, block_size=32)
    got, want = _local_arrays(Path(result.path)), _local_arrays(ref / "labels" / LAYER)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert LAYER in zarr.open_group(str(store / "labels"), mode="r").attrs["ome"]["labels"]


def test_a_local_publish_interrupted_after_the_rename_is_completed_by_recovery(tmp_path, monkeypatch):
    from tilefeet.objects.store import LocalLayer

    store = _section(tmp_path)

    def killed(self):
        raise RuntimeError("killed while listing the layer")

    monkeypatch.setattr(LocalLayer, "_placed", killed)
    with pytest.raises(RuntimeError, match="killed"):
        write_objects(store, block_size=32)
    monkeypatch.undo()
    layer = store / "labels" / LAYER
    assert (layer / ".tilefeet" / "plan.json").exists() and not staging_path(store, LAYER).exists()  # in place, state kept
    assert LAYER not in zarr.open_group(str(store / "labels"), mode="r").attrs["ome"]["labels"]
    with pytest.raises(OutputExistsError, match="already complete"):
        write_objects(store, block_size=32, resume=True)  # recovery lists it and drops the state
    assert LAYER in zarr.open_group(str(store / "labels"), mode="r").attrs["ome"]["labels"]
    assert not (layer / ".tilefeet").exists()


def test_a_publish_on_s3_interrupted_after_the_documents_is_completed_by_recovery(s3, tmp_path, monkeypatch):
    local = _section(tmp_path)
    url, key = _upload(s3, local)

    def killed(self):
        raise RuntimeError("killed while listing the layer")

    monkeypatch.setattr(ObjectStoreLayer, "_placed", killed)
    with pytest.raises(RuntimeError, match="killed"):
        write_objects(url, block_size=32, storage_options=s3.options)
    monkeypatch.undo()
    fs = _fs(s3)
    assert fs.exists(f"{key}/labels/{LAYER}/zarr.json")  # published...
    assert fs.exists(f"{key}/labels/{LAYER}/.tilefeet/plan.json")  # ...and the state still there
    with pytest.raises(OutputExistsError, match="already complete"):
        write_objects(url, block_size=32, resume=True, storage_options=s3.options)  # recovery lists it, drops the state
    write_objects(local, block_size=32)
    _assert_same_layer(s3, url, key, local / "labels" / LAYER)
    # --overwrite: the old layer leaves the list before it is deleted, the new one joins it once published
    result = write_objects(url, block_size=64, min_size="40px", overwrite=True, storage_options=s3.options)
    assert _listed(s3, key) == ["mitochondrion", LAYER] and len(result.table()) < len(read_table(local / "labels" / LAYER))


# ------------------------------------------------------------------------------ bad input


def test_bad_input_on_s3_is_one_line(s3, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # an unreachable endpoint: one try, not botocore's retries
    url, _ = _upload(s3, _section(tmp_path))
    write_image(np.zeros((32, 32), np.uint8), tmp_path / "image.ome.zarr", (4.0, 4.0))
    image, _ = _upload(s3, tmp_path / "image.ome.zarr")
    opts = _cli_options(s3)
    down = ["--storage-option", f"endpoint_url=http://127.0.0.1:{free_port()}", "--storage-option", "key=k", "--storage-option", "secret=s"]
    cases = [
        (("objects", url, *down), ("cannot reach", "endpoint")),
        (("objects", f"s3://{BUCKET}/nothing-here.ome.zarr", *opts), ("does not exist",)),
        (("objects", f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/seg.ome.zarr", *opts), ("bucket", "does not exist")),
        (("objects", image, *opts), ("no probabilities", "segment")),  # an image, not a segment output: no labels to read
    ]
    for args, needles in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        assert_one_line_error(code, err, *needles)
    assert _listed(s3, url[len("s3://"):]) == ["mitochondrion"]  # nothing written
