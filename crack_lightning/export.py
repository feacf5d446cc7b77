"""Export a checkpoint to ONNX and TorchScript, with the preprocessing contract beside it.

The exported graphs take ``float32 [N,3,S,S]`` images already preprocessed by
the contract (square resize to ``size``, ``(x/255 - mean)/std``, RGB) and
return the crack probability ``[N]``. ``<name>.json`` holds the contract, so a
deployment outside Python needs nothing else.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_model
from .engine import session, to_onnx
from .io import atomic_write, write_json
from .model import CrackClassifier
from .transforms import Preprocessing

CONTRACT_VERSION = 1
EXPORT_FILES = ("model.onnx", "model.torchscript.pt", "model.json")  # what export(..., name="model") writes


class ProbabilityModel(nn.Module):
    """The classifier with the sigmoid folded in: images in, probability of crack out.

    Holds the plain backbone and head (not the LightningModule, which tracing cannot walk).
    """

    def __init__(self, model: CrackClassifier):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.backbone(x)).squeeze(1))


def contract(model: CrackClassifier) -> dict:
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


class OnnxModel:
    """An exported model run with onnxruntime; quacks like the parts of the model Predictor uses."""

    def __init__(self, path: str | Path, threads: int = 0):
        from .checkpoint import CheckpointError, check_threshold, check_class_names

        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        if not meta_path.is_file():
            raise CheckpointError(f"the ONNX model needs its contract file beside it: {meta_path} is missing")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            pre = meta["preprocessing"]
            self.pre = Preprocessing.from_dict(pre)
            if len(pre["mean"]) != 3 or len(pre["std"]) != 3 or not 16 <= self.pre.size <= 4096 or \
                    not all(float(v) > 0 for v in pre["std"]):
                raise ValueError("preprocessing needs 3 means, 3 positive stds and a size of 16-4096")
            self.threshold = check_threshold(meta["threshold"], meta_path)
            self.class_names = check_class_names(meta["class_names"], meta_path)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{meta_path} is not a valid model contract ({exc.__class__.__name__}: "
                                  f"{str(exc)[:200]})") from exc
        try:
            self.session = session(str(path), threads)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes for a damaged model
            raise CheckpointError(f"cannot load {path}: not a valid ONNX model ({str(exc).splitlines()[0][:200]})") \
                from exc
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 4 or shape[1:] != [3, self.pre.size, self.pre.size]:
            raise CheckpointError(f"{path} takes input {shape}, its contract says [N, 3, {self.pre.size}, "
                                  f"{self.pre.size}]: they do not belong together")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.contiguous().numpy()})[0])
