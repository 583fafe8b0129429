"""Where outputs live on a file system: a staging folder beside the output, and its crash-safe move into place.

An output is built in ``OUT.partial`` and moved to ``OUT`` in one rename when complete, so a
reader never sees a half-written store at ``OUT``. Replacing an existing output sets it aside
first (``OUT.old``), renames the new one in, then deletes the old one. Every step is a rename or a
deletion of something already superseded, so a crash (``kill -9``) at any point leaves one of:

==========================  ============================  ========================================
on disk                     meaning                       what :func:`recover` does
==========================  ============================  ========================================
``OUT.partial``             not finished                  nothing: ``--resume`` continues it
``OUT.partial`` + ``.old``  crashed while replacing       puts ``OUT.old`` back (the new one is
                                                          still ``OUT.partial``)
``OUT`` + ``OUT.old``       crashed after the rename      deletes ``OUT.old``
==========================  ============================  ========================================

``convert`` and ``segment`` both use it (:func:`replace_dir`).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import OutputWriteError


def staging_path(path: str | os.PathLike) -> Path:
    return Path(path).with_name(Path(path).name + ".partial")


def old_path(path: str | os.PathLike) -> Path:
    return Path(path).with_name(Path(path).name + ".old")


def recover(path: str | os.PathLike) -> None:
    """Undo what a crash in :func:`replace_dir` left (see the module table); safe to call anytime."""
    path, old = Path(path), old_path(path)
    if not old.exists():
        return
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, path)


def replace_dir(staging: Path, path: Path) -> Path:
    """Move the finished ``staging`` folder to ``path``, replacing what is there, crash-safely."""
    recover(path)
    old = old_path(path)
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_writable(path: Path) -> None:
    """Refuse an output whose folder cannot be created or written, before any work, in one line."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.tilefeet-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise os_error(OSError(e.errno, e.strerror), path) from None  # the probe's name means nothing to the user


def os_error(e: OSError, path: str | os.PathLike, *, staging: Path | None = None, kept: bool = False) -> OutputWriteError:
    """An :class:`OSError` met while writing ``path`` as one line: what the OS said, and what became
    of the staging folder (kept for ``--resume``, or removed because nothing in it was finished)."""
    what = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "the operation is not permitted",
        errno.EFBIG: "a file is larger than the system allows",
        errno.ENAMETOOLONG: "a file name is too long",
    }.get(e.errno or 0, (e.strerror or type(e).__name__).lower())
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
    if staging is None:
        state = "nothing was written"
    elif kept:
        state = f"finished blocks are kept in {staging}: free space or fix permissions, then rerun with --resume"
    else:
        state = "nothing was finished, so nothing is kept"
    return OutputWriteError(f"cannot write {path}: {what}{where}; {state}")
