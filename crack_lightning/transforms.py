"""Train and evaluation pipelines (albumentations), built from the backbone's data config.

:func:`eval_transform` is THE preprocessing: training-time validation/test,
``predict.py``, localisation tiles and the ONNX contract all use it (or, for
the exported model, the :class:`Preprocessing` numbers it is built from), so
training and prediction cannot drift apart.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2


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
        :func:`eval_transform`'s last step, tested equal.
        """
        mean = torch.tensor(self.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
        return (x.float() / 255.0 - mean) / std

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """What a backbone takes: uint8 batches normalised here, already-normalised floats as they are."""
        return self.normalize(x) if x.dtype == torch.uint8 else x

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


def _finish(pre: Preprocessing, normalize: bool = True) -> list:
    norm = [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0)] if normalize else []
    return norm + [ToTensorV2()]


def eval_transform(pre: Preprocessing, normalize: bool = True) -> A.Compose:
    """Resize the whole patch to the model's size (no centre crop: a crack at the edge
    of a patch must not be cut away) and normalise.

    ``normalize=False`` stops before normalising and yields a uint8 ``3xSxS``
    tensor; :meth:`Preprocessing.normalize` finishes it on the GPU.
    """
    return A.Compose([A.Resize(pre.size, pre.size, interpolation=cv2.INTER_AREA)] + _finish(pre, normalize))


def train_transform(pre: Preprocessing, level: str = "light", normalize: bool = True) -> A.Compose:
    """Augmentations for training only. ``level`` is ``none``, ``light`` or ``strong``.

    ``strong`` covers the shifts a site photo brings (scale, blur, noise, JPEG,
    exposure, colour cast, grayscale, rotation). ``normalize`` as in :func:`eval_transform`.
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
    if level == "strong":
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
    return A.Compose(geometric + photometric + _finish(pre, normalize))


def preprocess_batch(images: list[np.ndarray], pre: Preprocessing) -> torch.Tensor:
    """Eval-preprocess decoded RGB arrays into one ``Bx3xSxS`` float tensor."""
    tf = eval_transform(pre)
    return torch.stack([tf(image=im)["image"] for im in images])
