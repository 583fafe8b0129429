"""`tilefeet bench` end to end on a small section: every job runs in its own process and reports."""

from __future__ import annotations

import pytest

from tilefeet.bench import benchmark, format_report


def test_bench_reports_tilefeet_and_baselines(tmp_path, random_engine):
    pytest.importorskip("monai")
    report = benchmark(640, str(random_engine.path), tmp_path, options={"backend": "torch", "tile": 128, "overlap": 32},
                       baselines=("io", "monai"))
    r = report["results"]
    assert set(r) == {"tilefeet", "io", "monai"}
    for job in r.values():
        assert job["seconds"] > 0 and job["mpx_per_s"] > 0 and job["peak_rss_mb"] > 50
    assert r["monai"]["infer_seconds"] <= r["monai"]["seconds"]
    text = format_report(report)
    assert "tilefeet" in text and "monai" in text and "×" in text and report["device"]
