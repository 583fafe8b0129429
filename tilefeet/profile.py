"""Where a run's time goes, stage by stage, and how busy the device is (``tilefeet bench --profile``).

Off by default and then free (one attribute test per stage). :func:`enable` turns it on for the
process; ``$TILEFEET_PROFILE=1`` does the same in worker processes. Two measures, because an
asynchronous device (a GPU) makes one number lie:

* ``network_device_seconds``: the runner calls timed on the device itself (CUDA events, read once
  at the end, so nothing waits): the device's busy time. Divided by the run's wall time it is the
  *device busy fraction*, the number to push towards 1.
* per-stage wall seconds (plan, runner, probe, read, upload, resample, tiles, network, blend,
  download, write, pyramid, finalize): with ``sync=True`` the device is synchronized at every stage boundary, so
  each stage is charged what it really cost, at the price of the overlap between stages (use it in
  a separate, profiled run; on a CPU it changes nothing).

Stages of concurrent blocks add up, so their sum can pass the wall time when blocks overlap.
``plan`` is the setup before the first block (opening the input, planning, the polarity probe);
``runner`` (building a runner: loading, compiling, warming up, choosing a backend) and ``probe``
(the polarity probe's network calls) happen inside it and are also shown alone.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STAGES = ("plan", "runner", "probe", "read", "upload", "resample_in", "tiles", "network", "blend", "resample_out", "download", "write", "pyramid", "finalize")


class Profile:
    """Process-wide stage timers (thread-safe)."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("TILEFEET_PROFILE", "") not in ("", "0")
        self.sync = False
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.seconds: dict[str, float] = defaultdict(float)
            self.calls: dict[str, int] = defaultdict(int)
            self._events: list[tuple[Any, Any]] = []

    @contextmanager
    def stage(self, name: str, device: Any = None) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        cuda = device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda"
        if cuda and self.sync:
            _synchronize(device)
        events = None
        if cuda and name == "network":
            import torch

            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if events is not None:
                events[1].record()
            if cuda and self.sync:
                _synchronize(device)
            dt = time.perf_counter() - t0
            with self._lock:
                self.seconds[name] += dt
                self.calls[name] += 1
                if events is not None:
                    self._events.append(events)

    def report(self, wall_seconds: float | None = None) -> dict[str, Any]:
        """Seconds and calls per stage; the device's network seconds and busy fraction (CUDA)."""
        with self._lock:
            out: dict[str, Any] = {
                "sync": self.sync,
                "stages": {k: {"seconds": round(self.seconds[k], 4), "calls": self.calls[k]} for k in STAGES if self.calls.get(k)},
            }
            if self._events:
                import torch

                torch.cuda.synchronize()
                device_s = sum(a.elapsed_time(b) for a, b in self._events) / 1e3
                out["network_device_seconds"] = round(device_s, 4)
                if wall_seconds:
                    out["device_busy_fraction"] = round(device_s / wall_seconds, 4)
            elif wall_seconds and self.calls.get("network"):
                out["device_busy_fraction"] = round(self.seconds["network"] / wall_seconds, 4)
            if wall_seconds:
                out["wall_seconds"] = round(wall_seconds, 4)
        return out


def _synchronize(device: Any) -> None:
    import torch

    torch.cuda.synchronize(device)


#: The process's profile (see the module docstring).
PROFILE = Profile()


def enable(*, sync: bool = False) -> Profile:
    """Turn profiling on for this process (and, through the environment, for processes it starts)."""
    PROFILE.enabled, PROFILE.sync = True, sync
    os.environ["TILEFEET_PROFILE"] = "1"
    PROFILE.reset()
    return PROFILE
