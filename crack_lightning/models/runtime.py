"""Which engine runs a network, and how: the one place that decides.

* ``auto``: ONNX Runtime on a CPU (2-3x PyTorch eager there, same numbers to ~1e-5), PyTorch on a
  GPU (channels_last, bf16 autocast: tensor cores);
* ``onnx`` / ``torch``: forced.

Prediction (:class:`~crack_lightning.inference.predictor.Predictor`) and the cached-feature frozen stage
(:func:`~crack_lightning.training.features.feature_extractor`) both ask here. An ONNX export costs a second
or two per start, so exports are cached on disk by the network's weights (``~/.cache/crack_lightning/onnx``,
or ``$CRACK_LIGHTNING_CACHE``): the second start of ``predict.py`` with the same model loads it.
:class:`OnnxModel` runs a model exported by :mod:`crack_lightning.inference.export` (which only exports).
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from crack_lightning.hardware import gpu_autocast

ENGINES = ("auto", "onnx", "torch")


OPSET = 17


def use_onnx(engine: str, device: torch.device | str) -> bool:
    """Whether ``engine`` on ``device`` means ONNX Runtime."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return engine == "onnx" or (engine == "auto" and torch.device(device).type == "cpu")


def to_onnx(module: nn.Module, size: int, f, opset: int = OPSET, dense: bool = False) -> None:
    """Trace ``module`` (images ``[N,3,size,size]`` in) to ONNX with a dynamic batch dimension (``dense``:
    a per-pixel output, and dynamic height and width as well)."""
    axes = {0: "batch", 2: "height", 3: "width"} if dense else {0: "batch"}
    torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), f, dynamo=False, input_names=["image"],
                      output_names=["probability"], dynamic_axes={"image": axes, "probability": axes},
                      opset_version=opset)


def session(model_bytes_or_path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes_or_path, opts, providers=["CPUExecutionProvider"])


def cache_dir() -> Path:
    return Path(os.environ.get("CRACK_LIGHTNING_CACHE") or Path.home() / ".cache" / "crack_lightning") / "onnx"


def export_key(module: nn.Module, size: int) -> str:
    """What identifies an export: the module's class, its weights and buffers, the input size, the
    exporter (torch version, opset)."""
    h = hashlib.sha256(f"{type(module).__qualname__}|{size}|{torch.__version__}|{OPSET}".encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def cached_onnx(module: nn.Module, size: int) -> bytes:
    """The ONNX export of ``module``, from the on-disk cache when this exact network was exported before."""
    return cached_export(export_key(module, size), lambda: exported(module, size))


def exported(module: nn.Module, size: int, dense: bool = False) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad():
        to_onnx(module, size, buf, dense=dense)
    return buf.getvalue()


def file_key(path: Path, what: str, size: int) -> str:
    """What identifies the export of ``what`` (e.g. a model file's probability network) made from the file at
    ``path``: its bytes, the input size, the exporter. A cached export found by it needs no network built."""
    h = hashlib.sha256(f"{what}|{size}|{torch.__version__}|{OPSET}".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def cached_export(key: str, make: Callable[[], bytes]) -> bytes:
    """The ONNX bytes cached under ``key``, else ``make()`` (cached for next time). Every cached file is checked
    against the SHA-256 written beside it: a damaged or half-copied file is made again and replaced, never
    used. A cache that cannot be written is skipped, never an error."""
    from crack_lightning.files import atomic_write

    path = cache_dir() / f"{key}.onnx"
    digest = path.with_suffix(".sha256")
    try:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == digest.read_text().strip():
            return data
    except OSError:
        pass
    data = make()
    try:
        with atomic_write(path, "wb") as f:
            f.write(data)
        with atomic_write(digest, "w") as f:
            f.write(hashlib.sha256(data).hexdigest())
    except OSError:
        pass
    return data


def onnx_runner(module: nn.Module | bytes, size: int, threads: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` (or its ONNX export's bytes) as an ONNX Runtime function of normalised float batches
    ``[N,3,size,size]``."""
    sess = session(module if isinstance(module, bytes) else cached_onnx(module, size), threads)
    return lambda x: torch.from_numpy(sess.run(None, {"image": x.float().contiguous().numpy()})[0])


def torch_runner(module: nn.Module, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` in PyTorch on ``device``: channels_last, bf16 autocast on a GPU; float32 out."""
    device = torch.device(device)
    module = module.to(device, memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with gpu_autocast(device):
            return module(x).float()
    return run


class OnnxModel:
    """An exported model run with onnxruntime; quacks like the parts of the model Predictor uses."""

    def __init__(self, path: str | Path, threads: int = 0):
        import json

        from crack_lightning.contract import Preprocessing
        from crack_lightning.errors import CheckpointError
        from crack_lightning.models.checkpoint import check_class_names, check_threshold

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


def derived_export(onnx_bytes: bytes, weights: dict[str, torch.Tensor], new_weights: dict[str, torch.Tensor]) -> bytes | None:
    """The export of a network that differs from an exported one only in some tensors (a site's refitted
    head), made by swapping those tensors' initializers instead of exporting again (seconds on a CPU).
    ``weights``: what ``onnx_bytes`` was exported from; both as their model files hold them, as float32
    (:func:`~crack_lightning.models.checkpoint.float_weights`). The threshold is not part of the probability
    network. None where a changed tensor is not an initializer of that name (folded into another op: only a
    fresh export is right) or the two differ in their tensors' names or shapes."""
    import onnx
    from onnx import numpy_helper

    if weights.keys() != new_weights.keys() or any(weights[k].shape != new_weights[k].shape for k in weights):
        return None
    changed = {k: v for k, v in new_weights.items() if k != "threshold" and not torch.equal(weights[k], v)}
    model = onnx.load_from_string(onnx_bytes)
    initializers = {i.name: i for i in model.graph.initializer}
    if any(k not in initializers for k in changed):
        return None
    for k, v in changed.items():
        initializers[k].CopyFrom(numpy_helper.from_array(v.detach().float().cpu().numpy(), k))
    return model.SerializeToString()
