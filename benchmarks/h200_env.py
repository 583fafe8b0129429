"""What the lent H200 machine has, what tilefeet must bring to it, and a CPU-side imitation of it.

The device tool's H200 runs this workplace's 'cuda' image: Python 3.12 with torch and a long list
of packages (:data:`IMAGE_PACKAGES`, read off such a machine on 2026-11-17 and copied from
``/work/.library/device/KINDS.md``), but not zarr, dask, the OME-Zarr stack or MONAI, and nothing can
be downloaded there. Those travel as wheels in ``.whl/`` (:data:`WHEELS`), fetched here by
``../shared/tools/device-wheels`` and pinned to the versions this project's tests run with (the
newest releases need not agree with each other: ome-zarr-models 1.8 wants pydantic < 2.13 while
the newest pydantic is 2.14; zarr 3.4 wants msgspec, which the image lacks).

Three uses:

* :func:`prepare` (``python benchmarks/gpu_check.py --prepare``, on the CPU side): download the
  pinned wheels, delete every other version, check that each wheel's requirements for Python 3.12
  are met by the image or by another wheel, and that what travels fits the 64 MiB limit;
* :func:`installed_problems` (on the device): the same requirement check over what was installed;
* :func:`simulation_env` (tests): a ``sitecustomize`` that makes every module of a distribution
  missing on the image unimportable, in this process's children, so that a CPU run proves the
  check's code paths import nothing the H200 lacks (``imagecodecs``, ``bioimageio.spec``, s3fs...).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEEL_DIR = REPO / ".whl"
DEVICE_WHEELS = REPO.parent / "shared" / "tools" / "device-wheels"
TRAVEL_LIMIT = 64 * 2**20  #: the working tree plus carried paths sent to the device machine

#: Python packages of the H200 image ('cuda'), as read on 2026-11-17 (KINDS.md).
IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
    threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()  # noqa: SIM905
)
#: Versions of image packages that sessions have seen there (KINDS.md's pip list, 2026-11).
IMAGE_VERSIONS = {"numpy": "2.5.2", "torch": "2.11.0", "onnx": "1.23.1", "onnxruntime": "1.30.0",
                  "onnxscript": "0.7.2", "triton": "3.6.0", "safetensors": "0.8.0", "onnx-ir": "1.0.0"}
#: What tilefeet's GPU check needs beyond the image: tilefeet's own dependencies (zarr and its codecs,
#: dask, the NGFF models, tomli-w, platformdirs), the cluster scheduler its tests import, and MONAI
#: (the benchmark's baseline). The pins are the versions installed where ``--prepare`` runs.
WHEELS = ("zarr", "numcodecs", "google-crc32c", "donfig", "dask", "partd", "locket", "distributed", "tblib", "zict",
          "tornado", "ome-zarr-models", "pydantic-zarr", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "platformdirs", "tomli-w", "monai")
#: Needed here (Python 3.11) only: dask asks for importlib_metadata below 3.12, so the imitation allows it.
PY311_ONLY = frozenset({"importlib-metadata", "lazy-importer"})


def canonical(name: str) -> str:
    """PEP 503 normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Wheel:
    """One wheel file of ``.whl/``: its distribution, version, and unconditional requirements."""

    path: Path
    name: str
    version: str
    requires: tuple[str, ...]

    @classmethod
    def read(cls, path: Path) -> Wheel:
        from packaging.utils import parse_wheel_filename

        name, version, _, _ = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode("utf-8", "replace")
        requires = tuple(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:"))
        return cls(path, canonical(str(name)), str(version), requires)

    def fits_python312(self) -> bool:
        """Whether one of the wheel's tags installs on CPython 3.12, Linux x86-64 (manylinux)."""
        from packaging.utils import parse_wheel_filename

        for tag in parse_wheel_filename(self.path.name)[3]:
            py_ok = tag.interpreter in ("py3", "cp312") or (tag.abi == "abi3" and tag.interpreter.startswith("cp3")
                                                            and int(tag.interpreter[3:]) <= 12)
            plat_ok = tag.platform == "any" or (tag.platform.endswith("x86_64") and "linux" in tag.platform)
            if py_ok and plat_ok:
                return True
        return False


def read_wheels(folder: Path = WHEEL_DIR) -> list[Wheel]:
    return [Wheel.read(p) for p in sorted(folder.glob("*.whl"))]


def unmet_requirements(wheels: list[Wheel], image: frozenset[str] = IMAGE_PACKAGES,
                       image_versions: dict[str, str] | None = None, python: str = "3.12") -> list[str]:
    """Each requirement of a wheel (for ``python``, no extras) that neither the image nor another
    wheel meets, as a sentence. Image packages of unknown version count as meeting it."""
    from packaging.requirements import Requirement

    versions = {w.name: w.version for w in wheels}
    known = {**IMAGE_VERSIONS, **(image_versions or {})}
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    problems = []
    for w in wheels:
        for text in w.requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonical(req.name)
            have = versions.get(name) or (known.get(name) if name in image else None)
            if have is None and name in image:
                continue  # on the image, version not recorded
            if have is None:
                problems.append(f"{w.name} {w.version} needs {text}, which is neither on the H200 image nor in .whl/")
            elif not req.specifier.contains(have, prereleases=True):
                where = ".whl/" if name in versions else "the H200 image"
                problems.append(f"{w.name} {w.version} needs {text}, but {where} has {name} {have}")
    return problems


def pinned_wheels() -> dict[str, str]:
    """:data:`WHEELS` with the versions installed in this environment (the ones the tests ran with)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = {}
    for name in WHEELS:
        try:
            pins[name] = version(name)
        except PackageNotFoundError:
            raise SystemExit(f"gpu_check --prepare: {name} is not installed here; run it in the project's venv "
                             "(. .venv/bin/activate), where the tests run") from None
    return pins


def prune(wheels: list[Wheel], pins: dict[str, str]) -> list[Wheel]:
    """Delete every wheel that is not a pinned version of a :data:`WHEELS` distribution (device-wheels
    also fetches the newest release of each, and packages the check does not use); returns the rest."""
    keep = []
    for w in wheels:
        if pins.get(w.name) == w.version:
            keep.append(w)
        else:
            w.path.unlink()
    return keep


def travel_bytes(carry: tuple[str, ...] = (".whl",)) -> tuple[int, list[tuple[int, str]]]:
    """Bytes sent to the device machine: tracked files, untracked files git does not ignore, and
    ``carry``; with the ten largest untracked-or-carried files (the usual surprise)."""

    def listed(*args: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *args], cwd=REPO, capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p]

    def size(rel: str) -> int:
        p = REPO / rel
        return p.stat().st_size if p.is_file() and not p.is_symlink() else 0

    tracked = listed()
    extra = listed("--others", "--exclude-standard")
    for c in carry:
        root = REPO / c
        extra += [str(p.relative_to(REPO)) for p in root.rglob("*") if p.is_file()] if root.is_dir() else [c]
    total = sum(size(p) for p in tracked) + sum(size(p) for p in extra)
    largest = sorted(((size(p), p) for p in extra), reverse=True)[:10]
    return total, largest


def prepare(fetch: bool = True) -> int:
    """The CPU-side step before a GPU session's ``run``: pinned wheels in ``.whl/``, checked; prints
    the problems (exit 1) or the ``run`` arguments (exit 0)."""
    pins = pinned_wheels()
    if fetch:
        if not DEVICE_WHEELS.is_file():
            print(f"gpu_check --prepare: {DEVICE_WHEELS} not found; download the wheels by hand (see "
                  "/work/.library/device/README.md) for: " + " ".join(f"{k}=={v}" for k, v in pins.items()))
            return 1
        subprocess.run(["bash", str(DEVICE_WHEELS), *(f"{k}=={v}" for k, v in pins.items())], cwd=REPO, check=True)
    wheels = prune(read_wheels(), pins)
    problems = [f"{name}=={v}: no wheel in .whl/" for name, v in pins.items() if name not in {w.name for w in wheels}]
    problems += [f"{w.path.name} does not install on CPython 3.12 x86-64" for w in wheels if not w.fits_python312()]
    problems += unmet_requirements(wheels)
    total, largest = travel_bytes()
    if total > TRAVEL_LIMIT:
        problems.append(f"{total / 2**20:.1f} MiB would travel, over the 64 MiB limit; largest untracked or carried: "
                        + ", ".join(f"{p} ({s / 2**20:.1f} MiB)" for s, p in largest[:5]))
    print(f".whl/: {len(wheels)} wheels, {sum(w.path.stat().st_size for w in wheels) / 2**20:.1f} MiB; "
          f"travelling in all: {total / 2**20:.1f} MiB of 64")
    for p in problems:
        print(f"PROBLEM: {p}")
    if problems:
        return 1
    print("ready: run with carry=[\".whl\"] and the command in benchmarks/README.md (\"GPU check\")")
    return 0


def installed_problems(site: Path) -> list[str]:
    """On the device: requirements of the distributions installed into ``site`` (pip --target) that
    nothing installed meets, read from their metadata (pip installs them with --no-deps)."""
    from importlib.metadata import PathDistribution, distributions

    here = {canonical(d.metadata["Name"]): d.version for d in distributions()}
    fake = []
    for info in sorted(site.glob("*.dist-info")):
        d = PathDistribution(info)
        fake.append(Wheel(info, canonical(d.metadata["Name"]), d.version, tuple(d.requires or ())))
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return unmet_requirements(fake, frozenset(here), here, python=py)


# ------------------------------------------------------------------------ the imitation (tests)


SITECUSTOMIZE = '''"""Imitates the H200 image (benchmarks/h200_env.py): modules of missing distributions do not import."""
import json as _json
import os as _os
import sys as _sys

_BLOCKED = frozenset(_json.loads(_os.environ.get("TILEFEET_H200_BLOCKED", "[]")))
_LOG = _os.environ.get("TILEFEET_H200_LOG")


class _MissingOnH200:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in _BLOCKED:
            if _LOG:
                frame, where = _sys._getframe(1), "?"
                while frame is not None:
                    if "importlib" not in frame.f_code.co_filename:
                        where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                        break
                    frame = frame.f_back
                with open(_LOG, "a") as f:
                    f.write(f"{name} <- {where}\\n")
            raise ModuleNotFoundError(f"No module named {name!r} (not on the H200 image nor in .whl/: imitated)", name=name)
        return None


_sys.meta_path.insert(0, _MissingOnH200())
'''


def blocked_modules() -> list[str]:
    """Top-level modules installed here whose every providing distribution is missing on the H200
    (neither on the image nor in :data:`WHEELS`); tilefeet itself travels as source."""
    from importlib.metadata import packages_distributions

    allowed = IMAGE_PACKAGES | {canonical(w) for w in WHEELS} | PY311_ONLY | {"tilefeet"}
    return sorted(
        top for top, dists in packages_distributions().items()
        if not top.startswith("_") and not any(canonical(d) in allowed for d in dists)
    )


def simulation_env(folder: Path, log: Path) -> dict[str, str]:
    """Environment variables under which this Python and its children import only what the H200 has
    (``sitecustomize`` in ``folder``); blocked import attempts are appended to ``log``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(folder), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, "TILEFEET_H200_BLOCKED": json.dumps(blocked_modules()), "TILEFEET_H200_LOG": str(log)}
