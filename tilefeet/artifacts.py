"""Compiled artefacts on disk (ONNX exports, TensorRT plans, backend timings, training checkpoints).

:func:`cache_dir` says where they live; :func:`build_once` builds one atomically and at most once
across processes. Low in the import graph: it imports only :mod:`tilefeet.errors`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import BackendUnavailableError


def cache_dir() -> Path:
    """Where compiled artefacts (ONNX exports, TensorRT plans, backend timings) are kept:
    ``$TILEFEET_CACHE`` if set, else the per-user cache folder (``~/.cache/tilefeet`` on Linux)."""
    env = os.environ.get("TILEFEET_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tilefeet"))


def build_once(target: Path, build: Callable[[Path], None], *, timeout_s: float = 3600.0) -> Path:
    """``target``, built first by ``build(tmp)`` if it does not exist yet; safe across processes.

    ``build`` writes a file or a folder at the temporary path it is given, which is then renamed
    to ``target`` in one step, so nobody ever sees a half-written artefact. A lock file beside
    ``target`` makes concurrent callers (workers of one run, several runs) wait while one builds;
    they then find ``target`` and load it. The lock is an OS file lock, released if its holder
    dies, so a crashed build never blocks the next one.
    """
    from filelock import FileLock, Timeout

    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(target.name + ".lock")
    try:
        with FileLock(str(lock_path), timeout=timeout_s):
            if target.exists():  # built by another process while we waited
                return target
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                _remove(tmp)
    except Timeout:
        raise BackendUnavailableError(
            f"waited {timeout_s:.0f} s for another process to build {target}; if no build is running, delete {lock_path}"
        ) from None
    return target


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
