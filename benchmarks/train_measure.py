"""Another lab's data: how far a few annotated slices take you, fine-tuned from an engine or trained
from scratch, against using an engine zero-shot. For each of the project's datasets as the target:

- **Lucchi** (FIB-SEM, 5 nm, membrane masks): fine-tune a membrane engine (``--from``) on 1 and on 3
  annotated training slices; train from scratch on the same slices with the same budget.
- **ISBI** (ssTEM, 4 nm): the membrane engines are trained on ISBI, so the transfer source is the
  other lab's engine, ``lucchi-mito`` (mitochondria, FIB-SEM): fine-tuned with a new output layer
  (``--new-head``) on 1 and 3 ISBI training slices, against scratch on the same slices.
- **PSSR** (tSEM, no labels): nothing to fine-tune on; the engines' 2 nm / 8 nm agreement.

Every trained engine and every zero-shot engine is scored on all three targets the way
``benchmarks/generalization.py`` scores (true pixel sizes, intensity ``bundle``); training uses
``tilefeet.train.train_from_zarr`` on OME-Zarr written from the PNGs, with its defaults: a 2-D
slice holds out the last 10 % of its width for validation (the best validation step is kept),
fine-tuning takes ``FINETUNE_DEFAULTS``; scratch runs get the same steps and batch with the
scratch learning rate. Times are wall-clock training seconds on this machine (see ``note``).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/train_measure.py \\
        --zero-shot old=/path/to/old/isbi-membrane --zero-shot new=engines/isbi-membrane \\
        --parent new=engines/isbi-membrane
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
from generalization import DATA, load_targets, score_all

#: Annotated slices per target: the first n of each list (spread through the volume).
LUCCHI_SLICES = ("training0000", "training0061", "training0135")
ISBI_SLICES = ("0", "10", "20")


def write_slices(data: Path, target: str, names: tuple[str, ...], tmp: Path) -> list:
    """Each slice and its membrane mask as OME-Zarr at its true pixel size (one dataset per slice)."""
    import imageio.v3 as iio

    from tilefeet.convert import write_image
    from tilefeet.training_data import DataSpec

    specs = []
    for n in names:
        if target == "lucchi":
            img = iio.imread(data / "lucchi" / "train" / "slices" / f"{n}.png")
            mask = iio.imread(data / "lucchi" / "train" / "membranes" / f"{n}.png") > 127
            px = (5.0, 5.0)
        else:
            img = iio.imread(data / "isbi2012" / "train" / "image" / f"{n}.png")
            mask = iio.imread(data / "isbi2012" / "train" / "label" / f"{n}.png") < 128
            px = (4.0, 4.0)
        image = write_image(img, tmp / f"{target}-{n}.ome.zarr", px)
        labels = write_image(mask.astype(np.uint8), tmp / f"{target}-{n}-membrane.ome.zarr", px)
        specs.append(DataSpec(str(image), (str(labels),)))
    return specs


def train(specs: list, out: Path, parent: str | None, new_head: bool, steps: int | None, seed: int, freeze_encoder: bool = False):
    from tilefeet.train import FINETUNE_DEFAULTS, train_from_zarr

    options = {"steps": steps or FINETUNE_DEFAULTS["steps"], "batch_size": FINETUNE_DEFAULTS["batch_size"],
               "val_every": FINETUNE_DEFAULTS["val_every"], "seed": seed, "device": "cpu", "freeze_encoder": freeze_encoder}
    t0, c0 = time.perf_counter(), time.process_time()
    result = train_from_zarr(None, [], out, data=specs, parent=parent, new_head=new_head, classes=["membrane"], progress=False, **options)
    return result, time.perf_counter() - t0, time.process_time() - c0


def table(rows: list[dict]) -> str:
    out = ["| target | method | annotated slices | F1 on the target | training time |", "|---|---|---:|---:|---:|"]
    key = {"isbi": "isbi_f1", "lucchi": "lucchi_f1", "pssr": "pssr_agreement_f1"}
    for r in rows:
        t = f"{r['train_seconds'] / 60:.1f} min" if r.get("train_seconds") else "—"
        out.append(f"| {r['target']} | {r['method']} | {r.get('slices', 0)} | {r[key[r['target']]]:.3f} | {t} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--zero-shot", action="append", default=[], metavar="NAME=ENGINE", help="an engine to score as is (repeatable)")
    ap.add_argument("--parent", action="append", default=[], metavar="NAME=ENGINE", help="a membrane engine to fine-tune on Lucchi (repeatable)")
    ap.add_argument("--isbi-parent", default="lucchi-mito", help="the engine fine-tuned (new head) on ISBI slices")
    ap.add_argument("--slices", nargs="*", type=int, default=[1, 3])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: FINETUNE_DEFAULTS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="run only these row ids")
    ap.add_argument("--tta", type=int, default=None, help="also score every zero-shot engine with segment --tta N")
    ap.add_argument("--frozen", action="store_true", help="also fine-tune each --parent on 1 Lucchi slice with --freeze-encoder")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default: results/train-measure-<this CPU>.json)")
    args = ap.parse_args()

    import torch

    from tilefeet.bench import device_name

    torch.set_num_threads(args.threads)
    if args.out is None:
        from bench_runners import slug

        args.out = Path(__file__).parent / "results" / f"train-measure-{slug(device_name('cpu'))}.json"
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    doc.update(device=device_name("cpu"), threads=args.threads,
               note="shared 2-core machine (other jobs ran at the same time): training under nice -n 10 with one torch thread; "
                    "times are upper bounds for an idle machine")
    targets = load_targets(args.data)
    done = {r["id"] for r in doc["rows"]}

    cache: dict[str, dict] = {}

    def record(row: dict, engine, tta: int = 1) -> None:
        if isinstance(engine, str):  # a zero-shot engine: scored once for its three rows
            key = f"{engine}-tta{tta}"
            cache[key] = cache.get(key) or score_all(targets, engine, threads=args.threads, tta=tta)
            row.update(cache[key])
        else:
            row.update(score_all(targets, engine, threads=args.threads))
        doc["rows"] = [r for r in doc["rows"] if r["id"] != row["id"]] + [row]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    jobs = []
    for spec in args.zero_shot:
        name, engine = spec.split("=", 1)
        for target in ("isbi", "lucchi", "pssr"):
            jobs.append({"id": f"zero-shot-{name}-{target}", "target": target, "method": f"zero-shot {name}", "engine": engine})
            if args.tta:
                jobs.append({"id": f"zero-shot-{name}-tta{args.tta}-{target}", "target": target,
                             "method": f"zero-shot {name}, --tta {args.tta}", "engine": engine, "tta": args.tta})
    for n in args.slices:
        for spec in args.parent:
            name, engine = spec.split("=", 1)
            jobs.append({"id": f"ft-{name}-lucchi-{n}", "target": "lucchi", "method": f"fine-tuned from {name}", "slices": n,
                         "parent": engine})
            if args.frozen and n == 1:
                jobs.append({"id": f"ft-{name}-frozen-lucchi-{n}", "target": "lucchi", "method": f"fine-tuned from {name}, --freeze-encoder",
                             "slices": n, "parent": engine, "freeze_encoder": True})
        jobs.append({"id": f"scratch-lucchi-{n}", "target": "lucchi", "method": "from scratch", "slices": n, "parent": None})
        jobs.append({"id": f"ft-{args.isbi_parent}-isbi-{n}", "target": "isbi", "method": f"fine-tuned from {args.isbi_parent} (new head)",
                     "slices": n, "parent": args.isbi_parent, "new_head": True})
        jobs.append({"id": f"scratch-isbi-{n}", "target": "isbi", "method": "from scratch", "slices": n, "parent": None})
    for job in jobs:
        if job["id"] in done or (args.only is not None and job["id"] not in args.only):
            continue
        if "engine" in job:
            record(dict(job), job["engine"], job.get("tta", 1))
            continue
        with tempfile.TemporaryDirectory() as d:
            names = (LUCCHI_SLICES if job["target"] == "lucchi" else ISBI_SLICES)[: job["slices"]]
            specs = write_slices(args.data, job["target"], names, Path(d))
            result, seconds, cpu = train(specs, Path(d) / "engine", job["parent"], job.get("new_head", False), args.steps, args.seed,
                                    job.get("freeze_encoder", False))
            row = {**job, "annotated": list(names), "steps": result.bundle.raw["training"]["steps"], "train_seconds": seconds, "train_cpu_seconds": cpu,
                   "best_step": result.best_step, "validation": [h["val_f1"][0] for h in result.history]}
            record(row, result.bundle)
    print(table(sorted(doc["rows"], key=lambda r: (r["target"], r["id"]))))


if __name__ == "__main__":
    main()
