"""tilefeet view: the layers read from a real segmentation, served with CORS and byte ranges, shown by
neuroglancer in a real headless Chromium (every layer loads, no error on the page, the labels lie
on the image with x horizontal, float16 probabilities drawn as stored), napari's layers, and bad
input as one line. Without a browser (and no way to install one) the browser tests are skipped,
saying why."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.request

import numpy as np
import pytest
import zarr

import tilefeet
from tilefeet.convert import write_image

from .conftest import isbi_slices
from .helpers import assert_one_line_error, run_cli
from .servers import free_port, start_http_server

H, W = 192, 256  # a real ISBI slice, cut: small enough to segment in seconds


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    return write_image(isbi_slices()[0][0][:H, :W], tmp_path_factory.mktemp("view") / "section.ome.zarr", (4.0, 4.0), chunk=128)


@pytest.fixture(scope="module")
def output(section, random_engine):
    """A segmentation with every layer there is: float16 probabilities in zarr v3 shards (what
    neuroglancer cannot read as stored, and what needs byte ranges), labels, objects, uncertainty.
    The network is the suite's small random U-Net (a second, not ten): the viewer is under test here,
    and any labels with structure show whether they lie where the array says (its threshold keeps
    about a third of the pixels)."""
    return tilefeet.segment_to_zarr(section, section.parent / "seg.ome.zarr", random_engine, output_dtype="float16",
                                    chunk_size=64, shard_size=128, uncertainty=True, tta=2, objects=True, threshold=0.5)


@pytest.fixture(scope="module")
def stack_output(tmp_path_factory, random_engine):
    """A stack (z, y, x; 50 nm between sections) segmented by a small random network."""
    folder = tmp_path_factory.mktemp("view-stack")
    planes = np.stack([s[:96, :128] for s in isbi_slices()[0][:3]])
    src = write_image(planes, folder / "stack.ome.zarr", (4.0, 4.0), chunk=64, z_spacing_nm=50.0)
    return tilefeet.segment_to_zarr(src, folder / "stack-seg.ome.zarr", random_engine, tile=64, overlap=16, chunk_size=64)


# ------------------------------------------------------------------------------------ the plan


def test_plan_lists_every_layer_of_a_section_output_in_its_units(output, section):
    from tilefeet.view import plan_view

    plan = plan_view(output)
    assert [x.name for x in plan.layers] == ["input", "probabilities: membrane", "uncertainty", "membrane", "membrane-objects"]
    assert [x.kind for x in plan.layers] == ["image", "probabilities", "uncertainty", "labels", "objects"]
    assert plan.stores["input"] == str(section.resolve())  # the input the output records
    assert plan.axes == ("y", "x") and plan.scale_nm == (4.0, 4.0) and plan.shape == (H, W)
    assert [x.name for x in plan.layers if x.visible] == ["input", "membrane"]  # the image and its masks at start
    assert plan.layer("membrane").color == (255, 64, 0)  # the label image's own colour
    levels = {d.path for d in plan.layer("probabilities: membrane").ms.datasets}
    assert len(levels) > 1 and plan.float32_views["output"] == levels  # the float16 levels, served as float32


def test_plan_of_a_stack_reads_z_from_the_metadata(stack_output):
    from tilefeet.view import neuroglancer_state, plan_view

    plan = plan_view(stack_output)
    assert plan.axes == ("z", "y", "x") and plan.scale_nm == (50.0, 4.0, 4.0) and plan.shape == (3, 96, 128)
    state = neuroglancer_state(plan, {"output": "zarr3://http://127.0.0.1:1/output", "input": "zarr3://http://127.0.0.1:1/input"})
    assert state["dimensions"] == {"x": [4e-9, "m"], "y": [4e-9, "m"], "z": [5e-8, "m"]}  # x first: horizontal
    assert state["position"] == [63.5, 47.5, 1]  # the centre of the middle section


def test_napari_layers_are_named_visible_and_in_nm(output, stack_output):
    from tilefeet.view import napari_layers, plan_view

    layers = napari_layers(plan_view(output))
    assert [x.name for x in layers] == ["input", "probabilities: membrane", "uncertainty", "membrane", "membrane-objects"]
    assert all(x.kwargs["visible"] for x in layers)
    assert [x.kind for x in layers] == ["image", "image", "image", "labels", "labels"]
    assert all(x.kwargs["scale"] == [4.0, 4.0] for x in layers)
    got = zarr.open_group(str(output), mode="r")
    np.testing.assert_array_equal(np.asarray(layers[1].data[0]), got["0"][0])  # class 0 of the probabilities
    np.testing.assert_array_equal(np.asarray(layers[3].data[0]), got["labels/membrane/0"][:])
    stack = napari_layers(plan_view(stack_output))
    assert all(x.kwargs["scale"] == [50.0, 4.0, 4.0] for x in stack)
    assert stack[1].data[0].shape == (3, 96, 128)


# ------------------------------------------------------------------------------------ the store server


def _get(url: str, **headers: str) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_store_server_answers_byte_ranges_with_cors(output):
    import fsspec

    from tilefeet.serve import Mount, StoreServer

    shard = output / "0" / "c" / "0" / "0" / "0"
    whole = shard.read_bytes()
    with StoreServer({"output": Mount(fsspec.filesystem("file"), str(output))}) as srv:
        base = srv.url("output")
        status, headers, body = _get(f"{base}/0/c/0/0/0", Range="bytes=10-19")
        assert (status, body, headers["Content-Range"]) == (206, whole[10:20], f"bytes 10-19/{len(whole)}")
        assert headers["Access-Control-Allow-Origin"] == "*" and "Content-Range" in headers["Access-Control-Expose-Headers"]
        assert _get(f"{base}/0/c/0/0/0", Range="bytes=-16")[2] == whole[-16:]  # a shard's index, read from the end
        assert _get(f"{base}/0/c/0/0/0", Range=f"bytes={len(whole) - 5}-")[2] == whole[-5:]
        assert _get(f"{base}/0/c/0/0/0")[2] == whole
        assert _get(f"{base}/0/c/0/0/0", Range=f"bytes={len(whole)}-")[0] == 416
        assert _get(f"{base}/0/c/9/9/9")[0] == 404
        assert _get(f"{base}/../section.ome.zarr/zarr.json")[0] == 404  # nothing outside the store
        assert _get(f"{base}/0/c")[0] == 404  # folders are not files
        req = urllib.request.Request(f"{base}/zarr.json", method="OPTIONS", headers={"Access-Control-Request-Headers": "range"})
        with urllib.request.urlopen(req, timeout=10) as r:  # a CORS preflight (a suffix range needs one)
            assert r.status == 204 and r.headers["Access-Control-Allow-Headers"] == "range"


def test_float16_arrays_are_served_as_float32_with_the_same_values(output):
    import fsspec

    from tilefeet.serve import Mount, StoreServer

    group = zarr.open_group(str(output), mode="r")
    assert group["0"].dtype == np.float16
    mount = Mount(fsspec.filesystem("file"), str(output), group, frozenset({"0"}))
    with StoreServer({"output": mount}) as srv:
        store = zarr.storage.FsspecStore.from_url(srv.url("output"), read_only=True)
        served = zarr.open_array(store=store, path="0", mode="r")
        assert served.dtype == np.float32 and served.chunks == group["0"].chunks
        np.testing.assert_array_equal(served[:], group["0"][:].astype(np.float32))


# ------------------------------------------------------------------------------------ in a browser


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium, installed here if it is missing and apt can (root); else the browser tests are skipped."""
    pytest.importorskip("neuroglancer", reason='neuroglancer is not installed (pip install "tilefeet[view]")')
    from tilefeet.browser import find_chromium

    found = find_chromium()
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=1200)
        found = find_chromium()
    if found is None:
        pytest.skip("no Chromium here and it could not be installed (apt-get install chromium needs root and the Debian archive)")
    return found


