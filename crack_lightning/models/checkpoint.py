"""Save and load models safely.

Loading never unpickles arbitrary objects (``torch.load(weights_only=True)``),
so a checkpoint carrying a code payload is refused. Two formats load:
Lightning training checkpoints (``*.ckpt``) and the slim release format written
by :func:`save_release` (half-precision weights + what prediction needs).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from crack_lightning.contract import Preprocessing
from crack_lightning.errors import CheckpointError, WeightsError
from crack_lightning.limits import HEAD_HIDDEN, IMAGE_SIZE, in_range
from crack_lightning.models.network import model_arguments

if TYPE_CHECKING:
    from crack_lightning.models.network import CrackNet

RELEASE_FORMAT = "crack_lightning.release/1"




def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if not found:
            raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a PyTorch file") from exc
        raise CheckpointError(
            f"refusing to load {path}: it references the Python object {found.group(1)}, and only "
            "weights-only checkpoints (tensors and plain data) are loaded - it may carry a code payload"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - zip/EOF/runtime errors all mean a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: damaged or not a PyTorch file "
                              f"({exc.__class__.__name__})") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict) or \
            not isinstance(obj.get("hyper_parameters"), dict):
        raise CheckpointError(f"{path} is not a crack_lightning checkpoint (no state_dict/hyper_parameters)")
    return obj


def check_threshold(value: Any, where: str | Path) -> float:
    """A stored decision threshold must be a number strictly between 0 and 1."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0.0 < t < 1.0:  # also False for NaN
        raise CheckpointError(f"{where}: stored threshold {value!r} is not in (0, 1): the file is damaged or "
                              "edited; pass --threshold to override it")
    return t


def check_class_names(value: Any, where: str | Path) -> list[str]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) and v for v in value)
            and value[0] != value[1]):
        raise CheckpointError(f"{where}: class_names must be two different names, got {value!r}")
    return list(value)


def check_hparams(hp: dict, where: str | Path) -> dict:
    """The constructor arguments stored in a checkpoint (the names of :class:`CrackNet`'s signature),
    checked before a model is built from them. Every weight is in the file: no pretrained source is asked."""
    kwargs = {k: hp[k] for k in model_arguments() if k in hp}
    kwargs.update(pretrained="none", weights_file=None)
    if not isinstance(kwargs.get("backbone", ""), str):
        raise CheckpointError(f"{where}: backbone must be a timm model name, got {kwargs['backbone']!r}")
    if "class_names" in kwargs:
        kwargs["class_names"] = check_class_names(kwargs["class_names"], where)
    size = kwargs.get("image_size", 0)
    if not (size == 0 or in_range(size, IMAGE_SIZE)):
        raise CheckpointError(f"{where}: image_size must be 0 or {IMAGE_SIZE[0]}-{IMAGE_SIZE[1]}, got {size!r}")
    hidden = kwargs.get("head_hidden", 0)
    if not in_range(hidden, HEAD_HIDDEN):
        raise CheckpointError(f"{where}: head_hidden must be an integer {HEAD_HIDDEN[0]}-{HEAD_HIDDEN[1]}, got {hidden!r}")
    rate = kwargs.get("drop_rate", 0.0)
    if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0.0 <= rate < 1.0):
        raise CheckpointError(f"{where}: drop_rate must be a number in [0, 1), got {rate!r}")
    return kwargs


def float_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stored state dict with its (fp16) weights as float32; the threshold keeps its own precision (a
    float32 round trip would move it), integer buffers stay integers."""
    return {k: v.float() if v.is_floating_point() and k != "threshold" else v for k, v in state_dict.items()}


def load_model(path: str | Path, device: str | torch.device = "cpu", trainable: bool = False) -> "CrackNet":
    """Rebuild the model from a checkpoint (no pretrained download: the checkpoint has the weights): a
    :class:`CrackNet` for prediction (no Lightning import), or with ``trainable`` the LightningModule
    (:class:`~crack_lightning.models.classifier.CrackClassifier`) that Lightning's loops take."""
    return model_from(read_checkpoint(path), path, device, trainable)


