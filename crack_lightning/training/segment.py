"""The segmentation recipe (``task: segment``): annotated photos -> a crack probability per pixel.

The same run folder as the classifier (lock, ``config.yaml``, ``split.csv``, checkpoints every epoch,
``--resume``, early stopping, ``metrics.json``, a release ``model.pt``): one stage that trains the whole
U-Net, evaluated before and after by the pixel F1 with a 2-pixel tolerance, its threshold chosen on
validation.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from crack_lightning.config.files import dump_yaml
from crack_lightning.config.schema import Config
from crack_lightning.data.scan import scan_sources
from crack_lightning.data.segmentation import (
    SegmentationDataModule,
    scan_negatives,
    scan_photos,
    split_photos,
)
from crack_lightning.files import (
    atomic_write,
    csv_path,
    path_text,
    write_json,
    write_text,
)
from crack_lightning.hardware import hardware
from crack_lightning.models.checkpoint import (
    float_weights,
    read_checkpoint,
    save_release,
)
from crack_lightning.models.segmentation import CrackSegmenter
from crack_lightning.training.callbacks import EvaluationResults
from crack_lightning.training.run_folder import is_global_zero, newest_readable
from crack_lightning.training.trainer import make_trainer

STAGE = "segment"


def build_segmenter(cfg: Config) -> CrackSegmenter:
    s, m = cfg.segment, cfg.model
    return CrackSegmenter(encoder=m.backbone, pretrained=m.pretrained, weights_file=m.weights_file,
                          decoder_channels=list(s.decoder_channels), crop_size=s.crop_size, lr=s.lr,
                          weight_decay=s.weight_decay, dice_weight=s.dice_weight, min_crack_px=s.min_crack_px)


def train_segmenter(cfg: Config, run_dir: Path, resume: bool, start: float) -> dict:
    import time

    roots = [cfg.data.root, *cfg.data.extra_roots]
    tiles, _ = scan_sources(cfg.data, workers=max(1, cfg.data.num_workers))  # the classifier's split, by tiles
    splits = split_photos(scan_photos(roots, cfg.data.group_pattern), tiles, cfg.data.val_fraction,
                          cfg.data.test_fraction, cfg.data.seed, cfg.segment.holdout)
    if cfg.segment.negatives:  # crack-free images: training only, never a choice or a score
        splits["train"] += scan_negatives(cfg.segment.negatives, cfg.segment.max_negatives, cfg.data.seed)
    model = build_segmenter(cfg)
    if is_global_zero():
        write_text(run_dir / "config.yaml", dump_yaml(cfg))
        with atomic_write(run_dir / "split.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "mask", "source", "group", "split"])
            w.writerows([csv_path(p.image), csv_path(p.mask) if p.mask else "", p.source, p.group, name]
                        for name, part in splits.items() for p in part)
        print("split: " + ", ".join(f"{name} {len(part)} photos" for name, part in splits.items())
              + f" -> {path_text(run_dir / 'split.csv')}")
    dm = SegmentationDataModule(splits, model.pre, cfg.data.batch_size, cfg.data.num_workers)
    before = _evaluate(cfg, model, dm, run_dir)
    folder = run_dir / "checkpoints" / STAGE
    resume_from, epoch, problems = newest_readable([folder / "last.ckpt", folder / "best.ckpt"]) if resume \
        else (None, -1, [])
    for problem in problems:
        print(f"warning: skipping a damaged checkpoint: {problem}", file=sys.stderr)
    trainer = make_trainer(cfg, run_dir, STAGE, cfg.segment.epochs, cfg.segment.patience, keep_until_epoch=epoch,
                           monitor="val_f1")
    trainer.fit(model, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
    best = next((f for f in (folder / "best.ckpt", folder / "last.ckpt") if f.is_file()), None)
    if best:
        model.load_state_dict(float_weights(read_checkpoint(best)["state_dict"]))
    after = _evaluate(cfg, model, dm, run_dir)  # validation chooses the threshold, then the test
    photos = photo_decision(model, splits)  # validation chooses the shortest crack that flags a photo
    model.hparams["min_crack_px"] = photos["min_crack_px"]
    result = {"run_dir": str(run_dir), "task": "segment", "encoder": cfg.model.backbone, "hardware": hardware(),
              "photos": {k: len(v) for k, v in splits.items()}, "holdout": list(cfg.segment.holdout),
              "before": before, "after": after, "threshold": float(model.threshold), "photos_decision": photos,
              "epochs_run": trainer.current_epoch, "wall_time_s": round(time.time() - start, 1)}
    if is_global_zero():
        save_release(model, run_dir / "model.pt", metrics={"test": after.get("test"), "val": after.get("val"),
                                                          "photos": photos}, task="segment")
        write_json(run_dir / "metrics.json", result)
    return result


def _evaluate(cfg: Config, model: CrackSegmenter, dm: SegmentationDataModule, run_dir: Path) -> dict[str, dict]:
    trainer = make_trainer(cfg, run_dir, None)
    found = next(c for c in trainer.callbacks if isinstance(c, EvaluationResults))
    trainer.validate(model, dm.val_dataloader(), verbose=False)  # chooses the threshold
    trainer.test(model, dm.test_dataloader(), verbose=False)
    return found.results


CRACKED_PX = 50  # a photo whose mask has at least this many crack pixels shows a crack


def longest_cracks(model, photos: list) -> list[tuple[float, bool]]:
    """For each photo: the longest crack the model finds, and whether its mask shows a crack."""
    from crack_lightning.data.images import decode_image
    from crack_lightning.data.tiles import read_mask
    from crack_lightning.measure import clean, measure
    from crack_lightning.models.segmentation import probability_map

    out = []
    model.eval()
    for p in photos:
        image = decode_image(p.image)
        truth = read_mask(Path(p.mask), (image.shape[1], image.shape[0])).sum() >= CRACKED_PX
        cracks = measure(clean(probability_map(image, model) >= float(model.threshold), 8))
        out.append((max((c.length_px for c in cracks), default=0.0), bool(truth)))
    return out


def _balanced(cut: float, pairs) -> float:
    """Mean of the recall on cracked photos and on crack-free ones (of the kinds present)."""
    hits = [length >= cut for length, truth in pairs if truth]
    quiet = [length < cut for length, truth in pairs if not truth]
    parts = [sum(x) / len(x) for x in (hits, quiet) if x]
    return sum(parts) / max(len(parts), 1)


def choose_min_length(val: list[tuple[float, bool]], default: float) -> tuple[float, bool]:
    """The shortest crack that flags a photo, by balanced accuracy on ``val`` (longest crack, shows a crack)
    pairs, the shorter on a tie; and whether it was chosen. A choice needs both kinds of photo: with no
    crack-free one every cut down to 1 px looks perfect (a leave-one-source-out fold whose crack-free walls
    are all held out), so ``default`` (the recipe's) stays."""
    if len({truth for _, truth in val}) < 2:
        return float(default), False
    candidates = sorted({1.0, *(max(1.0, length + 0.5) for length, _ in val)})
    return max(candidates, key=lambda c: (_balanced(c, val), -c)), True


def photo_decision(model, splits: dict[str, list]) -> dict:
    """The photo-level answer (a crack at least ``min_crack_px`` long): the length chosen on the validation
    photos by balanced accuracy (:func:`choose_min_length`: most photos show cracks, and plain accuracy would
    trade every false alarm away); then scored on the test photos, crack-free ones apart."""
    val = longest_cracks(model, splits["val"])
    cut, chosen = choose_min_length(val, model.hparams.get("min_crack_px", 40))
    test = longest_cracks(model, splits["test"])
    clear = [length for length, truth in test if not truth]
    cracked = [length for length, truth in test if truth]
    accuracy = sum((length >= cut) == truth for length, truth in test) / max(len(test), 1)
    return {"min_crack_px": round(cut, 1), "chosen_on": "validation" if chosen else "recipe (validation lacks a kind)",
            "val_balanced_accuracy": round(_balanced(cut, val), 4),
            "val_photos": len(val), "val_crack_free": sum(not t for _, t in val),
            "test_accuracy": round(accuracy, 4), "test_balanced_accuracy": round(_balanced(cut, test), 4),
            "test_photos": len(test), "test_recall": round(sum(x >= cut for x in cracked) / max(len(cracked), 1), 4),
            "test_crack_free": len(clear),
            "test_false_alarms": round(sum(x >= cut for x in clear) / max(len(clear), 1), 4)}
