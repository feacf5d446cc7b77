"""The frozen backbone as a feature extractor: the cached-feature frozen stage and the training anchors."""
from __future__ import annotations

import copy
import os

import torch

from crack_lightning.config.schema import Config
from crack_lightning.data.datamodule import CrackDataModule
from crack_lightning.models.network import CrackNet
from crack_lightning.tensor_ops import model_input


def feature_device(cfg: Config) -> torch.device:
    """Where to run the frozen backbone for the feature cache: this process's GPU if training uses one."""
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def feature_extractor(model: CrackNet, engine: str = "auto", device: torch.device | str = "cpu"):
    """The frozen backbone as a function of image batches (uint8 or normalised), on the engine
    :mod:`crack_lightning.models.runtime` picks; the features come back as float32 on the CPU."""
    from crack_lightning.models.runtime import onnx_runner, torch_runner, use_onnx

    model.eval()
    pre = model.pre
    if use_onnx(engine, device):
        ort = onnx_runner(model.backbone, pre.size)
        return lambda x: ort(model_input(pre, x))
    run = torch_runner(copy.deepcopy(model.backbone), device)
    return lambda x: run(model_input(pre, x.to(device, non_blocking=True))).cpu()


def site_anchors(cfg: Config, model: CrackNet, dm: CrackDataModule) -> dict | None:
    """The features of up to :data:`~crack_lightning.models.anchors.ANCHORS` training tiles (every source and
    class alike) under the final weights: what ``predict.py --calibrate-site`` refits the head against."""
    from crack_lightning.data.loaders import compute_features
    from crack_lightning.models.anchors import linear_head, pack_anchors, pick_anchors

    records = pick_anchors(dm.split("train"))
    if linear_head(model) is None or not records:
        return None
    extract = feature_extractor(model, cfg.train.feature_engine, feature_device(cfg))
    items = compute_features(extract, dm.eval_loader("train", records=records), "features of the training anchors")
    return pack_anchors(items.features, items.labels)
