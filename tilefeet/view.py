"""``tilefeet view``: a tilefeet output, and the section it came from, in neuroglancer or napari.

Three steps, each a function:

1. :func:`plan_view` reads the metadata only and decides the layers: the input image, the
   probabilities of each class, ``labels/<class>`` and ``labels/<class>-objects`` (``-cells``),
   ``uncertainty/``; their names, colours, display ranges, and the spatial axes and pixel size of
   the output (sections: c, y, x; stacks: c, z, y, x; read from the axes metadata, never assumed).
2. :class:`NeuroglancerView` serves the stores on 127.0.0.1 (:mod:`tilefeet.serve`: CORS, byte
   ranges, float16 arrays as float32) and opens neuroglancer's own Python server and client on
   them, with x horizontal and the units of the metadata. A remote output is read by neuroglancer
   itself when its web server allows it (CORS and byte ranges, no credentials, no float16), else
   through the local server (S3 with the command's credentials and endpoint, other web servers).
   :meth:`NeuroglancerView.screenshot` renders it in headless Chromium (:mod:`tilefeet.browser`)
   and refuses, in one line, a view in which a layer failed to load.
3. :func:`napari_layers` and :func:`open_napari`: the same layers in napari, built from the arrays
   (zarr through dask), each named and visible (napari-ome-zarr names label images
   ``labels/labels/<class>`` and hides them).

Neither viewer is a dependency: each is imported when asked for, with a one-line error naming the
install command when it is missing.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import (
    ConfigError,
    InputNotFoundError,
    InvalidImageError,
    RemoteStorageError,
    TilefeetError,
    TilefeetWarning,
    ViewerUnavailableError,
)
from .ngff import LABEL_COLORS, Multiscale, open_group, read_multiscale
from .storage import Remote, is_url, join

LayerKind = Literal["image", "probabilities", "labels", "objects", "uncertainty"]
StoreName = Literal["output", "input"]

#: What a user sees of each kind when the viewer opens (neuroglancer). napari shows every layer.
SHOWN_AT_START: frozenset[str] = frozenset({"image", "labels"})
NEUROGLANCER_INSTALL = 'pip install "tilefeet[view]"'
NAPARI_INSTALL = 'pip install "napari[all]"'


@dataclass(frozen=True)
class ViewLayer:
    """One layer of a view: where its multiscale image is and how to draw it."""

    name: str  #: as the viewer lists it: "input", "probabilities: membrane", "membrane", "membrane-objects", "uncertainty"
    kind: LayerKind
    store: StoreName
    path: str  #: the image group inside its store ("" for the store's root)
    ms: Multiscale
    channel: int | None = None  #: the class (index along the channel axis) of a probabilities layer
    color: tuple[int, int, int] = (255, 255, 255)
    window: tuple[float, float] = (0.0, 255.0)  #: values drawn from transparent/black to full colour
    visible: bool = True


@dataclass(frozen=True)
class ViewPlan:
    """Everything a viewer needs, read from the metadata: stores, layers and the space they share."""

    stores: Mapping[str, str]  #: store name -> its path or URL
    layers: tuple[ViewLayer, ...]
    axes: tuple[str, ...]  #: the output's spatial axes, slowest first: ("y", "x") or ("z", "y", "x")
    scale_nm: tuple[float, ...]  #: level-0 pixel size per spatial axis, in nm
    shape: tuple[int, ...]  #: level-0 extent per spatial axis, in pixels
    origin: tuple[float, ...] = ()  #: level-0 position of pixel 0's centre per spatial axis, in pixels
    float32_views: Mapping[str, frozenset[str]] = field(default_factory=dict)  #: arrays served as float32, per store

    def layer(self, name: str) -> ViewLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ConfigError(f"no layer {name!r} in this view; its layers: {', '.join(x.name for x in self.layers)}")

    def showing(self, names: Sequence[str] | None) -> ViewPlan:
        """The plan with exactly the layers ``names`` visible ("all": every layer; None: as planned)."""
        if names is None:
            return self
        if list(names) == ["all"]:
            return replace(self, layers=tuple(replace(x, visible=True) for x in self.layers))
        for n in names:
            self.layer(n)  # an unknown name is an error that lists the known ones
        return replace(self, layers=tuple(replace(x, visible=x.name in names) for x in self.layers))


# ------------------------------------------------------------------------------------ planning


def plan_view(output: str | Path, input: str | Path | None = None) -> ViewPlan:
    """The layers of ``output`` (a tilefeet output: path or URL) and of its input image (``input``,
    or the image the output records; a recorded one that cannot be opened is left out, with a
    warning). Reads metadata and the input's coarsest level (its display range), nothing else."""
    output = str(output)
    not_ours = (f"{output} is not a tilefeet output (an OME-Zarr image 'probabilities' with labels/); "
                f"give the output folder of `tilefeet segment`")
    try:
        ms = read_multiscale(output, role="output")
    except (InputNotFoundError, RemoteStorageError):
        raise
    except TilefeetError:
        raise InvalidImageError(not_ours) from None
    if ms.is_label:
        raise InvalidImageError(f"{output} is a label image, not a tilefeet output; give the output folder that holds labels/ (two levels up)")
    names = ms.names
    spatial = [i for i, a in enumerate(ms.axes) if a.type == "space"]
    if ms.name != "probabilities" or not ms.axes or ms.axes[0].type != "channel" or len(spatial) not in (2, 3) or spatial != list(range(1, len(names))):
        if len(spatial) >= 2 and ms.name != "probabilities":
            raise InvalidImageError(f"{output} is an OME-Zarr image, not a tilefeet output; segment it first "
                                    f"(`tilefeet segment {output} OUT.ome.zarr`), or give it after the output to see it beside one")
        raise InvalidImageError(not_ours)
    axes = tuple(names[i] for i in spatial)
    scale_nm = _scale_nm(ms, spatial, output)
    shape = tuple(ms.datasets[0].shape[i] for i in spatial)
    origin = tuple(ms.datasets[0].translation[i] / ms.datasets[0].scale[i] for i in spatial)
    root: Any = open_group(output, role="output")
    classes = list(ms.channels) or [str(c) for c in ms.metadata.get("classes", [])] or [f"class {i}" for i in range(ms.datasets[0].shape[0])]
    label_ms = {n: read_multiscale(join(output, "labels", n), role="labels") for n in ms.labels}

    layers: list[ViewLayer] = []
    stores: dict[str, str] = {"output": output}
    source = str(input) if input is not None else ms.metadata.get("input")
    if source:
        image = _input_layer(str(source), given=input is not None, output=output)
        if image is not None:
            layers.append(image)
            stores["input"] = image.ms.path  # the image group itself (a bioformats2raw layout's "0")
    prob_window = (0.0, 255.0) if ms.datasets[0].dtype == "uint8" else (0.0, 1.0)
    for i, cls in enumerate(classes):
        label = label_ms.get(_label_of(cls, label_ms))
        layers.append(ViewLayer(f"probabilities: {cls}", "probabilities", "output", "", ms, channel=i,
                                color=_label_color(label, i), window=prob_window))
    if "uncertainty" in root:
        um = read_multiscale(join(output, "uncertainty"), role="uncertainty")
        window = (0.0, 255.0) if um.datasets[0].dtype == "uint8" else (0.0, 1.0)
        layers.append(ViewLayer("uncertainty", "uncertainty", "output", "uncertainty", um, color=(255, 0, 255), window=window))
    class_index = {_label_of(c, label_ms): i for i, c in enumerate(classes)}
    for n, lm in label_ms.items():
        if n.endswith(("-objects", "-cells")):
            layers.append(ViewLayer(n, "objects", "output", f"labels/{n}", lm))
        else:
            layers.append(ViewLayer(n, "labels", "output", f"labels/{n}", lm, color=_label_color(lm, class_index.get(n, 0))))
    # shown at start: the image and the masks over it (without an image: the probabilities)
    shown = SHOWN_AT_START if any(x.kind == "image" for x in layers) else SHOWN_AT_START | {"probabilities"}
    layers = [replace(x, visible=x.kind in shown) for x in layers]
    plan = ViewPlan(stores, tuple(layers), axes, scale_nm, shape, origin)
    return _float16(plan)


