"""Train and evaluation pipelines (albumentations), built from the preprocessing contract.

:func:`eval_transform` is THE preprocessing: training-time validation/test, ``predict.py``,
localisation tiles and the ONNX contract all use it, so training and prediction cannot drift apart."""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import default_collate

from crack_lightning.contract import Preprocessing
from crack_lightning.tensor_ops import area_resize_exact


def _finish(pre: Preprocessing, normalize: bool = True) -> list:
    if not normalize:  # an HWC uint8 array: stack_uint8 batches it, model_input finishes it
        return []
    return [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0), ToTensorV2()]


def resize_op(pre: Preprocessing) -> A.Resize:
    """THE resize of evaluation and prediction: the whole patch to ``S x S`` by pixel area
    (no centre crop: a crack at the edge of a patch must not be cut away)."""
    return A.Resize(pre.size, pre.size, interpolation=cv2.INTER_AREA)


def eval_transform(pre: Preprocessing, normalize: bool = True) -> A.Compose:
    """:func:`resize_op`, then normalise into a float ``3xSxS`` tensor.

    ``normalize=False`` stops after the resize and yields the ``SxSx3`` uint8
    array; :meth:`Preprocessing.model_input` finishes batches of it on the GPU.
    """
    return A.Compose([resize_op(pre)] + _finish(pre, normalize))


class SiteArtifacts(A.ImageOnlyTransform):
    """Draws what inspection photos show that is NOT a crack onto any tile, label unchanged:
    a formwork or panel joint (a long straight groove, dark with a lit edge), a straight step
    in brightness (the edge of a member, a repair patch), a soft stain (water, efflorescence).

    Cracks are thin, wavy and end inside the surface; these are straight, span the tile or are
    blurred blobs. Trained with them, the model stops reading every line as a crack: the
    false alarms on crack-free walls (docs/field.md) were joints, edges and stains.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        rng = np.random.default_rng(int(self.random_generator.integers(2 ** 31)))
        kind = rng.choice(("joint", "edge", "stain"), p=(0.45, 0.25, 0.3))
        return {"joint": _joint, "edge": _edge, "stain": _stain}[kind](img, rng)


def _scaled(img: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """``img`` with every pixel's brightness multiplied by the ``(H,W)`` ``gain`` map."""
    return np.clip(img * gain[..., None], 0, 255).astype(np.uint8)


def _line_distance(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Signed distance (px) to a random straight line across the tile, mostly near an axis."""
    h, w = shape
    angle = rng.choice((0.0, np.pi / 2)) + rng.normal(0, 0.08) if rng.random() < 0.8 else rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return (xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle)


def _joint(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    half = rng.uniform(0.5, 3.5) * max(h, w) / 224
    d = _line_distance((h, w), rng)
    groove = np.clip(1 - np.abs(d) / half, 0, 1)  # 1 on the joint's axis, 0 beyond its half width
    lit = np.clip(1 - np.abs(d - 1.5 * half) / half, 0, 1) * rng.uniform(0, 0.25)
    gain = 1 - groove * rng.uniform(0.25, 0.6) + lit
    return _scaled(img, gain)


def _edge(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    d = _line_distance(img.shape[:2], rng)
    step = 1 / (1 + np.exp(-d / rng.uniform(0.5, 2.0)))  # a soft step, not a line
    gain = 1 + (rng.uniform(0.6, 1.35) - 1) * step
    return _scaled(img, gain)


def _stain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    blob = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        center = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        axes = (int(rng.uniform(0.1, 0.4) * w), int(rng.uniform(0.1, 0.4) * h))
        cv2.ellipse(blob, center, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    blob = cv2.GaussianBlur(blob, (0, 0), sigmaX=max(h, w) * rng.uniform(0.03, 0.08))
    gain = 1 + (rng.uniform(0.55, 1.3) - 1) * np.clip(blob, 0, 1)
    return _scaled(img, gain)


def train_transform(pre: Preprocessing, level: str = "light", normalize: bool = True) -> A.Compose:
    """Augmentations for training only. ``level`` is ``none``, ``light``, ``strong`` or ``site``.

    ``strong`` covers the shifts a site photo brings (scale, blur, noise, JPEG,
    exposure, colour cast, grayscale, rotation); ``site`` adds what a site photo shows that is
    not a crack (:class:`SiteArtifacts`: joints, edges, stains) and cast shadows.
    ``normalize`` as in :func:`eval_transform`.
    """
    if level == "none":
        return eval_transform(pre, normalize)
    s = pre.size
    geometric = [
        A.RandomResizedCrop(size=(s, s), scale=(0.6, 1.0), ratio=(0.8, 1.25), interpolation=cv2.INTER_AREA),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
    ]
    photometric = [A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)]
    if level in ("strong", "site"):
        geometric[0] = A.RandomResizedCrop(size=(s, s), scale=(0.25, 1.0), ratio=(0.75, 1.33),
                                           interpolation=cv2.INTER_AREA)
        geometric.append(A.Affine(scale=(0.5, 1.0), rotate=(-30, 30), border_mode=cv2.BORDER_REFLECT_101, p=0.4))
        photometric = [
            A.RandomBrightnessContrast(brightness_limit=0.4, contrast_limit=0.4, p=0.7),
            A.ColorJitter(brightness=0.0, contrast=0.0, saturation=(0.5, 1.5), hue=(-0.08, 0.08), p=0.5),
            A.ToGray(p=0.15),
            A.OneOf([A.GaussianBlur(sigma_limit=(0.3, 2.0)), A.Downscale(scale_range=(0.4, 0.8))], p=0.3),
            A.GaussNoise(std_range=(0.02, 0.1), p=0.3),
            A.ImageCompression(quality_range=(20, 90), p=0.3),
        ]
    if level == "site":  # before the photometric shifts: the artefacts are part of the scene
        photometric = [SiteArtifacts(p=0.5), A.RandomShadow(shadow_roi=(0, 0, 1, 1), p=0.15), *photometric]
    return A.Compose(geometric + photometric + _finish(pre, normalize))


def stack_uint8(images: Sequence[np.ndarray], pre: Preprocessing, defer_resize: bool = False) -> torch.Tensor:
    """One ``(B,H,W,3)`` uint8 batch of HWC images for :meth:`Preprocessing.model_input`.

    Images not yet ``S x S`` are resized here by :func:`resize_op`, unless ``defer_resize``
    and they all share one size that :func:`area_resize` handles exactly and that is at
    most twice the model's pixels (a folder of camera photos must not travel, nor reach
    the GPU as float32, at full size): then they travel as they are and the model's device
    resizes them (same pixels, less loader work). In a loader worker the batch lands in
    shared memory (``default_collate``): no extra copy.
    """
    h, w = images[0].shape[:2]
    defer = defer_resize and len({im.shape for im in images}) == 1 and h * w <= 2 * pre.size ** 2
    if not (defer and area_resize_exact(h, w, pre.size)):
        resize = resize_op(pre)
        images = [im if im.shape[:2] == (pre.size, pre.size) else resize(image=im)["image"] for im in images]
    return default_collate([torch.from_numpy(np.ascontiguousarray(im)) for im in images])


def preprocess_batch(images: list[np.ndarray], pre: Preprocessing) -> torch.Tensor:
    """Eval-preprocess decoded RGB arrays into one ``Bx3xSxS`` float tensor."""
    tf = eval_transform(pre)
    return torch.stack([tf(image=im)["image"] for im in images])
