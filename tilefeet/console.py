"""What the command line prints besides results: one-line notes and warnings on stderr, unless quiet.

Low in the import graph (typer only), so every command module, not only :mod:`tilefeet.cli`,
prints the same way. The CLI sets :data:`state` once per invocation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass


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
    """A fresh invocation (tests call the CLI many times in one process)."""
    state.quiet = False


def format_warning(message: object) -> str:
    return f"tilefeet: warning: {message}"
