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

``convert`` and ``segment`` both use it (:func:`replace_dir`), and so does ``objects``: a label
layer of an output is an output location too (:mod:`tilefeet.objects.store`), staged beside the
store, set aside elsewhere than ``OUT.old``, and listed in its parent's ``labels`` group by the
two hooks every location has (:meth:`OutputLocation._withdraw`, :meth:`OutputLocation._placed`).
Every location drops its run state only once the output is in place.

Remote data (``s3://bucket/key``, ``http(s)://host/path``) is reached through fsspec (s3fs, and
fsspec's HTTP file system) as zarr's :class:`~zarr.storage.FsspecStore`: :class:`Remote` is a URL
and its storage options (``anon``, ``endpoint_url``, ``key``/``secret``/``token``, ``profile``,
``region``, ``requester_pays``, ``header.NAME``; credentials otherwise come from the environment
as botocore finds them: ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` ...), and
:func:`remote_error` turns what the server or the network said into one line naming the URL and
the fix.

Where an output is written is an :class:`OutputLocation`: :class:`LocalOutput` (the staging
folder and renames above) or :class:`ObjectStoreOutput` (S3, which has no rename). An object
store output is written in place, and made visible last::

    s3://bucket/out.ome.zarr/
      0/c/...  labels/<class>/0/c/...     chunks, written by blocks as they finish
      .tilefeet/plan.json                 the run (settings, fingerprint): "a run is unfinished here"
      .tilefeet/done/<block>              completion records, each written after its block's data
      .tilefeet/meta/**/zarr.json         every Zarr metadata document, kept here while unfinished
      zarr.json                           published by finalize, the root document last

A reader sees no Zarr metadata at all until the output is complete (then all of it), so it
cannot open a half-written output as an image. The state of an output prefix follows from two
objects, ``zarr.json`` (root) and ``.tilefeet/plan.json``:

=========================  =====================================  =======================================
root ``zarr.json``, plan   meaning                                what :meth:`ObjectStoreOutput.recover` does
=========================  =====================================  =======================================
yes, no                    a complete output                      nothing
yes, yes                   finalize died after publishing         drops ``.tilefeet/`` (complete)
no, yes                    an unfinished run                      nothing: ``--resume`` continues it
no, no, ``.tilefeet/``     died while creating the store          deletes the prefix (nothing finished)
no, no, other objects      not a tilefeet output (or a deletion   nothing: it "exists" (``--overwrite``)
                           that was interrupted)
=========================  =====================================  =======================================

Without a rename, an existing output cannot be kept until its replacement is complete:
``--overwrite`` deletes it first (its root document first, so no reader ever sees a mix of old and
new), then writes the new one in place. This relies on S3's strong read-after-write consistency
for objects and listings (AWS since December 2020; MinIO, Ceph RGW and moto alike).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    AccessDeniedError,
    ConfigError,
    EndpointUnreachableError,
    InputNotFoundError,
    OutputWriteError,
    RemoteStorageError,
    TilefeetError,
)

#: The folder (or key prefix) of an unfinished output that holds its run state and completion records.
STATE_DIR = ".tilefeet"


def staging_path(path: str | os.PathLike) -> Path:
    return Path(path).with_name(Path(path).name + ".partial")


def old_path(path: str | os.PathLike) -> Path:
    return Path(path).with_name(Path(path).name + ".old")


def recover(path: str | os.PathLike, old: Path | None = None) -> bool:
    """Undo what a crash in :func:`replace_dir` left (see the module table); safe to call anytime.
    ``old``: where the old folder is set aside (default ``PATH.old``). Whether there was anything to undo."""
    path = Path(path)
    old = old_path(path) if old is None else old
    if not old.exists():
        return False
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, path)
    return True


def replace_dir(staging: Path, path: Path, old: Path | None = None) -> Path:
    """Move the finished ``staging`` folder to ``path``, replacing what is there, crash-safely
    (the old one set aside at ``old``, default ``PATH.old``)."""
    old = old_path(path) if old is None else old
    recover(path, old)
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_writable(path: Path, *, create: bool = True) -> None:
    """Refuse an output whose folder cannot be created or written, before any work, in one line.
    With ``create=False`` nothing is made: the nearest existing folder above ``path`` is probed."""
    parent = path.parent
    try:
        if create:
            parent.mkdir(parents=True, exist_ok=True)
        else:
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
        probe = parent / f".{path.name}.tilefeet-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise os_error(OSError(e.errno, e.strerror), path) from None  # the probe's name means nothing to the user


def os_error(
    e: OSError, path: str | os.PathLike, *, staging: Path | None = None, kept: bool = False, state: str | None = None
) -> OutputWriteError:
    """An :class:`OSError` met while writing ``path`` as one line: what the OS said, and what became
    of the staging folder (kept for ``--resume``, or removed because nothing in it was finished), or
    ``state`` (what became of the work, said by the caller: where a trained network is kept)."""
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
    if state is not None:
        pass
    elif staging is None:
        state = "nothing was written"
    elif kept:
        state = f"finished blocks are kept in {staging}: free space or fix permissions, then rerun with --resume"
    else:
        state = "nothing was finished, so nothing is kept"
    return OutputWriteError(f"cannot write {path}: {what}{where}; {state}")


# ------------------------------------------------------------------------------------- URLs

#: URL schemes tilefeet reads (all) and writes (``s3`` only: HTTP servers are read-only).
SCHEMES = ("s3", "http", "https")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")

#: Storage options a user may give (``--storage-option KEY=VALUE``): the schemes each applies to,
#: and what it means. ``header.NAME`` (HTTP request headers) is the one family of keys.
STORAGE_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "anon": (("s3",), "true: no credentials (a public bucket)"),
    "endpoint_url": (("s3",), "an S3-compatible server, e.g. http://localhost:9000 (MinIO)"),
    "region": (("s3",), "the bucket's region, e.g. eu-west-1"),
    "key": (("s3",), "access key id (default: from the environment)"),
    "secret": (("s3",), "secret access key"),
    "token": (("s3",), "session token"),
    "profile": (("s3",), "a profile of ~/.aws/config"),
    "requester_pays": (("s3",), "true: the requester pays for a requester-pays bucket"),
    "header.NAME": (("http", "https"), "an HTTP request header, e.g. header.Authorization=Bearer ..."),
}
_BOOLEAN_OPTIONS = ("anon", "requester_pays")
#: The command line's help for ``--storage-option``.
STORAGE_HELP = (
    "How to reach http(s):// and s3:// URLs, KEY=VALUE (repeatable): anon=true, endpoint_url=URL, region=, key=, secret=, "
    "token=, profile=, requester_pays=true, header.NAME=VALUE; credentials otherwise from the environment (AWS_*)."
)
#: Storage options of the command being run (the CLI's ``--storage-option``): the default of
#: :meth:`Remote.create` where none are given. Objects that outlive the call (an :class:`Image`,
#: an output location) capture their options when created, so worker threads need not see this.
_DEFAULT_OPTIONS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("tilefeet_storage_options", default=None)


def is_url(location: Any) -> bool:
    """Is ``location`` a URL (``scheme://...``) rather than a local path?"""
    return isinstance(location, str) and _URL.match(location) is not None


class Url(str):
    """A URL where a path would otherwise be: a string that also answers the two questions asked of
    an output path (``name``, ``resolve()``), so code that identifies outputs handles both."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    def resolve(self) -> Url:
        return self


def join(base: str | os.PathLike, *parts: str) -> Path | Url:
    """``base / part / ...`` for a local path or a URL."""
    if is_url(base):
        return Url("/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)]))
    return Path(base).joinpath(*parts)


def location_text(location: str | os.PathLike) -> str:
    """A path or URL as a string that identifies it (URLs as given, paths absolute)."""
    return str(location) if is_url(location) else str(Path(location).resolve())


def parse_storage_options(items: Sequence[str] | Mapping[str, Any] | None, where: str = "--storage-option") -> dict[str, Any]:
    """Storage options from ``KEY=VALUE`` strings (the CLI) or a mapping (Python), checked against
    :data:`STORAGE_OPTIONS`; ``true``/``false`` become booleans."""
    if not items:
        return {}
    pairs: list[tuple[str, Any]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        for item in items:
            name, sep, text = str(item).partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"{where} takes KEY=VALUE (e.g. anon=true or endpoint_url=http://localhost:9000), got {item!r}")
            pairs.append((name.strip(), text.strip()))
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key not in STORAGE_OPTIONS and not (key.startswith("header.") and len(key) > len("header.")):
            known = ", ".join(STORAGE_OPTIONS)
            raise ConfigError(f"unknown storage option {key!r} in {where}; known: {known}")
        if key in _BOOLEAN_OPTIONS and not isinstance(value, bool):
            text = str(value).lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{where} {key} takes true or false, got {value!r}")
            value = text in ("true", "1", "yes")
        out[key] = value
    return out


@contextlib.contextmanager
def default_storage_options(options: Mapping[str, Any] | None) -> Iterator[None]:
    """Use ``options`` for every URL opened inside the block without options of its own (the CLI's
    ``--storage-option`` for commands whose code opens stores in many places)."""
    token = _DEFAULT_OPTIONS.set(dict(options or {}))
    try:
        yield
    finally:
        _DEFAULT_OPTIONS.reset(token)


@dataclass(frozen=True)
class Remote:
    """A URL of an object store or web server, and the storage options to reach it.

    Picklable and small (no connection): every process makes its own file system from it (fsspec
    keeps one per set of options). Credentials given here travel with it to worker processes in
    memory; they are never written (provenance and run state record the URL only).
    """

    url: str  #: ``scheme://bucket-or-host/path``, no trailing slash
    options: tuple[tuple[str, Any], ...] = ()  #: storage options (checked), sorted by key

    @classmethod
    def create(cls, url: str, options: Mapping[str, Any] | None = None, *, role: str = "input") -> Remote:
        """A checked :class:`Remote`; ``options`` None means the command's (:func:`default_storage_options`)."""
        m = _URL.match(url)
        if m is None:
            raise ConfigError(f"{role} {url!r} is not a URL")
        scheme, rest = m.group(1).lower(), m.group(2).strip("/")
        if scheme not in SCHEMES:
            raise ConfigError(
                f"{role} {url}: tilefeet reads http://, https:// and s3:// URLs, not {scheme}://; "
                f"copy the data to S3 or a local folder, or serve it over HTTP"
            )
        if not rest or (scheme == "s3" and not rest.split("/")[0]):
            raise ConfigError(f"{role} {url} names no {'bucket' if scheme == 's3' else 'host'}; give e.g. s3://bucket/section.ome.zarr")
        chosen = _DEFAULT_OPTIONS.get() if options is None else options
        checked = parse_storage_options(chosen or {}, where="storage options")
        return cls(f"{scheme}://{rest}", tuple(sorted(checked.items())))

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def bucket(self) -> str:
        """The bucket (S3) or host (HTTP)."""
        return self.url.split("://", 1)[1].split("/", 1)[0]

    @property
    def key(self) -> str:
        """The path inside the bucket (S3) or on the host (HTTP), without a leading slash."""
        parts = self.url.split("://", 1)[1].split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    def child(self, *parts: str) -> Remote:
        return Remote(str(join(self.url, *parts)), self.options)

    def fs_path(self, *parts: str) -> str:
        """The file system path of ``url/parts``: ``bucket/key/...`` for s3fs, the whole URL for HTTP."""
        url = str(join(self.url, *parts)) if parts else self.url
        return url.split("://", 1)[1] if self.scheme == "s3" else url

    def fsspec_options(self) -> dict[str, Any]:
        """The options of this scheme as fsspec's file system takes them."""
        given = dict(self.options)
        out: dict[str, Any] = {}
        if self.scheme == "s3":
            for key in ("anon", "endpoint_url", "key", "secret", "token", "profile", "requester_pays"):
                if key in given:
                    out[key] = given[key]
            if "region" in given:
                out["client_kwargs"] = {"region_name": given["region"]}
            # Listings must say what is there now: an output's state is read from them.
            out["use_listings_cache"] = False
        else:
            headers = {k[len("header.") :]: str(v) for k, v in given.items() if k.startswith("header.")}
            if headers:
                out["headers"] = headers
        return out

    def filesystem(self) -> Any:
        """fsspec's (synchronous) file system for this URL's scheme and options."""
        import fsspec

        try:
            return fsspec.filesystem(self.scheme, **self.fsspec_options())
        except ImportError as e:
            raise ConfigError(f"reading {self.url} needs {e.name or 's3fs'}: pip install s3fs") from None

    def zarr_store(self, *, read_only: bool = True) -> Any:
        """zarr's store over this URL (asynchronous fsspec)."""
        from zarr.storage import FsspecStore

        try:
            return FsspecStore.from_url(self.url, storage_options=self.fsspec_options(), read_only=read_only)
        except ImportError as e:
            raise ConfigError(f"reading {self.url} needs {e.name or 's3fs'}: pip install s3fs") from None

    def endpoint(self) -> str:
        """Where requests go, in words: the S3 endpoint (option or environment) or the web server."""
        if self.scheme != "s3":
            return f"{self.scheme}://{self.bucket}"
        given = dict(self.options).get("endpoint_url")
        return str(given or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")

    def missing(self, *, role: str = "input") -> TilefeetError:
        """The one-line error for "nothing at this URL": a missing bucket is told from a missing key."""
        if self.scheme == "s3":
            try:
                bucket_exists = self.filesystem().exists(self.bucket)
            except Exception as e:
                return remote_error(e, self, role=role)
            if not bucket_exists:
                return InputNotFoundError(
                    f"{role} {self.url}: the bucket {self.bucket!r} does not exist at {self.endpoint()}; "
                    f"check the bucket name and the endpoint (--storage-option endpoint_url=... or AWS_ENDPOINT_URL)"
                )
        try:
            unfinished = self.filesystem().exists(self.fs_path(STATE_DIR, "plan.json"))
        except Exception:
            unfinished = False
        if unfinished:
            return InputNotFoundError(
                f"{role} {self.url} is an unfinished tilefeet output (a run is writing it, or was interrupted): it has no "
                f"image until the run completes; finish it with `tilefeet segment ... {self.url} --resume`"
            )
        return InputNotFoundError(f"{role} {self.url} does not exist (no Zarr store at that URL); check the URL")


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def bucket_missing(e: BaseException, remote: Remote) -> bool:
    """Whether "not found" (``e``) means the bucket itself is missing rather than a key in it. Asked of
    the server when the error does not say: the word "bucket" in a message proves nothing, as it is in
    the path whenever the bucket's name holds it (``s3://my-bucket/...``)."""
    text = str(e)
    if "NoSuchBucket" in text or "specified bucket does not exist" in text.lower():
        return True
    if remote.scheme != "s3":
        return False
    try:
        return not remote.filesystem().exists(remote.bucket)
    except Exception:
        return False


def remote_error(e: BaseException, remote: Remote, *, role: str = "input", writing: bool = False) -> TilefeetError:
    """What a request to ``remote`` raised, as one line that names the URL and the fix. Errors that
    are not about storage or the network come back as a generic :class:`RemoteStorageError`."""
    if isinstance(e, TilefeetError):
        return e
    names = _names(e)
    verb = "write" if writing else "read"
    what = f"{role} {remote.url}"
    public = "; a public bucket reads with --storage-option anon=true" if remote.scheme == "s3" and not writing else ""
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return AccessDeniedError(
            f"no credentials to {verb} {what}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            f"or give --storage-option key=... secret=...{public}"
        )
    status = getattr(e, "status", None)  # aiohttp's ClientResponseError
    if isinstance(e, PermissionError) or status in (401, 403):
        creds = (
            "check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or --storage-option key=... secret=...) "
            f"and that they may {verb} it{public}"
            if remote.scheme == "s3"
            else "give the credentials the server wants (e.g. --storage-option header.Authorization=...)"
        )
        return AccessDeniedError(f"access denied to {what} ({_reason(e)}); {creds}")
    unreachable = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ClientConnectionError",
                   "ServerDisconnectedError", "FSTimeoutError", "ConnectionError", "TimeoutError", "gaierror"}
    if names & unreachable:
        endpoint = ", the endpoint (--storage-option endpoint_url=... or AWS_ENDPOINT_URL)" if remote.scheme == "s3" else ""
        return EndpointUnreachableError(
            f"cannot reach {remote.endpoint()} to {verb} {what} ({_reason(e)}); check the URL{endpoint} "
            f"and that the server is up and reachable from here"
        )
    if isinstance(e, FileNotFoundError) or status in (404, 410) or "NoSuchBucket" in str(e):
        if bucket_missing(e, remote):
            fix = f"create it first (aws s3 mb s3://{remote.bucket}) or write elsewhere" if writing else "check the bucket name"
            cls = OutputWriteError if writing else InputNotFoundError
            return cls(f"{what}: the bucket {remote.bucket!r} does not exist at {remote.endpoint()}; {fix}")
        return InputNotFoundError(f"{what} does not exist ({_reason(e)}); check the URL")
    if isinstance(e, ValueError) and "endpoint" in str(e).lower():
        return ConfigError(f"{what}: {_reason(e)}; give --storage-option endpoint_url as http(s)://host:port")
    return RemoteStorageError(f"could not {verb} {what}: {type(e).__name__}: {_reason(e)}")


def list_files(location: str | os.PathLike, options: Mapping[str, Any] | None = None) -> set[str]:
    """The paths (``/``-separated, relative to ``location``) of every file under a folder or URL
    prefix, from one listing: a walk of the folder, one paginated listing on S3, and on a web server
    one page per folder (empty when the server lists no folders). Errors of a server are raised."""
    if is_url(location):
        remote = Remote.create(str(location), options)
        base = remote.fs_path().rstrip("/") + "/"
        return {p[len(base) :] for p in remote.filesystem().find(remote.fs_path()) if p.startswith(base)}
    root, found = Path(location), set[str]()
    for folder, _, files in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        found.update(f if rel == "." else f"{rel}/{f}" for f in files)
    return found


def is_remote_error(e: BaseException) -> bool:
    """Did a request to a server fail (as opposed to a bug or bad data)? Used to translate errors
    raised from inside zarr while it reads or writes chunks."""
    if isinstance(e, (OSError, TimeoutError)):
        return True
    return bool(_names(e) & {"BotoCoreError", "ClientError", "ClientResponseError", "ClientConnectionError", "FSTimeoutError"})


# --------------------------------------------------------------------------- output locations


class OutputLocation(ABC):
    """Where one output store is written, and how it becomes the finished output.

    :class:`OutputStore <tilefeet.writer.OutputStore>` (segment) and ``convert`` write through it;
    the rules about what exists and what may be resumed are theirs, the mechanics are these.
    """

    final: Path | Url  #: what the user named: the finished output
    staging: Path | Url  #: where the run writes until finalized (said in messages: kept for --resume)
    #: what ``--overwrite`` does to an existing output, for the "already exists" message
    overwrite_note: str = "it is kept until the new output is complete"

    @property
    def identity(self) -> str:
        """A string that identifies the output (dask keys of jobs writing it)."""
        return location_text(self.final)

    @abstractmethod
    def recover(self) -> None:
        """Complete or undo what a crash left (see the module tables); safe to call at any time."""

    @abstractmethod
    def check_writable(self) -> None:
        """Refuse, in one line and before any work, an output that cannot be written."""

    @abstractmethod
    def exists(self) -> bool:
        """Is there a finished output (or anything that is not an unfinished run) at ``final``?"""

    @abstractmethod
    def check_kind(self) -> None:
        """Refuse an existing ``final`` that cannot be an output store (a file)."""

    @abstractmethod
    def has_staging(self) -> bool:
        """Is there an unfinished run (its staging store)?"""

    @abstractmethod
    def read_state(self) -> dict:
        """The unfinished run's state (``plan.json``); ``{}`` when there is none or it is unreadable."""

    @abstractmethod
    def write_state(self, state: dict) -> None:
        """Record the run's state; written once the staging store is created, so a store without it
        holds nothing finished."""

    @abstractmethod
    def discard_staging(self) -> None:
        """Delete the unfinished run's staging store."""

    @abstractmethod
    def open_group(self, mode: str, *, zarr_format: int = 3) -> Any:
        """The staging store's root group: ``"w"`` creates it anew (deleting what was there) in
        ``zarr_format``, ``"r+"`` reopens it."""

    @abstractmethod
    def mark(self, record: str, text: str) -> None:
        """Write a completion record (after the data it vouches for)."""

    @abstractmethod
    def records(self, prefix: str = "") -> dict[str, str]:
        """The completion records whose names start with ``prefix``: name → text."""

    @abstractmethod
    def record_names(self) -> set[str]:
        """The names of all completion records (cheaper than :meth:`records`: no contents)."""

    @abstractmethod
    def publish(self) -> Path | Url:
        """Make the finished staging store the output at ``final``, then (once it is there) drop the run
        state; returns ``final``. A crash in between leaves the state beside a complete output:
        :meth:`recover` drops it."""

    def _withdraw(self) -> None:
        """Called before an existing output at ``final`` is set aside or deleted: a part of a larger
        store (a label layer) leaves its parent's listing here. Nothing for a whole output."""
        return None

    def _placed(self) -> None:
        """Called once the output is at ``final``, before its state is dropped (and by :meth:`recover`
        when a crash came between): a label layer joins its parent's listing here."""
        return None

    @abstractmethod
    def write_error(self, e: BaseException, *, kept: bool | None) -> TilefeetError:
        """An error met while writing as one line; ``kept``: what became of the staging store
        (True kept for --resume, False removed, None nothing was written)."""


class LocalOutput(OutputLocation):
    """An output folder on a file system: built in ``OUT.partial``, renamed into place (module docstring)."""

    final: Path
    staging: Path

    def __init__(self, path: str | os.PathLike, *, staging: Path | None = None, old: Path | None = None):
        self.final = Path(path)
        self.staging = staging_path(self.final) if staging is None else Path(staging)
        self.old = old_path(self.final) if old is None else Path(old)  #: where an old output is set aside while replaced

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.final)!r})"

    def recover(self) -> None:
        if recover(self.final, self.old):
            self._placed()  # whichever came back (old or new), it is in place again
        if (self.final / STATE_DIR).exists() and not self.staging.exists():
            self._placed()  # a publish interrupted after its rename
            shutil.rmtree(self.final / STATE_DIR, ignore_errors=True)
        if self.staging.exists() and not self.read_state():
            shutil.rmtree(self.staging)  # a run that died while creating it: nothing in it to resume

    def check_writable(self) -> None:
        check_writable(self.final)

    def exists(self) -> bool:
        return self.final.exists()

    def check_kind(self) -> None:
        from .errors import OutputExistsError

        if self.final.exists() and not self.final.is_dir():
            raise OutputExistsError(f"{self.final} exists and is not a folder; remove it or choose another output path")

    def has_staging(self) -> bool:
        return self.staging.exists()

    def read_state(self) -> dict:
        try:
            return json.loads((self.staging / STATE_DIR / "plan.json").read_text())
        except (OSError, ValueError):
            return {}

    def write_state(self, state: dict) -> None:
        folder = self.staging / STATE_DIR
        (folder / "done").mkdir(parents=True, exist_ok=True)
        (folder / "plan.json").write_text(json.dumps(state, default=str))

    def discard_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def open_group(self, mode: str, *, zarr_format: int = 3) -> Any:
        import zarr

        if mode == "w":
            self.staging.parent.mkdir(parents=True, exist_ok=True)
            return zarr.open_group(str(self.staging), mode="w", zarr_format=zarr_format)  # type: ignore[arg-type]
        return zarr.open_group(str(self.staging), mode=mode)  # type: ignore[arg-type]

    def mark(self, record: str, text: str) -> None:
        (self.staging / STATE_DIR / "done" / record).write_text(text)

    def records(self, prefix: str = "") -> dict[str, str]:
        done = self.staging / STATE_DIR / "done"
        return {p.name: p.read_text() for p in done.iterdir() if p.name.startswith(prefix)}

    def record_names(self) -> set[str]:
        done = self.staging / STATE_DIR / "done"
        return {p.name for p in done.iterdir()} if done.exists() else set()

    def publish(self) -> Path:
        if self.final.exists():
            self._withdraw()
        replace_dir(self.staging, self.final, self.old)
        self._placed()
        shutil.rmtree(self.final / STATE_DIR, ignore_errors=True)  # last: until the output is in place, it is the run's
        return self.final

    def write_error(self, e: BaseException, *, kept: bool | None) -> TilefeetError:
        if not isinstance(e, OSError):
            return RemoteStorageError(f"cannot write {self.final}: {_reason(e)}")
        return os_error(e, self.final, staging=None if kept is None else self.staging, kept=bool(kept))


class ObjectStoreOutput(OutputLocation):
    """An output under an S3 prefix, written in place; its Zarr metadata is published last (module docstring)."""

    overwrite_note = "on an object store there is no rename: the old output is deleted when the new run starts"
    final: Url
    staging: Url

    def __init__(self, remote: Remote, *, documents: Remote | None = None):
        if remote.scheme != "s3":
            raise ConfigError(
                f"cannot write to {remote.url}: web servers are read-only here; write to a local folder or to s3://bucket/out.ome.zarr"
            )
        if not remote.key:
            raise ConfigError(f"output {remote.url} names a bucket but no output name; give e.g. {remote.url}/out.ome.zarr")
        self.remote = remote
        #: where the Zarr metadata documents are published: the prefix itself, or (a label layer of an
        #: output that is itself unfinished) that output's unpublished documents, published with it
        self.documents = remote if documents is None else documents
        self.final = Url(remote.url)
        self.staging = self.final
        self._bucket_seen = False  #: the bucket is known to exist (so "not found" means a key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.remote.url!r})"

    # ---- keys

    def _path(self, *parts: str) -> str:
        return self.remote.fs_path(*parts)

    def _fs(self) -> Any:
        return self.remote.filesystem()

    def _call(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        """A file system call; what the server or the network says becomes one line."""
        try:
            return f(*args, **kwargs)
        except FileNotFoundError as e:
            if not self._bucket_seen and bucket_missing(e, self.remote):
                raise remote_error(e, self.remote, role="output", writing=True) from None
            self._bucket_seen = True  # a missing key, not a missing bucket: asked once per output
            raise
        except Exception as e:
            if is_remote_error(e):
                raise remote_error(e, self.remote, role="output", writing=True) from None
            raise

    def _exists(self, *parts: str) -> bool:
        return bool(self._call(self._fs().exists, self._path(*parts)))

    def _listing(self, *parts: str) -> list[str]:
        try:
            return list(self._call(self._fs().ls, self._path(*parts), detail=False))
        except FileNotFoundError:
            return []

    # ---- state

    def _doc(self, *parts: str) -> str:
        """The file system path of a published metadata document."""
        return self.documents.fs_path(*parts)

    def _published(self) -> bool:
        """Is the root metadata document there (v3's, or v2's attributes)?"""
        fs = self._fs()
        return bool(self._call(fs.exists, self._doc("zarr.json")) or self._call(fs.exists, self._doc(".zattrs")))

    def recover(self) -> None:
        published, running = self._published(), self.has_staging()
        if published and running:
            self._placed()  # finalize died after publishing
            self._call(self._fs().rm, self._path(STATE_DIR), recursive=True)
        elif not published and not running and self._listing(STATE_DIR):
            self._clear()  # died while creating the store: nothing in it was finished

    def check_writable(self) -> None:
        parent, _, name = self._path().rpartition("/")
        probe = f"{parent}/.{name}.tilefeet-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fs = self._fs()
        self._call(fs.pipe_file, probe, b"")
        self._call(fs.rm_file, probe)

    def exists(self) -> bool:
        if self._published():
            return True
        return bool(self._listing()) and not self.has_staging()

    def check_kind(self) -> None:
        from .errors import OutputExistsError

        if self._call(self._fs().isfile, self._path()):
            raise OutputExistsError(f"{self.final} is an object, not a prefix of objects; delete it or choose another output name")

    def has_staging(self) -> bool:
        return self._exists(STATE_DIR, "plan.json")

    def read_state(self) -> dict:
        try:
            return json.loads(self._call(self._fs().cat_file, self._path(STATE_DIR, "plan.json")))
        except (FileNotFoundError, ValueError):
            return {}

    def write_state(self, state: dict) -> None:
        self._call(self._fs().pipe_file, self._path(STATE_DIR, "plan.json"), json.dumps(state, default=str).encode())

    def discard_staging(self) -> None:
        self._clear()

    def _clear(self) -> None:
        """Delete everything under the prefix: the root document first, so that from the first request
        on no reader takes what is left for an output."""
        fs = self._fs()
        if self._published():
            self._withdraw()
        for root in ("zarr.json", ".zattrs"):
            with contextlib.suppress(FileNotFoundError):
                self._call(fs.rm_file, self._doc(root))
        prefixes = [self._path()] + ([self._doc()] if self.documents != self.remote else [])
        for prefix in prefixes:
            with contextlib.suppress(FileNotFoundError):
                self._call(fs.rm, prefix, recursive=True)

    def open_group(self, mode: str, *, zarr_format: int = 3) -> Any:
        import zarr

        store = unpublished_store(self.remote.zarr_store(read_only=False), self.remote)
        if mode == "w":
            self._clear()
            return zarr.open_group(store, mode="a", zarr_format=zarr_format)  # type: ignore[arg-type]
        # The format is known: no requests for the other format's documents.
        return zarr.open_group(store, mode=mode, zarr_format=zarr_format)  # type: ignore[arg-type]

    # ---- records

    def mark(self, record: str, text: str) -> None:
        self._call(self._fs().pipe_file, self._path(STATE_DIR, "done", record), text.encode())

    def record_names(self) -> set[str]:
        return {p.rsplit("/", 1)[-1] for p in self._listing(STATE_DIR, "done")}

    def records(self, prefix: str = "") -> dict[str, str]:
        paths = [self._path(STATE_DIR, "done", n) for n in sorted(self.record_names()) if n.startswith(prefix)]
        if not paths:
            return {}
        got = self._call(self._fs().cat, paths)
        return {p.rsplit("/", 1)[-1]: bytes(v).decode() for p, v in got.items()}

    # ---- finishing

    def publish(self) -> Url:
        fs = self._fs()
        meta = self._path(STATE_DIR, "meta")
        docs = self._call(fs.find, meta)
        contents = self._call(fs.cat, docs) if docs else {}
        inner = {self._doc(doc[len(meta) + 1 :]): contents[doc] for doc in docs if "/" in doc[len(meta) + 1 :]}
        if inner:
            self._call(fs.pipe, inner)  # every document but the root's, at once
        for name in (".zgroup", ".zattrs", "zarr.json"):  # v2's root documents, then v3's
            if f"{meta}/{name}" in contents:
                self._call(fs.pipe_file, self._doc(name), contents[f"{meta}/{name}"])  # the output exists from here on
        self._placed()
        self._call(fs.rm, self._path(STATE_DIR), recursive=True)  # last: until the output is published, it is the run's
        return self.final

    def write_error(self, e: BaseException, *, kept: bool | None) -> TilefeetError:
        err = remote_error(e, self.remote, role="output", writing=True)
        if kept is None:
            state = "nothing was written"
        elif kept:
            state = f"finished blocks are kept in {self.final}: fix the cause, then rerun with --resume"
        else:
            state = "nothing was finished, so nothing is kept"
        return type(err)(f"{err}; {state}")


#: Zarr metadata documents: v3's, and v2's (an NGFF 0.4 output).
_METADATA_NAMES = ("zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata")


def _is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in _METADATA_NAMES


@functools.cache
def _unpublished_store_class() -> type:
    from zarr.storage import WrapperStore

    class UnpublishedMetadata(WrapperStore):
        """A zarr store that keeps every metadata document (``zarr.json``) under ``.tilefeet/meta/``
        and passes chunks through: while an output is being written, no reader finds its Zarr
        metadata, so none can open it; :meth:`ObjectStoreOutput.publish` moves the documents out.
        What the server or the network says becomes one line (an ``OSError``, as a disk's would be)."""

        def __init__(self, store: Any, remote: Remote | None = None) -> None:
            super().__init__(store)
            self._remote = remote

        def _with_store(self, store: Any) -> Any:
            return type(self)(store, self._remote)

        @staticmethod
        def _key(key: str) -> str:
            return f"{STATE_DIR}/meta/{key}" if _is_metadata(key) else key

        async def _call(self, awaitable: Any) -> Any:
            try:
                return await awaitable
            except Exception as e:
                if self._remote is None or isinstance(e, TilefeetError) or not is_remote_error(e):
                    raise
                raise remote_error(e, self._remote, role="output", writing=True) from None

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            return await self._call(self._store.get(self._key(key), prototype, byte_range))

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            return await self._call(self._store.get_partial_values(prototype, [(self._key(k), r) for k, r in key_ranges]))

        async def exists(self, key: str) -> bool:
            return bool(await self._call(self._store.exists(self._key(key))))

        async def set(self, key: str, value: Any) -> None:
            await self._call(self._store.set(self._key(key), value))

        async def set_if_not_exists(self, key: str, value: Any) -> None:
            await self._call(self._store.set_if_not_exists(self._key(key), value))

        async def delete(self, key: str) -> None:
            await self._call(self._store.delete(self._key(key)))

    return UnpublishedMetadata


def unpublished_store(store: Any, remote: Remote) -> Any:
    """``store`` wrapped so that its metadata documents stay unpublished (zarr is imported on first use)."""
    return _unpublished_store_class()(store, remote)


def output_location(target: str | os.PathLike | OutputLocation, storage_options: Mapping[str, Any] | None = None) -> OutputLocation:
    """Where ``target`` (a path, an ``s3://`` URL, or a location already) is written."""
    if isinstance(target, OutputLocation):
        return target
    if is_url(target):
        return ObjectStoreOutput(Remote.create(str(target), storage_options, role="output"))
    return LocalOutput(target)
