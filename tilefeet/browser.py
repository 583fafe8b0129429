"""Headless Chromium, driven through the DevTools protocol: a page for screenshots and checks.

``tilefeet view --screenshot`` and its tests load neuroglancer in a real browser. This module
starts Chromium (Debian's ``chromium`` package, or any Chrome on the PATH) headless with a fresh
profile, opens one page, and records what the page says on its console (errors, warnings,
uncaught exceptions, failed requests), and evaluates JavaScript in it. The DevTools protocol is
spoken over a websocket with aiohttp (a dependency already), from a background thread, so the
caller stays synchronous. Nothing is downloaded: without a browser, :func:`find_chromium` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ViewerUnavailableError

#: Names of a Chromium or Chrome executable, in the order they are looked for on the PATH.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

#: Flags that let headless Chromium run as root in a container without a GPU or a network, render
#: WebGL in software, and stay quiet (no first-run pages, updates, sync or background requests).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)

INSTALL_HINT = "install Chromium (Debian/Ubuntu: apt-get install chromium)"


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome executable on the PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass(frozen=True)
class ConsoleMessage:
    level: str  #: "error", "warning", "info", "log", "debug", or "exception"
    text: str
    url: str = ""  #: the resource a failed request asked for (network errors)


class HeadlessChromium:
    """One headless Chromium with one page, closed (process and profile) by :meth:`close`."""

    def __init__(self, *, size: tuple[int, int] = (1024, 768), executable: str | None = None, timeout_s: float = 30.0):
        exe = executable or find_chromium()
        if exe is None:
            raise ViewerUnavailableError(f"no Chromium or Chrome on the PATH (looked for {', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}")
        self.messages: list[ConsoleMessage] = []
        self._profile = Path(tempfile.mkdtemp(prefix="tilefeet-chromium-"))
        self._log = self._profile / "chromium.log"
        args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", f"--window-size={size[0]},{size[1]}",
                "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", "about:blank"]
        with self._log.open("wb") as log:
            # its own process group: closing ends Chromium's helper processes too, not only the browser
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tilefeet-chromium", daemon=True)
        self._thread.start()
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._ws: Any = None
        self._session: Any = None
        try:
            port = self._devtools_port(timeout_s)
            self._call(self._connect(port), timeout_s)
            for domain in ("Runtime", "Log", "Page"):
                self.send(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------------------------- public

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str, *, timeout_s: float = 10.0) -> Any:
        """The value of a JavaScript expression in the page (JSON-serializable; promises awaited)."""
        reply = self.send("Runtime.evaluate", timeout_s=timeout_s, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            d = reply["exceptionDetails"]
            raise RuntimeError(f"JavaScript raised: {d.get('exception', {}).get('description') or d.get('text')}")
        return reply.get("result", {}).get("value")

    def errors(self) -> list[ConsoleMessage]:
        """Console errors, uncaught exceptions and failed requests so far."""
        return [m for m in list(self.messages) if m.level in ("error", "exception")]

    def send(self, method: str, *, timeout_s: float = 10.0, **params: Any) -> dict:
        """One DevTools command; its result."""
        return self._call(self._send(method, params), timeout_s)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._ws is not None:
                self._call(self._ws.close(), 5)
        with contextlib.suppress(Exception):
            if self._session is not None:
                self._call(self._session.close(), 5)
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self._proc.wait()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        with contextlib.suppress(RuntimeError):
            self._loop.close()
        for _ in range(50):  # a helper may still write into the profile while it exits
            shutil.rmtree(self._profile, ignore_errors=True)
            if not self._profile.exists():
                break
            time.sleep(0.05)

    def _signal(self, sig: int) -> None:
        """``sig`` to Chromium's process group (the browser and its helpers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if hasattr(os, "killpg"):
                os.killpg(self._proc.pid, sig)
            elif self._proc.poll() is None:  # no process groups (Windows): the browser alone
                self._proc.kill()

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- inside

    def _devtools_port(self, timeout_s: float) -> int:
        """Chromium writes the port it chose into DevToolsActivePort in its profile."""
        marker = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self._log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise ViewerUnavailableError(f"Chromium exited at start (status {self._proc.returncode}: {tail[0][:200]}); {INSTALL_HINT}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            time.sleep(0.05)
        raise ViewerUnavailableError(f"Chromium did not start within {timeout_s:.0f} s; {INSTALL_HINT}")

    def _call(self, coro: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout_s), self._loop).result(timeout_s + 1)

    async def _connect(self, port: int) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession()
        for _ in range(100):
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json(content_type=None) if t.get("type") == "page"]
            if pages:
                break
            await asyncio.sleep(0.05)
        else:
            raise ViewerUnavailableError("Chromium opened no page")
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._loop.create_task(self._receive())

    async def _send(self, method: str, params: dict) -> dict:
        self._next_id += 1
        future = self._loop.create_future()
        self._pending[self._next_id] = future
        await self._ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        return await future

    async def _receive(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(RuntimeError(f"DevTools: {data['error'].get('message')}"))
                    else:
                        future.set_result(data.get("result", {}))
            else:
                self._event(data.get("method", ""), data.get("params", {}))

    def _event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.messages.append(ConsoleMessage(params.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.messages.append(ConsoleMessage("exception", str(d.get("exception", {}).get("description") or d.get("text"))))
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            url = str(e.get("url") or "")
            self.messages.append(ConsoleMessage(str(e.get("level", "info")), str(e.get("text", "")) + (f" ({url})" if url else ""), url))
