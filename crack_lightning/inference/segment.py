"""Where each crack runs, how long and how wide: a segmentation model over a photo of any size.

The photo (EXIF orientation applied, as everywhere) is cut into overlapping windows, each run through
the network on its own (memory stays bounded by the window, not the photo: a 24 MP photo is fine);
the overlapping probabilities are averaged with weights that fall towards each window's edge, where a
U-Net sees least context. The crack map is the probabilities at the model's stored threshold, cleaned
of specks; each crack is then measured (:mod:`crack_lightning.measure`), and the photo is
called cracked when one crack is at least the model's ``min_crack_px`` long.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from crack_lightning.data.images import decode_image
from crack_lightning.errors import CheckpointError
from crack_lightning.files import PNG_METADATA, atomic_write, csv_path, csv_text
from crack_lightning.inference.outputs import CRACKS_CSV_HEADER, SEGMENT_SUMMARY_FIELDS
from crack_lightning.measure import SEVERITY_MM, Crack, clean, measure
from crack_lightning.models.segmentation import WINDOW, probability_map

MIN_AREA = 8  # crack-map components smaller than this many pixels are specks, not cracks


class _Probabilities(torch.nn.Module):
    """What is exported: normalised images in, crack probability per pixel out."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.sigmoid(self.net(x).float()).squeeze(1)


class OnnxSegmenter:
    """A segmentation network run by ONNX Runtime (on a CPU 2-3x PyTorch eager, tested equal to ~1e-4). The
    export is cached by the model file's bytes: ``build()`` (the PyTorch network) runs only when no export of
    these bytes is cached yet, so a second start builds no network."""

    def __init__(self, path: Path, pre, threshold: float, hparams: dict, build):
        from crack_lightning.models.runtime import (
            cached_export,
            exported,
            file_key,
            session,
        )

        self.pre, self.threshold, self.hparams = pre, float(threshold), hparams
        data = cached_export(file_key(path, "segment", 64), lambda: exported(_Probabilities(build().net).eval(), 64,
                                                                             dense=True))
        self.session = session(data)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.float().contiguous().numpy()})[0])


def load_segmenter(path: str | Path, device: str = "cpu", engine: str = "torch"):
    """A segmentation model file (``train.py --config configs/segment.yaml``'s ``model.pt`` or a ``.ckpt``),
    run by ``engine`` (``auto``: ONNX Runtime on a CPU, PyTorch on a GPU)."""
    from crack_lightning.models.checkpoint import (
        check_threshold,
        float_weights,
        read_checkpoint,
        stored_preprocessing,
    )
    from crack_lightning.models.runtime import use_onnx
    from crack_lightning.models.segmentation import CrackSegNet, segnet_arguments

    ckpt = read_checkpoint(path)
    if ckpt.get("task") != "segment":
        raise CheckpointError(f"{path} is not a segmentation model (a crack classifier?): give --checkpoint a "
                              "model trained with task: segment")

    def build():
        hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k in segnet_arguments()}
        model = CrackSegNet(**{**hp, "pretrained": "none", "weights_file": None})
        try:
            model.load_state_dict(float_weights(ckpt["state_dict"]))
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: its weights do not fit its stated architecture") from exc
        model.on_load_checkpoint(ckpt)
        return model.eval()

    stored = stored_preprocessing(ckpt, path) if use_onnx(engine, device) else None
    if stored is not None:  # a release file: what the export needs is stored beside the weights
        pre, threshold = stored
        return OnnxSegmenter(Path(path), pre, check_threshold(threshold, path), dict(ckpt["hyper_parameters"]), build)
    model = build()
    check_threshold(float(model.threshold), path)
    if use_onnx(engine, device):
        return OnnxSegmenter(Path(path), model.pre, float(model.threshold), model.hparams, lambda: model)
    return model.to(device)


@dataclass
class Segmentation:
    photo: str
    width: int
    height: int
    mask: np.ndarray = field(repr=False)
    cracks: list[Crack]
    min_crack_px: float

    @property
    def cracked(self) -> bool:
        return any(c.length_px >= self.min_crack_px for c in self.cracks)


def segment(path: str | Path, model, window: int = WINDOW) -> tuple[Segmentation, np.ndarray]:
    """The cleaned crack mask and the measured cracks of one photo (and the decoded photo)."""
    image = decode_image(path)
    return segment_array(image, model, str(path), window), image


def segment_array(image: np.ndarray, model, name: str = "photo", window: int = WINDOW,
                  should_stop: Callable[[], bool] | None = None) -> Segmentation:
    """:func:`segment` of a decoded ``HxWx3`` photo (what ``predict.py`` and the server share)."""
    probs = probability_map(image, model, window, should_stop=should_stop)
    mask = clean(probs >= float(model.threshold), MIN_AREA)
    min_len = float(model.hparams.get("min_crack_px", 0))
    return Segmentation(name, image.shape[1], image.shape[0], mask, measure(mask), min_len)


def overlay(image: np.ndarray, mask: np.ndarray, max_side: int = 2000) -> np.ndarray:
    """The photo with its crack pixels in solid magenta (thickened a pixel where the photo is shrunk to
    ``max_side``): the crack at a glance, the rest of the photo untouched."""
    import cv2

    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1.0:
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0  # any crack pixel shows
    mask = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0 if scale < 1.0 else mask
    out = image.copy()
    out[mask] = (255, 0, 255)
    return out


def write_outputs(seg: Segmentation, image: np.ndarray, out_dir: Path, stem: str, mm_per_pixel: float | None,
                  edges: Sequence[float] = SEVERITY_MM) -> dict:
    """``<stem>_mask.png`` (the photo's size, 255 = crack), ``<stem>_overlay.png``, ``<stem>_cracks.csv``;
    returns the photo's ``summary.csv`` row."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in PNG_METADATA.items():
        info.add_text(k, v)
    mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
    with atomic_write(mask_path, "wb") as f:
        Image.fromarray(seg.mask.astype(np.uint8) * 255).save(f, format="PNG", pnginfo=info)
    with atomic_write(overlay_path, "wb") as f:
        Image.fromarray(overlay(image, seg.mask)).save(f, format="PNG", pnginfo=info)
    rows = [c.row(mm_per_pixel, edges) for c in seg.cracks]
    header = CRACKS_CSV_HEADER + (["length_mm", "mean_width_mm", "max_width_mm", "severity"] if mm_per_pixel else [])
    with atomic_write(out_dir / f"{stem}_cracks.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    longest = max((c.length_px for c in seg.cracks), default=0.0)
    widest = max((c.max_width_px for c in seg.cracks), default=0.0)
    row = {"photo": seg.photo, "width": seg.width, "height": seg.height, "mask": mask_path.name,
           "overlay": overlay_path.name, "cracks": len(seg.cracks), "length_px": round(sum(c.length_px for c in seg.cracks), 1),
           "max_width_px": round(widest, 2), "crack": int(seg.cracked), "error": ""}
    if mm_per_pixel:
        row.update(length_mm=round(row["length_px"] * mm_per_pixel, 3), max_width_mm=round(widest * mm_per_pixel, 4))
    row["longest_px"] = round(longest, 1)
    return row


def write_summary(rows: list[dict], path: Path, mm: bool) -> None:
    fields = SEGMENT_SUMMARY_FIELDS + (["length_mm", "max_width_mm"] if mm else [])
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "photo": csv_path(r["photo"]), "error": csv_text(r.get("error", ""))} for r in rows)
