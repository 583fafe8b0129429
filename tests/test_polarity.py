"""Contrast polarity from evidence (tilefeet.polarity): every dataset the repository holds, as it is
and inverted, through both shipped engines and a fine-tuned one, gets the right polarity or a
warning, never a silent flip; the decision and its evidence are in the plan and the provenance."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

import tilefeet
from tilefeet.polarity import OutputStats, Polarity, PolarityWarning, decide, network_vote

DATA = Path(__file__).parent / "data"


def _isbi() -> np.ndarray:
    return np.concatenate([iio.imread(DATA / "isbi" / "image" / f"{i}.png") for i in (24, 25, 26)], axis=1)


def _lucchi() -> np.ndarray:
    return np.concatenate([iio.imread(DATA / "lucchi" / "image" / f"{n}.png") for n in ("testing0000", "testing0162")], axis=1)


#: name -> (loader, pixel size in nm)
DATASETS = {
    "isbi": (_isbi, 4.0),
    "lucchi": (_lucchi, 5.0),
    "pssr-2nm": (lambda: iio.imread(DATA / "pssr" / "HR_2nm.png"), 2.0),
    "pssr-8nm": (lambda: iio.imread(DATA / "pssr" / "LR_8nm.png"), 8.0),
}

#: (engine, dataset) pairs whose network evidence is strong either way (measured; the rest, PSSR
#: through isbi-membrane, PSSR 8 nm through em-membrane, ISBI through the mitochondria engine (few
#: mitochondria), is ambiguous to the network and must warn instead).
DECIDED = {
    ("isbi-membrane", "isbi"), ("isbi-membrane", "lucchi"),
    ("em-membrane", "isbi"), ("em-membrane", "lucchi"), ("em-membrane", "pssr-2nm"),
    ("lucchi-mito", "lucchi"), ("lucchi-mito", "pssr-2nm"), ("lucchi-mito", "pssr-8nm"),
}


def _plan(data: np.ndarray, engine, px: float, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = tilefeet.plan_segmentation(data, engine, pixel_size_nm=px, **options)
    polarity = [str(w.message) for w in caught if issubclass(w.category, PolarityWarning)]
    return run, polarity


def _check(engine, name: str, data: np.ndarray, px: float, inverted: bool, must_decide: bool) -> None:
    run, warned = _plan(255 - data if inverted else data, engine, px)
    flipped = run.plan.intensity.invert_max is not None
    label = f"{engine} on {name} {'inverted' if inverted else 'as it is'}: {run.plan.polarity}"
    assert not flipped or inverted, "a silent (or any) wrong flip: " + label
    if flipped != inverted:
        assert warned, "kept a section the network cannot read without a warning: " + label
    if must_decide:
        assert flipped == inverted and not warned, label
        if name.startswith("pssr"):  # one tile at 4 nm: judged by its four quarters, all agreeing
            assert "4 of 4 quarters agree" in run.plan.polarity, label
    assert run.plan.polarity.startswith("inverted" if flipped else "as it is"), label
    if warned:
        assert "--invert" in warned[0] and "--no-invert" in warned[0] and "\n" not in warned[0]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["isbi-membrane", "em-membrane", "lucchi-mito"])
@pytest.mark.parametrize("name", list(DATASETS))
def test_shipped_engines_get_polarity_right_or_warn(engine, name):
    load, px = DATASETS[name]
    data = load()
    for inverted in (False, True):
        _check(engine, name, data, px, inverted, (engine, name) in DECIDED)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """isbi-membrane fine-tuned on one Lucchi slice (tests/data/lucchi/train), briefly: a bundle whose
    normalization and histogram are its own one-slice data's (a one-slice histogram made the old,
    histogram-only detector flip this engine's own data: F1 0.04)."""
    from tilefeet.train import TrainConfig, resolve_parent, train_engine
    from tilefeet.training_data import resample

    parent = resolve_parent("isbi-membrane", ["membrane"])
    img = iio.imread(DATA / "lucchi" / "train" / "image" / "training0000.png")
    mask = (iio.imread(DATA / "lucchi" / "train" / "membranes" / "training0000.png") > 127).astype(np.uint8)
    img, mask = resample(img, mask[None], (5.0, 5.0), (4.0, 4.0))
    cut = img.shape[1] * 9 // 10
    config = TrainConfig(name="ft-lucchi", pixel_size_nm=(4.0, 4.0), classes=("membrane",), steps=8, batch_size=2, crop=128,
                         lr=5e-4, val_every=8, device="cpu")
    out = tmp_path_factory.mktemp("ft") / "ft-lucchi"
    return train_engine([img[:, :cut]], [mask[:, :, :cut]], out, config, val_images=[img[:, cut:]], val_masks=[mask[:, :, cut:]],
                        parent=parent, progress=False).bundle


