#!/usr/bin/env python
"""Which field photos get flagged, by each way of answering for a whole photo: what a user of
``predict.py PHOTOS`` sees (issue 27). Each answer is scored on the photos its model never trained on.

    python experiments/photo_answers.py --field ../shared/data/field [--limit N]

The field classifier's split is rebuilt exactly (``configs/field_gpu.yaml``: per source, by original
photo, seed 42; each source is split as if alone, so the Mendeley part need not be scanned); the
segmentation model's split is its run's ``split.csv`` (``--seg-split``). A photo "shows a crack" when its
mask has any crack pixel. Answers compared: the whole photo resized to the model's input (what
``predict.py`` did before), the tiles at 224 and 112 px (any tile at or above the threshold: what the
photo answer is now), and the crack map's photo rule. Writes results/photo_answers/.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from crack_lightning.config.schema import DataConfig
from crack_lightning.data.scan import scan_sources
from crack_lightning.data.split import split_records
from crack_lightning.files import RESULTS_HELP, results_path, write_results
from crack_lightning.hardware import describe, machine

SOURCES = ["rissbilder", "concrete_nocrack", "gaps", "aigle", "cracktree"]
PATTERN = r"(Rissbilder_for_Florian_[^_]+|concrete_wall_\d+|GAPS384_[a-z]+_\d{4})"


def classifier_test_photos(field: Path) -> dict[str, str]:
    """photo path -> split of the field classifier (crack_lite0_field.pt)."""
    cfg = DataConfig(root=str(field / SOURCES[0]), extra_roots=[str(field / s) for s in SOURCES[1:]],
                     group_pattern=PATTERN, tile_sizes=[224, 112])
    records, _ = scan_sources(cfg, workers=2)
    out: dict[str, set] = defaultdict(set)
    for r in split_records(records, cfg.val_fraction, cfg.test_fraction, cfg.seed):
        out[r.path].add(r.split)
    return {p: s.pop() if len(s) == 1 else "mixed" for p, s in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", default="../shared/data/field", type=Path)
    ap.add_argument("--seg-split", default="runs/seg_all/split.csv", type=Path)
    ap.add_argument("--limit", type=int, default=0, help="at most this many photos per source (0: all)")
    ap.add_argument("--results", default=None, help=RESULTS_HELP)
    args = ap.parse_args()
    from crack_lightning.data.images import decode_image
    from crack_lightning.inference.localize import localize_array
    from crack_lightning.inference.predictor import Predictor
    from crack_lightning.inference.segment import load_segmenter, segment_array

    cls_split = classifier_test_photos(args.field)
    seg_split = {}
    if args.seg_split.is_file():
        with open(args.seg_split, newline="") as f:
            seg_split = {r["image"]: r["split"] for r in csv.DictReader(f)}
    photos = sorted(p for p, s in cls_split.items() if s == "test" or seg_split.get(p) == "test")
    field_model = Predictor("models/crack_lite0_field.pt")
    mendeley = Predictor("models/crack_lite0.pt")
    seg = load_segmenter(Path("models/crack_seg_lite0.pt"), "cpu", "auto")
    per_source: dict[str, list] = defaultdict(list)
    for path in tqdm(photos, desc="photos"):
        source = Path(path).parts[-3]
        if args.limit and len(per_source[source]) >= args.limit:
            continue
        stem = Path(path).stem
        mask = next((m for m in (Path(path).parent.parent / "masks").glob(stem + ".*")), None)
        cracked = bool(mask is not None and (np.asarray(Image.open(mask).convert("L")) > 127).any())
        image = decode_image(path)
        flagged = {}
        if cls_split[path] == "test":
            for name, m in (("mendeley", mendeley), ("field", field_model)):
                flagged[f"{name}_whole"] = float(m.probabilities(m.preparer()(path)[None])[0]) >= m.threshold
                flagged[f"{name}_tiles"] = bool(localize_array(image, m).crack_tiles)  # 224 + 112 px
        if seg_split.get(path) == "test":
            flagged["crack_map"] = segment_array(image, seg, path).cracked
        per_source[source].append((cracked, flagged))
    answers = ["mendeley_whole", "field_whole", "mendeley_tiles", "field_tiles", "crack_map"]
    table, results = [], {"hardware": machine(), "photos": len(photos), "sources": {}}
    for source, rows in sorted(per_source.items()):
        for cracked in (True, False):
            part = [f for c, f in rows if c == cracked]
            scored = {a: [f[a] for f in part if a in f] for a in answers}
            if not part:
                continue
            rates = {a: (sum(v), len(v)) for a, v in scored.items()}
            results["sources"][f"{source}/{'crack' if cracked else 'no crack'}"] = rates
            table.append(f"| {source} | {'crack' if cracked else 'no crack'} | " +
                         " | ".join(f"{k / n:.0%} ({k}/{n})" if n else "" for k, n in rates.values()) + " |")
    md = [f"# Whole photos flagged, by how the photo is answered ({describe(results['hardware'])})", "",
          "The classifiers' answers on the field classifier's test photos, the crack map's on the segmentation "
          "model's test photos (never trained on). *_whole: the photo resized to 224 px; *_tiles: any tile at 224 or "
          "112 px at the threshold; crack_map: a crack at least the model's min_crack_px long.",
          "Rows with cracks: share flagged = recall; rows without: share flagged = false alarms.", "",
          "| source | photos show | " + " | ".join(answers) + " |", "|---|---|" + "---|" * len(answers),
          *table]
    write_results(results_path(args.results, "photo_answers"), results, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
