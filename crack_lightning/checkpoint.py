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
from typing import Any

import torch

from .model import CrackClassifier
from .weights import WeightsError

RELEASE_FORMAT = "crack_lightning.release/1"
MODEL_ARGS = ("backbone", "drop_rate", "image_size", "class_names", "threshold_rule", "target_fpr")


class CheckpointError(ValueError):
    """A checkpoint that cannot (or must not) be loaded; the message says why."""


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
    if not isinstance(obj, dict) or "state_dict" not in obj or "hyper_parameters" not in obj:
        raise CheckpointError(f"{path} is not a crack_lightning checkpoint (no state_dict/hyper_parameters)")
    return obj


def load_model(path: str | Path, device: str | torch.device = "cpu") -> CrackClassifier:
    """Rebuild the model from a checkpoint (no pretrained download: the checkpoint has the weights)."""
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    kwargs = {k: hp[k] for k in MODEL_ARGS if k in hp}
    try:
        model = CrackClassifier(pretrained="none", **kwargs)
    except WeightsError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
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
    model.meta = {k: ckpt.get(k) for k in ("metrics", "format") if k in ckpt}
    return model.eval().to(device)


def save_release(model: CrackClassifier, path: str | Path, metrics: dict | None = None, half: bool = True) -> None:
    """Write the slim release checkpoint (fp16 weights, hparams, threshold, preprocessing, metrics)."""
    from .io import atomic_write

    sd = {k: (v.half() if half and v.is_floating_point() and k != "threshold" else v).detach().cpu().clone()
          for k, v in model.state_dict().items()}
    hp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.hparams).items()}
    hp.update(pretrained="none", weights_file=None)  # the file holds every weight: loading needs neither
    obj = {
        "format": RELEASE_FORMAT,
        "hyper_parameters": hp,
        "state_dict": sd,
        "preprocessing": model.pre.to_dict(),
        "threshold": float(model.threshold),
        "metrics": metrics or {},
    }
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
