#!/usr/bin/env python
"""Leave one source out for crack maps: what a site the segmentation model never saw can expect.

    python experiments/loso_masks.py --field ../shared/data/field --out runs/loso_masks [-- train.py overrides]

One segmentation run (``configs/segment.yaml``) per held-out group: the concrete walls (rissbilder, with
the crack-free walls of concrete_nocrack: walls of a kind never trained on), the GAPs asphalt, the
pavement pair (aigle + cracktree). Each run's test split is its held-out photos only; reported per fold:
pixel precision / recall / F1 with a 2-pixel tolerance, the photo-level answer (accuracy, recall) and
the share of held-out crack-free photos given any crack. A fold whose run folder already holds a
``metrics.json`` is read, not trained again. Writes results/loso_masks/.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from crack_lightning.files import RESULTS_HELP, results_path, write_results
from crack_lightning.hardware import describe, machine

ROOT = Path(__file__).resolve().parent.parent
FOLDS = {"walls": ["rissbilder", "concrete_nocrack"], "gaps": ["gaps"], "pavement": ["aigle", "cracktree"]}
SOURCES = ["rissbilder", "concrete_nocrack", "gaps", "aigle", "cracktree"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", default="../shared/data/field")
    ap.add_argument("--out", default="runs/loso_masks", help="the folds' run folders")
    ap.add_argument("--folds", nargs="*", default=list(FOLDS), choices=list(FOLDS))
    ap.add_argument("--results", default=None, help=RESULTS_HELP)
    ap.add_argument("--rescore", action="store_true",
                    help="a finished fold whose photo rule was chosen on validation photos of one kind only: chosen again "
                         "with the current rule (training/segment.py)")
    args, overrides = ap.parse_known_args()
    results = {"hardware": machine(), "overrides": overrides, "folds": {}}
    roots = [str(Path(args.field) / s) for s in SOURCES]
    for fold in args.folds:
        run = Path(args.out) / fold
        if not (run / "metrics.json").is_file():
            cmd = [sys.executable, "train.py", "--config", "configs/segment.yaml", "--data.root", roots[0],
                   "--data.extra_roots", "[" + ", ".join(roots[1:]) + "]", "--segment.holdout",
                   ",".join(FOLDS[fold]), "--output_dir", args.out, "--run_name", fold, *overrides]
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                return 1
        m = json.loads((run / "metrics.json").read_text())
        rescored = run / "photos_decision.json"  # an earlier --rescore's
        if args.rescore and rescored.is_file():
            m["photos_decision"] = json.loads(rescored.read_text())
        elif args.rescore and not (m.get("photos_decision") or {}).get("val_crack_free"):  # chosen on one kind only
            import yaml

            from crack_lightning.data.segmentation import read_photo_split
            from crack_lightning.inference.segment import load_segmenter
            from crack_lightning.training.segment import photo_decision

            model = load_segmenter(run / "model.pt", engine="torch")
            recipe = yaml.safe_load((run / "config.yaml").read_text())["segment"]["min_crack_px"]
            model.hparams["min_crack_px"] = recipe  # the saved one is the fold's own choice
            m["photos_decision"] = photo_decision(model, read_photo_split(run / "split.csv"))
            rescored.write_text(json.dumps(m["photos_decision"], indent=1))
        results["folds"][fold] = {"held_out": FOLDS[fold], "pixel": m["after"]["test"],
                                  "photos": m.get("photos_decision"), "epochs": m.get("epochs_run"),
                                  "wall_time_s": m.get("wall_time_s")}
    md = [f"# Leave one source out, crack maps ({describe(results['hardware'])})", "",
          "| held out | pixel precision | pixel recall | pixel F1 (2 px) | photo accuracy | crack-free photos flagged |",
          "|---|---|---|---|---|---|"]
    for fold, r in results["folds"].items():
        p, ph = r["pixel"], r["photos"] or {}
        md.append(f"| {' + '.join(r['held_out'])} | {p['precision']:.3f} | {p['recall']:.3f} | **{p['f1']:.3f}** | "
                  f"{ph.get('test_accuracy', float('nan')):.3f} | {ph.get('test_false_alarms', float('nan')):.1%} "
                  f"of {ph.get('test_crack_free', 0)} |")
    write_results(results_path(args.results, "loso_masks"), results, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
