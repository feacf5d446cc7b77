"""How well does a model hold up on photos unlike its training set?

Controlled shifts that a site photo brings, applied to the clean test split
(each deterministic, so two models see exactly the same pixels), plus recall on
an out-of-domain crack-only folder (e.g. masonry walls). Prediction goes
through the normal :class:`~crack_lightning.inference.predictor.Predictor`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from crack_lightning.data.loaders import Batches, ImageDataset, make_loader
from crack_lightning.data.transforms import eval_transform
from crack_lightning.models.metrics import binary_metrics

Shift = Callable[[np.ndarray, int], np.ndarray]


def _zoom_out(factor: float) -> Shift:
    """Camera further away: the surface shrinks (thinner cracks), the frame fills with more surface."""
    def f(img: np.ndarray, seed: int) -> np.ndarray:
        h, w = img.shape[:2]
        small = cv2.resize(img, (max(1, int(w * factor)), max(1, int(h * factor))), interpolation=cv2.INTER_AREA)
        reps = (int(np.ceil(h / small.shape[0])) + 1, int(np.ceil(w / small.shape[1])) + 1)
        tiled = np.concatenate([np.concatenate([small if (i + j) % 2 == 0 else small[:, ::-1]
                                                for j in range(reps[1])], 1) for i in range(reps[0])], 0)
        return np.ascontiguousarray(tiled[:h, :w])
    return f


def _zoom_in(factor: float) -> Shift:
    """Camera closer: the centre enlarged (thicker cracks)."""
    def f(img: np.ndarray, seed: int) -> np.ndarray:
        h, w = img.shape[:2]
        ch, cw = int(h / factor), int(w / factor)
        y, x = (h - ch) // 2, (w - cw) // 2
        return cv2.resize(img[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_CUBIC)
    return f


def _blur(img, seed):
    return cv2.GaussianBlur(img, (0, 0), 2.0)


def _noise(img, seed):
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.float32) + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def _jpeg(img, seed):
    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 10])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy()


def _gain(g: float) -> Shift:
    return lambda img, seed: np.clip(img.astype(np.float32) * g, 0, 255).astype(np.uint8)


def _low_contrast(img, seed):
    x = img.astype(np.float32)
    return np.clip((x - x.mean()) * 0.4 + x.mean(), 0, 255).astype(np.uint8)


def _colour_cast(img, seed):
    return np.clip(img.astype(np.float32) * np.array([1.25, 1.0, 0.7]), 0, 255).astype(np.uint8)


def _gray(img, seed):
    return np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)


def _rotate(img, seed):
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 30, 1.0)
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT_101)


SHIFTS: dict[str, Shift] = {
    "zoom_0.5x": _zoom_out(0.5), "zoom_0.75x": _zoom_out(0.75), "zoom_1.5x": _zoom_in(1.5), "zoom_2x": _zoom_in(2.0),
    "blur": _blur, "noise": _noise, "jpeg_q10": _jpeg, "under_exposed": _gain(0.45), "over_exposed": _gain(1.7),
    "low_contrast": _low_contrast, "colour_cast": _colour_cast, "grayscale": _gray, "rotate_30": _rotate,
}


def probabilities(predictor, paths: Sequence[str], shift: Shift | None = None, desc: str = "") -> torch.Tensor:
    """Crack probabilities of ``paths`` under ``shift`` (applied to the decoded image, before the eval transform)."""
    ds = ImageDataset(paths, eval_transform(predictor.pre), before=shift)
    loader = make_loader(ds, predictor.batch_size, predictor.num_workers, collate_fn=Batches())
    return torch.cat([predictor.probabilities(b.x) for b in tqdm(loader, desc=desc, leave=False, unit="batch")])


def evaluate(predictor, paths: Sequence[str], labels: Sequence[int], ood_paths: Sequence[str] = ()) -> dict:
    """Metrics on the clean images, under every shift (and their mean), and OOD recall."""
    y = torch.tensor(list(labels))
    thr = float(predictor.threshold)
    out: dict = {"threshold": thr, "n": len(paths)}
    clean = probabilities(predictor, paths, None, "clean")
    out["clean"] = binary_metrics(clean, y, thr)
    out["shifts"] = {name: binary_metrics(probabilities(predictor, paths, fn, name), y, thr)
                     for name, fn in SHIFTS.items()}
    out["shift_mean"] = {k: float(np.mean([m[k] for m in out["shifts"].values()]))
                         for k in ("acc", "precision", "recall", "f1")}
    negatives = int((y == 0).sum())
    out["clean_fpr"] = out["clean"]["fp"] / negatives if negatives else float("nan")
    if ood_paths:
        p = probabilities(predictor, ood_paths, None, "out-of-domain")
        out["ood"] = {"n": len(ood_paths), "recall": float((p >= thr).float().mean())}
    return out


def table(results: dict[str, dict]) -> str:
    """Markdown: one column per model."""
    names = list(results)
    rows = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, get):
        rows.append(f"| {label} | " + " | ".join(get(results[n]) for n in names) + " |")

    row("clean test accuracy", lambda r: f"{r['clean']['acc']:.4f}")
    row("clean test F1", lambda r: f"{r['clean']['f1']:.4f}")
    for s in SHIFTS:
        row(f"{s} accuracy (recall)", lambda r, s=s: f"{r['shifts'][s]['acc']:.4f} ({r['shifts'][s]['recall']:.3f})")
    row("**mean over shifts: accuracy**", lambda r: f"**{r['shift_mean']['acc']:.4f}**")
    row("mean over shifts: F1", lambda r: f"{r['shift_mean']['f1']:.4f}")
    row("out-of-domain recall", lambda r: f"{r['ood']['recall']:.4f}" if "ood" in r else "")
    row("false-positive rate, clean test negatives", lambda r: f"{r['clean_fpr']:.4f}")
    return "\n".join(rows) + "\n"


def ood_files(folder: str | Path) -> list[str]:
    from crack_lightning.data.scan import list_images

    return [str(p) for p in list_images(Path(folder))]
