"""WiSE-FT: average fine-tuned weights with where fine-tuning started (``train.interpolate``)."""
from __future__ import annotations

import torch

from crack_lightning.config.schema import Config
from crack_lightning.errors import CheckpointError, WeightsError
from crack_lightning.models.checkpoint import float_weights, read_checkpoint
from crack_lightning.models.network import CrackNet


def interpolate(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * tuned``, tensor by tensor (WiSE-FT, Wortsman et al. 2022).

    Fine-tuning on a few new sites moves the weights away from what the start model knew; the
    average of the two ends gives back some of the new sites' gains for some of what the start
    knew (the trade is measured in docs/field.md). Both must be the same
    architecture and fine-tuning must have started from ``start`` (one loss basin): averaging
    two unrelated models does not work. Integer tensors (BatchNorm's batch counters) and the
    decision threshold come from ``tuned`` (the threshold is chosen again on validation).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if start.keys() != tuned.keys() or any(start[k].shape != tuned[k].shape for k in tuned):
        raise WeightsError("cannot interpolate two models of different architectures")
    return {k: torch.lerp(start[k].to(v.dtype), v, alpha) if v.is_floating_point() and k != "threshold" else v.clone()
            for k, v in tuned.items()}


def started_from(cfg: Config, model: CrackNet) -> dict[str, torch.Tensor] | None:
    """The whole crack classifier in ``model.weights_file`` when the run started from one (e.g. the
    released model), head included; ``None`` for other weights files (ImageNet backbones).

    It is the better partner for ``train.interpolate`` than the frozen stage's result: its head
    knows its own domain, and the average keeps it (field fold, docs/field.md: Mendeley validation
    accuracy 0.998 against 0.984 with the frozen-stage head)."""
    if not cfg.model.weights_file:
        return None
    try:
        sd = read_checkpoint(cfg.model.weights_file)["state_dict"]
    except CheckpointError:
        return None
    own = model.state_dict()
    if sd.keys() != own.keys() or any(sd[k].shape != own[k].shape for k in own):
        return None
    return float_weights(sd)