@pytest.fixture(scope="module")
def view(output, chromium):
    """The output in neuroglancer, open in a headless Chromium page."""
    from tilefeet.browser import HeadlessChromium
    from tilefeet.view import NeuroglancerView, plan_view

    with NeuroglancerView(plan_view(output)) as v, HeadlessChromium(size=(2 * W + 16, 2 * H + 120), executable=chromium) as page:
        page.navigate(v.url)
        yield v, page


def _show(v, names) -> None:
    with v.viewer.txn() as s:
        for layer in s.layers:
            layer.visible = layer.name in names


def _screen(v, page) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(v.screenshot(browser=page, size=(2 * W, 2 * H), timeout_s=60))[..., :3].astype(np.float32)


def _to_screen(array: np.ndarray, v, shape: tuple[int, int], dy: int = 0, dx: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (y, x) as neuroglancer draws it on a screen of ``shape`` (the nearest pixel: NGFF and
    neuroglancer put pixel i's centre at i), and where on the screen it is."""
    state = v.viewer.state
    scale, (px, py) = state.cross_section_scale, state.position[:2]
    v_, u_ = np.mgrid[: shape[0], : shape[1]]
    y = np.floor((v_ + 0.5 - shape[0] / 2) * scale + py + 0.5).astype(int) + dy
    x = np.floor((u_ + 0.5 - shape[1] / 2) * scale + px + 0.5).astype(int) + dx
    inside = (y >= 0) & (y < array.shape[0]) & (x >= 0) & (x < array.shape[1])
    return array[np.clip(y, 0, array.shape[0] - 1), np.clip(x, 0, array.shape[1] - 1)], inside


def test_every_layer_loads_in_neuroglancer_without_an_error(view, output):
    v, page = view
    _show(v, [x.name for x in v.plan.layers])
    _screen(v, page)  # raises on a layer in error, a failed chunk or an error on the page's console
    status = v.layer_status(page)
    assert [x["name"] for x in status] == ["input", "probabilities: membrane", "uncertainty", "membrane", "membrane-objects"]
    assert all(not x["loading"] and x["errors"] == [] for x in status), status
    assert v.problems(page) == []  # no layer errors, failed chunks or console errors


def test_labels_overlay_the_image_with_x_horizontal(view, output):
    v, page = view
    _show(v, ["input", "membrane"])
    rgb = _screen(v, page)
    orange = rgb[..., 0] - rgb[..., 2] > 60  # the label colour (255, 64, 0) at half opacity over grey
    label = zarr.open_group(str(output), mode="r")["labels/membrane/0"][:].astype(bool)
    assert 0.1 < label.mean() < 0.6

    def iou(mask):
        best = 0.0
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                drawn, inside = _to_screen(mask, v, orange.shape, dy, dx)
                drawn &= inside
                best = max(best, (drawn & orange).sum() / (drawn | orange).sum())
        return best

    assert iou(label) > 0.9  # label pixels are drawn in the label colour, and only they
    assert iou(label[::-1, ::-1]) < 0.5  # the measure tells a turned section (or a transposed one: it would not even fit)
    _, inside = _to_screen(label, v, orange.shape)
    assert not orange[~inside].any()  # nothing of the label colour outside the section


def test_float16_probabilities_are_drawn_as_stored(view, output):
    v, page = view
    _show(v, ["probabilities: membrane"])
    rgb = _screen(v, page)
    prob = zarr.open_group(str(output), mode="r")["0"][0].astype(np.float32)
    drawn, inside = _to_screen(prob, v, rgb.shape[:2])
    # the class colour (255, 64, 0) at opacity p over black: red is p × 255
    red = rgb[..., 0][inside] / 255
    error = np.abs(red - drawn[inside])
    assert np.median(error) < 0.01 and error.mean() < 0.02  # as stored, but for pixels on the edges of rounding
    assert np.corrcoef(red, drawn[inside])[0, 1] > 0.9
    assert not rgb[~inside].any()  # black around the section


def test_screenshot_command_writes_a_png(output, chromium, tmp_path, capsys):
    import imageio.v3 as iio

    png = tmp_path / "view.png"
    code, _, err = run_cli(capsys, "view", output, "--screenshot", png, "--size", "200x150", "--show", "input,membrane-objects")
    assert code == 0, err
    assert iio.imread(png).shape[:2] == (150, 200)
    assert not list(tmp_path.glob(".*partial"))


def test_view_prints_a_url_that_serves_neuroglancer_until_ctrl_c(output):
    """The command as a user runs it: the layers and the URL on stdout, neuroglancer's page and the
    data behind that URL, and Ctrl-C (SIGINT) ends it cleanly, status 0."""
    pytest.importorskip("neuroglancer", reason='neuroglancer is not installed (pip install "tilefeet[view]")')
    import signal

    from .helpers import cli_command

    with subprocess.Popen(cli_command("view", output), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            lines: list[str] = []
            while not (lines and lines[-1].startswith("http://")):
                line = proc.stdout.readline()  # type: ignore[union-attr]
                assert line, f"tilefeet view exited: {proc.stderr.read()}"  # type: ignore[union-attr]
                lines.append(line.strip())
            assert lines[-1].startswith("http://127.0.0.1:") and any(ln.split()[:2] == ["+", "membrane"] for ln in lines)
            status, _, page = _get(lines[-1])
            assert status == 200 and b"neuroglancer" in page.lower()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_remote_output_on_a_web_server_without_cors_is_proxied(output, tmp_path):
    """python's http.server sends no CORS headers (and ignores ranges): the local server reads it for neuroglancer."""
    pytest.importorskip("neuroglancer", reason='neuroglancer is not installed (pip install "tilefeet[view]")')
    from tilefeet.view import NeuroglancerView, plan_view

    server = start_http_server(output.parent, tmp_path / "http.log")
    try:
        url = f"{server.url}/{output.name}"
        with NeuroglancerView(plan_view(url)) as v:
            assert v.direct["output"] is False
            assert v.sources["output"].startswith("zarr3://http://127.0.0.1:")
            status, _, body = _get(f"{v.data_url('output')}/labels/membrane/0/zarr.json", Range="bytes=0-9")
            assert status == 206 and body == (output / "labels/membrane/0/zarr.json").read_bytes()[:10]
    finally:
        server.stop()


def test_a_web_server_with_cors_and_ranges_is_read_by_neuroglancer_itself_unless_float16(output, stack_output):
    """A web server that lets a page read it (tilefeet's own store server is one) is given to
    neuroglancer as is; float16 probabilities still go through the local server, converted."""
    pytest.importorskip("neuroglancer", reason='neuroglancer is not installed (pip install "tilefeet[view]")')
    import fsspec

    from tilefeet.serve import Mount, StoreServer
    from tilefeet.view import NeuroglancerView, plan_view

    with StoreServer({"a": Mount(fsspec.filesystem("file"), str(stack_output.parent)),
                      "b": Mount(fsspec.filesystem("file"), str(output.parent))}) as web:
        url = f"{web.url('a')}/{stack_output.name}"  # uint8
        with NeuroglancerView(plan_view(url)) as v:
            assert v.direct["output"] is True and v.sources["output"] == f"zarr3://{url}" and v.data_url("output") is None
        with NeuroglancerView(plan_view(f"{web.url('b')}/{output.name}")) as v:  # float16
            assert v.direct["output"] is False and v.data_url("output") is not None


# ------------------------------------------------------------------------------------ bad input


def test_a_folder_that_is_not_an_output_is_one_line(tmp_path, section, output, capsys):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(capsys, "view", tmp_path / "empty")[::2], "not a tilefeet output")
    assert_one_line_error(*run_cli(capsys, "view", section)[::2], "not a tilefeet output", "tilefeet segment")
    assert_one_line_error(*run_cli(capsys, "view", output / "labels" / "membrane")[::2], "label image", "two levels up")
    assert_one_line_error(*run_cli(capsys, "view", tmp_path / "missing.ome.zarr")[::2], "does not exist")


def test_a_port_in_use_is_one_line(output, capsys):
    pytest.importorskip("neuroglancer", reason='neuroglancer is not installed (pip install "tilefeet[view]")')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(*run_cli(capsys, "view", output, "--port", port)[::2], f"port {port}", "in use", "--port")


def test_an_unreachable_remote_output_is_one_line(capsys):
    url = f"http://127.0.0.1:{free_port()}/seg.ome.zarr"
    assert_one_line_error(*run_cli(capsys, "view", url)[::2], "cannot reach", url)


def test_bad_options_are_one_line(output, tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "view", output, "--show", "nuclei")[::2], "no layer 'nuclei'", "membrane-objects")
    assert_one_line_error(*run_cli(capsys, "view", output, "--screenshot", tmp_path / "v.jpg")[::2], ".png")
    assert_one_line_error(*run_cli(capsys, "view", output, "--screenshot", tmp_path / "v.png", "--size", "big")[::2], "WIDTHxHEIGHT")
    assert_one_line_error(*run_cli(capsys, "view", output, "--napari", "--screenshot", tmp_path / "v.png")[::2], "leave out --napari")


def test_napari_missing_is_one_line_naming_the_install(output, capsys):
    try:
        import napari  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("napari is installed here")
    assert_one_line_error(*run_cli(capsys, "view", output, "--napari")[::2], "napari", "pip install")
