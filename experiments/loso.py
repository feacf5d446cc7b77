#!/usr/bin/env python
"""Leave one field source out: what a user at a site the model has never seen can expect.

    python experiments/loso.py --mendeley ../shared/data/mendeley --field ../shared/data/field \
        --masonry ../shared/data/masonry_crack --config configs/field.yaml

For each held-out group (rissbilder, gaps, and aigle + cracktree pooled as "pavement") a model is
trained with configs/field.yaml on Mendeley (a seeded subset, --mendeley-per-class) plus every other
field source; the rissbilder fold also holds out concrete_nocrack (both are concrete walls). Each model
is then tested on its held-out tiles by the issue's protocol: the four 224x224 tiles of each 448x448
photo, crack = >= 0.5 % crack pixels, no crack = no crack pixel within the tile grown by 8 px. Reported
per fold: precision, recall, F1 (at the model's stored threshold), the false-alarm rate on the crack-free
walls (rissbilder fold), the accuracy on the run's Mendeley test patches and the recall on the masonry
set (evaluation only). Writes results/loso/. Nothing here is tuned on the held-out data.

Fold ``all`` holds nothing out: the candidate release, trained on every source (scored on the
Mendeley test patches and the masonry set only). Training and scoring can run apart, e.g. train on
a lent GPU (``--train-only``) and score here (``--runs rissbilder=DIR gaps=DIR ...``).
``--mendeley-test split.csv`` scores every model on the test rows of a full Mendeley run (the
released model's split; the GPU side is then given only its train/val patches, see
``tools/pack_data.py --exclude-test``).
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
from crack_lightning.config.files import load_config
from crack_lightning.data.scan import list_images
from crack_lightning.data.tiles import TileRule, scan_mask_root
from crack_lightning.files import RESULTS_HELP as OUT_HELP
from crack_lightning.files import results_path, write_results
from crack_lightning.hardware import machine as hardware
from crack_lightning.inference.calibrate import site_threshold
from crack_lightning.inference.predictor import Predictor
from crack_lightning.models.metrics import binary_metrics
from crack_lightning.training.recipe import train

FIELD = ("rissbilder", "concrete_nocrack", "gaps", "aigle", "cracktree")
FOLDS = {"rissbilder": ("rissbilder", "concrete_nocrack"), "gaps": ("gaps",), "pavement": ("aigle", "cracktree"),
         "all": ()}
EVAL_RULE = TileRule(sizes=(224,), crack_fraction=0.005, clear_margin=8)


def mendeley_subset(root: Path, per_class: int, out: Path) -> Path:
    """A seeded subset of the Mendeley folders as symbolic links (the data stays read-only where it is)."""
    rng = random.Random(0)
    for cls in ("Negative", "Positive"):
        files = list_images(root / cls)
        rng.shuffle(files)
        (out / cls).mkdir(parents=True, exist_ok=True)
        for f in files[:per_class]:
            (out / cls / f.name).symlink_to(f.resolve())
    return out


def tile_batches(pre, roots: list[Path], batch: int = 64) -> tuple[list, Iterator[torch.Tensor]]:
    """Every evaluation tile of ``roots`` (the issue's protocol, :data:`EVAL_RULE`): their records, and
    their eval-transformed images in batches of ``batch``, in record order."""
    from crack_lightning.data.loaders import ImageDataset
    from crack_lightning.data.transforms import eval_transform

    records = [r for root in roots for r in scan_mask_root(root, EVAL_RULE)[0]]
    ds = ImageDataset(records, eval_transform(pre))
    return records, (torch.stack([ds[i][0] for i in range(s, min(s + batch, len(ds)))])
                     for s in range(0, len(ds), batch))


@torch.inference_mode()
def tile_probabilities(predictor: Predictor, roots: list[Path]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Probabilities, labels and photo paths of every evaluation tile of ``roots``."""
    records, batches = tile_batches(predictor.pre, roots)
    probs = torch.cat([predictor.probabilities(b) for b in batches])
    return probs, torch.tensor([float(r.label) for r in records]), [r.path for r in records]


def site_calibration(walls: torch.Tensor, photos: list[str], probs: torch.Tensor, labels: torch.Tensor,
                     stored: float = 0.0, counts: tuple[int, ...] = (5, 10, 20), draws: int = 50,
                     refit=None) -> list[dict]:
    """What a user gets who photographs ``k`` crack-free spots of the new site and calibrates on them
    (``predict.py PHOTOS --calibrate-site``): the false alarms on the site's other crack-free photos, and
    precision/recall/F1 on the held-out crack photos; means over ``draws`` seeded draws of ``k`` photos.
    ``walls``/``probs`` are the scores of the wall and crack-photo tiles. Without ``refit`` the threshold
    alone moves (just above every shown tile, never below ``stored``); with ``refit = (head, anchors,
    walls_x, crack_x)`` (the linear head, the model's stored anchors, the tiles' features) the head is
    first refitted on the anchors plus the shown tiles' features, as ``--calibrate-mode head`` does."""
    from crack_lightning.models.anchors import refit_linear

    names = sorted(set(photos))
    out = []
    for k in counts:
        rows = []
        for draw in range(draws):
            chosen = set(random.Random(draw).sample(names, k))
            mask = torch.tensor([p in chosen for p in photos])
            w_scores, c_scores = walls, probs
            if refit is not None:
                head, anchors, walls_x, crack_x = refit
                weight, bias = refit_linear(head.weight, head.bias, anchors["features"], anchors["labels"],
                                            walls_x[mask])
                w_scores = torch.sigmoid(walls_x @ weight.T + bias).squeeze(1)
                c_scores = torch.sigmoid(crack_x @ weight.T + bias).squeeze(1)
            thr = site_threshold(w_scores[mask].tolist(), stored)
            m = binary_metrics(c_scores, labels, thr)
            rows.append((float((w_scores[~mask] >= thr).float().mean()), m["precision"], m["recall"], m["f1"]))
        mean = [sum(col) / draws for col in zip(*rows)]
        out.append({"photos": k, "draws": draws, "false_alarms": round(mean[0], 4),
                    "false_alarms_worst": round(max(r[0] for r in rows), 4), "precision": round(mean[1], 4),
                    "recall": round(mean[2], 4), "f1": round(mean[3], 4)})
    return out


@torch.inference_mode()
def tile_features(model, roots: list[Path]) -> torch.Tensor:
    """The head's input features of every evaluation tile of ``roots`` (PyTorch, as the refit reads them)."""
    model.eval()
    return torch.cat([model.features(b.to(memory_format=torch.channels_last)).float()
                      for b in tile_batches(model.pre, roots)[1]])


def site_refit_inputs(predictor: Predictor, walls_root: Path, crack_roots: list[Path]):
    """``site_calibration``'s ``refit`` for this model, or None where it stores no anchors (or the
    head is not linear): the head and anchors (float) of the model file, the features of every tile."""
    from crack_lightning.models.anchors import linear_head

    model = predictor.model  # the PyTorch model behind the predictor (scored with ONNX Runtime on a CPU)
    head, anchors = linear_head(model), model.meta.get("site_anchors")
    if head is None or not anchors:
        return None
    anchors = {"features": anchors["features"].float(), "labels": anchors["labels"].float()}
    return head, anchors, tile_features(model, [walls_root]), tile_features(model, crack_roots)


def localize_scores(predictor: Predictor, roots: list[Path], docs_heatmap: str | None = None) -> dict:
    """``predict.py --localize`` (default tiling: 227 px, 50 % overlap) over every held-out photo, each
    tile scored against the photo's mask by the same rule; optionally one heatmap for the docs: the
    held-out photo (of the first root) with the most tiles right on BOTH sides, an example that shows
    what the heatmap separates (it is picked, not typical: the tables are the typical)."""
    from crack_lightning.data.images import decode_image
    from crack_lightning.data.tiles import find_mask, read_mask
    from crack_lightning.inference.localize import localize_array, write_heatmap

    probs, labels, shown = [], [], None
    for root in roots:
        for image_path in sorted((root / "images").iterdir()):
            image = decode_image(image_path)
            mask = read_mask(find_mask(root, image_path), (image.shape[1], image.shape[0]))
            loc = localize_array(image, predictor, name=str(image_path))
            right = {0: 0, 1: 0}
            for t in loc.tiles:
                label = EVAL_RULE.label(mask, t.x, t.y, t.width) if t.width == t.height else None
                if label is not None:
                    probs.append(t.probability)
                    labels.append(float(label))
                    right[label] += int((t.probability >= loc.threshold) == bool(label))
            if docs_heatmap and root == roots[0] and (shown is None or min(right.values()) > shown[2]):
                shown = (loc, image, min(right.values()))
    if docs_heatmap and shown:
        write_heatmap(shown[0], shown[1], Path(docs_heatmap))
    out = scores(torch.tensor(probs), torch.tensor(labels), float(predictor.threshold))
    out["tiling"] = "227 px, stride 113 (predict.py --localize default)"
    return out


def _train_wall(run_dir: Path) -> float | None:
    """The training wall time a ``--train-only`` run wrote next to its model."""
    f = run_dir / "train_wall_s.txt"
    return float(f.read_text()) if f.is_file() else None


def scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    m = binary_metrics(probs, labels, threshold)
    keep = ("n", "precision", "recall", "f1", "acc", "tp", "fp", "fn", "tn")
    return {k: (round(float(m[k]), 4) if isinstance(m[k], float) else int(m[k])) for k in keep if k in m}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mendeley", default="../shared/data/mendeley")
    ap.add_argument("--field", default="../shared/data/field")
    ap.add_argument("--masonry", default="../shared/data/masonry_crack")
    ap.add_argument("--config", default="configs/field.yaml")
    ap.add_argument("--mendeley-per-class", type=int, default=2000)
    ap.add_argument("--folds", nargs="+", default=[f for f in FOLDS if f != "all"], choices=list(FOLDS))
    ap.add_argument("--train-only", action="store_true", help="train the folds, score nothing (e.g. on a GPU host)")
    ap.add_argument("--runs", nargs="*", default=[], metavar="FOLD=RUN_DIR",
                    help="score these finished runs instead of training (their folds)")
    ap.add_argument("--mendeley-test", default=None, metavar="SPLIT_CSV",
                    help="also score every model on the test rows of this Mendeley split.csv")
    ap.add_argument("--output-dir", default="runs/loso")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every fold")
    ap.add_argument("--out", default=None, help=OUT_HELP)
    ap.add_argument("--heatmap", default="docs/field_heatmap.png", help="one held-out photo's heatmap, for the docs")
    ap.add_argument("--heatmap-fold", default="rissbilder")
    args = ap.parse_args()
    args.out = str(results_path(args.out, "loso"))  # resolved once: every write goes to one file

    field = Path(args.field)
    masonry = sorted(p for p in Path(args.masonry).rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    results = {"hardware": hardware(), "config": args.config, "mendeley_per_class": args.mendeley_per_class, "overrides": args.set,
               "folds": {}}
    given = dict(kv.split("=", 1) for kv in args.runs)
    mendeley_test = []
    if args.mendeley_test:
        with open(args.mendeley_test, encoding="utf-8") as f:
            mendeley_test = [(Path(r["path"]), int(r["label"])) for r in csv.DictReader(f) if r["split"] == "test"]
    with tempfile.TemporaryDirectory() as tmp:
        mendeley = None if given else mendeley_subset(Path(args.mendeley), args.mendeley_per_class, Path(tmp) / "mendeley")
        for fold in (list(given) if given else args.folds):
            held = FOLDS[fold]
            extra = [str(field / s) for s in FIELD if s not in held]
            if fold in given:
                run, wall = {"run_dir": given[fold]}, _train_wall(Path(given[fold]))
            else:
                pairs = [("data.root", str(mendeley)), ("data.extra_roots", ",".join(extra)),
                         ("output_dir", args.output_dir), ("run_name", f"{fold}_{time.strftime('%Y%m%d-%H%M%S')}"),
                         ("trainer.enable_progress_bar", "false"), *(kv.split("=", 1) for kv in args.set)]
                cfg = load_config(ROOT / args.config, pairs)
                t0 = time.time()
                run = train(cfg)
                wall = time.time() - t0
                (Path(run["run_dir"]) / "train_wall_s.txt").write_text(f"{wall:.1f}\n")
            if args.train_only:
                print(f"{fold}: trained in {wall:.0f} s -> {run['run_dir']}", flush=True)
                continue
            predictor = Predictor(Path(run["run_dir"]) / "model.pt", num_workers=0)
            thr = float(predictor.threshold)
            crack_roots = [field / s for s in held if s != "concrete_nocrack"]
            row = {"held_out": list(held), "trained_on": ["mendeley"] + [Path(e).name for e in extra],
                   "threshold": round(thr, 4), "train_wall_s": wall}
            if crack_roots:
                probs, labels, _ = tile_probabilities(predictor, crack_roots)
                row["held_out_tiles"] = scores(probs, labels, thr)
            if "concrete_nocrack" in held:
                p0, _, photos = tile_probabilities(predictor, [field / "concrete_nocrack"])
                rate = round(float((p0 >= thr).float().mean()), 4)
                row["false_alarms_crack_free_walls"] = {"n": len(p0), "rate": rate}
                if crack_roots:
                    row["site_calibration"] = site_calibration(p0, photos, probs, labels, thr)
                    refit = site_refit_inputs(predictor, field / "concrete_nocrack", crack_roots)
                    if refit is not None:
                        row["site_head_refit"] = site_calibration(p0, photos, probs, labels, thr, refit=refit)
            with open(Path(run["run_dir"]) / "test_predictions.csv", encoding="utf-8") as f:
                mtest = [r for r in csv.DictReader(f) if r["source"] == "mendeley"]
            row["mendeley_test_acc"] = round(sum(int(r["correct"]) for r in mtest) / max(1, len(mtest)), 4)
            row["mendeley_test_n"] = len(mtest)
            if mendeley_test:
                rows = list(predictor.iter_rows([p for p, _ in mendeley_test], progress=False))
                right = sum(r.label == predictor.class_names[y] for r, (_, y) in zip(rows, mendeley_test))
                row["mendeley_full_test"] = {"n": len(rows), "acc": round(right / len(rows), 4), "split": args.mendeley_test}
            if crack_roots:
                heatmap = args.heatmap if fold == args.heatmap_fold else None
                row["localize"] = localize_scores(predictor, crack_roots, docs_heatmap=heatmap)
            rows = list(predictor.iter_rows(masonry, progress=False))
            row["masonry_recall"] = round(sum(r.label == predictor.class_names[1] for r in rows) / len(rows), 4)
            row["run_dir"] = run["run_dir"]
            results["folds"][fold] = row
            print(fold, row, flush=True)
            write_results(args.out, results, table(results))
    return 0


def table(results: dict) -> str:
    md = ["| held out | tiles (crack / no crack) | precision | recall | F1 | false alarms, crack-free walls "
          "| Mendeley test acc (run split) | Mendeley test acc (full split) | masonry recall | train wall s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    localize_rows: list[str] = []
    for fold, r in results["folds"].items():
        t = r.get("held_out_tiles")
        fa = r.get("false_alarms_crack_free_walls")
        alarms = f"{fa['rate']:.1%} of {fa['n']}" if fa else "-"
        full = r.get("mendeley_full_test")
        full_text = f"{full['acc']:.4f} ({full['n']})" if full else "-"
        if "localize" in r:
            loc = r["localize"]
            localize_rows.append(f"| {fold} | {loc['tp'] + loc['fn']} / {loc['tn'] + loc['fp']} | "
                                 f"{loc['precision']:.3f} | {loc['recall']:.3f} | {loc['f1']:.3f} |")
        tiles = (f"{t['tp'] + t['fn']} / {t['tn'] + t['fp']} | {t['precision']:.3f} | {t['recall']:.3f} "
                 f"| **{t['f1']:.3f}**") if t else "- | - | - | -"
        md.append(f"| {fold} | {tiles} | {alarms} | {r['mendeley_test_acc']:.4f} ({r['mendeley_test_n']}) | "
                  f"{full_text} | {r['masonry_recall']:.3f} | {r['train_wall_s']} |")
    if localize_rows:
        md += ["", "predict.py --localize over the held-out photos (227 px tiles, 50 % overlap), tiles scored "
                   "against the masks:", "", "| held out | tiles (crack / no crack) | precision | recall | F1 |",
               "|---|---|---|---|---|", *localize_rows]
    calibrated = [(fold, mode, c) for fold, r in results["folds"].items()
                  for key, mode in (("site_calibration", "threshold"), ("site_head_refit", "head"))
                  for c in r.get(key, [])]
    if calibrated:
        md += ["", "Site calibration from k crack-free photos of the held-out walls (`--calibrate-mode`): `threshold` "
                   "sets the threshold just above every tile of them (no training); `head` first refits the linear "
                   "head on them plus the model's stored training anchors, then does the same. False alarms on the "
                   "other crack-free photos, scores on the held-out crack photos (means of the draws):", "",
               "| held out | mode | crack-free photos shown | false alarms (worst draw) | precision | recall | F1 |",
               "|---|---|---|---|---|---|---|",
               *(f"| {fold} | {mode} | {c['photos']} | {c['false_alarms']:.1%} ({c['false_alarms_worst']:.1%}) | "
                 f"{c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} |" for fold, mode, c in calibrated)]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
