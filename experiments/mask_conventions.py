#!/usr/bin/env python
"""How wide does each source draw a crack, and what pixel F1 can a perfect model reach on it? (issue 26)

    python experiments/mask_conventions.py --field ../shared/data/field

The sources annotate cracks differently: some a 1-2 px centre line, some the crack's full width, some a
wide band. Leave-one-source-out scores a model, trained on the others' drawings, against the held-out
source's drawing with a 2 px tolerance; a model that finds every crack exactly but draws it the way its
training sources do is still marked down. Here every crack mask is redrawn "perfectly" at a fixed width
(its skeleton, widened to ``w`` px) and scored against the mask as drawn, with the same metric as training
(``models/segmentation.py: tolerant_counts``): the ceiling of pixel F1 for a model that draws ``w`` px wide.
Also the annotated width per source (twice the distance to the background along the skeleton).
Writes results/mask_conventions/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage.morphology import disk, skeletonize

from crack_lightning.files import RESULTS_HELP, results_path, write_results
from crack_lightning.hardware import describe, machine
from crack_lightning.models.segmentation import prf, tolerant_counts

SOURCES = ["rissbilder", "gaps", "aigle", "cracktree"]
WIDTHS = (1, 3, 5, 9, 15, 27)
FOLDS = {"walls (rissbilder)": ["rissbilder"], "gaps": ["gaps"], "pavement (aigle + cracktree)": ["aigle", "cracktree"]}


def redrawn(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's cracks drawn again along their skeleton, ``width`` px wide."""
    skel = skeletonize(mask)
    return skel if width <= 1 else ndimage.binary_dilation(skel, structure=disk(width // 2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", default="../shared/data/field", type=Path)
    ap.add_argument("--results", default=None, help=RESULTS_HELP)
    args = ap.parse_args()
    counts = {s: {w: torch.zeros(4, dtype=torch.float64) for w in WIDTHS} for s in SOURCES}
    widths: dict[str, list[float]] = {s: [] for s in SOURCES}
    for src in SOURCES:
        for f in sorted((args.field / src / "masks").iterdir()):
            mask = np.asarray(Image.open(f).convert("L")) > 127
            if not mask.any():
                continue
            skel = skeletonize(mask)
            widths[src].append(float(np.median(2 * ndimage.distance_transform_edt(mask)[skel])))
            target = torch.from_numpy(mask.astype(np.float32))[None]
            for w in WIDTHS:
                pred = torch.from_numpy(redrawn(mask, w).astype(np.float32))[None]
                counts[src][w] += tolerant_counts(pred, target, 0.5)
    results = {"hardware": machine(), "widths": WIDTHS, "sources": {}, "folds": {}}
    rows, fold_rows = [], []
    for src in SOURCES:
        f1 = {w: prf(counts[src][w])["f1"] for w in WIDTHS}
        results["sources"][src] = {"photos_with_cracks": len(widths[src]),
                                   "median_width_px": float(np.median(widths[src])),
                                   "p90_width_px": float(np.percentile(widths[src], 90)), "ceiling_f1": f1}
        rows.append(f"| {src} | {len(widths[src])} | {np.median(widths[src]):.1f} | {np.percentile(widths[src], 90):.1f} | "
                    + " | ".join(f"{f1[w]:.3f}" for w in WIDTHS) + " |")
    for fold, srcs in FOLDS.items():
        f1 = {w: prf(sum(counts[s][w] for s in srcs))["f1"] for w in WIDTHS}
        results["folds"][fold] = f1
        fold_rows.append(f"| {fold} | " + " | ".join(f"{f1[w]:.3f}" for w in WIDTHS) + " |")
    head = " | ".join(f"drawn {w} px" for w in WIDTHS)
    md = [f"# How each source draws a crack, and the pixel F1 a perfect model can reach ({describe(results['hardware'])})", "",
          "`python experiments/mask_conventions.py`: every crack mask redrawn along its own skeleton at a fixed width "
          "and scored against the mask as drawn (pixel F1, 2 px tolerance, as in training): the best a model can score "
          "on that source if it finds every crack exactly but draws it that wide.", "",
          f"| source | photos with a crack | median width (px) | 90th pct width | {head} |",
          "|---|---|---|---|" + "---|" * len(WIDTHS), *rows, "",
          "The leave-one-source-out folds (all held-out crack pixels pooled):", "",
          f"| held out | {head} |", "|---|" + "---|" * len(WIDTHS), *fold_rows]
    write_results(results_path(args.results, "mask_conventions"), results, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
