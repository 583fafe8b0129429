"""End-to-end benchmark: ``tilefeet segment`` against MONAI's ``sliding_window_inference`` and the
I/O floor, measured side by side in one run, on a section of real EM texture.

A thin wrapper around ``tilefeet bench`` (the same code, also available to users as a command)
that names the JSON after the device and the section size and keeps it in benchmarks/results/:

    python benchmarks/bench_segment.py                     # 4096², every baseline
    python benchmarks/bench_segment.py --size 8192 --baseline io --baseline monai
    python benchmarks/bench_segment.py --size 32768 --device cuda      # on a GPU machine

Any other option is passed to ``tilefeet bench`` (``tilefeet bench -h`` lists them).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    from tilefeet.bench import device_name
    from tilefeet.cli import main as tilefeet_main

    size = argv[argv.index("--size") + 1] if "--size" in argv else "4096"
    device = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
    if "--json" not in argv:
        slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
        slug = re.sub(r"-\d+-cores$", "", slug)
        argv = [*argv, "--json", str(RESULTS / f"segment-{slug}-{size}.json")]
    if "--workdir" not in argv:
        argv = [*argv, "--workdir", str(Path("bench-work").resolve())]
    return tilefeet_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
