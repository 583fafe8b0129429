"""tilefeet: segment whole EM sections stored as OME-Zarr, seam-free and out of core.

    import tilefeet
    tilefeet.segment_to_zarr("section.ome.zarr", "out.ome.zarr", engine="isbi-membrane")
    probs = tilefeet.segment("section.ome.zarr", engine="isbi-membrane")   # lazy xarray/dask

Importing tilefeet is cheap: torch, onnxruntime and tensorrt load only when a run needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TilefeetError

__all__ = [
    "Settings",
    "TilefeetError",
    "__version__",
    "clear_caches",
    "list_engines",
    "load_engine",
    "open_image",
    "plan_segmentation",
    "segment",
    "segment_to_zarr",
    "write_planned",
]


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))


def clear_caches() -> None:
    """Release what tilefeet keeps per process between runs: runners (and the device memory of their
    networks and tile caches), intensity lookup tables and blending windows on devices. Each cache is
    bounded; call this to free the device between unrelated jobs in a long-lived process."""
    import sys

    if "tilefeet.runners" in sys.modules:
        from .runners import clear_runners

        clear_runners()
    if "tilefeet.block" in sys.modules:
        from .block import device_lut

        device_lut.cache_clear()
    if "tilefeet.blend" in sys.modules:
        from .blend import device_window

        device_window.cache_clear()


def __getattr__(name: str):
    # Lazy public API: keeps `import tilefeet` light (no torch, no zarr until used).
    if name in ("segment", "segment_to_zarr", "plan_segmentation", "write_planned", "open_image"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("load_engine", "list_engines"):
        from . import engine

        return getattr(engine, name)
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(f"module 'tilefeet' has no attribute {name!r}")
