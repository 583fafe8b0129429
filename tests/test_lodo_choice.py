"""The membrane recipe chosen by transfer (issue 20, point 1): ``benchmarks/lodo_membrane.py`` trains
each recipe on one labelled dataset and scores it on the other; the choice recomputed from its runs
is the recipe the shipped ``isbi-membrane`` and ``em-membrane`` were trained with and ``tilefeet train``'s default."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tilefeet.augment import parse_augment
from tilefeet.engine import load_engine
from tilefeet.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_shipped_recipe_is_the_one_chosen_by_held_out_datasets():
    import lodo_membrane
    from train_ablation import VARIANTS

    doc = json.loads((ROOT / "benchmarks" / "results" / "lodo-membrane.json").read_text())
    rows = lodo_membrane.summarize([r for r in doc["runs"] if r["steps"] == doc["steps"]])
    chosen = lodo_membrane.choose(rows)
    assert chosen == doc["chosen"] == lodo_membrane.INCUMBENT
    # every recipe compared has both folds: each scored on a dataset it never saw
    assert all("transfer_f1" in r and set(lodo_membrane.FOLDS) <= set(r) for r in rows), rows
    spec, zoom, extra = VARIANTS[chosen]
    for engine in ("isbi-membrane", "em-membrane"):  # the default engine: the same recipe on both datasets
        training = load_engine(engine).raw["training"]
        assert tuple(training["augment"]) == parse_augment(spec) and tuple(training["scale_jitter"]) == zoom and not extra, engine
    config = TrainConfig(name="x", pixel_size_nm=(4.0, 4.0), classes=("membrane",))
    assert tuple(config.augment) == parse_augment(spec) and tuple(config.scale_jitter) == zoom
