"""What the command line prints besides results: one-line notes and warnings on stderr, unless quiet.

Low in the import graph (typer only), so every command module, not only :mod:`tilefeet.cli`,
prints the same way. The CLI sets :data:`state` once per invocation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class ConsoleState:
    quiet: bool = False  #: no progress bars, notes or summaries (results and errors still print)


state = ConsoleState()


def echo(msg: str) -> None:
    """A note for the user on stderr (suppressed by ``-q``)."""
    if not state.quiet:
        import typer

        typer.echo(msg, err=True)


def progress_enabled() -> bool:
    return not state.quiet


def configure(*, quiet: bool = False, verbose: bool = False) -> None:
    """``-q`` / ``-v`` as given before or after a command: either place turns them on."""
    state.quiet = state.quiet or quiet
    if verbose:
        logging.basicConfig(format="tilefeet: %(message)s")
        logging.getLogger("tilefeet").setLevel(logging.DEBUG)


def reset() -> None:
    """A fresh invocation, or the end of one (tests call the CLI many times in one process)."""
    state.quiet = False


def format_warning(message: object) -> str:
    return f"tilefeet: warning: {message}"


def dask_progress(description: str, *, enabled: bool, counts: Callable[[Any], bool] | None = None, unit: str = "task",
                  note: Callable[[Any], str | None] | None = None) -> Any:
    """A dask callback that shows a tqdm bar over the tasks ``counts`` accepts (all by default),
    optionally writing ``note(key)`` on the bar when it returns text (e.g. "pyramid").
    Use as a context manager around ``dask.compute``."""
    from dask.callbacks import Callback

    class _Bar(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.bar: Any = None
            self.noted: set[str] = set()

        def _start_state(self, dsk: Any, state: Any) -> None:
            from tqdm.auto import tqdm

            keys = state["ready"] + list(state["waiting"])
            total = sum(1 for k in keys if counts is None or counts(k))
            self.bar = tqdm(total=total, desc=description, unit=unit, disable=not enabled, dynamic_ncols=True)

        def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
            text = note(key) if note is not None and self.bar is not None and enabled else None
            if text and text not in self.noted:
                self.bar.set_postfix_str(text)
                self.noted.add(text)

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            if self.bar is not None and (counts is None or counts(key)):
                self.bar.update(1)

        def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
            if self.bar is not None:
                self.bar.close()

    return _Bar()
