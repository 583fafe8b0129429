"""Errors a user can act on.

Every error tilefeet raises on purpose derives from :class:`TilefeetError` and from the built-in
exception that fits, so callers may catch either (a missing store is also a ``FileNotFoundError``).
Messages are one line: what was found, what was expected, where, and how to fix it. The CLI prints
them without a traceback and exits non-zero.
"""

from __future__ import annotations


class TilefeetError(Exception):
    """Base class of every error tilefeet raises on purpose."""

    exit_code = 2


class InputNotFoundError(TilefeetError, FileNotFoundError):
    """An input path (image, store, engine file, label image) does not exist."""


class InvalidImageError(TilefeetError, ValueError):
    """The input exists but is not an image tilefeet can segment (format, metadata, axes, shape)."""


class CorruptDataError(TilefeetError, OSError):
    """Stored data could not be decoded (a damaged chunk or file)."""


class MissingDataError(TilefeetError, FileNotFoundError):
    """Chunk files of a stored image are missing (lost, not left out as empty): they would read as
    the array's fill value. See :mod:`tilefeet.chunks`."""


class UnitError(TilefeetError, ValueError):
    """A physical unit or pixel size that cannot be understood."""


class ConfigError(TilefeetError, ValueError):
    """An option value that cannot work (tile size, overlap, block size, threshold, ...)."""


class OutputWriteError(TilefeetError, OSError):
    """The operating system refused to write the output (permissions, a full disk, a read-only file system)."""


class OutputExistsError(TilefeetError, FileExistsError):
    """The output exists and the user did not ask to overwrite or resume it."""


class EngineNotFoundError(TilefeetError, LookupError):
    """No engine bundle of that name or path."""


class InvalidEngineError(TilefeetError, ValueError):
    """An engine bundle whose engine.toml or weights are unusable."""


class BackendUnavailableError(TilefeetError, RuntimeError):
    """An inference backend that cannot run here (library missing, no GPU)."""


class Interrupted(TilefeetError):
    """The user interrupted a run (Ctrl-C); the message says what was kept and how to resume. Not a
    ``KeyboardInterrupt``: click would swallow it into "Aborted!" and the message would be lost."""

    exit_code = 130


class ClusterError(TilefeetError, ConnectionError):
    """A dask.distributed cluster that cannot be reached or cannot do the job: its workers do not see
    the run's files, none offers the resources asked for, a task kept killing workers."""


class TilefeetWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one line)."""


class RemoteStorageError(TilefeetError, OSError):
    """An object store or web server (``s3://``, ``http(s)://``) refused or failed a request."""


class AccessDeniedError(RemoteStorageError, PermissionError):
    """Credentials missing, wrong, or not allowed to do what was asked (read the input, write the output)."""


class EndpointUnreachableError(RemoteStorageError, ConnectionError):
    """The server of a URL (an S3 endpoint, a web server) cannot be reached."""


class ViewerUnavailableError(TilefeetError, RuntimeError):
    """A viewer that cannot run here: its package (neuroglancer, napari) or a browser is missing."""
