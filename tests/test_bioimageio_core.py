"""bioimage.io's own model test passes on a package tilefeet exports, run where tilefeet cannot be
imported: the package's weights (TorchScript, ONNX) need nothing of tilefeet.

``bioimageio.core``'s ``test_model`` validates the description, then runs every weight format on the
test input and compares with the test output, and runs each at several tile sizes and batch sizes.
It runs in a subprocess (``python -I``, outside the repository) whose ``import tilefeet`` raises. The
interpreter is this one (``bioimageio.core`` comes with the ``test`` extra), or the one that
``TILEFEET_BIOIMAGEIO_PYTHON`` names: a separate environment, e.g. the newest ``bioimageio.core``
beside a newer ``bioimageio.spec`` here than it pins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import yaml

from tilefeet.bioimageio import export_package

pytestmark = pytest.mark.slow

PYTHON = os.environ.get("TILEFEET_BIOIMAGEIO_PYTHON") or sys.executable

#: Run in the subprocess: block tilefeet, prove it is blocked, run the model test, print its summary.
SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoTilefeet(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tilefeet" or name.startswith("tilefeet."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, NoTilefeet())
    try:
        import tilefeet  # noqa: F401
        blocked = False
    except ModuleNotFoundError:
        blocked = True

    from bioimageio.core import __version__ as core_version, test_model
    from bioimageio.spec.model.v0_5 import ModelDescr

    summary = test_model(sys.argv[1])
    print(json.dumps({
        "blocked": blocked,
        "tilefeet_loaded": any(m == "tilefeet" or m.startswith("tilefeet.") for m in sys.modules),
        "status": summary.status,
        "implemented": ModelDescr.implemented_format_version,
        "core": core_version,
        "details": [{"name": d.name, "status": d.status, "errors": [e.msg for e in d.errors],
                     "warnings": [w.msg for w in d.warnings]} for d in summary.details],
    }))
    """
)


def _has_core() -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('bioimageio.core') is None)"
    return subprocess.run([PYTHON, "-I", "-c", probe], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def core_summary(request, tmp_path_factory):
    if not _has_core():
        pytest.skip(f"bioimageio.core is not installed for {PYTHON}: pip install -e '.[test]', or set TILEFEET_BIOIMAGEIO_PYTHON")
    folder = tmp_path_factory.mktemp("core")
    package = export_package(request.getfixturevalue("runner_bundle"), folder / "rand.zip")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TILEFEET"))}
    done = subprocess.run([PYTHON, "-I", "-c", SCRIPT, str(package)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    with zipfile.ZipFile(package) as z:
        summary["declared"] = str(yaml.safe_load(z.read("rdf.yaml"))["format_version"])
    return summary


def test_tilefeet_cannot_be_imported_where_the_model_test_runs(core_summary):
    assert core_summary["blocked"] and not core_summary["tilefeet_loaded"]


def test_bioimageio_cores_model_test_passes_on_every_weight_format(core_summary):
    failed = [(d["name"], d["errors"]) for d in core_summary["details"] if d["status"] != "passed"]
    assert core_summary["status"] == "passed", failed
    ran = {d["name"] for d in core_summary["details"]}
    for fmt in ("torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({fmt})" in ran, sorted(ran)
        assert any(n.startswith(f"Run {fmt} inference for inputs with batch_size: 2") for n in ran), sorted(ran)


def test_the_package_is_declared_in_a_format_version_it_knows(core_summary):
    """Not newer than its bioimageio.spec implements (which it would only 'treat as' its own)."""

    def version(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))

    assert version(core_summary["declared"]) <= version(core_summary["implemented"])
    warnings = [w for d in core_summary["details"] for w in d["warnings"]]
    assert not any("future format_version" in w for w in warnings), warnings
