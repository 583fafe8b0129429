"""What each domain randomization adds to cross-dataset scores: short training runs of the membrane
network on ISBI (slices 0–20, validation 21–23, as the shipped engine), with and without each
randomization group, scored zero-shot on the project's other data the way
``benchmarks/generalization.py`` scores (true pixel sizes, intensity ``bundle``):

- ISBI held-out slices 24–29 (in-domain): membrane pixel F1;
- Lucchi FIB-SEM test slices at 5 nm: membrane pixel F1, boundary F1, the cells' adapted Rand error;
- the PSSR 2 nm / 8 nm pair: agreement F1.

Variants: ``none`` (flips and rotations only), ``legacy`` (the first engines' recipe: light intensity
jitter and zoom 0.8–1.25), ``all`` (every group of :mod:`tilefeet.augment` + zoom 0.8–1.25),
``all-X`` (all but group X; ``all-scale`` turns zoom off), ``all+widescale`` (zoom 0.6–1.6), and
``all+lucchi`` (several datasets: ISBI and the Lucchi membrane training slices resampled 5 → 4 nm,
drawn 1 : 1; Lucchi is then no longer zero-shot, PSSR still is). Each variant runs for several
seeds; the table gives the mean and the spread (max − min) across seeds.

Every run is appended to the JSON as it finishes, and a rerun skips runs already there, so the
script can be stopped and restarted. Run with one torch thread on a shared machine:

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/train_ablation.py --seeds 0 1 --steps 600
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization import DATA, Targets, load_targets, score_all

from tilefeet.augment import ALL, parse_augment

#: variant -> (augment spec, zoom range, extra datasets)
VARIANTS: dict[str, tuple[str, tuple[float, float], tuple[str, ...]]] = {
    "none": ("none", (1.0, 1.0), ()),
    "legacy": ("legacy", (0.8, 1.25), ()),
    "all": ("all", (0.8, 1.25), ()),
    **{f"all-{g}": (f"all,-{g}", (0.8, 1.25), ()) for g in ALL},
    "all-scale": ("all", (1.0, 1.0), ()),
    "all+widescale": ("all", (0.6, 1.6), ()),
    "all+lucchi": ("all", (0.8, 1.25), ("lucchi",)),
}


def isbi_training(data: Path) -> dict:
    """ISBI slices 0–20 (training) and 21–23 (validation), membrane = label below 128."""
    import imageio.v3 as iio

    def load(ids):
        imgs = [iio.imread(data / "isbi2012" / "train" / "image" / f"{i}.png") for i in ids]
        masks = [(iio.imread(data / "isbi2012" / "train" / "label" / f"{i}.png") < 128).astype(np.uint8)[None] for i in ids]
        return imgs, masks

    (ti, tm), (vi, vm) = load(range(21)), load(range(21, 24))
    return {"images": ti, "masks": tm, "val_images": vi, "val_masks": vm}


def lucchi_training(data: Path, names: list[str] | None = None, val: tuple[str, ...] = ("training0162", "training0163", "training0164")) -> dict:
    """Lucchi training slices (all but ``val``, or ``names``) with membrane masks, resampled 5 → 4 nm."""
    import imageio.v3 as iio

    from tilefeet.training_data import resample

    folder = data / "lucchi" / "train"
    every = sorted(p.stem for p in (folder / "slices").glob("*.png"))
    names = names if names is not None else [n for n in every if n not in val]

    def load(ids):
        out = [resample(iio.imread(folder / "slices" / f"{n}.png"), (iio.imread(folder / "membranes" / f"{n}.png") > 127)[None].astype(np.uint8),
                        (5.0, 5.0), (4.0, 4.0)) for n in ids]
        return [a for a, _ in out], [m for _, m in out]

    (ti, tm), (vi, vm) = load(names), load(list(val))
    return {"images": ti, "masks": tm, "val_images": vi, "val_masks": vm}


def train_variant(variant: str, seed: int, steps: int, batch: int, sets: dict[str, dict], out: Path):
    from tilefeet.train import TrainConfig, train_engine

    spec, zoom, extra = VARIANTS[variant]
    names = ("isbi", *extra)
    parts = [sets[n] for n in names]
    config = TrainConfig(name=f"ablation-{variant}-{seed}", pixel_size_nm=(4.0, 4.0), classes=("membrane",), steps=steps,
                         batch_size=batch, val_every=max(1, steps // 3), seed=seed, scale_jitter=zoom, augment=parse_augment(spec),
                         device="cpu")
    return train_engine(
        [a for p in parts for a in p["images"]], [m for p in parts for m in p["masks"]], out, config,
        val_images=[a for p in parts for a in p["val_images"]], val_masks=[m for p in parts for m in p["val_masks"]],
        dataset=[i for i, p in enumerate(parts) for _ in p["images"]], val_dataset=[i for i, p in enumerate(parts) for _ in p["val_images"]],
        dataset_weights=[1.0] * len(parts), progress=False,
    )


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and spread (max − min) across seeds, per variant, in VARIANTS order."""
    keys = ("isbi_f1", "lucchi_f1", "lucchi_boundary_f1", "lucchi_are", "lucchi_membrane_fraction", "pssr_agreement_f1",
            "pssr_correlation", "pssr_membrane_fraction_2nm", "pssr_membrane_fraction_8nm", "train_seconds")
    rows = []
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        if rs:
            have = [k for k in keys if all(k in r for r in rs)]
            rows.append({"variant": v, "seeds": len(rs), **{k: float(np.mean([r[k] for r in rs])) for k in have},
                         **{f"{k}_spread": float(np.ptp([r[k] for r in rs])) for k in have}})
    return rows


