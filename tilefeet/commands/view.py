"""``tilefeet view OUT [INPUT]``: a segmentation in neuroglancer (or napari), or a screenshot of it
(see :mod:`tilefeet.view`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from ..storage import STORAGE_HELP


def register(app: typer.Typer) -> None:
    app.command("view")(view_cmd)


def view_cmd(
    output: str = typer.Argument(..., help="A tilefeet output (OME-Zarr): a path, or an http(s):// or s3:// URL."),
    input: Optional[str] = typer.Argument(None, help="The input image to show beneath it (default: the one the output records)."),
    napari: bool = typer.Option(False, "--napari", help="Open napari instead of neuroglancer (needs napari installed)."),
    screenshot: Optional[Path] = typer.Option(
        None, "--screenshot", help="Render the view in headless Chromium, write this PNG, and exit (for reports and CI)."
    ),
    size: Optional[str] = typer.Option(None, "--size", help="Screenshot size WxH in pixels (default: the section's aspect, 1024 on its longest side)."),
    show: Optional[str] = typer.Option(
        None, "--show", help="Layers visible at start, comma-separated, e.g. input,membrane-objects; or all (default: the image and the class masks)."
    ),
    port: int = typer.Option(0, "--port", help="neuroglancer's port on 127.0.0.1 (0: any free port)."),
    open_browser: bool = typer.Option(False, "--open", help="Also open the viewer's URL in the default web browser."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds a screenshot may take to load and render."),
    storage_option: list[str] = typer.Option([], "--storage-option", help=STORAGE_HELP),
) -> None:
    """Look at a segmentation: the input, probabilities, labels, objects and uncertainty as layers of
    neuroglancer (served on 127.0.0.1; the URL is printed) or napari; or render a PNG of it."""
    from .. import console
    from ..errors import ConfigError
    from ..storage import check_writable, default_storage_options, parse_storage_options
    from ..view import NeuroglancerView, describe, open_napari, plan_view

    shape = _parse_size(size)
    if screenshot is not None:
        if napari:
            raise ConfigError("--screenshot renders neuroglancer in headless Chromium; leave out --napari")
        if screenshot.suffix.lower() != ".png":
            raise ConfigError(f"--screenshot writes a PNG; give a .png file name, not {screenshot.name!r}")
        if screenshot.is_dir():
            raise ConfigError(f"--screenshot {screenshot} is a folder; give a file name, e.g. {screenshot / 'view.png'}")
        check_writable(screenshot)
    with default_storage_options(parse_storage_options(storage_option)):
        plan = plan_view(output, input)
        plan = plan.showing([n.strip() for n in show.split(",") if n.strip()] if show else None)
        if napari:
            viewer = open_napari(plan)
            import napari as napari_module

            console.echo(f"napari: {len(viewer.layers)} layers of {output}")
            napari_module.run()
            return
        view = NeuroglancerView(plan, port=port)
        try:
            if screenshot is not None:
                view.screenshot(screenshot, size=shape, timeout_s=timeout)
                console.echo(f"wrote {screenshot}")
                return
            try:  # Ctrl-C from the moment the URL can be seen ends the view, status 0
                typer.echo("\n".join(["layers (+ shown at start):", *describe(plan)]))
                typer.echo(view.url)
                if open_browser:
                    import webbrowser

                    webbrowser.open(view.url)
                console.echo("serving on 127.0.0.1 until Ctrl-C")
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                console.echo("stopped")
        finally:
            _close_within(view, CLOSE_SECONDS)


#: Seconds the servers get to stop when the view ends. neuroglancer's server stops on its own event
#: loop, which an open browser connection can keep busy (seen on a loaded CI machine: Ctrl-C did not
#: end the command in 30 s); its threads are daemons, so the command ends after this bound either way.
CLOSE_SECONDS = 5.0


def _close_within(view: Any, seconds: float) -> None:
    import threading

    closer = threading.Thread(target=view.close, name="tilefeet-view-close", daemon=True)
    closer.start()
    closer.join(seconds)


def _parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    from ..errors import ConfigError

    if text is None:
        return None
    w, sep, h = text.lower().partition("x")
    try:
        shape = (int(w), int(h))
    except ValueError:
        shape = (0, 0)
    if not sep or not (16 <= shape[0] <= 8192 and 16 <= shape[1] <= 8192):
        raise ConfigError(f"--size takes WIDTHxHEIGHT in pixels (16 to 8192 each), e.g. 1024x768; got {text!r}")
    return shape
