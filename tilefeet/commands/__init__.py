"""Sub-commands that live beside the stage they drive. Each module has ``register(app)``.

The core commands (segment, info, convert, engines) are in :mod:`tilefeet.cli`; the modules listed
here add theirs (train, evaluate, bench, build-engine) so each stays next to its own code.
"""

from __future__ import annotations

import importlib

import typer

#: modules with a ``register(app: typer.Typer)`` function
COMMAND_MODULES: list[str] = ["evaluate", "build_engine", "train", "import_engine", "objects", "view"]


def register_commands(app: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)
