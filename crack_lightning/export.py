"""Export a checkpoint to ONNX and TorchScript, with the preprocessing contract beside it.

The exported graphs take ``float32 [N,3,S,S]`` images already preprocessed by
the contract (square resize to ``size``, ``(x/255 - mean)/std``, RGB) and
return the crack probability ``[N]``. ``<name>.json`` holds the contract, so a
deployment outside Python needs nothing else.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from torch import nn

from .checkpoint import load_model
from .io import atomic_write, write_json
from .model import CrackClassifier
from .transforms import Preprocessing

CONTRACT_VERSION = 1


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


def _to_onnx(module: nn.Module, size: int, f: BinaryIO, opset: int = 17) -> None:
    """Trace ``module`` (images ``[N,3,size,size]`` in) to ONNX with a dynamic batch dimension."""
    torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), f, dynamo=False, input_names=["image"],
                      output_names=["probability"], dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}},
                      opset_version=opset)


def _session(model_bytes_or_path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes_or_path, opts, providers=["CPUExecutionProvider"])


def onnx_runner(module: nn.Module, size: int, threads: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Compile ``module`` to an in-memory ONNX Runtime session (2-3x PyTorch eager on a CPU).

    Used for CPU prediction and for computing cached backbone features; the
    outputs match PyTorch to ~1e-5 (checked in the tests).
    """
    buf = io.BytesIO()
    with torch.no_grad():
        _to_onnx(module, size, buf)
    session = _session(buf.getvalue(), threads)
    return lambda x: torch.from_numpy(session.run(None, {"image": x.float().contiguous().numpy()})[0])


def export(checkpoint: str | Path, out_dir: str | Path, name: str = "model", opset: int = 17) -> dict[str, Path]:
    """Write ``name.onnx``, ``name.torchscript.pt`` and ``name.json`` into ``out_dir``."""
    model = load_model(checkpoint).float().eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped = ProbabilityModel(model).eval()
    example = torch.zeros(1, 3, model.pre.size, model.pre.size)
    paths = {"onnx": out / f"{name}.onnx", "torchscript": out / f"{name}.torchscript.pt", "contract": out / f"{name}.json"}
    with atomic_write(paths["onnx"], "wb") as f:
        _to_onnx(wrapped, model.pre.size, f, opset)
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, example)
    with atomic_write(paths["torchscript"], "wb") as f:
        torch.jit.save(traced, f)
    write_json(paths["contract"], contract(model))
    return paths


class OnnxModel:
    """An exported model run with onnxruntime; quacks like the parts of the model Predictor uses."""

    def __init__(self, path: str | Path, threads: int = 0):
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise FileNotFoundError(2, "ONNX model needs its contract file beside it", str(meta_path))
        meta = json.loads(meta_path.read_text())
        self.pre = Preprocessing.from_dict(meta["preprocessing"])
        self.threshold = float(meta["threshold"])
        self.class_names = list(meta["class_names"])
        self.session = _session(str(path), threads)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.contiguous().numpy()})[0])
