"""Crack segmentation: a U-Net decoder (segmentation-models-pytorch) over a timm encoder, per-pixel crack
probability, and the LightningModule that trains it.

:class:`CrackSegNet` is the plain network prediction loads (no Lightning import); its signature is the
one list of its arguments. :class:`CrackSegmenter` adds training: BCE + Dice (thin structures are a
small share of pixels, which plain BCE lets the model ignore), and validation scored as an inspector
looks at a crack map: pixel precision, recall and F1 with a 2-pixel tolerance, the decision threshold
chosen on it and stored in every checkpoint.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crack_lightning.contract import Preprocessing
from crack_lightning.errors import Stopped
from crack_lightning.models.components.lightning import TrainedWithLightning
from crack_lightning.models.network import KeepsArguments

TOLERANCE_PX = 2  # a predicted crack pixel counts if a true one is within 2 px, and vice versa


def segnet_arguments() -> set[str]:
    return set(inspect.signature(CrackSegNet.__init__).parameters) - {"self"}


class CrackSegNet(KeepsArguments, nn.Module):
    """U-Net over a timm encoder (``tu-<encoder>`` in segmentation-models-pytorch), one logit per pixel.
    The encoder starts from ImageNet weights (``pretrained``: the offline Lite0 package or timm's hub),
    or from a crack classifier's backbone (``weights_file``: a crack_lightning model file)."""

    def __init__(self, encoder: str = "tf_efficientnet_lite0", pretrained: str = "lite0",
                 weights_file: str | None = None, decoder_channels: tuple[int, ...] | list[int] = (128, 64, 32, 16, 8),
                 crop_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4, dice_weight: float = 1.0,
                 min_crack_px: int = 40):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        import segmentation_models_pytorch as smp

        from crack_lightning.models.components.pretrained import create_pretrained

        super().__init__()
        self._keep_arguments(arguments)
        self.net = smp.Unet(encoder_name=f"tu-{encoder}", encoder_weights=None, classes=1,
                            decoder_channels=tuple(decoder_channels))
        if pretrained != "none" or weights_file:
            start = create_pretrained(encoder, pretrained if not weights_file else "none", None)
            if weights_file:
                start = _classifier_backbone(start, weights_file)
            self.net.encoder.model.load_state_dict(start.state_dict(), strict=False)  # its head is not used
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=self.net.encoder.model)
        self.pre = Preprocessing(crop_size, tuple(map(float, config["mean"])), tuple(map(float, config["std"])))
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,1,H,W)`` of normalised images ``(B,3,H,W)``, H and W multiples of 32."""
        return self.net(x)

    @torch.inference_mode()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Crack probability per pixel ``(B,H,W)``."""
        return torch.sigmoid(self(x).float()).squeeze(1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(checkpoint.get("preprocessing"), dict):
            self.pre = Preprocessing.from_dict(checkpoint["preprocessing"])


def _classifier_backbone(net: nn.Module, weights_file: str) -> nn.Module:
    """The backbone of a crack classifier file, loaded into ``net`` (same architecture)."""
    from crack_lightning.models.checkpoint import float_weights, read_checkpoint

    sd = float_weights(read_checkpoint(weights_file)["state_dict"])
    net.load_state_dict({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, strict=False)
    return net


def tolerant_counts(probs: torch.Tensor, target: torch.Tensor, threshold: float,
                    tolerance: int = TOLERANCE_PX) -> torch.Tensor:
    """``[tp_pred, pred, tp_true, true]`` pixel counts: predicted crack pixels within ``tolerance`` of a true
    one, all predicted, true crack pixels within ``tolerance`` of a predicted one, all true."""
    pred = (probs >= threshold).float().unsqueeze(1)
    true = (target > 0.5).float().unsqueeze(1)
    k = 2 * tolerance + 1
    near_true = F.max_pool2d(true, k, stride=1, padding=tolerance)
    near_pred = F.max_pool2d(pred, k, stride=1, padding=tolerance)
    return torch.stack([(pred * near_true).sum(), pred.sum(), (true * near_pred).sum(), true.sum()]).double()


def prf(counts: torch.Tensor) -> dict[str, float]:
    tp_pred, pred, tp_true, true = (float(c) for c in counts)
    precision = tp_pred / pred if pred else (1.0 if not true else 0.0)
    recall = tp_true / true if true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


THRESHOLDS = (0.02, 0.03, 0.05, 0.075, *(round(0.05 * k, 2) for k in range(2, 19)))  # 0.02 ... 0.90: on validation


class CrackSegmenter(TrainedWithLightning, CrackSegNet, L.LightningModule):
    """:class:`CrackSegNet` with its training (one stage, the whole network) and its evaluation."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x).squeeze(1).float()
        bce = F.binary_cross_entropy_with_logits(logits, y)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        loss = bce + self.hparams.dice_weight * dice
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=self.hparams.lr * 0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _collect(self, stage: str, batch) -> None:
        x, y = batch
        probs = torch.sigmoid(self(x).float()).squeeze(1)
        counts = torch.stack([tolerant_counts(probs, y, t) for t in THRESHOLDS])
        self._collected[stage] = self._collected.get(stage, 0) + counts

    def validation_step(self, batch, batch_idx):
        self._collect("val", batch)

    def test_step(self, batch, batch_idx):
        self._collect("test", batch)

    def _finish(self, stage: str) -> None:
        counts = self._collected.pop(stage, None)
        if counts is None or self.trainer.sanity_checking:
            return
        if self.trainer.world_size > 1:
            counts = self.all_gather(counts).sum(0)
        scores = [prf(c)["f1"] for c in counts]
        if stage == "val" and not self.trainer.testing:
            self.threshold.fill_(THRESHOLDS[max(range(len(scores)), key=scores.__getitem__)])
        at = THRESHOLDS.index(min(THRESHOLDS, key=lambda t: abs(t - float(self.threshold))))
        result = {**prf(counts[at]), "threshold": float(self.threshold)}
        self._results[stage] = result
        for k, v in result.items():
            self.log(f"{stage}_{k}", v, prog_bar=k == "f1", sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = checkpoint.get("hyper_parameters")
        if hp is not None:
            checkpoint["initial_weights"] = {"pretrained": hp.get("pretrained"), "weights_file": hp.get("weights_file")}
            hp.update(pretrained="none", weights_file=None)
        checkpoint["preprocessing"] = self.pre.to_dict()
        checkpoint["task"] = "segment"


WINDOW = 512  # pixels per side of a window (a multiple of 32)
OVERLAP = 64


def _ramp(n: int, overlap: int) -> np.ndarray:
    w = np.ones(n, np.float32)
    k = min(overlap, n // 2)
    if k:
        edge = (np.arange(k, dtype=np.float32) + 1) / (k + 1)
        w[:k], w[n - k:] = edge, edge[::-1]
    return w


def _starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    return starts + ([length - window] if starts[-1] != length - window else [])


@torch.inference_mode()
def probability_map(image: np.ndarray, model, window: int = WINDOW, overlap: int = OVERLAP,
                    should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Crack probability per pixel ``(H, W)`` float32 of an ``HxWx3`` uint8 photo, window by window
    (``should_stop`` is asked before each: true raises :class:`~crack_lightning.errors.Stopped`)."""
    h, w = image.shape[:2]
    acc = np.zeros((h, w), np.float32)
    weight = np.zeros((h, w), np.float32)
    mean = np.array(model.pre.mean, np.float32) * 255
    std = np.array(model.pre.std, np.float32) * 255
    device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")  # ONNX: CPU
    for y in _starts(h, window, window - overlap):
        for x in _starts(w, window, window - overlap):
            if should_stop is not None and should_stop():
                raise Stopped("segmentation")
            tile = image[y:y + window, x:x + window]
            th, tw = tile.shape[:2]
            padded = np.pad(tile, ((0, -th % 32), (0, -tw % 32), (0, 0)), mode="reflect")
            t = torch.from_numpy(((padded.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())[None]
            p = model.probabilities(t.to(device))[0, :th, :tw].float().cpu().numpy()
            ramp = np.outer(_ramp(th, overlap if y else 0) if h > window else np.ones(th, np.float32),
                            _ramp(tw, overlap if x else 0) if w > window else np.ones(tw, np.float32))
            ramp = np.maximum(ramp, 1e-3)
            acc[y:y + th, x:x + tw] += p * ramp
            weight[y:y + th, x:x + tw] += ramp
    return acc / weight
