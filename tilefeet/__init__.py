"""tilefeet: segment whole EM sections stored as OME-Zarr, seam-free and out of core.

    import tilefeet
    tilefeet.segment_to_zarr("section.ome.zarr", "out.ome.zarr", engine="em-membrane")
    probs = tilefeet.segment("section.ome.zarr", engine="em-membrane")   # lazy xarray/dask

Importing tilefeet is cheap: torch, onnxruntime and tensorrt load only when a run needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import TilefeetError

#: The engine ``tilefeet segment`` and the library run when none is named: the membrane network
#: trained on every labelled membrane dataset tilefeet has (ISBI 2012 ssTEM and EPFL/Lucchi FIB-SEM,
#: continued from ``isbi-membrane``). Chosen over ``isbi-membrane`` by what it does on data it never
#: saw: on the PSSR tSEM pair its 2 nm and 8 nm membrane maps agree at F1 0.692 against 0.639,
#: while on ISBI's held-out slices the two tie (0.800 and 0.802); with two labelled datasets in its
#: training no labelled one is left out of it (``benchmarks/membrane_engines.py``, README, *Engines*).
DEFAULT_ENGINE = "em-membrane"


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
