"""The bundled ``lucchi-mito`` engine on held-out data, through the real pipeline (convert → segment →
evaluate): its score must stay what its README states, so a change to the pipeline that degrades
real segmentations fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tilefeet.cli import main

from .conftest import DATA

ENGINE = Path(__file__).resolve().parents[1] / "engines" / "lucchi-mito"
#: Pixel F1 of the 1 × 2 montage of tests/data/lucchi, as engines/lucchi-mito/README.md states it.
README_F1 = "0.9290"

pytestmark = pytest.mark.skipif(not (ENGINE / "engine.toml").is_file(), reason=f"no engine bundle at {ENGINE}")


def test_held_out_f1_matches_the_readme(tmp_path):
    from tilefeet.evaluate import evaluate

    section, out = tmp_path / "lucchi.ome.zarr", tmp_path / "mito.ome.zarr"
    assert main(["-q", "convert", str(DATA / "lucchi" / "image"), str(section), "--grid", "1x2", "--pixel-size", "5nm"]) == 0
    assert main(["-q", "convert", str(DATA / "lucchi" / "mitochondrion"), str(section), "--grid", "1x2", "--labels", "mitochondrion"]) == 0
    assert main(["-q", "segment", str(section), str(out), "-e", str(ENGINE)]) == 0
    ev = evaluate(out, section / "labels" / "mitochondrion")
    assert ev.region.shape == (768, 2048)
    assert f"| {README_F1} |" in (ENGINE / "README.md").read_text()  # the number below is the README's
    assert ev.pixel.f1 == pytest.approx(float(README_F1), abs=0.02)
