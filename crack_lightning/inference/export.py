"""Export a checkpoint to ONNX and TorchScript, with the preprocessing contract beside it.

The exported graphs take ``float32 [N,3,S,S]`` images already preprocessed by
the contract (square resize to ``size``, ``(x/255 - mean)/std``, RGB) and
return the crack probability ``[N]``. ``<name>.json`` holds the contract, so a
deployment outside Python needs nothing else.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from crack_lightning.files import atomic_write, write_json
from crack_lightning.models.checkpoint import load_model
from crack_lightning.models.network import CrackNet
from crack_lightning.models.runtime import to_onnx

CONTRACT_VERSION = 1




class ProbabilityModel(nn.Module):
    """The classifier with the sigmoid folded in: images in, probability of crack out.

    Holds the plain backbone and head (not the LightningModule, which tracing cannot walk).
    """

    def __init__(self, model: CrackNet):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.backbone(x)).squeeze(1))


def contract(model: CrackNet) -> dict:
    return {
        "version": CONTRACT_VERSION,
        "input": "float32 [N,3,size,size], RGB, resized (whole image, no crop) then (x/255 - mean) / std",
        "output": "float32 [N] probability of the crack class",
        "preprocessing": model.pre.to_dict(),
        "threshold": float(model.threshold),
        "class_names": list(model.hparams.class_names),
        "backbone": model.hparams.backbone,
    }


def export(checkpoint: str | Path, out_dir: str | Path, name: str = "model", opset: int = 17) -> dict[str, Path]:
    """Write ``name.onnx``, ``name.torchscript.pt`` and ``name.json`` into ``out_dir`` (a segmentation model:
    per-pixel probabilities, any height and width that are multiples of 32)."""
    from crack_lightning.models.checkpoint import read_checkpoint

    out = Path(out_dir)
    if read_checkpoint(checkpoint).get("task") == "segment":
        return _export_segmenter(checkpoint, out, name, opset)
    model = load_model(checkpoint).float().eval()
    out.mkdir(parents=True, exist_ok=True)
    wrapped = ProbabilityModel(model).eval()
    example = torch.zeros(1, 3, model.pre.size, model.pre.size)
    paths = {"onnx": out / f"{name}.onnx", "torchscript": out / f"{name}.torchscript.pt", "contract": out / f"{name}.json"}
    with atomic_write(paths["onnx"], "wb") as f:
        to_onnx(wrapped, model.pre.size, f, opset)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, example)
    with atomic_write(paths["torchscript"], "wb") as f:
        torch.jit.save(traced, f)
    write_json(paths["contract"], contract(model))
    return paths


def _export_segmenter(checkpoint: str | Path, out: Path, name: str, opset: int) -> dict[str, Path]:
    from crack_lightning.inference.segment import _Probabilities, load_segmenter

    model = load_segmenter(checkpoint, engine="torch").float()
    wrapped = _Probabilities(model.net).eval()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"onnx": out / f"{name}.onnx", "torchscript": out / f"{name}.torchscript.pt", "contract": out / f"{name}.json"}
    with atomic_write(paths["onnx"], "wb") as f:
        to_onnx(wrapped, 64, f, opset, dense=True)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, torch.zeros(1, 3, 64, 64))
    with atomic_write(paths["torchscript"], "wb") as f:
        torch.jit.save(traced, f)
    write_json(paths["contract"], {
        "version": CONTRACT_VERSION, "task": "segment",
        "input": "float32 [N,3,H,W], RGB, H and W multiples of 32 (pad), (x/255 - mean) / std, no resize",
        "output": "float32 [N,H,W] crack probability per pixel",
        "preprocessing": model.pre.to_dict(), "threshold": float(model.threshold),
        "min_crack_px": float(model.hparams.get("min_crack_px", 0)), "encoder": model.hparams.encoder})
    return paths
