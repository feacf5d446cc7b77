"""The crack classifier as a network: a pretrained timm backbone with a one-logit head.

:class:`CrackNet` is what prediction, export, calibration and the server load: a plain
``nn.Module`` (no Lightning import on their start-up path). It also carries what prediction
needs to be trustworthy: the preprocessing contract and the decision threshold chosen on
validation data (a buffer, so it travels inside every checkpoint). Its signature is the one
list of the model's arguments; the LightningModule that trains it
(:class:`~crack_lightning.models.classifier.CrackClassifier`) is the same network with the
training added, and the same state dict.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from crack_lightning.contract import Preprocessing
from crack_lightning.hardware import gpu_autocast
from crack_lightning.tensor_ops import model_input


def pooled_features(net: nn.Module, size: int) -> int:
    """Width of what ``net`` (classifier removed) really returns.

    ``num_features`` is not it for every family: timm's MobileNetV3 has a 1280-wide
    ``conv_head`` after its 960 pooled channels (``head_hidden_size``). One tiny
    forward pass is the only answer that holds for any timm model.
    """
    was_training = net.training
    net.eval()
    with torch.no_grad():
        width = int(net(torch.zeros(1, 3, size, size)).shape[-1])
    net.train(was_training)
    return width


def model_arguments() -> set[str]:
    """The names the model is built from: :class:`CrackNet`'s signature, the one list of them (a config,
    a checkpoint's hyperparameters and ``train.py --help`` all read it here)."""
    return set(inspect.signature(CrackNet.__init__).parameters) - {"self"}


class HParams(dict):
    """The arguments a network was built with, readable as attributes (as Lightning's ``hparams``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class KeepsArguments:
    """A network that keeps its constructor's arguments as ``hparams`` (readable as attributes, as
    Lightning's are); :class:`~crack_lightning.models.components.lightning.TrainedWithLightning` keeps
    them Lightning's way instead."""

    def _keep_arguments(self, arguments: dict[str, Any]) -> None:
        self._hparams = HParams(arguments)

    @property
    def hparams(self) -> HParams:
        return self._hparams


class CrackNet(KeepsArguments, nn.Module):
    """timm backbone (pooled features) -> dropout -> Linear(features, 1) (or, with ``head_hidden``, a
    one-hidden-layer MLP). Images are normalised floats ``(B,3,S,S)``, or uint8 ``(B,H,W,3)`` that
    :meth:`features` finishes on their own device."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str = "lite0",
        weights_file: str | None = None,
        drop_rate: float = 0.2,
        image_size: int = 0,
        class_names: tuple[str, str] | list[str] = ("Negative", "Positive"),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        threshold_rule: str = "f1",
        target_fpr: float = 0.001,
        head_hidden: int = 0,
    ):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        from crack_lightning.models.components.pretrained import (
            create_pretrained,  # timm: a second to import
        )

        super().__init__()
        self._keep_arguments(arguments)
        net = create_pretrained(backbone, pretrained, weights_file)
        self.pre = Preprocessing.from_model(net, image_size)
        net.reset_classifier(0)
        self.backbone = net
        width = pooled_features(net, self.pre.size)
        if head_hidden > 0:  # one hidden layer: room for several sources' looks on a frozen backbone
            self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(width, head_hidden), nn.ReLU(),
                                      nn.Dropout(drop_rate), nn.Linear(head_hidden, 1))
        else:
            self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(width, 1))
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of images: normalised floats, or uint8 (finished here, on x's device)."""
        x = model_input(self.pre, x)
        if x.is_cuda:  # channels_last is the fast layout for convolutions on tensor cores
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of images (normalised floats, or uint8 finished here)."""
        return self.head_logits(self.features(x))

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of pooled backbone features ``(B,C)``: the head alone."""
        return self.head(feats).squeeze(1)

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Crack probabilities ``(B,)``. On a GPU the backbone runs in bf16 autocast (tensor
        cores); the head and sigmoid stay float32 so probabilities near the threshold keep
        their precision."""
        with gpu_autocast(x.device):
            feats = self.features(x)
        return torch.sigmoid(self.head(feats.float()).squeeze(1))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What the model saw in training is what it sees after loading: the stored preprocessing,
        not whatever timm's pretrained config of the architecture says today."""
        if isinstance(checkpoint.get("preprocessing"), dict):
            self.pre = Preprocessing.from_dict(checkpoint["preprocessing"])
