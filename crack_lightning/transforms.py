"""Train and evaluation pipelines (albumentations), built from the backbone's data config.

:func:`eval_transform` is THE preprocessing: training-time validation/test,
``predict.py``, localisation tiles and the ONNX contract all use it (or, for
the exported model, the :class:`Preprocessing` numbers it is built from), so
training and prediction cannot drift apart.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import default_collate


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing contract: square resize to ``size`` then ``(x/255 - mean) / std``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_model(cls, model: torch.nn.Module, size: int = 0) -> "Preprocessing":
        """Read mean/std/size from timm's data config of ``model`` (``size`` > 0 overrides)."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        return cls(
            size=int(size or cfg["input_size"][-1]),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x/255 - mean) / std`` of a uint8 ``(B,3,H,W)`` batch, on whatever device it is.

        Loaders built with ``normalize=False`` ship uint8 (4x less to copy and pin)
        and the model applies this on the GPU: the same arithmetic as
        :func:`eval_transform`'s last step, tested equal. ``x`` may be a
        channels_last view (what :meth:`model_input` makes); the result keeps it.
        """
        mean, std = _on_device((self.mean, self.std), x.device)
        return (x.float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """What a backbone takes, on ``x``'s device: normalised floats ``(B,3,S,S)`` pass as they are;
        uint8 batches are ``(B,H,W,3)`` (what :func:`stack_uint8` ships), area-resized here when
        not yet ``S x S`` (:func:`area_resize`), then normalised into a channels_last ``(B,3,S,S)``."""
        if x.dtype != torch.uint8:
            return x
        if tuple(x.shape[1:3]) != (self.size, self.size):
            x = area_resize(x, self.size)
        return self.normalize(x.permute(0, 3, 1, 2))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


@lru_cache(maxsize=64)
def _on_device(values: tuple, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Small float32 constants, copied to ``device`` once: a fresh host-to-GPU copy per batch
    would make the host wait for the GPU and stall the prediction pipeline."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in values)


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


# ---- the resize on the model's device -------------------------------------------------------
# Resizing (227 -> 224, INTER_AREA) and normalising cost a loader worker more than the JPEG
# decode: bench/run.py on this project's CPU measures 5,100 img/s per worker for the decode
# alone and 1,150 with the eval preprocessing. On a GPU host the loader, not the
# GPU, limits prediction, so :func:`stack_uint8` can ship images at their own size and
# :func:`area_resize` repeats OpenCV's arithmetic there, bit for bit (tested against cv2).


@lru_cache(maxsize=64)
def _area_taps(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's ``computeResizeAreaTab`` for one axis: ``(K, dst)`` source indices and float32
    weights, tap ``j`` of every output in row ``j``, in OpenCV's order (unused taps: weight 0
    on index 0). Built once per device, like :func:`_on_device`."""
    scale = src / dst
    taps: list[list[tuple[int, float]]] = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s2 = min(math.floor(f2), src - 1)
        s1 = min(math.ceil(f1), s2)
        t = [(s1 - 1, (s1 - f1) / cell)] if s1 - f1 > 1e-3 else []
        t += [(s, 1.0 / cell) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            t.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        taps.append(t)
    k = max(len(t) for t in taps)
    index = torch.zeros(k, dst, dtype=torch.long)
    weight = torch.zeros(k, dst, dtype=torch.float32)  # OpenCV rounds the double weights to float
    for d, t in enumerate(taps):
        for j, (s, w) in enumerate(t):
            index[j, d], weight[j, d] = s, w
    return index.to(device), weight.to(device)


def area_resize_exact(height: int, width: int, size: int) -> bool:
    """Whether :func:`area_resize` reproduces ``cv2.resize(INTER_AREA)`` for this size: a
    downscale (or none) whose factors are not integers on both axes (OpenCV takes a
    separate integer path there)."""
    if (height, width) == (size, size):
        return True
    return height >= size and width >= size and not (height % size == 0 and width % size == 0)


def _area_axis(x: torch.Tensor, dim: int, dst: int) -> torch.Tensor:
    index, weight = _area_taps(x.shape[dim], dst, x.device)
    shape = [1] * x.ndim
    shape[dim] = dst
    out = None
    for j in range(len(index)):  # one tap at a time, product then sum: OpenCV's float order, no FMA
        term = x.index_select(dim, index[j]) * weight[j].view(shape)
        out = term if out is None else out + term
    return out


def area_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B,H,W,C)`` uint8 -> ``(B,S,S,C)`` uint8, identical to :func:`resize_op` (OpenCV
    INTER_AREA) for the sizes :func:`area_resize_exact` accepts, on any device."""
    if not area_resize_exact(x.shape[1], x.shape[2], size):
        raise ValueError(f"area_resize cannot reproduce OpenCV for {tuple(x.shape[1:3])} -> {size}")
    if tuple(x.shape[1:3]) == (size, size):
        return x
    y = _area_axis(_area_axis(x.float(), 2, size), 1, size)  # horizontal, then vertical, as OpenCV
    return torch.round(y).clamp_(0, 255).to(torch.uint8)  # round half to even, as cvRound


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
