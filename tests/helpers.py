"""Helpers the test modules share: the CLI as a user meets it, and the scores tests compare."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

import numpy as np


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``tilefeet ARGS`` in this process: exit status, stdout, stderr."""
    from tilefeet.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """A bad input: non-zero status, exactly one ``tilefeet: error:`` line holding every needle
    (case-insensitive), no traceback. Returns the line."""
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("tilefeet: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def cli_command(*args) -> list[str]:
    """``tilefeet ARGS`` as a command line for a subprocess (killed, timed or measured from outside).
    Ctrl-C works in it as in a terminal: a suite started as a background job (``.ci/run &``) hands
    its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    code = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from tilefeet.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, *map(str, args)]


def peak_rss_mb(command: list[str], env: Mapping[str, str] | None = None) -> float:
    """Peak resident memory (MB) of one run of ``command``, measured by a wrapper process that has
    only that child, under glibc's default allocator settings (a user's; the suite's other
    subprocesses keep freed memory, see conftest)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "assert r.returncode == 0; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=environ)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pixel F1 of two masks (tilefeet's own metric, the one evaluate reports)."""
    from tilefeet.metrics import pixel_metrics

    return pixel_metrics(np.asarray(pred, bool), np.asarray(truth, bool)).f1