@pytest.mark.slow
def test_fine_tuned_engine_keeps_its_own_data_and_flips_it_inverted(fine_tuned):
    from tilefeet.intensity import polarity as histogram_distances

    assert OutputStats.from_toml(fine_tuned.raw.get("reference")) is not None  # training records what its network outputs
    data = _lucchi()
    # the one-slice histogram still says "inverted" for the engine's own kind of data: the network outvotes it
    distances = histogram_distances(fine_tuned.normalization, data)
    assert distances is not None and distances[1] < distances[0]
    for inverted in (False, True):
        _check(fine_tuned, "lucchi", data, 5.0, inverted, must_decide=True)


def test_user_choice_is_kept_and_said(random_engine):
    data = _isbi()
    run, warned = _plan(data, random_engine, 4.0, invert=True)
    assert run.plan.intensity.invert_max == 255 and run.plan.polarity == "inverted (--invert)" and not warned
    run, warned = _plan(data, random_engine, 4.0, invert=False)
    assert run.plan.intensity.invert_max is None and run.plan.polarity == "as it is (--no-invert)" and not warned


def test_a_network_without_evidence_keeps_the_contrast_and_warns(random_engine):
    """A random network finds no consistent structure either way: nothing is flipped, one warning says so."""
    run, warned = _plan(_isbi(), random_engine, 4.0)
    assert run.plan.intensity.invert_max is None
    assert len(warned) == 1 and "could not tell" in warned[0] and "--invert" in warned[0] and "--no-invert" in warned[0]


def test_plan_and_provenance_show_the_decision(tmp_path):
    data = 255 - _isbi()
    out = tmp_path / "out.ome.zarr"
    run, warned = _plan(data, "isbi-membrane", 4.0)
    text = run.describe()
    assert not warned and "contrast    inverted: network on" in text and "strong evidence" in text and "training data:" in text
    tilefeet.write_planned(run, out)
    import json

    meta = json.loads((out / "zarr.json").read_text())
    provenance = meta["attributes"]["ome"]["multiscales"][0]["metadata"]
    assert provenance["contrast"] == run.plan.polarity


def _stats(consistency, confidence, fraction=0.2):
    n = len(consistency)
    return OutputStats((fraction,) * n, tuple(consistency), tuple(confidence))


