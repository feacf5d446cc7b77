"""What ``predict.py`` reads and writes, known before any model is loaded (torch-free): the inputs a
command line names, the default model, and the names and headers of every output file, so each
output is checked before any work and recognised later as ours.
"""
from __future__ import annotations

import glob
import sys
from pathlib import Path
from typing import Sequence

from crack_lightning.data.images import is_image_file, list_images
from crack_lightning.errors import InputError

RELEASE_NAME = "crack_lite0.pt"
# the shipped classifiers by short name (``--model NAME``); "site", the default, answers a patch with the
# Mendeley model and a photo from the tiles of the photo model (models/README.md)
MODELS = {"mendeley": RELEASE_NAME, "field": "crack_lite0_field.pt"}
PHOTO_MODEL = "crack_lite0_site.pt"  # the field model with hard negatives and a photo-level threshold
DEFAULT_MODEL = "site"
MODEL_NAMES = (DEFAULT_MODEL, *MODELS)


def default_checkpoint(checkout: Path | None = None, prefix: Path | None = None) -> Path:
    """The released model: ``models/`` of the checkout (a clone or an editable install), else the
    copy a regular install places under ``<prefix>/share/crack_lightning/models`` (pyproject data-files)."""
    candidates = [(checkout or Path(__file__).resolve().parents[2]) / "models" / RELEASE_NAME,
                  Path(prefix or sys.prefix) / "share" / "crack_lightning" / "models" / RELEASE_NAME]
    return next((c for c in candidates if c.is_file()), candidates[0])


DEFAULT_CHECKPOINT = default_checkpoint()


def model_files(choice: str | Path | None) -> tuple[Path, Path]:
    """``(patch model, photo model)`` of a ``--model`` choice: a short name (:data:`MODEL_NAMES`) or a file
    (then both). A name never shadows a file: ``./field`` is the file."""
    text = str(choice) if choice else DEFAULT_MODEL
    if text == DEFAULT_MODEL:
        return DEFAULT_CHECKPOINT, DEFAULT_CHECKPOINT.with_name(PHOTO_MODEL)
    if text in MODELS and not Path(text).exists():
        return (DEFAULT_CHECKPOINT.with_name(MODELS[text]),) * 2
    return (Path(choice),) * 2


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand files, folders (recursive) and globs into a sorted, de-duplicated list of images."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            matches = list_images(p)
        elif p.is_file():
            matches = [p]
        else:
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            matches = [q for q in matches if q.is_file() and is_image_file(q)]
            if not matches:
                raise InputError(f"no such file, folder or matching glob: {item}")
        if not matches:
            raise InputError(f"no images (.jpg, .png, ...) found in {item}")
        found += matches
    seen, out = set(), []
    for p in found:
        key = str(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


PREDICTIONS_HEADER = ["path", "probability", "label", "true_label", "correct", "error"]
TILES_CSV_HEADER = ["x", "y", "width", "height", "probability"]
SUMMARY_FIELDS = ["photo", "width", "height", "label", "probability", "tiles", "crack_tiles", "crack_fraction",
                  "max_probability", "threshold", "error"]
CRACKS_CSV_HEADER = ["id", "length_px", "mean_width_px", "max_width_px", "x", "y", "width", "height"]
SEGMENT_SUMMARY_FIELDS = ["photo", "width", "height", "mask", "overlay", "cracks", "length_px", "max_width_px",
                          "longest_px", "crack", "error"]
# what --localize and --segment write per photo and per folder (replaced only if ours)
PHOTO_CSV_HEADERS = (TILES_CSV_HEADER, SUMMARY_FIELDS, CRACKS_CSV_HEADER, SEGMENT_SUMMARY_FIELDS)
SEGMENT_MODEL = "crack_seg_lite0.pt"  # the shipped segmentation model (models/)
REPORT_FILES = ("confusion_matrix.png", "roc.png", "precision_recall.png", "histogram.png", "mistakes.png",
                "report.json")
EXPORT_FILES = ("model.onnx", "model.torchscript.pt", "model.json")  # what export(..., name="model") writes
