"""The package's imports point one way (the layers of DESIGN.md), and no module reaches into another's
private names. A failure names the import; move the code to the layer it belongs to instead of
importing upwards."""

from __future__ import annotations

import ast
from pathlib import Path

import tilefeet

#: Lower layers never import higher ones (lazy imports inside functions included): pure core,
#: then data in and out, then planning and engines, the block function, graphs, entry points.
LAYERS: list[list[str]] = [
    ["errors", "units", "geometry", "console", "artifacts", "device", "profile"],
    ["resolution", "blend", "intensity", "metrics", "ngff", "storage", "chunks", "models", "sample", "mask", "serve", "browser"],
    ["settings", "image", "engine", "convert", "training_data", "augment"],
    ["plan", "runners", "train", "bioimageio", "polarity"],
    ["block", "tilecache", "writer", "probe"],
    ["schedule", "objects", "cluster"],
    ["pipeline", "evaluate", "preview", "bench", "view"],
    ["cli", "commands"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
PACKAGE = Path(tilefeet.__file__).parent


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every import in a file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tilefeet" else None


def test_every_module_has_a_layer():
    assert {_top(m) for m, _ in _modules() if _top(m)} <= set(RANK)


def test_imports_point_down():
    upward = []
    for module, path in _modules():
        me = _top(module)
        if me is None:
            continue
        for target, names in _imports(module, path):
            targets = [target] + [f"{target}.{n}" for n in names] if target == "tilefeet" else [target]
            for t in targets:
                other = _top(t)
                if other in RANK and other != me and RANK[other] > RANK[me]:
                    upward.append(f"{module} imports {t}")
    assert not upward, upward


def test_no_module_uses_another_modules_private_names():
    private = []
    for module, path in _modules():
        for target, names in _imports(module, path):
            if _top(target) and _top(target) != _top(module):
                private += [f"{module}: from {target} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, private