def _scale_nm(ms: Multiscale, axes: Sequence[int], where: str) -> tuple[float, ...]:
    from .units import nm_per_unit

    out = []
    for i in axes:
        unit = ms.axes[i].unit
        factor = nm_per_unit(unit, where=f"{where} axis {ms.axes[i].name!r}") if unit else 1.0
        out.append(ms.datasets[0].scale[i] * factor)
    return tuple(out)


def _label_of(cls: str, labels: Mapping[str, Multiscale]) -> str:
    from .ngff import label_name

    return label_name(cls) if label_name(cls) in labels else cls


def _label_color(label: Multiscale | None, index: int) -> tuple[int, int, int]:
    """The colour a label image gives its value 1 (image-label metadata), else the class's default."""
    for c in (label.image_label or {}).get("colors", []) if label is not None else []:
        if c.get("label-value") == 1 and len(c.get("rgba", [])) >= 3:
            r, g, b = (int(v) for v in c["rgba"][:3])
            return (r, g, b)
    r, g, b = LABEL_COLORS[index % len(LABEL_COLORS)]
    return (r, g, b)


def _input_layer(source: str, *, given: bool, output: str) -> ViewLayer | None:
    """The input image as a layer, its display range from its coarsest level. An image the user gave
    must open; one the output merely records is left out with a warning when it cannot."""
    try:
        if not given and not is_url(source) and not Path(source).exists():
            raise InputNotFoundError(f"the input image {source} recorded in {output} does not exist (moved or deleted)")
        ms = read_multiscale(source, role="input")
        window = _display_range(source, ms)
    except TilefeetError as e:
        if given:
            raise
        warnings.warn(TilefeetWarning(f"{e}; showing the output alone (give the image after the output to see it)"), stacklevel=3)
        return None
    return ViewLayer("input", "image", "input", "", ms, window=window)


