"""A read-only web server for Zarr stores on 127.0.0.1, as browser viewers (neuroglancer) need them.

Each store is *mounted* under a name (``/output/...``, ``/input/...``) and read through fsspec,
so a local folder, a web server without CORS and an S3 bucket (with the command's credentials and
endpoint) are served alike. Every answer carries CORS headers, and single byte ranges are honoured
(``Range: bytes=a-b``, ``a-``, ``-n``, answered 206): neuroglancer reads a sharded zarr v3 array's
index and chunks by range, and without them it misreads whole shard files as chunks.

Arrays of a type the viewer cannot read (float16: neuroglancer has none) are served converted:
their ``zarr.json`` says float32, one uncompressed chunk per stored (inner) chunk, and each chunk
is read through zarr and encoded when asked for. Nothing is ever written.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from .errors import ConfigError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK_KEY = re.compile(r"^c((?:/\d+)+)$")


@dataclass
class Mount:
    """One store served under ``/<name>/``: its fsspec file system and root, and the arrays (paths
    relative to the root, zarr v3) to serve as float32."""

    fs: Any
    root: str
    group: Any = None  #: the zarr group of the store (needed to read converted arrays)
    as_float32: frozenset[str] = frozenset()
    _arrays: dict[str, Any] = field(default_factory=dict)

    def path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def converted(self, key: str) -> bytes | None:
        """The bytes of ``key`` when it belongs to an array served converted, else None."""
        for array in self.as_float32:
            prefix = f"{array}/" if array else ""
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if rest == "zarr.json":
                return self._float32_metadata(array)
            m = _CHUNK_KEY.match(rest)
            if m:
                return self._float32_chunk(array, tuple(int(i) for i in m.group(1).strip("/").split("/")))
        return None

    def _array(self, path: str) -> Any:
        if path not in self._arrays:
            self._arrays[path] = self.group[path]
        return self._arrays[path]

    def _float32_metadata(self, path: str) -> bytes:
        arr = self._array(path)
        meta = json.loads(self.fs.cat_file(self.path(f"{path}/zarr.json" if path else "zarr.json")))
        meta["data_type"] = "float32"
        meta["fill_value"] = float(arr.fill_value or 0)
        meta["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": list(arr.chunks)}}
        meta["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/"}}
        meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        meta.pop("storage_transformers", None)
        return json.dumps(meta).encode()

    def _float32_chunk(self, path: str, index: tuple[int, ...]) -> bytes:
        arr = self._array(path)
        if len(index) != len(arr.shape):
            raise FileNotFoundError(path)
        start = [i * c for i, c in zip(index, arr.chunks)]
        if any(s >= n for s, n in zip(start, arr.shape)):
            raise FileNotFoundError(path)
        region = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, arr.chunks, arr.shape))
        chunk = np.full(arr.chunks, arr.fill_value or 0, dtype="<f4")  # edge chunks are whole in zarr v3
        data = np.asarray(arr[region], dtype="<f4")
        chunk[tuple(slice(0, s) for s in data.shape)] = data
        return chunk.tobytes()


class StoreServer:
    """Serves :class:`Mount` s at ``http://127.0.0.1:PORT/<name>/`` from a background thread until closed."""

    def __init__(self, mounts: Mapping[str, Mount], *, port: int = 0, host: str = "127.0.0.1"):
        self.mounts = dict(mounts)
        #: what went wrong reading a store ("output/0/c/0/0/0: ValueError: ..."), in order: a viewer only sees "502"
        self.errors: list[str] = []
        handler = type("Handler", (_Handler,), {"mounts": self.mounts, "errors": self.errors})
        try:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise ConfigError(f"cannot serve the data on {host}:{port} ({e.strerror or e}); give another port, or 0 for any free one") from None
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self.host = host
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="tilefeet-store-server", daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        """The URL of a mounted store (no trailing slash)."""
        return f"http://{self.host}:{self.port}/{name}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> StoreServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    mounts: dict[str, Mount]
    errors: list[str]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # a viewer makes thousands of requests: say nothing
        pass

    def _cors(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Length, Content-Range, Accept-Ranges, ETag")

    def do_OPTIONS(self) -> None:  # CORS preflight (a Range header that is not a plain bytes=a-b needs one)
        self.send_response(HTTPStatus.NO_CONTENT)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", self.headers.get("Access-Control-Request-Headers") or "Range")
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        name, _, key = path.lstrip("/").partition("/")
        key = key.strip("/")
        mount = self.mounts.get(name)
        if mount is None or any(part in ("..", ".") for part in key.split("/")):
            return self._error(HTTPStatus.NOT_FOUND)
        try:
            data = mount.converted(key)
            if data is None:
                info = mount.fs.info(mount.path(key))
                if info.get("type") == "directory" or info.get("size") is None:
                    return self._error(HTTPStatus.NOT_FOUND)
            size = len(data) if data is not None else int(info["size"])
        except (FileNotFoundError, KeyError):
            return self._error(HTTPStatus.NOT_FOUND)
        except Exception as e:
            return self._failed(name, key, e)
        start, end = 0, size  # [start, end)
        status = HTTPStatus.OK
        wanted = self.headers.get("Range")
        m = _RANGE.match(wanted.strip()) if wanted else None
        if m and (m.group(1) or m.group(2)):  # a single range; several ranges get the whole file (allowed)
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self._cors()
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        payload = b""
        if body:
            try:
                payload = data[start:end] if data is not None else mount.fs.cat_file(mount.path(key), start=start, end=end)
                if len(payload) == size and end - start != size:  # a web server behind that ignores ranges sent it all
                    payload = payload[start:end]
            except FileNotFoundError:
                return self._error(HTTPStatus.NOT_FOUND)
            except Exception as e:
                return self._failed(name, key, e)
        self.send_response(status)
        self._cors()
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/json" if key.endswith(".json") or key.endswith((".zattrs", ".zarray", ".zgroup")) else "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            with contextlib.suppress(ConnectionError):
                self.wfile.write(payload)

    def _failed(self, name: str, key: str, e: Exception) -> None:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        self.errors.append(f"{name}/{key}: {type(e).__name__}{': ' + text if text else ''}")
        self._error(HTTPStatus.BAD_GATEWAY)

    def _error(self, status: HTTPStatus) -> None:
        self.send_response(status)
        self._cors()
        self.send_header("Content-Length", "0")
        self.end_headers()
