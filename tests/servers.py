"""Real servers for the remote-storage tests, each in its own process on the loopback: an
S3-compatible object store (moto's server mode) and a plain web server (``python -m http.server``).

Both log one line per request (``"GET /bucket/key HTTP/1.1" 200``) to a file, which is how the
tests count what tilefeet fetched: from the servers' side, not from inside tilefeet.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

_REQUEST = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Request:
    method: str
    path: str  #: the URL path, unquoted, without the query
    status: int


@dataclass
class Server:
    """A server process and its request log."""

    url: str  #: http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path
    _mark: int = field(default=0)

    def requests(self) -> list[Request]:
        """The requests logged since :meth:`mark` (all of them before the first mark)."""
        text = self.log.read_text(errors="replace")[self._mark :]
        out = []
        for m in _REQUEST.finditer(text):
            out.append(Request(m.group(1), unquote(m.group(2).split("?", 1)[0]), int(m.group(3))))
        return out

    def mark(self) -> None:
        """Count requests from now on."""
        self._mark = len(self.log.read_text(errors="replace"))

    def gets(self, prefix: str) -> Counter:
        """GET requests of files answered 200 since the mark, per path under ``prefix`` (folder
        listings, ``.../``, are :meth:`listings`)."""
        return Counter(r.path for r in self.requests()
                       if r.method == "GET" and r.status == 200 and r.path.startswith(prefix) and not r.path.endswith("/"))

    def listings(self, prefix: str) -> list[str]:
        """Folder listings (GETs of ``.../`` answered 200) since the mark under ``prefix``, in order."""
        return [r.path for r in self.requests() if r.method == "GET" and r.status == 200 and r.path.startswith(prefix) and r.path.endswith("/")]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start(args: list[str], log: Path, port: int, env: dict | None = None) -> Server:
    handle = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-u", *args], stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=log.parent
    )
    handle.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server {args} exited at start: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return Server(f"http://127.0.0.1:{port}", proc, log)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the server {args} did not listen on port {port} within 60 s: {log.read_text()[-2000:]}")


def start_http_server(root: Path, log: Path) -> Server:
    """``python -m http.server`` serving ``root`` (read-only, GET and HEAD; folders are listed as HTML
    pages, which is how tilefeet finds missing chunks there)."""
    port = free_port()
    return _start(["-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)], log, port)


#: A web server like most that host OME-Zarr: files only, no folder listings (404 for a folder).
_NO_LISTINGS = """
import functools, http.server, sys
class Files(http.server.SimpleHTTPRequestHandler):
    def list_directory(self, path):
        self.send_error(404, "no listings here")
port, root = int(sys.argv[1]), sys.argv[2]
http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Files, directory=root)).serve_forever()
"""


def start_file_server(root: Path, log: Path) -> Server:
    """A web server serving the files under ``root`` but no folder listings (404)."""
    port = free_port()
    return _start(["-c", _NO_LISTINGS, str(port), str(root)], log, port)


def start_s3_server(log: Path, *, enforce_auth: bool = False) -> Server:
    """moto's S3-compatible server. ``enforce_auth``: every request must be signed with a key moto's
    IAM knows (none is), so any credentials are refused: a server that says "bad credentials"."""
    port = free_port()
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if enforce_auth else {}
    return _start(["-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)], log, port, env)