def stored_contract(ckpt: dict[str, Any], where: str | Path) -> tuple[Preprocessing, list[str], float] | None:
    """What prediction needs of a checkpoint without building its network: the preprocessing, the class
    names and the threshold, each checked (``None`` when the file stores no preprocessing)."""
    stored = stored_preprocessing(ckpt, where)
    if stored is None:
        return None
    kwargs = check_hparams(dict(ckpt["hyper_parameters"]), where)
    return stored[0], list(kwargs.get("class_names", ("Negative", "Positive"))), stored[1]


def stored_preprocessing(ckpt: dict[str, Any], where: str | Path) -> tuple[Preprocessing, float] | None:
    """Any model file's (classifier or segmentation) stored preprocessing and threshold, checked; ``None`` when
    it stores no preprocessing (a training ``.ckpt``: the network must be built)."""
    if not isinstance(ckpt.get("preprocessing"), dict):
        return None
    try:
        pre = Preprocessing.from_dict(ckpt["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: its stored preprocessing is damaged ({exc.__class__.__name__})") from None
    if not in_range(pre.size, IMAGE_SIZE):
        raise CheckpointError(f"{where}: stored input size {pre.size!r} is not {IMAGE_SIZE[0]}-{IMAGE_SIZE[1]}")
    threshold = ckpt["state_dict"].get("threshold")
    if not isinstance(threshold, torch.Tensor) or threshold.numel() != 1:
        raise CheckpointError(f"{where}: no decision threshold stored")
    return pre, threshold.item()


def model_from(ckpt: dict[str, Any], path: str | Path, device: str | torch.device = "cpu",
               trainable: bool = False) -> "CrackNet":
    """:func:`load_model` of a checkpoint already read (:func:`read_checkpoint`)."""
    from crack_lightning.models.network import CrackNet

    hp = dict(ckpt["hyper_parameters"])
    kwargs = check_hparams(hp, path)
    try:
        if trainable:
            from crack_lightning.models.classifier import CrackClassifier

            model = CrackClassifier(**kwargs)
        else:
            model = CrackNet(**kwargs)
    except WeightsError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    sd = float_weights(ckpt["state_dict"])
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    wrong = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    unexpected = [k for k in sd if k not in own]
    if missing or wrong or unexpected:
        raise CheckpointError(
            f"{path} does not match architecture {kwargs.get('backbone')}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} wrongly shaped tensors (e.g. {(missing + wrong + unexpected)[:2]})"
        )
    model.load_state_dict(sd)
    model.on_load_checkpoint(ckpt)  # the stored preprocessing
    model.meta = {k: ckpt.get(k) for k in ("metrics", "format", "site_anchors") if k in ckpt}
    return model.eval().to(device)


def save_release(model: nn.Module, path: str | Path, metrics: dict | None = None, half: bool = True,
                 anchors: dict | None = None, task: str = "classify") -> None:
    """Write the slim release checkpoint (fp16 weights, hparams, threshold, preprocessing, metrics, and the
    training anchors that ``--calibrate-site`` refits the head against: ``anchors``, else the model's own)."""
    from crack_lightning.files import atomic_write

    sd = {k: (v.half() if half and v.is_floating_point() and k != "threshold" else v).detach().cpu().clone()
          for k, v in model.state_dict().items()}
    hp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.hparams).items()}
    hp.update(pretrained="none", weights_file=None)  # the file holds every weight: loading needs neither
    from importlib.metadata import version

    obj = {
        "format": RELEASE_FORMAT,
        "pytorch-lightning_version": version("lightning"),  # so that CrackClassifier.load_from_checkpoint reads it
        "hyper_parameters": hp,
        "state_dict": sd,
        "preprocessing": model.pre.to_dict(),
        "threshold": float(model.threshold),
        "metrics": metrics or {},
        "task": task,
    }
    anchors = anchors if anchors is not None else (getattr(model, "meta", None) or {}).get("site_anchors")
    if anchors:
        obj["site_anchors"] = anchors
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