def _display_range(source: str, ms: Multiscale) -> tuple[float, float]:
    """0.5 and 99.5 percentiles of the coarsest level (its middle plane along any non-y/x axis)."""
    ds = ms.datasets[-1]
    arr = open_group(source, role="input")[ds.path]
    index = tuple(slice(None) if i >= len(ds.shape) - 2 else n // 2 for i, n in enumerate(ds.shape))
    a = np.asarray(arr[index], dtype=np.float64)
    if a.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(a, (0.5, 99.5)))
    return (lo, hi if hi > lo else lo + 1.0)


def _float16(plan: ViewPlan) -> ViewPlan:
    """Arrays neuroglancer cannot read (float16) are served as float32 (zarr v3); a zarr v2 layer of
    float16 cannot be, and is left out with a warning."""
    views: dict[str, set[str]] = {}
    kept = []
    for layer in plan.layers:
        f16 = [d.path for d in layer.ms.datasets if np.dtype(d.dtype) == np.float16]
        if f16 and layer.ms.version.startswith("0.4"):
            warnings.warn(TilefeetWarning(f"layer {layer.name!r} is float16 in a zarr v2 store, which neuroglancer cannot read; "
                                          f"it is left out (re-run segment with --dtype uint8 or float32)"), stacklevel=3)
            continue
        for p in f16:
            views.setdefault(layer.store, set()).add(f"{layer.path}/{p}" if layer.path else p)
        kept.append(layer)
    return replace(plan, layers=tuple(kept), float32_views={k: frozenset(v) for k, v in views.items()})


# ------------------------------------------------------------------------------------ neuroglancer


def _import_neuroglancer() -> Any:
    try:
        import neuroglancer
    except ImportError:
        raise ViewerUnavailableError(f"tilefeet view needs the neuroglancer package, which is not installed; {NEUROGLANCER_INSTALL}") from None
    return neuroglancer


def fit_scale(plan: ViewPlan, size: tuple[int, int]) -> float:
    """neuroglancer's crossSectionScale (level-0 pixels per screen pixel) that fits the section in ``size``."""
    h, w = plan.shape[-2], plan.shape[-1]
    return max(w / size[0], h / size[1]) * 1.02