def test_decision_rule():
    strong_plain = (_stats([0.92], [0.76]), _stats([0.67], [0.58]))
    assert decide(*strong_plain, None) == Polarity(False, "strong", *strong_plain)
    d = decide(strong_plain[1], strong_plain[0], (0.3, 1.2))  # strong network evidence outvotes the histogram
    assert d.invert and d.warning is None
    # weak: margins below the thresholds, or consistency and confidence disagree: kept and warned
    for plain, inv in [(_stats([0.79], [0.63]), _stats([0.83], [0.64])), (_stats([0.9], [0.5]), _stats([0.7], [0.6]))]:
        d = decide(plain, inv, (1.5, 0.4))  # ... even where the histogram says inverted
        assert not d.invert and d.warning and "the histogram suggests inverted" in d.warning
    # a class found in one polarity only counts 0 in the other: mitochondria vanish when inverted
    assert network_vote(_stats([0.97], [0.94]), _stats([math.nan], [math.nan])) == (1, "strong")
    # margins past the thresholds are not enough: an unsure network (a random one's confidence is
    # about 0.5) or tiles that disagree among themselves make the evidence weak
    assert network_vote(_stats([0.84], [0.48]), _stats([0.90], [0.52])) == (-1, "weak")
    from dataclasses import replace

    tiles_p = (_stats([0.9], [0.8]), _stats([0.7], [0.6]))
    tiles_i = (_stats([0.7], [0.6]), _stats([0.9], [0.8]))
    split = replace(_stats([0.92], [0.76]), tiles=tiles_p), replace(_stats([0.67], [0.58]), tiles=tiles_i)
    assert network_vote(*split) == (1, "weak")
    # three tiles of four agreeing are enough; three quarters of a one-tile probe are not (one
    # patch of tissue can fool a network as a whole: em-membrane on the PSSR 8 nm image)
    good, bad = (_stats([0.9], [0.8]),) * 3, (_stats([0.7], [0.6]),)
    four_p, four_i = good + bad, bad * 3 + good[:1]
    tiles = replace(_stats([0.92], [0.76]), tiles=four_p), replace(_stats([0.67], [0.58]), tiles=four_i)
    assert network_vote(*tiles) == (1, "strong")
    quarters = replace(tiles[0], quarters=True), replace(tiles[1], quarters=True)
    assert network_vote(*quarters) == (1, "weak")
    assert "3 of 4 quarters agree" in decide(*quarters, None).describe()
    # nothing found either way: no evidence
    nothing = _stats([math.nan], [math.nan])
    d = decide(nothing, nothing, None)
    assert not d.invert and d.strength == "none" and "no probed tile has anything of the engine's classes" in d.warning
    assert OutputStats.from_toml(strong_plain[0].to_toml("x")) == strong_plain[0]


def test_a_probe_is_cached_by_what_it_reads_and_runs(tmp_path, monkeypatch, random_engine):
    """The same pixels through the same network and settings give the cached probe (no network pass,
    the same decision and evidence); other pixels are another probe; a damaged or unwritable cache
    is passed over."""
    import tilefeet.probe as probe_module

    monkeypatch.setenv("TILEFEET_CACHE", str(tmp_path / "cache"))
    img = _isbi()

    def plan(data):
        return tilefeet.plan_segmentation(data, random_engine, pixel_size_nm="4nm")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PolarityWarning)
        first = plan(img)
        files = sorted((tmp_path / "cache" / "probe").glob("*.json"))
        assert len(files) == 1
        runs: list[int] = []  # probes computed: output statistics of the network's passes
        real_stats = probe_module.output_stats
        monkeypatch.setattr(probe_module, "output_stats", lambda *a, **k: runs.append(1) or real_stats(*a, **k))
        again = plan(img)
        assert again.plan.polarity == first.plan.polarity and again.describe() == first.describe()
        assert not runs  # read from the cache: the network did not run
        plan(img ^ 1)  # every pixel one grey level off
        assert len(sorted((tmp_path / "cache" / "probe").glob("*.json"))) == 2 and runs
        files[0].write_text("{not json")
        assert plan(img).plan.polarity == first.plan.polarity  # recomputed, and written again
        assert files[0].read_text().startswith('{"key"')
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("TILEFEET_CACHE", str(tmp_path / "a-file" / "cache"))  # no folder can be made there, even by root
        runs.clear()
        assert plan(img).plan.polarity == first.plan.polarity and runs  # the probe ran, and nothing failed


def test_the_probe_cache_keeps_the_newest_entries(tmp_path):
    """A cache that sees thousands of sections does not grow without end: beyond
    PROBE_CACHE_ENTRIES the least recently written probes are deleted."""
    import os

    from tilefeet.probe import PROBE_CACHE_ENTRIES, _prune

    for i in range(10):
        p = tmp_path / f"{i:02d}.json"
        p.write_text("{}")
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "other.txt").write_text("")  # not a probe: left alone
    _prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["07.json", "08.json", "09.json", "other.txt"]
    assert PROBE_CACHE_ENTRIES >= 1000
