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
    """Write ``name.onnx``, ``name.torchscript.pt`` and ``name.json`` into ``out_dir``."""
    model = load_model(checkpoint).float().eval()
    out = Path(out_dir)
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