def default_size(plan: ViewPlan, longest: int = 1024) -> tuple[int, int]:
    """A screenshot of the section's aspect (x : y), its longest side ``longest`` pixels."""
    h, w = plan.shape[-2] * plan.scale_nm[-2], plan.shape[-1] * plan.scale_nm[-1]
    if w >= h:
        return (longest, max(128, round(longest * h / w)))
    return (max(128, round(longest * w / h)), longest)


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _image_shader(layer: ViewLayer) -> str:
    lo, hi = layer.window
    if layer.kind == "image":
        return (f"#uicontrol invlerp normalized(range=[{lo:g}, {hi:g}])\n"
                "void main() {\n  emitGrayscale(normalized());\n}\n")
    return (f'#uicontrol vec3 color color(default="{_hex(layer.color)}")\n'
            f"#uicontrol invlerp value(range=[{lo:g}, {hi:g}])\n"
            "void main() {\n  emitRGB(color * clamp(value(), 0.0, 1.0));\n}\n")


def neuroglancer_state(plan: ViewPlan, sources: Mapping[str, str], *, size: tuple[int, int] = (1280, 800)) -> dict:
    """The neuroglancer viewer state (JSON) of a plan whose stores are at ``sources`` (``zarr3://...``
    or ``zarr2://...`` URL prefixes, per store): x horizontal, physical units, the section fitted."""
    ng = _import_neuroglancer()
    s = ng.ViewerState()
    names = tuple(reversed(plan.axes))  # x, y(, z): neuroglancer's first display axis is horizontal
    s.dimensions = ng.CoordinateSpace(names=list(names), units="nm", scales=list(reversed(plan.scale_nm)))
    # NGFF places pixel centres at origin + i·scale, and so does neuroglancer: the centre of the
    # section in y and x, the middle section of a stack in z
    centre = [o + ((n - 1) / 2 if k >= len(plan.shape) - 2 else n // 2) for k, (o, n) in enumerate(zip(plan.origin, plan.shape))]
    s.position = list(reversed(centre))
    s.cross_section_scale = fit_scale(plan, size)
    s.projection_scale = max(plan.shape[-2:]) * 1.5
    s.layout = "xy" if len(plan.axes) == 2 else "4panel"
    s.cross_section_background_color = "#000000"
    for layer in plan.layers:
        url = sources[layer.store] + (f"/{layer.path}" if layer.path else "") + "/"
        if layer.kind in ("labels", "objects"):
            kw: dict[str, Any] = {}
            if layer.kind == "labels":
                kw = dict(segments=[1], segment_colors={1: _hex(layer.color)}, selected_alpha=0.5)
            s.layers[layer.name] = ng.SegmentationLayer(source=url, color_seed=0, **kw)  # the same colours every time
        else:
            kw = dict(local_position=[layer.channel]) if layer.channel is not None else {}
            if layer.kind != "image":  # added onto the image beneath: the class colour, as bright as the probability
                kw["blend"] = "additive"
            s.layers[layer.name] = ng.ImageLayer(source=url, shader=_image_shader(layer), opacity=1.0, **kw)
        s.layers[layer.name].visible = layer.visible
    s.selected_layer.visible = False
    return s.to_json()


def _source_prefix(ms: Multiscale) -> str:
    return "zarr2://" if ms.version.startswith("0.4") else "zarr3://"


def _browser_can_read(url: str) -> bool:
    """Can a page from another origin read the store at ``url`` as neuroglancer does: does its web
    server send CORS headers and honour byte ranges (sharded arrays are read by range)?"""
    origin = "http://127.0.0.1"
    for meta in ("zarr.json", ".zattrs"):
        req = urllib.request.Request(f"{url.rstrip('/')}/{meta}", headers={"Origin": origin, "Range": "bytes=0-0"})
        with contextlib.suppress(Exception), urllib.request.urlopen(req, timeout=10) as r:
            return r.status == 206 and r.headers.get("Access-Control-Allow-Origin") in ("*", origin)
    return False


class NeuroglancerView:
    """A plan served and opened in neuroglancer, until :meth:`close`. ``port``: neuroglancer's (the
    URL to open; 0: any free port); the data are served on another, free, port of 127.0.0.1."""

    def __init__(self, plan: ViewPlan, *, port: int = 0, size: tuple[int, int] = (1280, 800)):
        from .serve import Mount, StoreServer

        ng = _import_neuroglancer()
        self.plan = plan
        self._server: StoreServer | None = None
        mounts: dict[str, Mount] = {}
        sources: dict[str, str] = {}
        self.direct: dict[str, bool] = {}
        for name, location in plan.stores.items():
            prefix = _source_prefix_of(plan, name)
            converted = plan.float32_views.get(name, frozenset())
            if is_url(location):
                remote = Remote.create(location, None, role=name)
                headers = {k[len("header."):]: str(v) for k, v in remote.options if k.startswith("header.")}
                if remote.scheme != "s3" and not converted and not headers and _browser_can_read(remote.url):
                    sources[name] = prefix + remote.url
                    self.direct[name] = True
                    continue
                fs, root = remote.filesystem(), remote.fs_path()
            else:
                import fsspec

                fs, root = fsspec.filesystem("file"), str(Path(location).resolve())
            mounts[name] = Mount(fs, root, open_group(location, role=name) if converted else None, frozenset(converted))
            self.direct[name] = False
        _start_neuroglancer(ng, port)
        if mounts:
            try:
                self._server = StoreServer(mounts)
            except BaseException:
                _stop_neuroglancer(ng)
                raise
            sources.update({name: _source_prefix_of(plan, name) + self._server.url(name) for name in mounts})
        self._open = True
        self.viewer = ng.Viewer()
        self.viewer.set_state(neuroglancer_state(plan, sources, size=size))
        self.url: str = self.viewer.get_viewer_url()
        self.sources = sources

    def data_url(self, store: str) -> str | None:
        """Where the local server serves a store (None when neuroglancer reads it directly)."""
        return self._server.url(store) if self._server is not None and store in self._server.mounts else None

    def layer_status(self, browser: Any) -> list[dict]:
        """Each layer's state in a page showing this view: ``{"name", "loading", "errors"}``."""
        return list(browser.evaluate(_LAYER_STATUS_JS) or [])

    def screenshot(self, png: str | Path | None = None, *, size: tuple[int, int] | None = None, timeout_s: float = 60.0,
                   browser: Any = None) -> bytes:
        """The view rendered by headless Chromium once every visible chunk has loaded, as PNG bytes
        (also written to ``png``, atomically). A layer that failed to load, a chunk that failed, or
        an error on the page's console is a one-line error, said as soon as it happens; so is a
        render that takes longer than ``timeout_s``. ``browser``: a :class:`HeadlessChromium`
        already showing :attr:`url` (else one is started and closed)."""
        from .browser import HeadlessChromium

        size = size or default_size(self.plan)
        own = browser is None
        page = browser or HeadlessChromium(size=(size[0] + 16, size[1] + 120))
        try:
            if own:
                page.navigate(self.url)
            deadline = time.monotonic() + timeout_s
            self._wait(page, deadline, lambda: self._layers_loaded(page), "load the layers")
            with self.viewer.txn() as s:  # one section, fitted into the screenshot, without the cursor's axes
                s.cross_section_scale = fit_scale(self.plan, size)
                s.layout = "xy"
                s.show_axis_lines = False
                s.show_default_annotations = False
            with self.viewer.config_state.txn() as c:
                c.show_ui_controls = False
                c.show_panel_borders = False
                c.viewer_size = list(size)
            for _ in range(5):  # neuroglancer may answer once before the canvas has its size
                replies: list[Any] = []
                self._statistics: list[Any] = []
                self.viewer.async_screenshot(replies.append, statistics_callback=self._statistics.append)
                self._wait(page, deadline, replies.__len__, "render the view")
                shot = replies[0].screenshot
                if (shot.width, shot.height) == tuple(size):
                    break
            self._raise_problems(page)
        finally:
            if own:
                page.close()
        data = _flatten(shot.image)
        if png is not None:
            _write_file(Path(png), data)
        return data

    def _layers_loaded(self, page: Any) -> bool:
        try:
            status = self.layer_status(page)
        except RuntimeError:  # the page has not defined its viewer yet
            return False
        return len(status) == len(self.plan.layers) and not any(x["loading"] for x in status)

    def _wait(self, page: Any, deadline: float, ready: Any, what: str) -> None:
        """Until ``ready()``; a problem on the page (a failed layer, chunk or request) is raised at once."""
        while not ready():
            self._raise_problems(page)
            if time.monotonic() > deadline:
                raise ConfigError(f"neuroglancer did not {what} in time (the data server or the browser is too slow); give a longer --timeout")
            time.sleep(0.1)

    def _raise_problems(self, page: Any) -> None:
        problems = self.problems(page)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InvalidImageError(f"neuroglancer could not show {self.plan.stores['output']}: {problems[0]}{more}")

    def problems(self, page: Any) -> list[str]:
        """What went wrong in a page showing this view: layers in error, failed chunks, console errors."""
        problems: list[str] = [f"the data server could not read {e}" for e in (self._server.errors[:1] if self._server else [])]
        with contextlib.suppress(RuntimeError):  # the page has not defined its viewer yet
            problems += [f"layer {x['name']!r}: {e}" for x in self.layer_status(page) for e in x["errors"]]
        stats = getattr(self, "_statistics", [])
        totals = stats[-1].total.to_json() if stats and stats[-1].total is not None else {}
        if int(totals.get("visibleChunksFailed", 0)):
            problems.append(f"{totals['visibleChunksFailed']} chunks failed to load")
        own = self.url.split("/v/", 1)[0] + "/"
        for m in page.errors():
            # neuroglancer's client and its Python server talk through requests that may fail and be
            # retried (a state update that crossed another is answered 412; there is no favicon)
            if not m.url.startswith(own):
                problems.append(f"browser console: {m.text[:300]}")
        return problems

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if getattr(self, "_open", False):
            self._open = False
            _stop_neuroglancer(_import_neuroglancer())

    def __enter__(self) -> NeuroglancerView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_file(path: Path, data: bytes) -> None:
    """``data`` written beside ``path`` and renamed onto it: never half a PNG; an OS error is one line."""
    import os

    from .storage import os_error

    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise os_error(OSError(e.errno, e.strerror), path) from None


def _flatten(png: bytes) -> bytes:
    """neuroglancer's screenshot keeps the canvas's alpha (a layer drawn alone over nothing is
    translucent): composed over black, as the page shows it, into an RGB PNG."""
    import imageio.v3 as iio

    rgba = iio.imread(png)
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        return png
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    rgb = np.round(rgba[..., :3].astype(np.float32) * alpha).astype(np.uint8)
    return bytes(iio.imwrite("<bytes>", rgb, extension=".png"))


def _source_prefix_of(plan: ViewPlan, store: str) -> str:
    for layer in plan.layers:
        if layer.store == store:
            return _source_prefix(layer.ms)
    return "zarr3://"


#: Views open in this process: they share neuroglancer's server (one per process), stopped with the last.
_views_open = 0
_views_lock = threading.Lock()


def _start_neuroglancer(ng: Any, port: int) -> None:
    """neuroglancer's server on 127.0.0.1:``port``, started by the first view of the process. A taken
    port is one line before anything starts."""
    global _views_open
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port; give 1-65535, or 0 for any free one")
    with _views_lock:
        running = ng.server.global_server.port if ng.server.is_server_running() else None
        if port and port != running:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError as e:
                    raise ConfigError(f"port {port} on 127.0.0.1 is in use ({e.strerror or e}); give another with --port, or --port 0 for any free one") from None
            if running is not None:
                raise ConfigError(f"neuroglancer already serves on 127.0.0.1:{running} in this process; open the view there (port 0)")
        if running is None:
            ng.set_server_bind_address("127.0.0.1", port)
            try:
                ng.server.start()
            except OSError as e:  # taken between the check and the start
                raise ConfigError(f"cannot open neuroglancer on 127.0.0.1:{port} ({e.strerror or e}); give another --port, or 0 for any free one") from None
        _views_open += 1


def _stop_neuroglancer(ng: Any) -> None:
    global _views_open
    with _views_lock:
        _views_open -= 1
        if _views_open <= 0:
            _views_open = 0
            ng.server.stop()


#: Each layer's state in neuroglancer's page: still loading its data source, and any errors (data
#: source, shader, layer type). neuroglancer's client exposes its viewer as ``window.viewer``.
_LAYER_STATUS_JS = """(() => viewer.layerManager.managedLayers.map(m => {
  const l = m.layer, errors = [];
  let loading = false;
  if (!l) return {name: m.name, loading: false, errors: ['unknown layer type']};
  for (const d of l.dataSources) {
    const s = d.loadState;
    if (s === undefined) loading = true;
    else if (s.error) errors.push(String(s.error.message || s.error));
  }
  const e = l.shaderError && l.shaderError.value;
  if (e) errors.push('shader: ' + String(e.message || JSON.stringify(e)));
  return {name: m.name, loading, errors};
}))()"""


# ------------------------------------------------------------------------------------ napari


@dataclass(frozen=True)
class NapariLayer:
    """One napari layer: its type, its pyramid (dask arrays, finest first) and keyword arguments."""

    kind: Literal["image", "labels"]
    data: list[Any]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.kwargs["name"])


def napari_layers(plan: ViewPlan) -> list[NapariLayer]:
    """The plan's layers for napari, every one visible and named as in neuroglancer; probabilities
    and uncertainty blend additively in their class colour over the input, labels at half opacity."""
    import dask.array as da

    groups = {name: open_group(loc, role=name) for name, loc in plan.stores.items()}
    out = []
    for layer in plan.layers:
        group = groups[layer.store]
        arrays = [da.from_zarr(group[f"{layer.path}/{d.path}" if layer.path else d.path]) for d in layer.ms.datasets]
        ms = layer.ms
        keep = list(range(len(ms.axes)))
        if layer.channel is not None:
            arrays = [a[layer.channel] for a in arrays]
            keep = keep[1:]
        scale = [ms.datasets[0].scale[i] * _nm(ms, i) for i in keep]
        translate = [ms.datasets[0].translation[i] * _nm(ms, i) for i in keep]
        common: dict[str, Any] = dict(name=layer.name, scale=scale, translate=translate, visible=True, multiscale=len(arrays) > 1)
        if layer.kind in ("labels", "objects"):
            kw = dict(common, opacity=0.5 if layer.kind == "labels" else 0.6)
            if layer.kind == "labels":
                kw["colors"] = {1: tuple(c / 255 for c in layer.color) + (1.0,)}
            out.append(NapariLayer("labels", arrays, kw))
        elif layer.kind == "image":
            out.append(NapariLayer("image", arrays, dict(common, colormap="gray", contrast_limits=list(layer.window))))
        else:
            out.append(NapariLayer("image", arrays, dict(common, colormap=("custom", layer.color), contrast_limits=list(layer.window),
                                                         blending="additive", opacity=0.7)))
    return out


def _nm(ms: Multiscale, axis: int) -> float:
    from .units import nm_per_unit

    unit = ms.axes[axis].unit
    return nm_per_unit(unit) if unit and ms.axes[axis].type == "space" else 1.0


def open_napari(plan: ViewPlan) -> Any:
    """A napari viewer with the plan's layers (napari's event loop is the caller's: ``napari.run()``)."""
    try:
        import napari
        from napari.utils.colormaps import Colormap, DirectLabelColormap
    except ImportError:
        raise ViewerUnavailableError(f"tilefeet view --napari needs napari, which is not installed; {NAPARI_INSTALL}") from None
    viewer = napari.Viewer(title=f"tilefeet: {plan.stores['output']}")
    for layer in napari_layers(plan):
        kw = dict(layer.kwargs)
        data = layer.data if kw["multiscale"] else layer.data[0]
        if layer.kind == "labels":
            colors = kw.pop("colors", None)
            if colors is not None:
                kw["colormap"] = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), **colors})
            viewer.add_labels(data, **kw)
        else:
            cmap = kw.get("colormap")
            if isinstance(cmap, tuple):
                rgb = tuple(c / 255 for c in cmap[1])
                kw["colormap"] = Colormap([(0, 0, 0, 1), (*rgb, 1)], name=layer.name)
            viewer.add_image(data, **kw)
    return viewer


def describe(plan: ViewPlan) -> list[str]:
    """The layers in a few lines, for the terminal."""
    rows = []
    for x in plan.layers:
        where = plan.stores[x.store] + (f"/{x.path}" if x.path else "")
        rows.append(f"  {'+' if x.visible else ' '} {x.name:28s} {x.kind:14s} {where}")
    return rows
