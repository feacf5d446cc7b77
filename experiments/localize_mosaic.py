#!/usr/bin/env python
"""Localisation benchmark: mosaics of known Mendeley test patches -> tile accuracy, time, memory.

Each mosaic is an 18x13 grid of 227 px patches (4086x2951, ~12 megapixels, the
size of the photos the patches were cut from) drawn from the *test* split of a
run (never seen in training), crack / no-crack cells in a random pattern. With
the tile grid aligned to the patches (stride 227) every tile has a known answer.
The default sliding window (50% overlap) is timed on the same photos.

    python experiments/localize_mosaic.py --split runs/mendeley_lite0/split.csv --mosaics 5
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from crack_lightning.data.images import decode_image
from crack_lightning.data.records import read_split_csv
from crack_lightning.files import RESULTS_HELP as OUT_HELP
from crack_lightning.files import results_path
from crack_lightning.hardware import machine as hardware
from crack_lightning.inference.localize import localize, write_heatmap
from crack_lightning.inference.predictor import Predictor

COLS, ROWS, P = 18, 13, 227


def build_mosaic(pos: list[str], neg: list[str], rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    truth = np.array([[rng.random() < 0.3 for _ in range(COLS)] for _ in range(ROWS)])
    canvas = np.zeros((ROWS * P, COLS * P, 3), np.uint8)
    for (r, c), crack in np.ndenumerate(truth):
        canvas[r * P:(r + 1) * P, c * P:(c + 1) * P] = decode_image(rng.choice(pos if crack else neg))
    return canvas, truth


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True, help="split.csv of a training run (its test rows are used)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--mosaics", type=int, default=5)
    ap.add_argument("--out", default=None, help=OUT_HELP)
    ap.add_argument("--heatmap", default="docs/mosaic_heatmap.png")
    ap.add_argument("--workdir", default="/tmp/crack_mosaics")
    args = ap.parse_args()
    args.out = str(results_path(args.out, "localize_mosaic"))  # resolved once: every write goes to one file

    test = [r for r in read_split_csv(Path(args.split)) if r.split == "test"]
    pos = [r.path for r in test if r.label == 1]
    neg = [r.path for r in test if r.label == 0]
    rng = random.Random(0)
    predictor = Predictor(args.checkpoint, num_workers=0)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    right = total = 0
    times = []
    for i in range(args.mosaics):
        canvas, truth = build_mosaic(pos, neg, rng)
        photo = work / f"mosaic_{i}.png"
        Image.fromarray(canvas).save(photo)
        loc, _ = localize(photo, predictor, tile=P, stride=P)
        for t in loc.tiles:
            right += int((t.probability >= loc.threshold) == truth[t.y // P, t.x // P])
            total += 1
        t0 = time.perf_counter()
        loc, image = localize(photo, predictor)  # default: 50% overlap, as users run it
        times.append(time.perf_counter() - t0)
        if i == 0 and args.heatmap:
            Path(args.heatmap).parent.mkdir(parents=True, exist_ok=True)
            write_heatmap(loc, image, Path(args.heatmap))
        print(f"mosaic {i}: {right}/{total} tiles right so far; overlapped pass {times[-1]:.1f} s "
              f"({len(loc.tiles)} tiles)")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "mosaics": args.mosaics, "photo_size": [COLS * P, ROWS * P], "megapixels": round(COLS * P * ROWS * P / 1e6, 2),
        "aligned_tiles": total, "aligned_tile_accuracy": right / total,
        "seconds_per_photo_overlap50": round(float(np.mean(times)), 2), "tiles_per_photo_overlap50": len(loc.tiles),
        "peak_rss_mb": round(peak_mb), "checkpoint": str(predictor.checkpoint),
        "hardware": hardware(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
