#!/usr/bin/env python
"""Choose a finished segmentation run's pixel threshold (over the recipe's whole grid, 0.02-0.90) and its
photo-level rule (the shortest crack that flags a photo) on its validation photos, score both on its
test photos, and write the model with them (runs trained before the recipe chose them this way).

    python tools/photo_rule.py --run runs/seg_all --output models/crack_seg_lite0.pt
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crack_lightning.cli.guard import guarded


def run(args: argparse.Namespace) -> int:
    from crack_lightning.data.segmentation import read_photo_split
    from crack_lightning.errors import ConfigError
    from crack_lightning.files import write_json
    from crack_lightning.inference.segment import load_segmenter
    from crack_lightning.models.checkpoint import read_checkpoint, save_release
    from crack_lightning.training.segment import photo_decision

    run_dir, out = Path(args.run), Path(args.output)
    if out.exists():
        raise ConfigError(f"{out} exists: choose a new --output file")
    splits = read_photo_split(run_dir / "split.csv")
    model = load_segmenter(run_dir / "model.pt", engine="torch")
    pixel = pixel_scores(model, splits)
    decision = photo_decision(model, splits)
    model.hparams["min_crack_px"] = decision["min_crack_px"]
    metrics = dict(read_checkpoint(run_dir / "model.pt").get("metrics") or {})
    metrics.update(pixel, photos=decision)
    save_release(model, out, metrics=metrics, task="segment")
    summary = json.loads((run_dir / "metrics.json").read_text())
    summary["photos_decision"] = decision
    summary["after"] = pixel
    write_json(out.with_suffix(".metrics.json"), summary)
    print(json.dumps({"pixel": pixel, "photos": decision}, indent=1))
    return 0


def pixel_scores(model, splits: dict) -> dict:
    """The threshold with the best validation pixel F1 (2 px tolerance) over the recipe's grid, set on the
    model; pixel precision, recall and F1 of validation and test at it."""
    import torch

    from crack_lightning.data.segmentation import MaskedPhotos
    from crack_lightning.models.segmentation import THRESHOLDS, prf, tolerant_counts

    def counts(photos):
        total = 0
        for x, y in MaskedPhotos(photos, model.pre):
            with torch.inference_mode():
                probs = model.probabilities(x[None])
            total = total + torch.stack([tolerant_counts(probs, y[None], t) for t in THRESHOLDS])
        return total

    val = counts(splits["val"])
    best = max(range(len(THRESHOLDS)), key=lambda i: prf(val[i])["f1"])
    model.threshold.fill_(THRESHOLDS[best])
    test = counts(splits["test"])
    return {"val": {**prf(val[best]), "threshold": THRESHOLDS[best]},
            "test": {**prf(test[best]), "threshold": THRESHOLDS[best]}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--output", required=True)
    sys.exit(guarded(lambda: run(ap.parse_args())))