def table(rows: list[dict]) -> str:
    """Mean ± half the spread across seeds; Δ against ``all``."""
    base = next((r for r in rows if r["variant"] == "all"), None)
    cols = [("isbi_f1", "ISBI held-out F1"), ("lucchi_f1", "Lucchi F1"), ("lucchi_boundary_f1", "Lucchi boundary F1"),
            ("lucchi_are", "Lucchi cells ARE ↓"), ("lucchi_membrane_fraction", "Lucchi membrane fraction (truth 0.216)"),
            ("pssr_agreement_f1", "PSSR agreement F1"), ("pssr_correlation", "PSSR correlation"),
            ("pssr_membrane_fraction_2nm", "PSSR membrane 2 nm / 8 nm")]
    out = ["| variant | seeds | " + " | ".join(c for _, c in cols) + " | Δ Lucchi F1 vs all | Δ PSSR correlation vs all |",
           "|---|---:|" + "---:|" * (len(cols) + 2)]

    def cell(r: dict, k: str) -> str:
        if k not in r:
            return "—"
        if k == "pssr_membrane_fraction_2nm":
            return f"{r[k]:.3f} / {r.get('pssr_membrane_fraction_8nm', float('nan')):.3f}"
        return f"{r[k]:.3f} ± {r[k + '_spread'] / 2:.3f}" if r["seeds"] > 1 else f"{r[k]:.3f}"

    def delta(r: dict, k: str) -> str:
        return f"{r[k] - base[k]:+.3f}" if base and k in r and k in base else "—"

    for r in rows:
        out.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cell(r, k) for k, _ in cols)
                   + f" | {delta(r, 'lucchi_f1')} | {delta(r, 'pssr_correlation')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default: results/train-ablation-<this CPU>.json)")
    ap.add_argument("--no-score", action="store_true", help="train only (score later, in a fresh process, with --score-only)")
    ap.add_argument("--score-only", action="store_true", help="score the bundles already trained, train nothing")
    ap.add_argument("--rescore", action="store_true", help="score runs again that the JSON already holds (after a scoring change)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tilefeet-ablation",
                    help="where the trained bundles are kept (a rerun scores them instead of training again)")
    args = ap.parse_args()

    import torch

    from tilefeet.bench import device_name

    torch.set_num_threads(args.threads)
    if args.out is None:
        from bench_runners import slug

        args.out = Path(__file__).parent / "results" / f"train-ablation-{slug(device_name('cpu'))}.json"
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    doc.update(device=device_name("cpu"), threads=args.threads, steps=args.steps, batch_size=args.batch_size, crop=256,
               note="shared 2-core machine (other jobs ran at the same time); training under nice -n 10, one torch thread")
    targets = load_targets(args.data)
    sets = {"isbi": isbi_training(args.data), "lucchi": lucchi_training(args.data)}
    pending = []
    for seed in args.seeds:  # every variant once before the next seed: partial results stay comparable
        for v in args.variants:
            if not args.rescore and any(r["variant"] == v and r["seed"] == seed and r["steps"] == args.steps for r in doc["runs"]):
                continue
            folder = args.workdir / f"{v}-s{seed}-{args.steps}"
            if not (folder / "result.json").is_file():
                if args.score_only:
                    continue
                t0 = time.perf_counter()
                result = train_variant(v, seed, args.steps, args.batch_size, sets, folder)
                (folder / "result.json").write_text(json.dumps(
                    {"train_seconds": time.perf_counter() - t0, "val_f1": result.best_val_f1[0], "best_step": result.best_step}))
            pending.append((v, seed, folder))
            if not args.no_score:
                pending = [p for p in pending if not _score_run(p, args, targets, doc)]  # scored now, or later if the pipeline fails
    print(table(doc.get("summary", [])))
    if pending:
        print(f"{len(pending)} run(s) trained but not scored; score them with --score-only")


def _score_run(run: tuple, args, targets: Targets, doc: dict) -> bool:
    v, seed, folder = run
    try:
        scores = score_all(targets, str(folder), threads=args.threads)
    except Exception as e:  # the pipeline may be mid-change on a shared checkout: keep training, score later
        print(f"{v} seed {seed}: scoring failed ({type(e).__name__}: {e})", flush=True)
        return False
    info = json.loads((folder / "result.json").read_text())
    entry = {"variant": v, "seed": seed, "steps": args.steps, **info, **scores}
    doc["runs"] = [r for r in doc["runs"] if (r["variant"], r["seed"], r["steps"]) != (v, seed, args.steps)] + [entry]
    doc["summary"] = summarize([r for r in doc["runs"] if r["steps"] == args.steps])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"{v:<16} seed {seed}: " + "  ".join(f"{k} {entry[k]:.3f}" for k in
          ("isbi_f1", "lucchi_f1", "lucchi_boundary_f1", "lucchi_are", "pssr_agreement_f1")) + f"  ({entry['train_seconds']:.0f} s)", flush=True)
    return True


if __name__ == "__main__":
    main()
