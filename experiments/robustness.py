#!/usr/bin/env python
"""Robustness evaluation: clean test split, controlled shifts, out-of-domain recall; several models side by side.

    python experiments/robustness.py --split runs/mendeley_lite0/split.csv \\
        --model plain=runs/mendeley_lite0/model.pt --model robust=runs/mendeley_robust/model.pt \\
        --ood ../shared/data/masonry_crack

Writes results/robustness/robustness.json and results/robustness/robustness.md. The OOD folder is only ever
evaluated (never trained or tuned on); its false-positive counterpart is the
clean test negatives.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from crack_lightning.data.records import read_split_csv
from crack_lightning.files import RESULTS_HELP as OUT_HELP
from crack_lightning.files import results_path, write_results
from crack_lightning.hardware import machine as hardware
from crack_lightning.inference.predictor import Predictor
from crack_lightning.inference.robustness import evaluate, ood_files, table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True, help="split.csv of a run; its test rows are evaluated")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    ap.add_argument("--ood", default=None, help="crack-only out-of-domain folder (recall)")
    ap.add_argument("--per-class", type=int, default=500, help="test images per class (0 = all)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=None, help=OUT_HELP)
    args = ap.parse_args()
    args.out = str(results_path(args.out, "robustness"))  # resolved once: every write goes to one file

    test = [r for r in read_split_csv(Path(args.split)) if r.split == "test"]
    rng = random.Random(0)
    chosen = []
    for label in (0, 1):
        mine = [r for r in test if r.label == label]
        rng.shuffle(mine)
        chosen += mine[: args.per_class] if args.per_class else mine
    paths, labels = [r.path for r in chosen], [r.label for r in chosen]
    ood = ood_files(args.ood) if args.ood else []
    results, seconds = {}, {}
    for spec in args.model:
        name, _, ckpt = spec.partition("=")
        t0 = time.perf_counter()
        results[name] = evaluate(Predictor(ckpt, num_workers=args.workers), paths, labels, ood)
        results[name]["checkpoint"] = ckpt
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: clean acc {results[name]['clean']['acc']:.4f}, shift mean acc "
              f"{results[name]['shift_mean']['acc']:.4f}, ood recall {results[name].get('ood', {}).get('recall')}",
              flush=True)
    out = {"hardware": hardware(), "test_images": len(paths), "ood_images": len(ood), "seconds": seconds,
           "models": results}
    write_results(args.out, out, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
