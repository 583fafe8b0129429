"""The membrane engines side by side, scored the way the generalization study scores.

For each engine (default: ``isbi-membrane`` v2 and ``em-membrane``), with tilefeet's defaults:

- ISBI held-out slices 24–29 (4 nm): membrane F1, F1 within 1 px, the cells' adapted Rand error;
- the same montage downsampled to 8 nm (antialiased) and segmented at its true 8 nm (resolution
  normalization) and forced to 4 nm (what ignoring the pixel size gives), scored within 1 px on the
  4 nm grid: the issue's resolution test (normalized should beat forced by ≥ 0.05);
- Lucchi's 5 test slices at 5 nm, and forced to 4 nm: F1, F1 within 1 px, cells' ARE;
- the PSSR 2 nm / 8 nm pair: agreement (no labels: consistency, not accuracy).

Which of these are held out depends on the engine: ``isbi-membrane`` never saw Lucchi; ``em-membrane``
trained on both labelled datasets, so only PSSR is zero-shot for it. The JSON says so per row.

    python benchmarks/membrane_engines.py --out benchmarks/results/membrane-engines.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization import DATA, Targets, _segment, load_targets, score_isbi, score_lucchi, score_pssr

from tilefeet.metrics import tolerant_metrics

#: engine -> the datasets it trained on (so a row can say whether it is held out)
TRAINED_ON = {"isbi-membrane": ("isbi",), "em-membrane": ("isbi", "lucchi")}


def score_isbi_8nm(targets: Targets, engine: str, *, normalize: bool) -> dict:
    """The held-out ISBI montage at 8 nm, its membranes brought back to the 4 nm grid and scored within 1 px."""
    from skimage.transform import resize

    img, truth = targets.isbi
    small = (img.shape[0] // 2, img.shape[1] // 2)
    lo = np.clip(np.round(resize(img.astype(np.float64), small, order=1, anti_aliasing=True, preserve_range=True)), 0, 255).astype(np.uint8)
    t0 = time.perf_counter()
    p = _segment(lo, engine, pixel_size_nm="8nm" if normalize else "4nm")
    p = resize(p, truth.shape, order=1, preserve_range=True)
    pred = p >= 0.5
    return {"f1_1px": tolerant_metrics(pred, truth, 1.0).f1, "seconds": time.perf_counter() - t0}


def score_engine(targets: Targets, engine: str) -> dict:
    seen = TRAINED_ON.get(engine, ())
    out: dict = {"engine": engine, "trained_on": list(seen)}
    if Path(engine).is_dir():
        from tilefeet.engine import load_engine

        out["weights_sha256"] = load_engine(engine).weights_digest
    out["isbi"] = {**score_isbi(targets, engine), "held_out": "slices 24-29 (in-domain)"}
    for norm in (True, False):
        out[f"isbi_8nm_{'normalized' if norm else 'forced_4nm'}"] = score_isbi_8nm(targets, engine, normalize=norm)
        out[f"lucchi_{'5nm' if norm else 'forced_4nm'}"] = {
            **score_lucchi(targets, engine, normalize=norm), "zero_shot": "lucchi" not in seen}
        out[f"pssr_{'normalized' if norm else 'forced_4nm'}"] = {**score_pssr(targets, engine, normalize=norm), "zero_shot": True}
    out["resolution_gain_1px"] = out["isbi_8nm_normalized"]["f1_1px"] - out["isbi_8nm_forced_4nm"]["f1_1px"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="isbi-membrane,em-membrane")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "membrane-engines.json")
    ap.add_argument("--trained-on", action="append", default=[], metavar="ENGINE=DATASETS",
                    help="what an engine not in TRAINED_ON was trained on, e.g. /tmp/x=isbi+lucchi (repeatable)")
    args = ap.parse_args(argv)
    for spec in args.trained_on:
        name, _, sets = spec.partition("=")
        TRAINED_ON[name] = tuple(sets.split("+"))
    targets = load_targets(args.data)
    rows = []
    for engine in args.engines.split(","):
        rows.append(score_engine(targets, engine))
        r = rows[-1]
        print(f"{engine:<16} ISBI F1 {r['isbi']['f1']:.3f} (1 px {r['isbi']['f1_1px']:.3f}, ARE {r['isbi']['adapted_rand_error']:.3f})  "
              f"8 nm: normalized {r['isbi_8nm_normalized']['f1_1px']:.3f} forced {r['isbi_8nm_forced_4nm']['f1_1px']:.3f}  "
              f"Lucchi F1 {r['lucchi_5nm']['f1']:.3f} (1 px {r['lucchi_5nm']['f1_1px']:.3f}, ARE {r['lucchi_5nm']['adapted_rand_error']:.3f}; "
              f"forced 1 px {r['lucchi_forced_4nm']['f1_1px']:.3f})  PSSR agreement {r['pssr_normalized']['agreement_f1']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
