"""Training anchors: the features of training tiles a release keeps, and the refit of the linear head on
them plus a site's crack-free tiles (what ``--calibrate-site`` runs)."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SITE_SHARE = 0.3  # the site's crack-free tiles weigh this much against all anchors together
SITE_L2 = 1e-3  # pull of the refitted head towards the trained one
ANCHORS = 2048  # training tiles whose features a release keeps for the head refit (fp16: 5 MB at 1280-d)


def pick_anchors(records: Sequence[Any], n: int = ANCHORS, seed: int = 0) -> list[Any]:
    """At most ``n`` records, equally many (as far as each has them) of every ``(source, label)``
    group: what the refitted head must keep getting right, every source and both classes alike."""
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for r in records:
        groups[(r.source, int(r.label))].append(r)
    rng = random.Random(seed)
    per = n // max(1, len(groups))
    chosen = []
    for key in sorted(groups):
        members = groups[key][:]
        rng.shuffle(members)
        chosen += members[:per]
    return chosen


def pack_anchors(features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a release file stores (``site_anchors``): fp16 features ``(N, D)`` and uint8 labels."""
    return {"features": features.detach().cpu().half(), "labels": labels.detach().cpu().to(torch.uint8)}


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The model's head if it is one linear layer (the refit fits exactly that); else None."""
    layers = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    return layers[0] if len(layers) == 1 else None


def anchor_accuracy(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    threshold: float) -> float:
    """The share of the anchors a linear head classifies right at ``threshold``."""
    p = torch.sigmoid((x @ weight.T + bias).squeeze(1))
    return round(float(((p >= threshold).float() == y).float().mean()), 4)


def refit_linear(weight: torch.Tensor, bias: torch.Tensor, anchors_x: torch.Tensor, anchors_y: torch.Tensor,
                 site_x: torch.Tensor, share: float = SITE_SHARE, l2: float = SITE_L2,
                 steps: int = 100, site_y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A logistic head fitted on the anchors (their labels) plus the site's features (label ``site_y``, by
    default 0: crack-free; together weighing ``share`` of the anchors), starting from and pulled towards
    ``weight``/``bias`` (L2 ``l2``); L-BFGS, deterministic. Returns the new ``weight``, ``bias``."""
    x = torch.cat([anchors_x.float(), site_x.float()])
    y = torch.cat([anchors_y.float(), torch.zeros(len(site_x)) if site_y is None else site_y.float()])
    w = torch.cat([torch.ones(len(anchors_x)), torch.full((len(site_x),), share * len(anchors_x) / max(1, len(site_x)))])
    w = w / w.sum()
    w0, b0 = weight.detach().float().cpu().clone(), bias.detach().float().cpu().clone()
    W, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (x @ W.T + b).squeeze(1)
        loss = (w * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum() + l2 * ((W - w0) ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()
