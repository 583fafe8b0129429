"""Nothing missing is read as data (issue 17): a chunk file missing from the input is refused in one
line naming the count and the keys, before anything is written, unless --allow-missing-chunks (then
the plan and the provenance say how many); chunks a writer left out as empty are not missing; a
garbled chunk is named by its key. Local zarr v3 and v2 stores, sharded arrays, a web server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import tilefeet
from tilefeet.convert import write_image
from tilefeet.errors import MissingDataError
from tilefeet.image import Image
from tilefeet.ngff import image_metadata, multiscales

from .conftest import isbi_montage
from .helpers import assert_one_line_error, run_cli
from .servers import start_file_server, start_http_server

CLI_KW = ["--chunk-size", "128", "--block-size", "128", "--threads", "1", "--no-invert"]
KW = dict(chunk_size=128, block_size=128, threads=1, invert=False)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """256 × 384 px of held-out ISBI: tissue in every 64² chunk (4 × 6 chunks)."""
    return isbi_montage(1, 2)[0][:256, :384]


@pytest.fixture
def section(tmp_path, pixels) -> Path:
    return write_image(pixels, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=64)


def foreign(path: Path, data: np.ndarray, *, chunk: int = 64, shards: tuple[int, int] | None = None, zarr_format: int = 3,
            separator: str = ".") -> Path:
    """An OME-Zarr section written by plain zarr-python, as other tools write them: chunks that hold
    only the fill value (0) are left out (zarr's default, write_empty_chunks=False), and the store
    does not say that it writes every chunk."""
    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)  # type: ignore[arg-type]
    g.attrs.update(image_metadata(multiscales("foreign", (4.0, 4.0), 1), version="0.5" if zarr_format == 3 else "0.4"))
    kw: dict = {"dimension_names": ["y", "x"]} if zarr_format == 3 else {"chunk_key_encoding": {"name": "v2", "separator": separator}}
    g.create_array("0", shape=data.shape, chunks=(chunk, chunk), shards=shards, dtype=data.dtype, fill_value=0, **kw)[:] = data
    return path


def segment(capsys, src, out, *args) -> tuple[int, str, str]:
    return run_cli(capsys, "segment", src, out, "-e", args[0], *CLI_KW, *args[1:])


def nothing_written(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


# ------------------------------------------------------------------------------- missing chunks


def test_a_missing_chunk_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys, section, random_engine):
    (section / "0" / "c" / "1" / "2").unlink()
    out = tmp_path / "o.ome.zarr"
    code, _, err = segment(capsys, section, out, random_engine.path)
    assert code == 2
    assert_one_line_error(code, err, str(section), "1 of 24 chunks of level 0 is missing", "0/c/1/2", "--allow-missing-chunks")
    assert nothing_written(out)
    # The library says the same, as an error that is also a FileNotFoundError.
    with pytest.raises(FileNotFoundError, match="0/c/1/2"):
        tilefeet.plan_segmentation(section, random_engine, **KW)


def test_allowed_missing_chunks_run_and_the_plan_and_provenance_say_how_many(tmp_path, capsys, section, random_engine):
    for key in ("1/2", "3/5"):
        (section / "0" / "c" / key).unlink()
    out = tmp_path / "o.ome.zarr"
    code, plan, err = segment(capsys, section, out, random_engine.path, "--allow-missing-chunks", "--dry-run")
    assert code == 0, err
    assert "2 MISSING" in plan and "0/c/1/2, 0/c/3/5" in plan and nothing_written(out)
    code, _, err = segment(capsys, section, out, random_engine.path, "--allow-missing-chunks", "-q")
    assert code == 0, err
    meta = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["metadata"]
    assert meta["missing_chunks"] == 2 and meta["input_chunks"][0]["missing_keys"] == ["0/c/1/2", "0/c/3/5"]
    # The lazy library call, too.
    probs = tilefeet.segment(section, random_engine, allow_missing_chunks=True, **KW)
    assert probs.shape == (1, 256, 384)


@pytest.mark.parametrize("separator", [".", "/"])
def test_zarr_v2_inputs_name_their_missing_chunks(tmp_path, capsys, pixels, random_engine, separator):
    if separator == ".":  # tilefeet's own 0.4 conversion
        src = write_image(pixels, tmp_path / "v2.ome.zarr", (4.0, 4.0), chunk=64, version="0.4")
    else:  # another writer's, with "/" between chunk indices
        src = foreign(tmp_path / "v2.ome.zarr", pixels, zarr_format=2, separator="/")
    key = f"1{separator}2"
    (src / "0" / key).unlink()
    out = tmp_path / "o.ome.zarr"
    code, _, err = segment(capsys, src, out, random_engine.path)
    assert_one_line_error(code, err, "1 of 24 chunks", f"0/{key}")
    assert nothing_written(out)


def test_a_missing_shard_is_all_of_its_chunks(tmp_path, capsys, pixels, random_engine):
    src = foreign(tmp_path / "sharded.ome.zarr", pixels, chunk=64, shards=(128, 128))
    assert Image.open(src).check_chunks(0).describe() == "level 0: 24 chunks, all stored"
    (src / "0" / "c" / "1" / "1").unlink()
    code, _, err = segment(capsys, src, tmp_path / "o.ome.zarr", random_engine.path)
    assert_one_line_error(code, err, "4 of 24 chunks", "shard file 0/c/1/1", "image pixels run up to them")


def test_chunks_left_out_as_empty_are_not_missing(tmp_path, capsys, pixels, random_engine):
    """zarr leaves out chunks that hold only the fill value: a montage's padding is not missing data,
    while a chunk lost from the tissue beside it is."""
    padded = pixels.copy()
    padded[:, 300:] = 0  # padding from x 300: chunk column 5 (x 320:384) is all 0 and not stored
    src = foreign(tmp_path / "padded.ome.zarr", padded)
    assert not (src / "0" / "c" / "0" / "5").exists()
    check = Image.open(src).check_chunks(0)
    assert (check.missing, check.empty) == (0, 4)
    code, plan, err = segment(capsys, src, tmp_path / "o.ome.zarr", random_engine.path, "--dry-run")
    assert code == 0 and "4 absent as empty" in plan, err
    (src / "0" / "c" / "2" / "1").unlink()  # tissue
    code, _, err = segment(capsys, src, tmp_path / "o.ome.zarr", random_engine.path)
    assert_one_line_error(code, err, "1 of 24 chunks", "0/c/2/1", "if they are empty on purpose, pass --allow-missing-chunks")


def test_padding_that_ends_on_a_chunk_border_is_refused_and_the_option_accepts_it(tmp_path, capsys, pixels, random_engine):
    """The one empty layout that cannot be told from lost chunks: tissue up to a chunk border."""
    aligned = pixels.copy()
    aligned[:, 320:] = 0
    src = foreign(tmp_path / "aligned.ome.zarr", aligned)
    code, _, err = segment(capsys, src, tmp_path / "o.ome.zarr", random_engine.path)
    assert_one_line_error(code, err, "4 of 24 chunks", "0/c/0/5", "empty on purpose")
    code, plan, err = segment(capsys, src, tmp_path / "o.ome.zarr", random_engine.path, "--allow-missing-chunks", "--dry-run")
    assert code == 0 and "4 MISSING" in plan, err


def test_a_level_with_nothing_stored_is_missing_and_arrays_in_memory_have_nothing_missing(tmp_path, pixels, random_engine):
    src = foreign(tmp_path / "bare.ome.zarr", pixels)
    shutil.rmtree(src / "0" / "c")
    with pytest.raises(MissingDataError, match="24 of 24 chunks"):
        tilefeet.plan_segmentation(src, random_engine, **KW)
    run = tilefeet.plan_segmentation(pixels, random_engine, pixel_size_nm=4.0, **KW)
    assert run.plan.chunks == () and not any(line.startswith("chunks") for line in run.describe().splitlines())


def test_objects_and_evaluate_refuse_an_output_that_lost_a_chunk(tmp_path, capsys, section, random_engine):
    out = tilefeet.segment_to_zarr(section, tmp_path / "o.ome.zarr", random_engine, **KW)
    meta = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["metadata"]
    assert meta["every_chunk_written"] is True and meta["missing_chunks"] == 0
    assert run_cli(capsys, "evaluate", out, out / "labels" / "membrane")[0] == 0
    (out / "labels" / "membrane" / "0" / "c" / "1" / "2").unlink()
    code, _, err = run_cli(capsys, "objects", out)
    assert_one_line_error(code, err, "1 of 6 chunks of labels/membrane is missing", "labels/membrane/0/c/1/2", "no objects there")
    assert "membrane-objects" not in json.loads((out / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"]
    code, _, err = run_cli(capsys, "evaluate", out, section)
    assert_one_line_error(code, err, "1 of 6 chunks of level 0 is missing", "0/c/1/2", "scored as background")
    (out / "0" / "c" / "0" / "0" / "1").unlink()
    code, _, err = run_cli(capsys, "evaluate", out, section, "--threshold", "0.5")
    assert_one_line_error(code, err, "1 of 6 chunks of the membrane probabilities is missing", "0/c/0/0/1")


# ------------------------------------------------------------------------------- remote input


@pytest.fixture(scope="module")
def served(tmp_path_factory, pixels):
    root = tmp_path_factory.mktemp("served")
    write_image(pixels, root / "lost.ome.zarr", (4.0, 4.0), chunk=64)
    (root / "lost.ome.zarr" / "0" / "c" / "2" / "3").unlink()
    # 4096 chunks of 32² in 64 folders: what a section of 16k chunks is, a quarter the size
    noise = np.random.default_rng(0).integers(0, 255, (2048, 2048), dtype=np.uint8)
    foreign(root / "many.ome.zarr", noise, chunk=32)
    write_image(np.stack([pixels] * 3), root / "stack.ome.zarr", (4.0, 4.0), chunk=64, levels=1, z_spacing_nm=50.0)
    (root / "stack.ome.zarr" / "0" / "c" / "1" / "2" / "3").unlink()
    server = start_http_server(root, tmp_path_factory.mktemp("logs") / "http.log")
    server.root = root  # type: ignore[attr-defined]
    yield server
    server.stop()


def test_a_web_server_input_with_a_missing_chunk_is_refused(tmp_path, capsys, served, random_engine):
    out = tmp_path / "o.ome.zarr"
    code, _, err = segment(capsys, f"{served.url}/lost.ome.zarr", out, random_engine.path)
    assert_one_line_error(code, err, f"{served.url}/lost.ome.zarr", "1 of 24 chunks", "0/c/2/3")
    assert nothing_written(out)


def test_a_web_server_without_listings_is_said_unchecked_not_refused(tmp_path, capsys, served, random_engine):
    """Most web servers list no folders: nothing can be checked there, and the plan says so."""
    files = start_file_server(Path(served.root), tmp_path / "files.log")
    try:
        url = f"{files.url}/lost.ome.zarr"
        assert not Image.open(url).check_chunks(0).listed
        code, plan, err = segment(capsys, url, tmp_path / "o.ome.zarr", random_engine.path, "--dry-run")
        assert code == 0, err
        assert "chunks      level 0: not checked for missing chunks" in plan and "gives no listing of its files" in plan
    finally:
        files.stop()


def test_the_check_lists_folders_and_reads_no_chunk(served):
    """4096 chunks: one listing per folder (the array's, c/, and one per chunk row), no chunk read."""
    url = f"{served.url}/many.ome.zarr"
    served.mark()
    check = Image.open(url).check_chunks(0)
    assert (check.chunks, check.missing, check.listed) == (4096, 0, True)
    folders = served.listings("/many.ome.zarr/0/")
    assert sorted(folders) == sorted(["/many.ome.zarr/0/", "/many.ome.zarr/0/c/", *(f"/many.ome.zarr/0/c/{i}/" for i in range(64))])
    assert not served.gets("/many.ome.zarr/0/c/")


def test_a_stack_is_listed_once_for_all_its_sections(served, random_engine):
    url = f"{served.url}/stack.ome.zarr"
    served.mark()
    run = tilefeet.plan_segmentation(url, random_engine, allow_missing_chunks=True, **KW)
    (check,) = run.plan.chunks
    assert (check.chunks, check.missing, check.keys) == (3 * 24, 1, ("0/c/1/2/3",))
    folders = served.listings("/stack.ome.zarr/0/")
    expected = ["/stack.ome.zarr/0/", "/stack.ome.zarr/0/c/", *(f"/stack.ome.zarr/0/c/{z}/" for z in range(3)),
                *(f"/stack.ome.zarr/0/c/{z}/{y}/" for z in range(3) for y in range(4))]
    assert sorted(folders) == sorted(expected)  # each once, not once per section


# ------------------------------------------------------------------------------- garbled chunks


@pytest.mark.parametrize("sharded", [False, True])
def test_a_garbled_chunk_is_named_by_its_key_and_store(tmp_path, capsys, pixels, random_engine, sharded):
    if sharded:
        src = foreign(tmp_path / "s.ome.zarr", pixels, shards=(128, 128))
        key, where = "0/c/1/1", "y 128:192, x 128:192"  # the shard, and its first chunk that fails
    else:
        src = write_image(pixels, tmp_path / "s.ome.zarr", (4.0, 4.0), chunk=64)
        key, where = "0/c/1/2", "y 64:128, x 128:192"
    (src / key).write_bytes(b"garbage" * 9)
    code, _, err = segment(capsys, src, tmp_path / "o.ome.zarr", random_engine.path)
    assert_one_line_error(code, err, f"{src}: chunk {key} of level 0 ({where})", "damaged")
